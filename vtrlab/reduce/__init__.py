"""vtrlab.reduce"""
