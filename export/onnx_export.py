"""Export a pixels-to-answer torch module to ONNX in the bundle contract, and check it with ONNX Runtime."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_inspector.core.bundle import MODEL_FILE

log = logging.getLogger(__name__)

OPSET = 17
# Constants larger than this go to model.onnx.data: protobuf cannot hold > 2 GB in one file.
EXTERNAL_DATA_BYTES = 1_800_000_000


@contextlib.contextmanager
def quiet_trace() -> Iterator[None]:
    """Silence torch's TracerWarnings while tracing a graph of fixed spatial size.

    They say that shapes read during tracing become constants, which is the contract here: height, width
    and the feature grid are fixed per bundle and only the batch stays dynamic (traced at one batch size,
    checked at another by `onnx_reference_check`). Printed to a user on every fit, five multi-line warnings
    that end "might cause the trace to be incorrect" looked like a failed export; other warnings still show.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_onnx(module: nn.Module, folder: Path, input_size: tuple[int, int], constant_bytes: int = 0,
                trace_batch: int = 2) -> Path:
    """Write folder/model.onnx with input `image` uint8 (N,H,W,3) and outputs anomaly_map, score; batch dynamic.

    `trace_batch`: the example batch traced; graphs that group the batch (per-tile statistics: whole frames
    of K tiles) need a multiple of K.
    """
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    module = module.eval()
    dummy = torch.zeros((trace_batch, input_size[0], input_size[1], 3), dtype=torch.uint8)
    with torch.no_grad(), quiet_trace():
        torch.onnx.export(
            module, (dummy,), str(path), input_names=["image"], output_names=["anomaly_map", "score"],
            dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False)
    if constant_bytes > EXTERNAL_DATA_BYTES:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        log.info("model constants %.1f GB: stored as ONNX external data", constant_bytes / 1e9)
    return path


def onnx_reference_check(module: nn.Module, onnx_path: Path, images: np.ndarray, rtol: float = 1e-3) -> float:
    """Run torch and ONNX Runtime on the same uint8 batch; return the max relative difference of the maps.

    Called after every export, so a bundle whose graph disagrees with its torch reference is never shipped.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_maps, ort_scores = session.run(["anomaly_map", "score"], {"image": images})
    with torch.no_grad():
        ref_maps, ref_scores = (t.numpy() for t in module.eval()(torch.from_numpy(images)))
    scale = max(float(np.abs(ref_maps).max()), 1e-12)
    rel = float(max(np.abs(ort_maps - ref_maps).max(), np.abs(ort_scores - ref_scores).max()) / scale)
    if rel > rtol:
        raise RuntimeError(f"{onnx_path}: ONNX Runtime differs from torch by {rel:.2e} relative (> {rtol})")
    return rel
