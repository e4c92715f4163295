"""One module per reduction method; each registers itself with :func:`vtrlab.reduce.registry.register`.

Modules here are imported on first use of the registry (``names()`` / ``get()``).
"""
