"""vtrlab.recon"""
