"""vtrlab.flow"""
