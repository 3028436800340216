"""Backbone features on one grid: what PaDiM models per position and the memory-bank kind searches.

Every operation between the backbone's taps and the embedding is linear and per channel (neighbourhood
averaging, average-pooling finer taps down, bilinear upsampling coarser ones), so a channel reduction
(a random subset or a fitted projection) can be applied to each tap at its own resolution, before any of
them: the big tensors never reach the grid at full width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_inspector.core.errors import DataError
from export.backbones import create_backbone
from export.graph import BgrToInput
from export.onnx_export import quiet_trace


class FeatureOptions(Protocol):
    """The option fields the feature extractor reads (PadimOptions and PatchcoreOptions both have them)."""

    @property
    def backbone(self) -> str: ...
    @property
    def weights(self) -> Path | None: ...
    @property
    def layers(self) -> tuple[str, ...] | None: ...
    @property
    def feature_dim(self) -> int | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def neighbourhood(self) -> int: ...


def random_subset(total: int, dim: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of `dim` of `total` channels drawn with `seed` (all channels when dim is None or >= total)."""
    if dim is None or dim >= total:
        return torch.arange(total)
    if dim < 1:
        raise DataError(f"feature_dim must be >= 1, got {dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(total, generator=generator)[:dim]).values


def tap_offsets(channels: tuple[int, ...]) -> list[int]:
    """Where each tap's channels start in the concatenated channel axis (plus the total at the end)."""
    offsets = [0]
    for count in channels:
        offsets.append(offsets[-1] + count)
    return offsets


class PadimFeatures(nn.Module):
    """uint8 BGR -> embedding (N, P, d) on the grid: backbone taps reduced, brought to one grid, combined.

    The channel reduction is either a random subset of `options.feature_dim` channels (the original
    PaDiM; taps concatenated) or, when `projection` (C_total, d) is given, a linear map of all channels
    (taps projected, then summed: the same as projecting the concatenation). `grid_stride` 8 puts the
    embedding on the stride-8 grid (finer taps are average-pooled down): a quarter of the positions.
    """

    def __init__(self, options: FeatureOptions, grid_stride: int = 4, projection: torch.Tensor | None = None):
        super().__init__()
        self.grid_stride = int(grid_stride)
        self.backbone, self.info = create_backbone(options.backbone, options.weights, options.layers)
        self.preprocess = BgrToInput(self.info.mean, self.info.std)
        if options.neighbourhood < 1 or options.neighbourhood % 2 == 0:
            raise DataError(f"neighbourhood must be an odd number >= 1, got {options.neighbourhood}")
        # Local aggregation (as PatchCore does): a position's feature becomes the mean of its k x k
        # neighbourhood, so the model tolerates a pixel of jitter. Measured on MVTec bottle (d=100):
        # pixel AUROC 0.974 -> 0.981 and AUPRO 0.906 -> 0.920 with k=3 and epsilon 0.1.
        self.neighbourhood = int(options.neighbourhood)
        self.channels = sum(self.info.channels)
        self.projected = False
        if projection is not None:
            self.project(projection)
            return
        index = random_subset(self.channels, options.feature_dim, options.seed)
        self.dim = int(index.numel())
        # The random subset, split per layer: channels are chosen before upsampling (the same result,
        # since upsampling is per channel), so unused channels never reach the grid.
        offsets = tap_offsets(self.info.channels)
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            part = index[(index >= lo) & (index < hi)] - lo
            self.register_buffer(f"channels_{i}", part, persistent=False)
        self.keep = [int(getattr(self, f"channels_{i}").numel()) for i in range(len(self.info.channels))]

    def project(self, projection: torch.Tensor) -> None:
        """From now on reduce the channels with `projection` (C_total, d) instead of a channel subset."""
        offsets = tap_offsets(self.info.channels)
        if projection.ndim != 2 or projection.shape[0] != offsets[-1]:
            raise DataError(f"projection must be ({offsets[-1]}, d) for {self.info.name}, got "
                            f"{tuple(projection.shape)}")
        self.projected = True
        self.dim = int(projection.shape[1])
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            # (d, C_i, 1, 1): a 1x1 convolution at the tap's own resolution (ONNX Runtime's fast Conv path)
            weight = projection[lo:hi].t().contiguous().to(torch.float32)[:, :, None, None]
            self.register_buffer(f"projection_{i}", weight)
        self.keep = [self.dim] * len(self.info.channels)

    def reduce(self, i: int, feature: torch.Tensor) -> torch.Tensor:
        """Tap i (N, C_i, h, w) -> (N, d_i, h, w): its projection, or its share of the channel subset."""
        if self.projected:
            return F.conv2d(feature, getattr(self, f"projection_{i}"))
        if self.keep[i] < self.info.channels[i]:
            return torch.index_select(feature, 1, getattr(self, f"channels_{i}"))
        return feature

    def pool(self, feature: torch.Tensor, factor: int) -> torch.Tensor:
        """k x k neighbourhood mean, then (a tap finer than the grid) the mean of each factor x factor cell."""
        if self.neighbourhood > 1:
            feature = F.avg_pool2d(feature, self.neighbourhood, 1, self.neighbourhood // 2, count_include_pad=False)
        if factor > 1:  # keeps what the pixels said, where striding would drop 3 of 4 positions
            feature = F.avg_pool2d(feature, factor, factor)
        return feature

    def taps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's tap activations (N, C_i, h_i, w_i) for uint8 BGR (N, H, W, 3)."""
        return self.backbone(self.preprocess(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Embedding (N, P, d): positions of the grid row-major, feature channels last."""
        return self.embed(self.taps(image), (int(image.shape[1]), int(image.shape[2])))

    def embed(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Tap activations -> embedding (N, P, d).

        Channels-last is the layout the per-position MatMul needs; reaching it at low resolution (before
        upsampling) keeps the big transposes out of the graph (measured: the full-size transpose cost as
        much as the MatMul itself).
        """
        grid = (image_size[0] // self.grid_stride, image_size[1] // self.grid_stride)
        parts = []
        for i, feature in enumerate(features):
            if self.keep[i] == 0:
                continue
            factor = self.grid_stride // self.info.strides[i]
            if factor > 1 and self.projected:
                # Pooling and projection commute: pool the tap down to the grid first, so the projection runs
                # on 1/factor^2 of the positions (measured: the stride-4 tap's 1x1 conv was 0.55 ms of ~10).
                feature = self.reduce(i, self.pool(feature, factor))
            else:
                feature = self.pool(self.reduce(i, feature), factor)
            feature = feature.permute(0, 2, 3, 1)
            if feature.shape[1:3] != grid:
                feature = upsample_nhwc(feature, (int(grid[0]), int(grid[1])))
            parts.append(feature)
        if self.projected:
            embedding = parts[0]
            for part in parts[1:]:
                embedding = embedding + part
        else:
            embedding = torch.cat(parts, dim=3)
        return embedding.reshape(embedding.shape[0], -1, embedding.shape[3])


class FastEmbedding:
    """Fit-time feature extraction in ONNX Runtime: the same module, exported into memory (about 0.5 s).

    Measured on the 2-core VM at batch 8 (Lite0, 256 px): the backbone took 11.9 ms a frame in ONNX Runtime
    against 46.3 ms in eager torch, and eager torch's neighbourhood pooling another 12 ms a batch; this was
    most of a fit's time. `refresh()` re-exports after the module's channel reduction changed.
    """

    def __init__(self, features: PadimFeatures, input_size: tuple[int, int], threads: int | None = None):
        self.features = features
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.threads = threads or torch.get_num_threads()
        self.refresh()

    def refresh(self) -> None:
        import io

        import onnxruntime as ort

        buffer = io.BytesIO()
        dummy = torch.zeros((1, *self.input_size, 3), dtype=torch.uint8)
        with torch.no_grad(), quiet_trace():
            torch.onnx.export(self.features.eval(), (dummy,), buffer,  # type: ignore[arg-type]
                              input_names=["image"], output_names=["embedding"],
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                              opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # measured: the arena kept the peak 150 MB higher (fit RSS)
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 BGR (N, H, W, 3) -> embedding (N, P, d)."""
        return torch.from_numpy(self.session.run(None, {"image": np.ascontiguousarray(batch)})[0])


def _linear_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of bilinear resizing with align_corners=False (as F.interpolate)."""
    src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (src - low).astype(np.float32)
    return torch.from_numpy(low), torch.from_numpy(high), torch.from_numpy(1.0 - frac), torch.from_numpy(frac)


def upsample_nhwc(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, h, w, C) to (N, H, W, C) as constant Gathers and weights (stays channels-last)."""
    for axis, target in ((1, size[0]), (2, size[1])):
        low, high, w_low, w_high = _linear_taps(int(x.shape[axis]), target)
        shape = [1, 1, 1, 1]
        shape[axis] = target
        x = (torch.index_select(x, axis, low) * w_low.view(shape)
             + torch.index_select(x, axis, high) * w_high.view(shape))
    return x


def semi_orthogonal(total: int, dim: int, seed: int) -> torch.Tensor:
    """(total, dim) matrix with orthonormal columns, drawn with `seed` (Q of a Gaussian matrix's QR).

    A semi-orthogonal embedding (Kim et al., 2021) mixes every backbone channel into each of the d
    dimensions instead of keeping d of them and dropping the rest. Measured on the cached stride-8 features
    (3 seeds): fryum pixel AUROC 0.946-0.951 at d=64 against 0.940-0.947 for a random subset at d=100.
    """
    if dim < 1:
        raise DataError(f"feature_dim must be >= 1, got {dim}")
    if dim > total:
        raise DataError(f"feature_dim {dim} is more than the backbone's {total} channels")
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(total, dim, generator=generator, dtype=torch.float64))
    return q.to(torch.float32)


def whitened_projection(within_cov: np.ndarray, dim: int, seed: int, floor_rank: int) -> torch.Tensor:
    """Whiten the channels by their variation between good images, then a semi-orthogonal embedding.

    `within_cov` (C, C) is the channel covariance around each position's own mean (fitted on training
    images): its top directions are how good parts vary (lighting, placement), which a random embedding
    otherwise spends most of its d dimensions on. Scaling each eigen-direction by 1/sqrt(variance + floor)
    (floor = the eigenvalue at `floor_rank`) evens them out before the random mixing; the overall scale is
    kept near the original so the covariance regulariser (epsilon) keeps its meaning.
    """
    values, vectors = np.linalg.eigh(within_cov.astype(np.float64))
    values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
    floor = float(values[min(floor_rank, len(values) - 1)])
    if floor <= 0:
        raise DataError("the training features have too little variation to fit a whitened projection")
    scale = np.sqrt(floor / (values + floor))
    q = semi_orthogonal(within_cov.shape[0], dim, seed).double().numpy()
    return torch.from_numpy(vectors @ (scale[:, None] * (vectors.T @ q))).to(torch.float32)
