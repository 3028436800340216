"""AE/VAE: config checks, ONNX == torch, training on generated textures, resume, bad input, bundle use.

Every model here is really trained (on CPU, seconds) and really exported; the bundles are loaded with
`Bundle.load` and run by the ONNX Runtime backend the edge service uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import BUNDLE_FILE, Bundle
from edge_inspector.core.errors import ConfigError, DataError
from edge_inspector.core.images import read_image, read_mask, resize_to
from edge_inspector.core.tiling import Tiler
from edge_inspector.tools.labels import discover_labels
from edge_inspector.tools.metrics import image_auroc, pixel_auroc
from edge_inspector.tools.replay import replay_folder
from export.autoencoder import training as ae_training
from export.autoencoder.config import TrainConfig, config_from_dict, load_train_config
from export.autoencoder.model import Architecture, ConvAutoencoder, ReconstructionGraph
from export.autoencoder.training import TrainingError, checkpoint_folder, train_autoencoder
from export.onnx_export import export_onnx, onnx_reference_check
from export.textures import DEFECTS, make_texture, write_texture_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _config(folder: Path, **overrides) -> TrainConfig:
    # threshold_folds 0 (the hold-out): these tests are about training, tiling and resume, and one model each
    # keeps them fast; the k-fold threshold is tests/test_ae_folds.py.
    values = dict(train_folder=str(folder), input_size=32, depth=2, base_channels=8, latent_channels=4,
                  epochs=3, batch_size=8, patience=5, seed=0, device="cpu", threshold_folds=0)
    values.update(overrides)
    return config_from_dict(values, "test")


def _write_images(folder: Path, count: int, size: int = 32, seed: int = 0, texture: str = "grain") -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:03d}.png"), make_texture(rng, size, texture)[0])
    return folder


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

def test_example_config_loads():
    config = load_train_config(ROOT / "configs" / "train_ae.yaml")
    assert config.train_folder.name == "good"
    assert config.input_size == (256, 256) and config.rows == 1 and config.cols == 1
    assert isinstance(config.lr, float) and config.epochs >= 1 and config.out is not None


@pytest.mark.parametrize("entry, key", [
    ({"ephocs": 3}, "ephocs"),
    ({"epochs": "many"}, "epochs"),
    ({"lr": True}, "lr"),
    ({"input_size": [256]}, "input_size"),
    ({"input_size": 100}, "input_size"),  # not a multiple of 2**depth
    ({"val_fraction": 1.5}, "val_fraction"),
    ({"device": "tpu"}, "device"),
    ({"patch_size": 64, "rows": 2}, "patch_size"),
    ({"use_f1_threshold": True}, "use_f1_threshold"),
    ({"stride": [8, 8]}, "stride"),
    ({"roi": [0, 0, 10]}, "roi"),
])
def test_config_errors_name_the_key(tmp_path, entry, key):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train_folder": "good", **entry}))
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    message = str(err.value)
    assert key in message and str(path) in message and "\n" not in message


def test_config_paths_resolve_from_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "train.yaml"
    path.write_text("train_folder: ../images\nout: bundles/x\n")
    config = load_train_config(path)
    assert config.train_folder == tmp_path / "sub" / "../images"
    assert config.out == tmp_path / "sub" / "bundles/x"


# --------------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, ssim_weight", [("ae", 0.0), ("vae", 0.5)])
def test_onnx_runtime_matches_torch(tmp_path, kind, ssim_weight):
    torch.manual_seed(1)
    net = ConvAutoencoder(Architecture(kind, base_channels=8, depth=3, latent_channels=4))
    for module in net.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    graph = ReconstructionGraph(net, (48, 64), ssim_weight=ssim_weight, blur_sigma=2.0).eval()
    path = export_onnx(graph, tmp_path, (48, 64))
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    assert onnx_reference_check(graph, path, images) <= 1e-3

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"image": images[:1]})  # dynamic batch
    with torch.no_grad():
        ref_maps, ref_scores = graph(torch.from_numpy(images[:1]))
    assert maps.shape == (1, 48, 64) and scores.shape == (1,)
    np.testing.assert_allclose(maps, ref_maps.numpy(), rtol=1e-3, atol=1e-3 * float(ref_maps.abs().max()))
    np.testing.assert_allclose(scores, maps.reshape(1, -1).max(axis=1), rtol=1e-6)


def test_error_map_is_zero_for_a_perfect_reconstruction():
    """The map measures reconstruction error: an identity 'model' must score 0 everywhere, SSIM term included."""
    class Identity(ConvAutoencoder):
        def reconstruct(self, x):
            return x

    graph = ReconstructionGraph(Identity(Architecture(depth=2)), (32, 32), ssim_weight=1.0, blur_sigma=1.0).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    maps, scores = graph(images)
    assert float(maps.abs().max()) < 1e-4 and float(scores.max()) < 1e-4


# --------------------------------------------------------------------------------------------------
# Training on generated textures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fabric(tmp_path_factory) -> Path:
    return write_texture_dataset(tmp_path_factory.mktemp("textures"), "fabric", train=30, test_good=12,
                                 test_per_defect=6, size=128, seed=0)


@pytest.fixture(scope="module")
def fabric_ae(fabric, tmp_path_factory) -> Bundle:
    config = config_from_dict(dict(train_folder=str(fabric / "train" / "good"), input_size=128, epochs=6,
                                   patience=6, seed=0, device="cpu", threshold_folds=0,
                                   defects_folder=str(fabric / "test" / "scratch")), "test")
    return train_autoencoder(config, "ae", tmp_path_factory.mktemp("bundles") / "fabric_ae")


def _score_test_set(bundle: Bundle, category: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    items = discover_labels(category)
    images = np.stack([resize_to(read_image(item.path), bundle.input_size) for item in items])
    result = create_backend(bundle, "onnxruntime", threads=2).infer(images)
    labels = np.array([item.label for item in items])
    masks = np.stack([read_mask(item.mask_path, bundle.input_size) if item.mask_path
                      else np.zeros(bundle.input_size, bool) for item in items])
    return result.scores, labels, result.anomaly_maps, masks


@pytest.mark.slow
def test_ae_separates_defective_textures(fabric, fabric_ae):
    scores, labels, maps, masks = _score_test_set(fabric_ae, fabric)
    assert image_auroc(scores, labels) >= 0.9
    assert pixel_auroc(maps, masks) >= 0.9
    # Every defect kind on its own, so a model that only catches one kind cannot pass.
    kinds = np.array([item.defect_type for item in discover_labels(fabric)])
    for kind in DEFECTS:
        pick = (kinds == "good") | (kinds == kind)
        assert image_auroc(scores[pick], labels[pick]) >= 0.9, kind


@pytest.mark.slow
def test_ae_bundle_is_a_normal_bundle(fabric, fabric_ae):
    bundle = Bundle.load(fabric_ae.path)  # sha256 verified
    meta = yaml.safe_load((bundle.path / BUNDLE_FILE).read_text())
    assert meta["model_kind"] == "ae" and meta["input_size"] == [128, 128]
    assert bundle.meta.tiling.rows == 1 and bundle.meta.tiling.cols == 1
    assert bundle.meta.threshold.rule == "conformal_false_reject_rate"
    assert bundle.meta.threshold.f1_optimal_value is not None  # defects_folder given
    assert bundle.meta.score_stats.count == 6  # threshold_folds 0: 20% of 30 good images held out
    assert bundle.meta.score_stats.max < bundle.threshold  # no held-out good frame rejected
    assert not checkpoint_folder(bundle.path).exists()  # removed after a finished run
    good = np.stack([read_image(p) for p in sorted((fabric / "test" / "good").iterdir())])
    result = create_backend(bundle, "onnxruntime").infer(good)
    assert result.anomaly_maps.shape == (len(good), 128, 128) and result.anomaly_maps.dtype == np.float32
    assert result.scores.shape == (len(good),)
    assert np.median([bundle.normalise(s) for s in result.scores]) < 1.0
    report = replay_folder(fabric, bundle, create_backend(bundle, "onnxruntime")).report  # labelled MVTec layout
    assert report.image_auroc >= 0.9 and report.pixel_auroc >= 0.9
    assert report.confusion.recall >= 0.5  # the bundle's own threshold catches defects, not just the ranking


@pytest.mark.slow
def test_vae_trains_and_separates_defects(fabric, tmp_path):
    config = config_from_dict(dict(train_folder=str(fabric / "train" / "good"), input_size=128, epochs=6,
                                   patience=6, seed=0, device="cpu", ssim_weight=0.2, threshold_folds=0), "test")
    bundle = train_autoencoder(config, "vae", tmp_path / "fabric_vae")
    assert Bundle.load(bundle.path).meta.model_kind == "vae"
    assert bundle.meta.model_params["kl_weight"] > 0 and bundle.meta.model_params["ssim_weight"] == 0.2
    assert bundle.meta.map_blur_sigma == 4.0  # the graph's blur, so the service sends the map at its detail
    scores, labels, _, _ = _score_test_set(bundle, fabric)
    assert image_auroc(scores, labels) >= 0.9


def test_patches_come_from_the_service_tiler(tmp_path):
    """patch_size 32 on 64x64 frames is a 2x2 grid; training patches equal Tiler.split of each frame."""
    folder = _write_images(tmp_path / "good", 10, size=64)
    config = _config(folder, patch_size=32, input_size=None)
    data = ae_training.load_patches(config)
    assert (data.grid.tiling.rows, data.grid.tiling.cols, data.grid.input_size) == (2, 2, (32, 32))
    tiler = Tiler(2, 2, (32, 32))
    np.testing.assert_array_equal(data.patches[3], tiler.split(read_image(data.paths[3])))
    bundle = train_autoencoder(config, "ae", tmp_path / "tiled")
    assert (bundle.meta.tiling.rows, bundle.meta.tiling.cols, bundle.meta.tiling.mode) == (2, 2, "shared")
    assert bundle.input_size == (32, 32)
    # Replay (the service's tiling and ONNX Runtime) scores the held-out frames as training did.
    summary = replay_folder(folder, bundle, create_backend(bundle, "onnxruntime"))
    _, val_idx = ae_training.split_frames(10, config.val_fraction, config.seed, "test")
    held_out = [summary.rows[i].score for i in val_idx]
    assert max(held_out) == pytest.approx(bundle.meta.score_stats.max, rel=1e-3)
    assert min(held_out) == pytest.approx(bundle.meta.score_stats.min, rel=1e-3)


def test_service_tiling_options_reach_the_bundle(tmp_path):
    """Overlapping tiles inside an ROI, as the service's tiling section allows, are trained and recorded."""
    folder = _write_images(tmp_path / "good", 10, size=64)
    config = _config(folder, rows=2, cols=2, tile_size=[24, 24], roi=[8, 8, 40, 40], input_size=32)
    data = ae_training.load_patches(config)
    tiler = Tiler(2, 2, (32, 32), tile_size=(24, 24), roi=(8, 8, 40, 40))
    np.testing.assert_array_equal(data.patches[0], tiler.split(read_image(data.paths[0])))
    bundle = train_autoencoder(config, "ae", tmp_path / "roi")
    tiling = bundle.meta.tiling
    assert (tiling.rows, tiling.cols, tiling.tile_size, tiling.roi) == (2, 2, [24, 24], [8, 8, 40, 40])
    assert tiling.tiler(bundle.input_size).boxes((64, 64, 3)) == tiler.boxes((64, 64, 3))


