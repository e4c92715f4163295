"""vtrlab.metrics"""
