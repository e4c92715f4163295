"""One module per VLM family; each registers its adapter with ``vtrlab.models.registry.register``."""
