"""``python -m vtrlab.organism ARGS`` = ``vtrlab organism ARGS``: the one organism CLI (train, eval,
realism, card, random). The modules themselves have no entry points of their own."""

from vtrlab.organism.cli import app

app()
