"""TensorRT path: engine naming/selection, batch split and profiles, the state-directory cache, fallbacks
without TensorRT, graph checks, and (on a GPU) engines built from real fitted bundles.

Tests that need TensorRT and a CUDA GPU skip cleanly elsewhere; everything else runs on every machine.
Parity tolerances (documented in docs/jetson.md), max |diff| / max |reference| on maps and scores:
  * fp32 engine (model.onnx, strongly typed, TF32 off) vs ONNX Runtime on model.onnx: <= 1e-3;
  * fp16 engine (engines/model.fp16.onnx) vs ONNX Runtime on the same mixed graph: <= 1e-2 (TensorRT picks
    other fp16 kernels than ONNX Runtime), and vs the fp32 graph: <= 2e-2 (test_mixed_precision's limit).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edge_inspector.backends import create_backend
from edge_inspector.backends.tensorrt.build import BuildOptions, frame_group, profile_batches, resolve_tiles
from edge_inspector.backends.tensorrt.engines import (
    MIXED_GRAPH,
    DeviceInfo,
    EngineSpec,
    default_precision,
    engine_filename,
    gpu_slug,
    graph_for,
    max_relative_difference,
    parse_engine_filename,
    read_cached_engine,
    save_cached_engine,
    select_engine,
    unrecorded_engines,
)
from edge_inspector.backends.tensorrt.runtime import check_profile, split_batches, unavailable_reason
from edge_inspector.core.bundle import Bundle, BundleMeta, ThresholdInfo, TilingInfo, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import BackendError, ConfigError
from export.commands.tensorrt import check_graph, options_from_cli
from export.synthetic import make_part

SIZE = 32
FP32_TOLERANCE = 1e-3
FP16_VS_MIXED_ONNX = 1e-2
FP16_VS_FP32 = 2e-2

# ------------------------------------------------------------------------------------------ fixtures


def _const(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array), name)


def make_contract_graph(path: Path, size: int = SIZE, cast_first: bool = True, seed: int = 0) -> Path:
    """A small real PaDiM-shaped graph in the bundle contract (uint8 NHWC BGR -> anomaly_map, score).

    It uses the op kinds of the real export (Cast from uint8, Transpose, Gather for BGR->RGB, Conv incl.
    depthwise, Clip as ReLU6, MaxPool, batched 3-D MatMul with a constant, ReduceSum, Sqrt, bilinear
    Resize, reflect Pad and a blur Conv, ReduceMax) so TensorRT builds of it exercise the same parser paths.
    `cast_first=False` reproduces the mistake TensorRT refuses (Transpose on the uint8 input).
    """
    rng = np.random.default_rng(seed)
    grid = size // 4
    positions, dim = grid * grid, 4
    inv = rng.normal(size=(positions, dim, dim)).astype(np.float32)
    inv = np.einsum("pij,pkj->pik", inv, inv) / dim + np.eye(dim, dtype=np.float32)  # SPD per position
    blur = cv2.getGaussianKernel(5, 1.0).astype(np.float32)
    inits = [
        _const("perm_rgb", np.array([2, 1, 0], np.int64)),
        _const("scale", np.full((1, 3, 1, 1), 1 / 58.0, np.float32)),
        _const("bias", np.full((1, 3, 1, 1), -2.0, np.float32)),
        _const("w1", rng.normal(scale=0.3, size=(4, 3, 3, 3)).astype(np.float32)),
        _const("b1", rng.normal(scale=0.1, size=(4,)).astype(np.float32)),
        _const("relu6_min", np.array(0.0, np.float32)), _const("relu6_max", np.array(6.0, np.float32)),
        _const("w_dw", rng.normal(scale=0.5, size=(4, 1, 3, 3)).astype(np.float32)),
        _const("mean", rng.normal(scale=0.2, size=(1, dim, grid, grid)).astype(np.float32)),
        _const("shape_flat", np.array([0, dim, positions], np.int64)),
        _const("axes_2", np.array([2], np.int64)),
        _const("inv_cov", inv),
        _const("axes_23", np.array([2, 3], np.int64)),
        _const("clamp_min", np.array(0.0, np.float32)),
        _const("shape_grid", np.array([0, 1, grid, grid], np.int64)),
        _const("roi", np.zeros(0, np.float32)),
        _const("scales", np.array([1, 1, 4, 4], np.float32)),
        _const("pads", np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64)),
        _const("w_blur", (blur @ blur.T).reshape(1, 1, 5, 5)),
        _const("shape_map", np.array([0, size, size], np.int64)),
    ]
    if cast_first:
        prep = [helper.make_node("Cast", ["image"], ["as_float"], to=TensorProto.FLOAT, name="pre/Cast"),
                helper.make_node("Transpose", ["as_float"], ["nchw"], perm=[0, 3, 1, 2], name="pre/Transpose")]
    else:
        prep = [helper.make_node("Transpose", ["image"], ["nchw_u8"], perm=[0, 3, 1, 2], name="pre/Transpose"),
                helper.make_node("Cast", ["nchw_u8"], ["nchw"], to=TensorProto.FLOAT, name="pre/Cast")]
    nodes = prep + [
        helper.make_node("Gather", ["nchw", "perm_rgb"], ["rgb"], axis=1, name="pre/Gather"),
        helper.make_node("Mul", ["rgb", "scale"], ["scaled"], name="pre/Mul"),
        helper.make_node("Add", ["scaled", "bias"], ["normed"], name="pre/Add"),
        helper.make_node("Conv", ["normed", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="bb/Conv"),
        helper.make_node("Clip", ["c1", "relu6_min", "relu6_max"], ["r1"], name="bb/Clip"),
        helper.make_node("Conv", ["r1", "w_dw"], ["c2"], pads=[1, 1, 1, 1], group=4, name="bb/ConvDw"),
        helper.make_node("Relu", ["c2"], ["r2"], name="bb/Relu"),
        helper.make_node("MaxPool", ["r2"], ["emb"], kernel_shape=[2, 2], strides=[2, 2], name="bb/MaxPool"),
        helper.make_node("Sub", ["emb", "mean"], ["diff"], name="mahalanobis/Sub"),
        helper.make_node("Reshape", ["diff", "shape_flat"], ["flat"], name="mahalanobis/Reshape"),
        helper.make_node("Transpose", ["flat"], ["by_pos"], perm=[0, 2, 1], name="mahalanobis/Transpose"),
        helper.make_node("Unsqueeze", ["by_pos", "axes_2"], ["rows"], name="mahalanobis/Unsqueeze"),
        helper.make_node("MatMul", ["rows", "inv_cov"], ["left"], name="mahalanobis/MatMul"),
        helper.make_node("Mul", ["left", "rows"], ["terms"], name="mahalanobis/Mul"),
        helper.make_node("ReduceSum", ["terms", "axes_23"], ["d2"], keepdims=0, name="mahalanobis/ReduceSum"),
        helper.make_node("Max", ["d2", "clamp_min"], ["d2_pos"], name="mahalanobis/Max"),
        helper.make_node("Sqrt", ["d2_pos"], ["dist"], name="mahalanobis/Sqrt"),
        helper.make_node("Reshape", ["dist", "shape_grid"], ["low"], name="head/Reshape"),
        helper.make_node("Resize", ["low", "roi", "scales"], ["up"], mode="linear",
                         coordinate_transformation_mode="half_pixel", name="head/Resize"),
        helper.make_node("Pad", ["up", "pads"], ["padded"], mode="reflect", name="head/Pad"),
        helper.make_node("Conv", ["padded", "w_blur"], ["blurred"], name="head/Blur"),
        helper.make_node("Reshape", ["blurred", "shape_map"], ["anomaly_map"], name="head/ToMap"),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0, name="head/Score"),
    ]
    graph = helper.make_graph(
        nodes, "contract",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_bundle(folder: Path, size: int = SIZE, rows: int = 1, cols: int = 1, cast_first: bool = True,
                mode: str = "shared") -> Bundle:
    """A bundle around the small contract graph: for the graph checks, naming and option tests only (the GPU
    tests build engines from real fitted bundles)."""
    make_contract_graph(folder / "model.onnx", size, cast_first)
    meta = BundleMeta(model_kind="padim", input_size=(size, size),
                      threshold=ThresholdInfo(value=3.0, rule="manual"), score_stats=None,
                      training=TrainingInfo(folder="synthetic", image_count=0, file_list_sha256="0" * 64),
                      tiling=TilingInfo(rows=rows, cols=cols, mode=mode))
    return finalize_bundle(folder, meta)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "bundle")


def parts(n: int, size: int = SIZE, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([make_part(rng, size, defect="scratch" if i % 2 else None)[0] for i in range(n)])


DEVICE = DeviceInfo("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0.30")

# ------------------------------------------------------------------------------------------ naming / selection


def test_gpu_slug_is_file_name_safe():
    assert gpu_slug("NVIDIA GeForce RTX 3060 Ti") == "nvidia-geforce-rtx-3060-ti"
    assert gpu_slug("  Orin (nvgpu) ") == "orin-nvgpu"
    assert gpu_slug("???") == "unknown-gpu"


def test_engine_filename_carries_gpu_cc_trt_and_precision():
    name = engine_filename(DEVICE, "fp16")
    assert name == "nvidia-jetson-agx-orin_sm87_trt10.3.0.30_fp16.engine"
    assert parse_engine_filename(name) == EngineSpec("nvidia-jetson-agx-orin", "87", "10.3.0.30", "fp16")
    assert parse_engine_filename(name).matches(DEVICE)
    with pytest.raises(ConfigError, match="precision"):
        engine_filename(DEVICE, "bf16")


@pytest.mark.parametrize("name", ["model.onnx", "orin_sm87_trt10.3_fp64.engine", "orin_87_trt10_fp16.engine",
                                  "Orin_sm87_trt10.3_fp16.engine", "orin_sm87_trt10.3_fp16.engine.tmp"])
def test_parse_rejects_foreign_names(name):
    assert parse_engine_filename(name) is None


def _recorded(*precisions: str, device: DeviceInfo = DEVICE) -> list[str]:
    return ["model.onnx"] + [f"engines/{engine_filename(device, p)}" for p in precisions]


def test_select_prefers_fp16_then_fp32():
    assert select_engine(_recorded("fp32", "fp16"), DEVICE).endswith("_fp16.engine")
    assert select_engine(_recorded("fp32"), DEVICE).endswith("_fp32.engine")


def test_select_honours_requested_precision():
    assert select_engine(_recorded("fp16", "fp32"), DEVICE, "fp32").endswith("_fp32.engine")
    assert select_engine(_recorded("fp16"), DEVICE, "fp32") is None
    with pytest.raises(ConfigError):
        select_engine(_recorded("fp16"), DEVICE, "int8")  # implicit INT8 is gone (removed in TensorRT 11)


def test_int8_engines_of_older_versions_are_never_selected():
    old = "engines/nvidia-jetson-agx-orin_sm87_trt10.3.0.30_int8.engine"
    assert parse_engine_filename(old.rpartition("/")[2]) is None
    assert select_engine(["model.onnx", old], DEVICE) is None


@pytest.mark.parametrize("other", [
    DeviceInfo("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0.26"),  # other TensorRT build: engine refused
    DeviceInfo("NVIDIA Jetson AGX Orin", (7, 2), "10.3.0.30"),  # other compute capability
    DeviceInfo("NVIDIA GeForce RTX 3060", (8, 7), "10.3.0.30"),  # other GPU model
])
def test_select_ignores_engines_for_other_devices(other):
    assert select_engine(_recorded("fp16", "fp32", device=other), DEVICE) is None


def test_select_only_considers_engines_folder():
    stray = [f"other/{engine_filename(DEVICE, 'fp16')}", engine_filename(DEVICE, "fp32")]
    assert select_engine(["model.onnx", *stray], DEVICE) is None


def test_unrecorded_engine_files_are_reported_not_used(bundle):
    (bundle.path / "engines").mkdir()
    stray = bundle.path / "engines" / engine_filename(DEVICE, "fp16")
    stray.write_bytes(b"not an engine")
    assert unrecorded_engines(bundle) == [stray]
    assert select_engine(bundle.meta.files, DEVICE) is None
    bundle.add_file(f"engines/{stray.name}")  # recorded -> sha-verified on load -> a candidate
    assert unrecorded_engines(Bundle.load(bundle.path)) == []
    assert select_engine(Bundle.load(bundle.path).meta.files, DEVICE) == f"engines/{stray.name}"


def test_default_precision_avoids_slow_fp16_gpus():
    assert default_precision((8, 7)) == "fp16"  # Orin
    assert default_precision((5, 3)) == "fp16"  # Nano
    assert default_precision((6, 1)) == "fp32"  # consumer Pascal: fp16 at 1/64 rate


def test_relative_difference_uses_output_scale():
    reference = np.array([0.0, 10.0, 100.0])
    assert max_relative_difference(reference + 0.05, reference) == pytest.approx(5e-4)
    assert max_relative_difference(reference, reference) == 0.0


def test_build_options_validation():
    BuildOptions(precision="fp16", tiles=4).validate()
    for bad, match in [(dict(tiles=0), "tiles"), (dict(workspace_mb=1), "workspace"),
                       (dict(precision="int8"), "precision")]:
        with pytest.raises(ConfigError, match=match):
            BuildOptions(**bad).validate()


def test_profile_is_built_for_the_tiles_of_one_frame(tmp_path):
    """A 3x4 grid (the RTSP example) gets a profile of 12: one frame, one call (the old default max 8 ran 8 + 4)."""
    grid = make_bundle(tmp_path / "grid", rows=3, cols=4)
    assert frame_group(grid) == 1 and resolve_tiles(grid) == 12
    assert profile_batches(resolve_tiles(grid), frame_group(grid)) == (1, 12, 12)
    single = make_bundle(tmp_path / "single")
    assert resolve_tiles(single) == 1 and resolve_tiles(single, 6) == 6  # a shared bundle run on a grid
    with pytest.raises(ConfigError, match="--tiles"):
        resolve_tiles(single, 0)


def test_per_tile_profile_is_whole_frames(tmp_path):
    per_tile = make_bundle(tmp_path / "pt", rows=2, cols=2, mode="per_tile")
    assert frame_group(per_tile) == 4 and resolve_tiles(per_tile) == 4 and resolve_tiles(per_tile, 8) == 8
    assert profile_batches(8, 4) == (4, 8, 8)  # min 4: never a batch that is not whole frames
    with pytest.raises(ConfigError) as info:
        resolve_tiles(per_tile, 6)
    assert "not a multiple of the 4 tiles" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        profile_batches(6, 4)


def test_cli_options_check_tiles_against_the_bundle(tmp_path):
    per_tile = make_bundle(tmp_path / "pt", rows=2, cols=2, mode="per_tile")
    options = options_from_cli(per_tile, precision="fp32", tiles=None, workspace_mb=512)
    assert (options.precision, options.tiles, options.workspace_mb) == ("fp32", None, 512)
    assert options_from_cli(per_tile, None, 8, 1024).precision == "fp16"
    with pytest.raises(ConfigError, match="not a multiple"):
        options_from_cli(per_tile, None, 6, 1024)

# ------------------------------------------------------------------------------------------ batch split


@pytest.mark.parametrize("count, max_batch, group, sizes", [
    (12, 12, 1, [12]),  # one frame of a 12-tile grid: one call
    (12, 8, 1, [6, 6]),  # balanced, so both calls keep one input shape
    (7, 4, 1, [4, 3]),
    (1, 8, 1, [1]),
    (0, 8, 1, []),
    (8, 4, 4, [4, 4]),  # per-tile, K = 4: whole frames only
    (12, 8, 4, [8, 4]),  # three frames, at most two per call
    (24, 8, 4, [8, 8, 8]),
    (20, 12, 4, [12, 8]),
])
def test_split_batches(count, max_batch, group, sizes):
    bounds = split_batches(count, max_batch, group)
    assert [stop - start for start, stop in bounds] == sizes
    assert all(b[1] == a[0] for b, a in zip(bounds, bounds[1:]))  # contiguous, in order
    assert not bounds or (bounds[0][0], bounds[-1][1]) == (0, count)
    assert all((stop - start) % group == 0 and stop - start <= max_batch for start, stop in bounds)


def test_split_refuses_partial_frames_and_bad_profiles():
    with pytest.raises(BackendError, match="not whole frames of 4 tiles"):
        split_batches(6, 8, 4)
    with pytest.raises(BackendError, match="not a multiple"):
        split_batches(8, 6, 4)


def test_profile_check_for_per_tile_engines():
    check_profile(1, 8, 1)
    check_profile(4, 8, 4)
    check_profile(1, 12, 4)  # min below K is harmless: whole frames are always sent
    for low, high in [(1, 10), (8, 8)]:
        with pytest.raises(BackendError) as info:
            check_profile(low, high, 4, "engines/x.engine")
        message = str(info.value)
        assert message.startswith("engines/x.engine: optimisation profile") and "\n" not in message

# ------------------------------------------------------------------------------------------ engine cache


def test_graph_for_each_precision(tmp_path):
    plain = make_bundle(tmp_path / "plain")
    assert graph_for(plain, "fp32") == plain.onnx_path
    with pytest.raises(BackendError, match="--graph-only"):
        graph_for(plain, "fp16")  # no mixed graph: fp16 cannot be built, and says how to get one
    (plain.path / "engines").mkdir()
    (plain.path / MIXED_GRAPH).write_bytes(plain.onnx_path.read_bytes())
    plain.add_file(MIXED_GRAPH)
    assert graph_for(plain, "fp16") == plain.path / MIXED_GRAPH


def test_cached_engine_from_another_graph_is_ignored(tmp_path):
    folder = tmp_path / "state"
    path = save_cached_engine(folder, engine_filename(DEVICE, "fp16"), b"engine bytes", "a" * 64)
    assert read_cached_engine(folder, DEVICE, "fp16", "a" * 64) == (str(path), b"engine bytes")
    assert read_cached_engine(folder, DEVICE, "fp16", "b" * 64) is None  # mixed graph written again since
    assert read_cached_engine(folder, DEVICE, None) == (str(path), b"engine bytes")

# ------------------------------------------------------------------------------------------ graph check


def test_contract_graph_passes_tensorrt_check(bundle):
    result = check_graph(bundle.onnx_path)
    assert result.errors == [] and result.warnings == []


def test_uint8_transpose_before_cast_is_refused(tmp_path):
    bad = make_bundle(tmp_path / "bad", cast_first=False)
    errors = check_graph(bad.onnx_path).errors
    assert len(errors) == 1 and "Transpose" in errors[0] and "uint8" in errors[0]


def test_check_catches_unsupported_resize_and_dynamic_clip(tmp_path):
    path = make_contract_graph(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "Resize":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("mode", "cubic")])
        if node.op_type == "Clip":
            node.input[2] = "c1"  # max computed at run time
    onnx.save(model, str(path))
    result = check_graph(path)
    assert len(result.errors) == 1 and "cubic" in result.errors[0]
    assert len(result.warnings) == 1 and "Clip" in result.warnings[0]  # TensorRT 10 copes, 8.x does not


def test_real_padim_export_and_its_mixed_graph_are_tensorrt_compatible(small_padim_bundle, tmp_path):
    """The real export (conftest's fitted bundle) and the mixed graph made from it pass the TensorRT graph check."""
    from export.mixed_precision import write_mixed_graph

    assert check_graph(small_padim_bundle.onnx_path).errors == []
    write_mixed_graph(small_padim_bundle.onnx_path, tmp_path / "mixed.onnx")
    assert check_graph(tmp_path / "mixed.onnx").errors == []

# ------------------------------------------------------------------------------------------ without TensorRT


needs_no_tensorrt = pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present")


@needs_no_tensorrt
def test_unavailable_reason_is_a_short_string():
    reason = unavailable_reason()
    assert isinstance(reason, str) and reason and "\n" not in reason


@needs_no_tensorrt
def test_auto_falls_back_to_onnxruntime(bundle, caplog):
    caplog.set_level(logging.INFO, logger="edge_inspector.backends")
    backend = create_backend(bundle, "auto")
    assert backend.name.startswith("onnxruntime")
    assert any("because" in r.getMessage() and "tensorrt" in r.getMessage().lower() for r in caplog.records)
    result = backend.infer(parts(3))
    assert result.anomaly_maps.shape == (3, SIZE, SIZE) and result.scores.shape == (3,)
    np.testing.assert_allclose(result.scores, result.anomaly_maps.max(axis=(1, 2)), rtol=1e-6)


@needs_no_tensorrt
def test_explicit_tensorrt_backend_raises_one_line(bundle):
    with pytest.raises(BackendError) as info:
        create_backend(bundle, "tensorrt")
    message = str(info.value)
    assert "tensorrt" in message and "\n" not in message


@needs_no_tensorrt
def test_cli_without_tensorrt_exits_2_with_one_line(bundle):
    from export.cli import main

    result = CliRunner().invoke(main, ["tensorrt", str(bundle.path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TensorRT" in lines[0]
    assert not (bundle.path / "engines").exists() or not any((bundle.path / "engines").glob("*.engine"))


def test_cli_bad_flags_exit_2(bundle, tmp_path):
    from export.cli import main

    result = CliRunner().invoke(main, ["tensorrt", str(bundle.path), "--tiles", "0"])
    assert result.exit_code == 2 and "error: --tiles must be >= 1" in result.output
    per_tile = make_bundle(tmp_path / "pt", rows=1, cols=2, mode="per_tile")
    result = CliRunner().invoke(main, ["tensorrt", str(per_tile.path), "--tiles", "3"])
    assert result.exit_code == 2 and "not a multiple of the 2 tiles" in result.output


def test_cli_check_only_reports_graph_problems(tmp_path):
    from export.cli import main

    good = make_bundle(tmp_path / "good")
    bad = make_bundle(tmp_path / "bad", cast_first=False)
    ok = CliRunner().invoke(main, ["tensorrt", str(good.path), "--check-only"])
    assert ok.exit_code == 0 and "no TensorRT incompatibilities" in ok.output
    refused = CliRunner().invoke(main, ["tensorrt", str(bad.path), "--check-only"])
    assert refused.exit_code == 2 and "uint8" in refused.output


def test_backend_modules_import_without_tensorrt_or_torch():
    code = ("import sys; import edge_inspector.backends.tensorrt.runtime, edge_inspector.backends.tensorrt.build, "
            "edge_inspector.backends.tensorrt.cuda, export.commands.tensorrt; "
            "bad = [m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

# ------------------------------------------------------------------------------------------ with TensorRT + GPU


@pytest.fixture
def gpu():
    pytest.importorskip("tensorrt")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from edge_inspector.backends.tensorrt.cuda import probe_device

    return probe_device()


def _copy(bundle: Bundle, folder: Path) -> Bundle:
    """A private copy of a session-fitted bundle: engines are written into it."""
    shutil.copytree(bundle.path, folder)
    return Bundle.load(folder)


def _frames(folder: Path, bundle: Bundle, count: int) -> np.ndarray:
    """Real test images of the generated dataset, as the service feeds them (tiled when the bundle is)."""
    from edge_inspector.core.images import list_images, read_image, resize_to

    tiler = bundle.meta.tiling.tiler(bundle.input_size)
    paths = list_images(folder / "test")[:count]
    if tiler is not None:
        return np.concatenate([tiler.split(resize_to(read_image(p), (128, 128))) for p in paths])
    return np.stack([resize_to(read_image(p), bundle.input_size) for p in paths])


def _ort(path: Path, images: np.ndarray):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["anomaly_map", "score"], {"image": images})


def test_fp32_and_fp16_engines_from_a_fitted_bundle(small_padim_bundle, synthetic_dataset, tmp_path, gpu):
    """`edge-export fit` bundle -> `edge-export tensorrt` (fp32 and fp16) -> engines agree with ONNX Runtime."""
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend
    from export.cli import main

    bundle = _copy(small_padim_bundle, tmp_path / "bundle")
    for precision in ("fp32", "fp16"):
        done = CliRunner().invoke(main, ["tensorrt", str(bundle.path), "--precision", precision, "--tiles", "4"])
        assert done.exit_code == 0, done.output
    bundle = Bundle.load(bundle.path)  # engines and the mixed graph are now recorded and sha256-verified
    assert f"engines/{engine_filename(gpu, 'fp16')}" in bundle.meta.files and MIXED_GRAPH in bundle.meta.files
    assert (bundle.path / "engines" / "timing.cache").is_file()
    images = _frames(synthetic_dataset, bundle, 18)
    want_maps, want_scores = _ort(bundle.onnx_path, images)
    mixed_maps, mixed_scores = _ort(bundle.path / MIXED_GRAPH, images)
    for precision in ("fp32", "fp16"):
        backend = TensorRTBackend(bundle, precision=precision)
        try:
            assert backend.max_batch == 4 and backend.precision == precision
            got = backend.infer(images)  # 18 images in calls of at most 4
            assert got.anomaly_maps.shape == (18, 128, 128) and got.scores.shape == (18,)
            if precision == "fp32":
                assert max_relative_difference(got.anomaly_maps, want_maps) <= FP32_TOLERANCE
                assert max_relative_difference(got.scores, want_scores) <= FP32_TOLERANCE
            else:
                assert max_relative_difference(got.anomaly_maps, mixed_maps) <= FP16_VS_MIXED_ONNX
                assert max_relative_difference(got.scores, mixed_scores) <= FP16_VS_MIXED_ONNX
                assert max_relative_difference(got.anomaly_maps, want_maps) <= FP16_VS_FP32
        finally:
            backend.close()


def test_per_tile_engine_runs_any_whole_number_of_frames(synthetic_dataset, tmp_path, gpu):
    """A per-tile bundle (K = 4 statistics sets) runs 1..4 frames on an engine built for 2 frames per call."""
    from edge_inspector.backends.tensorrt.build import BuildOptions, build_engine
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend
    from export.padim.fit import PadimOptions, fit_padim

    options = PadimOptions(input_size=(64, 64), feature_dim=16, folds=2, rows=2, cols=2, tile_mode="per_tile", seed=1)
    bundle = fit_padim(synthetic_dataset / "train" / "good", tmp_path / "per_tile", options)
    result = build_engine(bundle, BuildOptions(precision="fp32", tiles=8), gpu)
    assert result.profile == (4, 8, 8)
    backend = TensorRTBackend(Bundle.load(bundle.path), precision="fp32")
    try:
        images = _frames(synthetic_dataset, bundle, 4)  # 4 frames = 16 tiles
        want_maps, want_scores = _ort(bundle.onnx_path, images)
        for frames in (1, 2, 3, 4):  # 3 frames = 12 tiles: calls of 8 + 4, each whole frames
            got = backend.infer(images[:4 * frames])
            assert max_relative_difference(got.anomaly_maps, want_maps[:4 * frames]) <= FP32_TOLERANCE
            assert max_relative_difference(got.scores, want_scores[:4 * frames]) <= FP32_TOLERANCE
        with pytest.raises(BackendError, match="not whole frames"):
            backend.infer(images[:6])
    finally:
        backend.close()


def test_first_start_builds_then_reuses_engine(small_padim_bundle, tmp_path, gpu, caplog):
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend

    bundle = _copy(small_padim_bundle, tmp_path / "bundle")
    caplog.set_level(logging.WARNING)
    first = TensorRTBackend(bundle)  # no mixed graph in the bundle: fp32, and the log says how to get fp16
    first.close()
    assert any("built engines/" in r.getMessage() for r in caplog.records)
    assert first.precision == "fp32" and any("--graph-only" in r.getMessage() for r in caplog.records)
    engine = bundle.path / first.engine_path
    stamp = engine.stat().st_mtime_ns
    caplog.clear()
    second = create_backend(Bundle.load(bundle.path), "auto")
    try:
        assert second.name == "tensorrt" and engine.stat().st_mtime_ns == stamp
        assert not any("building" in r.getMessage() for r in caplog.records)
    finally:
        second.close()


def test_export_cli_imports_without_torch():
    """`edge-export tensorrt` must start on a Jetson that has no torch: the CLI module may not import it."""
    code = "import sys, export.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).resolve().parents[1])).returncode == 0
