"""vtrlab.runner"""
