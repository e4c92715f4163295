"""One module per family: its tiny random-weight builder, full-size shapes and layout-proof spec, each
registered with ``vtrlab.testing.registry`` (imported on the first lookup)."""
