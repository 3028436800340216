"""Memory-bank model kind (PatchCore-like): nearest-neighbour distance of each patch to a coreset of good
training patches, exported in the same bundle contract as PaDiM and the autoencoder."""

from export.patchcore.fit import PatchcoreOptions, fit_patchcore

__all__ = ["PatchcoreOptions", "fit_patchcore"]
