"""The autoencoder's k-fold threshold: every good image scored by a model that never saw it.

Every model here is really trained (tiny 32x32 generated textures, one or two epochs: seconds on CPU) and
really exported; bundles are loaded with `Bundle.load` and run by the ONNX Runtime backend the service uses.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.images import read_image
from edge_inspector.tools.replay import replay_folder
from export.autoencoder import training as ae_training
from export.autoencoder.config import TrainConfig, config_from_dict, load_train_config
from export.autoencoder.folds import STORE_NAME, cross_fit_scores, fold_ids, fold_seed, resolve_folds
from export.autoencoder.training import checkpoint_folder, split_frames, train_autoencoder
from export.cli import main
from export.textures import make_texture


def _images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:03d}.png"), make_texture(rng, 32, "grain")[0])
    return folder


def _config(folder: Path, **overrides) -> TrainConfig:
    values = dict(train_folder=str(folder), input_size=32, depth=2, base_channels=8, latent_channels=4,
                  epochs=2, batch_size=16, patience=5, seed=0, device="cpu")
    values.update(overrides)
    return config_from_dict(values, "test")


# --------------------------------------------------------------------------------------------------
# The fold plan (no training)
# --------------------------------------------------------------------------------------------------

def test_folds_partition_the_images_for_a_seed():
    ids = fold_ids(23, 5, seed=0)
    assert sorted(np.bincount(ids).tolist()) == [4, 4, 5, 5, 5]  # sizes differ by at most one
    np.testing.assert_array_equal(ids, fold_ids(23, 5, seed=0))
    assert not np.array_equal(ids, fold_ids(23, 5, seed=1))
    assert len({fold_seed(0, j) for j in range(5)}) == 5 and fold_seed(0, 2) == fold_seed(0, 2) != fold_seed(1, 2)

    calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def score_fold(fold, train, scored):
        calls.append((fold, train, scored))
        return scored * 10.0  # a score that names the image, to check each lands in its place

    scores = cross_fit_scores(23, 5, 0, score_fold)
    np.testing.assert_array_equal(scores, np.arange(23) * 10.0)
    assert [fold for fold, _, _ in calls] == [0, 1, 2, 3, 4]
    for _, train, scored in calls:  # a fold model never trains on what it scores, and trains on all the rest
        assert not set(train) & set(scored) and sorted(set(train) | set(scored)) == list(range(23))


@pytest.mark.parametrize("requested, images, expected", [(0, 10, 0), (1, 10, 0), (2, 10, 2), (10, 10, 10)])
def test_fold_counts(requested, images, expected):
    assert resolve_folds(requested, images) == expected


@pytest.mark.parametrize("requested, images", [(-1, 10), (11, 10), (-3, None)])
def test_bad_fold_counts_are_one_line(requested, images):
    with pytest.raises(ConfigError, match=r"^--threshold-folds: expected 0 or 1 .* got -?\d+$") as err:
        resolve_folds(requested, images, "--threshold-folds")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Training: k-fold against the hold-out
# --------------------------------------------------------------------------------------------------

def test_kfold_certifies_where_the_hold_out_cannot(tmp_path):
    """200 good images and a 0.5% target (199 scores needed): the 40-image hold-out cannot certify it, 2 folds
    score all 200 and do; the bundle runs in ONNX Runtime and rejects (almost) none of its good images."""
    folder = _images(tmp_path / "good", 200)
    config = _config(folder, target_false_reject_rate=0.005)
    held = train_autoencoder(config, "ae", tmp_path / "held", threshold_folds=0)
    kfold = train_autoencoder(config, "ae", tmp_path / "kfold", threshold_folds=2)

    assert held.meta.score_stats.count == 40 and held.meta.training.folds == 0
    assert not held.meta.threshold.certified and "hold-out" in held.meta.threshold.note

    kfold = Bundle.load(kfold.path)  # sha256 verified
    info, params = kfold.meta.threshold, kfold.meta.model_params
    assert kfold.meta.score_stats.count == 200 and kfold.meta.training.folds == 2
    assert info.certified and info.rule == "conformal_false_reject_rate"
    assert "2-fold" in info.note and "200 good images" in info.note
    assert params["threshold_folds"] == 2 and params["fold_epochs"] == params["best_epoch"]
    # Same final model either way (same seed and split): only the threshold's scores differ.
    assert params["best_validation_error"] == held.meta.model_params["best_validation_error"]

    good = np.stack([read_image(p) for p in sorted(folder.iterdir())])
    scores = create_backend(kfold, "onnxruntime").infer(good).scores
    assert np.mean(scores > kfold.threshold) <= 0.01
    _, val_idx = split_frames(200, config.val_fraction, config.seed, "test")
    # ONNX Runtime reproduces the final model's median on its held-out frames, recorded beside the folds' median.
    assert np.median(scores[val_idx]) == pytest.approx(params["held_out_median_final"], rel=1e-3)


def test_fold_models_are_seeded_and_resume_redoes_only_unfinished_folds(tmp_path, monkeypatch):
    folder = _images(tmp_path / "good", 12)
    config = _config(folder, threshold_folds=3)
    reference = train_autoencoder(config, "ae", tmp_path / "reference")
    other_seed = train_autoencoder(_config(folder, threshold_folds=3, seed=1), "ae", tmp_path / "seed1")
    assert other_seed.meta.score_stats.mean != reference.meta.score_stats.mean

    original = ae_training.Trainer.train_epoch
    calls = []

    def interrupt_fold_two(self, patches, epoch):  # final model: calls 1-2, fold 1: 3-4, fold 2: 5-6
        calls.append(self.label)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, patches, epoch)

    monkeypatch.setattr(ae_training.Trainer, "train_epoch", interrupt_fold_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(config, "ae", out)
    assert calls[-1] == "fold 2/3 epoch" and not out.exists()
    assert (checkpoint_folder(out) / STORE_NAME).is_file()  # fold 1's scores kept

    calls.clear()
    resumed = train_autoencoder(config, "ae", out, resume=True)
    assert calls == ["fold 2/3 epoch"] * 2 + ["fold 3/3 epoch"] * 2  # final model and fold 1 not trained again
    assert resumed.meta.score_stats == reference.meta.score_stats  # every fold's scores, exactly
    assert resumed.threshold == reference.threshold and resumed.meta.training.folds == 3
    assert not checkpoint_folder(out).exists()


# --------------------------------------------------------------------------------------------------
# CLI and config
# --------------------------------------------------------------------------------------------------

def _write_config(tmp_path: Path, **extra) -> Path:
    _images(tmp_path / "good", 10)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dict(train_folder="good", input_size=32, depth=2, base_channels=8,
                                        latent_channels=4, epochs=1, device="cpu", **extra)))
    return path


def test_cli_default_folds_and_hold_out(tmp_path):
    config = _write_config(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--model", "ae", "--config", str(config), "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert "from 10 out-of-sample good scores (5-fold)" in result.output  # the default scores every image
    assert Bundle.load(tmp_path / "k").meta.training.folds == 5

    result = runner.invoke(main, ["train", "--model", "ae", "--config", str(config), "--out", str(tmp_path / "h"),
                                  "--threshold-folds", "0"])
    assert result.exit_code == 0, result.output
    assert "from 2 out-of-sample good scores (hold-out)" in result.output
    bundle = Bundle.load(tmp_path / "h")
    assert bundle.meta.training.folds == 0 and bundle.meta.model_params["threshold_folds"] == 0
    # As before folds existed: the scores are the shipped model's own on its 2 held-out frames.
    summary = replay_folder(tmp_path / "good", bundle, create_backend(bundle, "onnxruntime"))
    _, val_idx = split_frames(10, 0.2, 0, "test")
    held_out = sorted(summary.rows[i].score for i in val_idx)
    assert held_out == pytest.approx([bundle.meta.score_stats.min, bundle.meta.score_stats.max], rel=1e-3)


@pytest.mark.parametrize("value", ["-1", "11"])
def test_cli_bad_fold_count_is_one_line(tmp_path, value):
    config = _write_config(tmp_path)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["train", "--model", "ae", "--config", str(config), "--out", str(out),
                                       "--threshold-folds", value])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: --threshold-folds: expected 0 or 1") and f"got {value}" in result.output
    if value == "11":
        assert "the 10 good images" in result.output
    assert not out.exists() and not checkpoint_folder(out).exists()


def test_config_fold_count(tmp_path):
    config = _write_config(tmp_path, threshold_folds=-2)
    with pytest.raises(ConfigError, match="threshold_folds") as err:
        load_train_config(config)
    assert "\n" not in str(err.value) and str(config) in str(err.value)
    with pytest.raises(ConfigError, match=r"^threshold_folds: .* the 10 good images, got 12$"):
        train_autoencoder(_config(tmp_path / "good", threshold_folds=12), "ae", tmp_path / "out")
    assert not (tmp_path / "out").exists()
