"""vtrlab.organism"""
