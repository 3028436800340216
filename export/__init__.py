"""Workstation side of edge-inspector: fit/train models with torch and export them as model bundles."""
