"""Shared fixtures: a generated dataset and one small real PaDiM bundle fitted on it per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MVTEC_BOTTLE = SHARED_DATA / "mvtec" / "bottle"


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A washer category in MVTec layout at 128 px: 24 good training images, 6 good + 4 per defect to test."""
    from export.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data"), train=24, test_good=6, test_per_defect=4, size=128, seed=3)


@pytest.fixture(scope="session")
def small_padim_bundle(synthetic_dataset, tmp_path_factory):
    """A real fitted PaDiM bundle (Lite0, 128 px, d=40, 3 folds): small enough to fit in seconds."""
    from export.padim.fit import PadimOptions, fit_padim

    options = PadimOptions(input_size=(128, 128), feature_dim=40, folds=3, target_false_reject_rate=0.05, seed=1)
    return fit_padim(synthetic_dataset / "train" / "good", tmp_path_factory.mktemp("bundles") / "washer", options)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """The service tests' real PaDiM bundle (1x2 tiles of generated conveyor frames), fitted once a session."""
    from service_helpers import fitted_bundle

    return fitted_bundle(tmp_path_factory.getbasetemp())