def test_f1_threshold_can_be_the_decision_rule(tmp_path):
    good = _write_images(tmp_path / "good", 10)
    rng = np.random.default_rng(5)
    import cv2

    (tmp_path / "bad").mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "bad" / f"{i}.png"), make_texture(rng, 32, "grain", "missing")[0])
    bundle = train_autoencoder(_config(good, defects_folder=str(tmp_path / "bad"), use_f1_threshold=True),
                               "ae", tmp_path / "f1")
    info = bundle.meta.threshold
    assert info.rule == "f1_optimal" and info.value == pytest.approx(info.f1_optimal_value)
    assert info.conformal_value is not None and info.conformal_value != info.value


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------

def test_resume_continues_an_interrupted_run_exactly(tmp_path, monkeypatch):
    folder = _write_images(tmp_path / "good", 12)
    config = _config(folder, epochs=4)
    reference = train_autoencoder(config, "ae", tmp_path / "reference")

    original = ae_training.Trainer.train_epoch
    def interrupt_third(self, patches, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, patches, epoch)

    monkeypatch.setattr(ae_training.Trainer, "train_epoch", interrupt_third)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(config, "ae", out)
    assert not out.exists() and (checkpoint_folder(out) / "last.pt").is_file()
    monkeypatch.setattr(ae_training.Trainer, "train_epoch", original)

    changed = dataclasses.replace(config, lr=config.lr / 2)
    with pytest.raises(ConfigError, match="lr"):
        train_autoencoder(changed, "ae", out, resume=True)

    resumed = train_autoencoder(config, "ae", out, resume=True)
    assert resumed.meta.model_params["epochs_run"] == 4
    assert resumed.meta.model_params["best_validation_error"] == pytest.approx(
        reference.meta.model_params["best_validation_error"], rel=1e-5)
    assert resumed.threshold == pytest.approx(reference.threshold, rel=1e-4)
    assert not checkpoint_folder(out).exists()


