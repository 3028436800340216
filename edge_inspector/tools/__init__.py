"""Offline and operator tools."""
