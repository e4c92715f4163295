"""vtrlab.capture"""