# --------------------------------------------------------------------------------------------------
# Bad input: one-line errors, nothing half-written
# --------------------------------------------------------------------------------------------------

def test_patch_size_that_does_not_fit_the_frames(tmp_path):
    folder = _write_images(tmp_path / "good", 6, size=48)
    with pytest.raises(ConfigError, match=r"patch_size: 32x32 does not fit the 48x48") as err:
        train_autoencoder(_config(folder, patch_size=32, input_size=None), "ae", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="patch_size"):
        train_autoencoder(_config(folder, patch_size=64, input_size=None), "ae", tmp_path / "out")
    with pytest.raises(ConfigError, match="tile_size") as err:  # the service's tiling rules, same message
        train_autoencoder(_config(folder, rows=2, tile_size=[64, 64]), "ae", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_too_few_images_for_a_validation_split(tmp_path):
    folder = _write_images(tmp_path / "good", 4)
    with pytest.raises(DataError, match=r"4 good images give 3 training and 1 validation") as err:
        train_autoencoder(_config(folder), "ae", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_nan_loss_is_one_line_and_leaves_no_bundle(tmp_path):
    folder = _write_images(tmp_path / "good", 10)
    out = tmp_path / "bundles" / "diverged"
    out.parent.mkdir()
    with pytest.raises(TrainingError, match=r"training diverged: (loss|validation error) became (nan|inf)") as err:
        train_autoencoder(_config(folder, lr=1e30, epochs=5), "ae", out)
    assert "\n" not in str(err.value) and "lower lr" in str(err.value)
    assert not out.exists() and _leftovers(out.parent, out.name) == []


def test_failed_export_leaves_the_previous_bundle_intact(tmp_path, monkeypatch):
    folder = _write_images(tmp_path / "good", 10)
    out = tmp_path / "bundle"
    first = train_autoencoder(_config(folder, epochs=1), "ae", out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ae_training, "onnx_reference_check", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train_autoencoder(_config(folder, epochs=1, seed=3), "ae", out)
    assert Bundle.load(out).sha256 == first.sha256 and _leftovers(tmp_path, "bundle") == []


def test_cli_train_and_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from export.cli import main

    _write_images(tmp_path / "good", 10)  # train_folder "good" is relative to the config file
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(dict(train_folder="good", input_size=32, depth=2, base_channels=8,
                                          latent_channels=4, epochs=2, device="cpu")))
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--model", "vae", "--config", str(config), "--out",
                                  str(tmp_path / "vae")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and Bundle.load(tmp_path / "vae").meta.model_kind == "vae"

    result = runner.invoke(main, ["train", "--model", "ae", "--config", str(config)])
    assert result.exit_code == 2 and "out: no bundle folder given" in result.output

    config.write_text("train_folder: good\nbatch: 4\n")
    result = runner.invoke(main, ["train", "--model", "ae", "--config", str(config), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "batch: unknown key" in result.output


# --------------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# --------------------------------------------------------------------------------------------------

BOTTLE = SHARED_DATA / "mvtec" / "bottle"


@pytest.mark.slow
@pytest.mark.mvtec
@pytest.mark.skipif(not BOTTLE.is_dir(), reason="../shared/data/mvtec/bottle not present")
def test_ae_on_mvtec_bottle(tmp_path):
    """A short CPU run on the real bottle images (measured: image 0.986, pixel 0.885; benchmarks/ae_bench.py)."""
    config = config_from_dict(dict(train_folder=str(BOTTLE / "train" / "good"), input_size=128, epochs=15,
                                   patience=15, seed=0, device="cpu", threshold_folds=0), "test")
    bundle = train_autoencoder(config, "ae", tmp_path / "bottle_ae")
    scores, labels, maps, masks = _score_test_set(bundle, BOTTLE)
    assert image_auroc(scores, labels) >= 0.9
    assert pixel_auroc(maps, masks) >= 0.8
