"""The mixed-precision graph (fp16 network, fp32 distance) on real fitted bundles, run by ONNX Runtime.

Tolerances, measured with this file's fixtures (2-core CPU VM, ONNX Runtime 1.32, CPU provider), as
max |mixed - fp32| / max |fp32| over the generated test sets (18 washer frames, 30 fabric images):
  PaDiM 128 px d=40: maps 7.9e-3, scores 2.5e-3; per-tile PaDiM 2x2 at 64 px: maps and scores 1.6e-3;
  PatchCore 128 px: maps 2.8e-3, scores 1.6e-3; autoencoder 64 px: maps 1.4e-5, scores 1.2e-5.
The limits below leave about 2.5x headroom over the worst of these.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edge_inspector.backends import create_backend
from edge_inspector.backends.tensorrt.engines import MIXED_GRAPH, max_relative_difference
from edge_inspector.core.bundle import Bundle
from edge_inspector.core.errors import BundleError
from edge_inspector.core.images import list_images, read_image, resize_to
from export.commands.tensorrt import check_graph
from export.mixed_precision import (
    DISTANCE_SCOPES,
    check_distance_fp32,
    node_float_types,
    source_sha256,
    to_mixed_precision,
    write_mixed_graph,
)

MAP_TOLERANCE = 2e-2
SCORE_TOLERANCE = 1e-2
BORDERLINE = 0.02  # a verdict may differ only for scores this close (relative) to the threshold
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def patchcore_bundle(synthetic_dataset, tmp_path_factory) -> Bundle:
    from export.patchcore import PatchcoreOptions, fit_patchcore

    options = PatchcoreOptions(input_size=(128, 128), folds=3, target_false_reject_rate=0.05, bank_fraction=0.1,
                               seed=1)
    return fit_patchcore(synthetic_dataset / "train" / "good", tmp_path_factory.mktemp("pc") / "washer", options)


@pytest.fixture(scope="module")
def per_tile_bundle(synthetic_dataset, tmp_path_factory) -> Bundle:
    from export.padim.fit import PadimOptions, fit_padim

    options = PadimOptions(input_size=(64, 64), feature_dim=16, folds=2, rows=2, cols=2, tile_mode="per_tile",
                           seed=1)
    return fit_padim(synthetic_dataset / "train" / "good", tmp_path_factory.mktemp("pt") / "washer", options)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory) -> Path:
    from export.textures import write_texture_dataset

    return write_texture_dataset(tmp_path_factory.mktemp("tex"), "fabric", train=30, test_good=12,
                                 test_per_defect=6, size=128, seed=0)


@pytest.fixture(scope="module")
def ae_bundle(fabric, tmp_path_factory) -> Bundle:
    from export.autoencoder.config import config_from_dict
    from export.autoencoder.training import train_autoencoder

    config = config_from_dict(dict(train_folder=str(fabric / "train" / "good"), input_size=64, epochs=2,
                                   patience=6, seed=0, device="cpu", ssim_weight=0.5), "test")
    return train_autoencoder(config, "ae", tmp_path_factory.mktemp("ae") / "fabric")


def _test_images(folder: Path, bundle: Bundle) -> np.ndarray:
    """The test set as the service feeds it: whole frames tiled as trained, else resized frames."""
    paths = list_images(folder / "test")
    tiler = bundle.meta.tiling.tiler(bundle.input_size)
    if tiler is not None:
        return np.concatenate([tiler.split(resize_to(read_image(p), (128, 128))) for p in paths])
    return np.stack([resize_to(read_image(p), bundle.input_size) for p in paths])


def _run(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"image": images})
    return maps, scores


def _bundle(request, name: str) -> Bundle:
    return request.getfixturevalue(name)


CASES = [("small_padim_bundle", "synthetic_dataset"), ("per_tile_bundle", "synthetic_dataset"),
         ("patchcore_bundle", "synthetic_dataset"), ("ae_bundle", "fabric")]


@pytest.mark.parametrize("bundle_name, data_name", CASES)
def test_mixed_graph_scores_agree_with_fp32(request, tmp_path, bundle_name, data_name):
    bundle, data = _bundle(request, bundle_name), request.getfixturevalue(data_name)
    mixed = tmp_path / "mixed.onnx"
    report = write_mixed_graph(bundle.onnx_path, mixed)
    assert report.fp16_nodes > 20 and report.casts_to_fp16 >= 1 and report.casts_to_fp32 >= 1
    images = _test_images(data, bundle)
    want_maps, want_scores = _run(bundle.onnx_path, images)
    got_maps, got_scores = _run(mixed, images)
    assert got_maps.dtype == np.float32 and got_scores.dtype == np.float32
    assert max_relative_difference(got_maps, want_maps) <= MAP_TOLERANCE
    assert max_relative_difference(got_scores, want_scores) <= SCORE_TOLERANCE
    ours, theirs = got_scores / bundle.threshold, want_scores / bundle.threshold
    flipped = (ours > 1.0) != (theirs > 1.0)
    assert not (flipped & (np.abs(theirs - 1.0) > BORDERLINE)).any()
    assert max_relative_difference(got_maps, want_maps) > 0.0  # the network really ran in fp16


@pytest.mark.parametrize("bundle_name", ["small_padim_bundle", "patchcore_bundle", "ae_bundle"])
def test_distance_and_everything_after_is_fp32_on_the_graph(request, bundle_name):
    bundle = _bundle(request, bundle_name)
    mixed, _ = to_mixed_precision(onnx.load(str(bundle.onnx_path)))
    rows = node_float_types(mixed)
    names = [name for name, _, _ in rows]
    first_distance = min(i for i, name in enumerate(names) if any(f"/{s}/" in name for s in DISTANCE_SCOPES))
    convs = [types for _, op, types in rows if op in ("Conv", "ConvTranspose")]
    assert convs and all(types == {FLOAT16} for types in convs)  # the whole network runs in fp16
    after = rows[first_distance:]
    assert all(FLOAT16 not in types for name, _, types in after if not name.endswith("/to_fp32"))
    assert any(op == "MatMul" and types == {FLOAT} for _, op, types in after)  # distance or blur MatMul, fp32
    # The preprocessing before the first convolution stays fp32 (the autoencoder compares against it).
    first_conv = next(i for i, (_, op, _) in enumerate(rows) if op in ("Conv", "ConvTranspose"))
    assert all(FLOAT16 not in types for name, _, types in rows[:first_conv] if not name.endswith("/to_fp16"))
    check_distance_fp32(mixed)
    graph_outputs = {o.name: o.type.tensor_type.elem_type for o in mixed.graph.output}
    assert graph_outputs == {"anomaly_map": FLOAT, "score": FLOAT}


def test_mixed_graph_passes_the_tensorrt_graph_check(small_padim_bundle, tmp_path):
    mixed = tmp_path / "mixed.onnx"
    write_mixed_graph(small_padim_bundle.onnx_path, mixed)
    result = check_graph(mixed)
    assert result.errors == []
    assert source_sha256(mixed) == small_padim_bundle.sha256


def test_graph_without_a_distance_scope_is_refused(small_padim_bundle):
    model = onnx.load(str(small_padim_bundle.onnx_path))
    for node in model.graph.node:
        node.name = node.name.replace("/mahalanobis/", "/something/")
    with pytest.raises(BundleError, match="no distance node") as info:
        to_mixed_precision(model)
    assert "\n" not in str(info.value)


def test_unknown_operator_in_the_fp16_part_is_refused(small_padim_bundle):
    model = onnx.load(str(small_padim_bundle.onnx_path))
    clip = next(n for n in model.graph.node if n.op_type == "Clip" and "/backbone/" in n.name)
    index = list(model.graph.node).index(clip)
    out = clip.output[0]
    clip.output[0] = out + "_pre"
    model.graph.node.insert(index + 1, helper.make_node("Softsign", [out + "_pre"], [out], name="/features/Odd"))
    with pytest.raises(BundleError, match="Softsign node '/features/Odd'"):
        to_mixed_precision(model)


def test_constant_beyond_fp16_range_is_refused(small_padim_bundle):
    model = onnx.load(str(small_padim_bundle.onnx_path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] = 1e6
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    with pytest.raises(BundleError, match="beyond fp16"):
        to_mixed_precision(model)


def test_graph_only_writes_and_records_the_mixed_graph(small_padim_bundle, tmp_path):
    from export.cli import main

    folder = tmp_path / "bundle"
    shutil.copytree(small_padim_bundle.path, folder)
    before = Bundle.load(folder)
    result = CliRunner().invoke(main, ["tensorrt", str(folder), "--graph-only"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    after = Bundle.load(folder)  # verified: the new file's sha256 is recorded
    assert MIXED_GRAPH in after.meta.files and after.model_id == before.model_id  # engines/ leaves the id alone
    again = CliRunner().invoke(main, ["tensorrt", str(folder), "--graph-only"])
    assert again.exit_code == 0 and "already current" in again.output
    maps = create_backend(after, "onnxruntime").infer(np.zeros((1, 128, 128, 3), np.uint8)).anomaly_maps
    got, _ = _run(folder / MIXED_GRAPH, np.zeros((1, 128, 128, 3), np.uint8))
    assert max_relative_difference(got, maps) <= MAP_TOLERANCE


def test_stale_mixed_graph_is_made_again_and_its_engines_dropped(small_padim_bundle, tmp_path):
    """A mixed graph made from another model.onnx is rewritten, and fp16 engines built from it are forgotten."""
    from edge_inspector.backends.tensorrt.engines import DeviceInfo, engine_filename
    from export.cli import main
    from export.mixed_precision import SOURCE_KEY

    folder = tmp_path / "bundle"
    shutil.copytree(small_padim_bundle.path, folder)
    assert CliRunner().invoke(main, ["tensorrt", str(folder), "--graph-only"]).exit_code == 0
    stale = onnx.load(str(folder / MIXED_GRAPH))
    next(p for p in stale.metadata_props if p.key == SOURCE_KEY).value = "0" * 64
    onnx.save(stale, str(folder / MIXED_GRAPH))
    device = DeviceInfo("Orin", (8, 7), "10.3.0")
    bundle = Bundle.load(folder, verify=False)
    bundle.add_file(MIXED_GRAPH)
    for precision in ("fp16", "fp32"):
        rel = f"engines/{engine_filename(device, precision)}"
        (folder / rel).write_bytes(b"engine")
        bundle.add_file(rel)
    result = CliRunner().invoke(main, ["tensorrt", str(folder), "--graph-only"])
    assert result.exit_code == 0 and "written" in result.output, result.output
    after = Bundle.load(folder)  # every remaining entry verifies
    assert source_sha256(folder / MIXED_GRAPH) == after.sha256
    assert f"engines/{engine_filename(device, 'fp32')}" in after.meta.files
    assert f"engines/{engine_filename(device, 'fp16')}" not in after.meta.files
    assert not (folder / "engines" / engine_filename(device, "fp16")).exists()
