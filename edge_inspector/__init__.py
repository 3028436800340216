"""edge-inspector: the device runtime (no torch). Reads model bundles, runs them, publishes results."""

__version__ = "0.1.0"
