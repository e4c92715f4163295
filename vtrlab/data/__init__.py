"""vtrlab.data"""
