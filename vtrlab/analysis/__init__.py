"""Analyses: tidy tables built from captured signals (no I/O, no plotting)."""
