"""TensorRT path: engine naming/selection, fallbacks without TensorRT, graph checks, and (on a GPU) parity.

Tests that need TensorRT and a CUDA GPU skip cleanly elsewhere; everything else runs on every machine.
Parity tolerances (documented in docs/jetson.md):
  * fp32 engine vs ONNX Runtime: max |diff| / max |reference| <= 1e-3 (maps and scores);
  * fp16 engine (distance layers kept in fp32): <= 2e-2, and no verdict differs except within 2 % of the
    threshold.
"""

from __future__ import annotations

import logging
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
from edge_inspector.backends.tensorrt.runtime import unavailable_reason
from edge_inspector.backends.tensorrt.engines import (BuildOptions, DeviceInfo, EngineSpec, default_precision,
                                                     engine_filename, gpu_slug, max_relative_difference,
                                                     parse_engine_filename, select_engine, unrecorded_engines)
from edge_inspector.core.bundle import Bundle, BundleMeta, ThresholdInfo, TilingInfo, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import BackendError, ConfigError
from export.synthetic import make_part
from export.commands.tensorrt import calibration_source, check_graph, options_from_cli

SIZE = 32
FP32_TOLERANCE = 1e-3
FP16_TOLERANCE = 2e-2

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


def make_bundle(folder: Path, size: int = SIZE, rows: int = 1, cols: int = 1, cast_first: bool = True) -> Bundle:
    make_contract_graph(folder / "model.onnx", size, cast_first)
    meta = BundleMeta(model_kind="padim", input_size=(size, size),
                      threshold=ThresholdInfo(value=3.0, rule="manual"), score_stats=None,
                      training=TrainingInfo(folder="synthetic", image_count=0, file_list_sha256="0" * 64),
                      tiling=TilingInfo(rows=rows, cols=cols))
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


def test_select_prefers_fp16_then_fp32_then_int8():
    assert select_engine(_recorded("fp32", "int8", "fp16"), DEVICE).endswith("_fp16.engine")
    assert select_engine(_recorded("int8", "fp32"), DEVICE).endswith("_fp32.engine")
    assert select_engine(_recorded("int8"), DEVICE).endswith("_int8.engine")


def test_select_honours_requested_precision():
    assert select_engine(_recorded("fp16", "fp32"), DEVICE, "fp32").endswith("_fp32.engine")
    assert select_engine(_recorded("fp16"), DEVICE, "int8") is None
    with pytest.raises(ConfigError):
        select_engine(_recorded("fp16"), DEVICE, "fp8")


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
    BuildOptions(precision="fp16", max_batch=4, opt_batch=4).validate()
    for bad, match in [(dict(max_batch=0), "max-batch"), (dict(max_batch=4, opt_batch=5), "opt-batch"),
                       (dict(workspace_mb=1), "workspace"), (dict(precision="fp64"), "precision")]:
        with pytest.raises(ConfigError, match=match):
            BuildOptions(**bad).validate()


def test_cli_options_use_tiles_as_optimum(tmp_path):
    tiled = make_bundle(tmp_path / "tiled", rows=2, cols=3)
    options = options_from_cli(tiled, fp16=True, int8=False, calib=None, max_batch=8, opt_batch=None,
                               workspace_mb=512)
    assert (options.precision, options.opt_batch, options.max_batch, options.workspace_mb) == ("fp16", 6, 8, 512)
    with pytest.raises(ConfigError, match="--calib"):
        options_from_cli(tiled, False, True, None, 8, None, 512)
    with pytest.raises(ConfigError, match="only used with --int8"):
        options_from_cli(tiled, False, False, tmp_path, 8, None, 512)

# ------------------------------------------------------------------------------------------ calibration data


