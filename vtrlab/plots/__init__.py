"""vtrlab.plots"""