def test_calibration_batches_match_graph_input(tmp_path, bundle):
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(48, 40), (32, 32), (100, 64), (20, 20), (64, 64)]):
        cv2.imwrite(str(folder / f"{i}.png"), make_part(rng, shape)[0])
    (folder / "broken.png").write_bytes(b"not a png")
    source = calibration_source(folder, bundle, batch_size=2)
    batches = list(source.batches())
    assert [b.shape for b in batches] == [(2, SIZE, SIZE, 3)] * 3  # 5 readable images, last batch padded
    assert all(b.dtype == np.uint8 and b.flags.c_contiguous for b in batches)
    assert np.array_equal(batches[2][0], batches[2][1])  # padding repeats the pending image
    first = cv2.resize(cv2.imread(str(folder / "0.png")), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(batches[0][0], first)  # BGR, resized as images.resize_to does
    assert source.cache_path.parent == bundle.path / "engines"


def test_calibration_of_tiled_bundle_feeds_tiles(tmp_path):
    tiled = make_bundle(tmp_path / "tiled", rows=2, cols=2)
    folder = tmp_path / "good"
    folder.mkdir()
    cv2.imwrite(str(folder / "frame.png"), make_part(np.random.default_rng(0), (64, 64))[0])
    batches = list(calibration_source(folder, tiled, batch_size=4).batches())
    assert len(batches) == 1 and batches[0].shape == (4, SIZE, SIZE, 3)
    frame = cv2.imread(str(folder / "frame.png"))
    assert np.array_equal(batches[0][3], frame[32:, 32:])  # row-major tiles, bottom-right last

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


@pytest.mark.slow
def test_real_padim_export_is_tensorrt_compatible(tmp_path):
    """The lead's real export (tiny synthetic fit) must pass the TensorRT graph check."""
    padim = pytest.importorskip("export.padim.fit")
    from export.synthetic import write_dataset

    root = write_dataset(tmp_path / "data", train=8, test_good=1, test_per_defect=1, size=64)
    fitted = padim.fit_padim(root / "train" / "good", tmp_path / "bundle",
                             padim.PadimOptions(input_size=(64, 64), feature_dim=16, folds=2, batch_size=4))
    result = check_graph(fitted.onnx_path)
    assert result.errors == [], result.errors

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

    result = CliRunner().invoke(main, ["tensorrt", str(bundle.path), "--fp16"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TensorRT" in lines[0]
    assert not (bundle.path / "engines").exists() or not any((bundle.path / "engines").glob("*.engine"))


def test_cli_bad_flags_exit_2(bundle):
    from export.cli import main

    result = CliRunner().invoke(main, ["tensorrt", str(bundle.path), "--max-batch", "2", "--opt-batch", "3"])
    assert result.exit_code == 2 and "error: --opt-batch" in result.output


def test_cli_check_only_reports_graph_problems(tmp_path):
    from export.cli import main

    good = make_bundle(tmp_path / "good")
    bad = make_bundle(tmp_path / "bad", cast_first=False)
    ok = CliRunner().invoke(main, ["tensorrt", str(good.path), "--check-only"])
    assert ok.exit_code == 0 and "no TensorRT incompatibilities" in ok.output
    refused = CliRunner().invoke(main, ["tensorrt", str(bad.path), "--check-only"])
    assert refused.exit_code == 2 and "uint8" in refused.output


def test_backend_modules_import_without_tensorrt_or_torch():
    code = ("import sys; import edge_inspector.backends.tensorrt.runtime, export.commands.tensorrt; "
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
    from edge_inspector.backends.tensorrt.engines import probe_device

    return probe_device()


def _reference(bundle: Bundle, images: np.ndarray):
    return create_backend(bundle, "onnxruntime").infer(images)


def test_fp32_engine_build_and_parity(bundle, gpu):
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend
    from edge_inspector.backends.tensorrt.engines import build_engine

    result = build_engine(bundle, BuildOptions(precision="fp32", max_batch=4, opt_batch=2), gpu)
    assert result.saved and result.rel_path == f"engines/{engine_filename(gpu, 'fp32')}"
    assert (bundle.path / "engines" / "timing.cache").is_file()
    reloaded = Bundle.load(bundle.path)  # the engine is now sha256-verified with the rest
    assert result.rel_path in reloaded.meta.files
    backend = TensorRTBackend(reloaded, precision="fp32")
    try:
        assert backend.max_batch == 4
        for n in (1, 3, 4, 7):  # below, at and above the profile's max batch
            images = parts(n, seed=n)
            got, want = backend.infer(images), _reference(reloaded, images)
            assert got.anomaly_maps.shape == (n, SIZE, SIZE) and got.scores.shape == (n,)
            assert max_relative_difference(got.anomaly_maps, want.anomaly_maps) <= FP32_TOLERANCE
            assert max_relative_difference(got.scores, want.scores) <= FP32_TOLERANCE
    finally:
        backend.close()


def test_fp16_engine_parity_within_documented_tolerance(bundle, gpu):
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend
    from edge_inspector.backends.tensorrt.engines import build_engine

    build_engine(bundle, BuildOptions(precision="fp16", max_batch=4, opt_batch=1), gpu)
    backend = TensorRTBackend(Bundle.load(bundle.path), precision="fp16")
    try:
        images = parts(4, seed=3)
        got, want = backend.infer(images), _reference(bundle, images)
        assert max_relative_difference(got.anomaly_maps, want.anomaly_maps) <= FP16_TOLERANCE
        assert max_relative_difference(got.scores, want.scores) <= FP16_TOLERANCE
    finally:
        backend.close()


def test_first_start_builds_then_reuses_engine(bundle, gpu, caplog):
    from edge_inspector.backends.tensorrt.runtime import TensorRTBackend

    caplog.set_level(logging.WARNING)
    first = TensorRTBackend(bundle)
    first.close()
    assert any("built engines/" in r.getMessage() for r in caplog.records)
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
