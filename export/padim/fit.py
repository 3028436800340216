"""PaDiM: a Gaussian per feature-map position, fitted on good parts; anomaly = Mahalanobis distance.

Why streaming: the reference PaDiM and anomalib keep every training embedding in memory to compute the
covariances (users report 35-50 GB peaks). Mean and covariance only need sum(x) and sum(x x^T) per
position, so we accumulate those in float64 batch by batch: memory depends on the grid and feature size,
never on the number of training images.

Why k-fold: the threshold needs out-of-sample scores of good images. With sums, the statistics "without fold
j" are just the totals minus fold j's sums, so every good image gets an out-of-sample score for the price of
re-extracting features, instead of holding back a small validation set.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from edge_inspector.core.progress import progress

from edge_inspector.core.bundle import Bundle, BundleMeta, TilingInfo, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import DataError
from edge_inspector.core.images import iter_readable, list_images, read_image, resize_to

from export.backbones import DEFAULT_BACKBONE, backbone_names, create_backbone
from export.graph import BgrToInput, MapToAnswer
from export.onnx_export import export_onnx, onnx_reference_check
from export.staging import staged_bundle_folder
from export.threshold import conformal_threshold, score_stats

log = logging.getLogger(__name__)


@dataclass
class PadimOptions:
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    input_size: tuple[int, int] = (256, 256)
    feature_dim: int | None = 100  # random channel subset; None keeps all channels
    seed: int = 0
    folds: int = 5
    target_false_reject_rate: float = 0.005
    rows: int = 1
    cols: int = 1
    tile_mode: str = "shared"  # or "per_tile"
    tile_size: tuple[int, int] | None = None  # as the service's tiling.tile_size / stride / roi
    stride: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None
    epsilon: float = 0.1  # added to the covariance diagonal: keeps it invertible for flat regions
    neighbourhood: int = 3  # average each feature over k x k positions before modelling (1 = off)
    blur_sigma: float = 4.0
    batch_size: int = 8
    layers: tuple[str, ...] | None = None  # backbone tap points; None = the backbone's default


class PadimFeatures(nn.Module):
    """uint8 BGR -> embedding (N, P, d) on the stride-4 grid: backbone stages upsampled and concatenated.

    `grid_stride` 8 puts the embedding on the stride-8 grid instead (finer taps are average-pooled down):
    the memory-bank kind (`export.patchcore`) uses it, a quarter of the positions to search.
    """

    def __init__(self, options, grid_stride: int = 4):
        super().__init__()
        self.grid_stride = int(grid_stride)
        self.backbone, self.info = create_backbone(options.backbone, options.weights, options.layers)
        self.preprocess = BgrToInput(self.info.mean, self.info.std)
        total = sum(self.info.channels)
        if options.feature_dim is None or options.feature_dim >= total:
            index = torch.arange(total)
        else:
            if options.feature_dim < 1:
                raise DataError(f"feature_dim must be >= 1, got {options.feature_dim}")
            generator = torch.Generator().manual_seed(options.seed)
            index = torch.sort(torch.randperm(total, generator=generator)[: options.feature_dim]).values
        self.dim = int(index.numel())
        # The random subset, split per layer: channels are chosen before upsampling (the same result,
        # since upsampling is per channel), so unused channels never reach the stride-4 grid.
        offsets = [0]
        for channels in self.info.channels:
            offsets.append(offsets[-1] + channels)
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            part = index[(index >= lo) & (index < hi)] - lo
            self.register_buffer(f"channels_{i}", part, persistent=False)
        self.keep = [int(getattr(self, f"channels_{i}").numel()) for i in range(len(self.info.channels))]
        # Local aggregation (as PatchCore does): a position's feature becomes the mean of its k x k
        # neighbourhood, so the model tolerates a pixel of jitter. Measured on MVTec bottle (d=100):
        # pixel AUROC 0.974 -> 0.981 and AUPRO 0.906 -> 0.920 with k=3 and epsilon 0.1.
        if options.neighbourhood < 1 or options.neighbourhood % 2 == 0:
            raise DataError(f"neighbourhood must be an odd number >= 1, got {options.neighbourhood}")
        self.neighbourhood = int(options.neighbourhood)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Embedding (N, P, d): positions of the stride-4 grid row-major, feature channels last.

        Channels-last is the layout the per-position MatMul needs; reaching it at low resolution (before
        upsampling) keeps the big transposes out of the graph (measured: the full-size transpose cost as
        much as the MatMul itself).
        """
        features = self.backbone(self.preprocess(image))
        grid = (int(image.shape[1]) // self.grid_stride, int(image.shape[2]) // self.grid_stride)
        parts = []
        for i, (feature, channels) in enumerate(zip(features, self.info.channels)):
            if self.keep[i] == 0:
                continue
            if self.keep[i] < channels:
                feature = torch.index_select(feature, 1, getattr(self, f"channels_{i}"))
            if self.neighbourhood > 1:
                feature = F.avg_pool2d(feature, self.neighbourhood, 1, self.neighbourhood // 2,
                                       count_include_pad=False)
            factor = self.grid_stride // self.info.strides[i]
            if factor > 1:  # a tap finer than the grid: average it down (keeps what the pixels said)
                feature = F.avg_pool2d(feature, factor, factor)
            feature = feature.permute(0, 2, 3, 1)
            if feature.shape[1:3] != grid:
                feature = upsample_nhwc(feature, (int(grid[0]), int(grid[1])))
            parts.append(feature)
        embedding = torch.cat(parts, dim=3)
        return embedding.reshape(embedding.shape[0], -1, embedding.shape[3])


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


class Mahalanobis(nn.Module):
    """Embedding (N, P, d) -> distance map (N, 1, h, w) against per-position Gaussians.

    `mean` is (K, P, d) and `inv_cov` (K, P, d, d), K = 1 for statistics shared by all tiles, or K = tiles
    per frame for per-tile statistics (then N must be a multiple of K, tiles in row-major order).
    The distance is one batched MatMul over positions: (K*P, N/K, d) x (K*P, d, d). A submodule of its own
    so its ONNX nodes are named `/mahalanobis/...`: the TensorRT builder keeps those in fp32, since squared
    distances overflow fp16.
    """

    def __init__(self, mean: torch.Tensor, inv_cov: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("inv_cov", inv_cov.to(torch.float32))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (N, P, d) -> distance map (N, 1, h, w)."""
        n, p, d = emb.shape
        k = self.mean.shape[0]
        x = by_position(emb, k)  # (K*P, N/K, d)
        diff = x - self.mean.reshape(k * p, 1, d)
        left = torch.matmul(diff, self.inv_cov.reshape(k * p, d, d))
        dist = torch.sqrt(torch.clamp((left * diff).sum(-1), min=0.0))  # (K*P, N/K)
        return dist.reshape(k, p, -1).permute(2, 0, 1).reshape(n, 1, *self.grid)


def by_position(emb: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P, d), N = frames x k tile slots -> (k*P, frames, d): one row block per statistics set and position."""
    n, p, d = emb.shape
    return emb.reshape(-1, k, p, d).permute(1, 2, 0, 3).reshape(k * p, -1, d)


class PadimModel(nn.Module):
    """The exported graph: uint8 BGR (N, H, W, 3) -> anomaly_map (N, H, W), score (N)."""

    def __init__(self, features: PadimFeatures, mean: torch.Tensor, inv_cov: torch.Tensor,
                 input_size: tuple[int, int], blur_sigma: float):
        super().__init__()
        self.features = features
        self.mahalanobis = Mahalanobis(mean, inv_cov, (input_size[0] // 4, input_size[1] // 4))
        self.head = MapToAnswer(input_size, blur_sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.mahalanobis(self.features(image)))


@dataclass
class GaussianSums:
    """sum(x), sum(x x^T) and count per (tile slot, position), in float64."""

    k: int
    p: int
    d: int
    count: int = 0
    sum_x: torch.Tensor = field(init=False)
    sum_xx: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.sum_x = torch.zeros(self.k * self.p, self.d, dtype=torch.float64)
        self.sum_xx = torch.zeros(self.k * self.p, self.d, self.d, dtype=torch.float64)

    def add(self, emb: torch.Tensor) -> None:
        """emb: (N, P, d) with N a multiple of k (whole frames)."""
        x = by_position(emb, self.k).double()
        self.sum_x += x.sum(1)
        self.sum_xx += torch.bmm(x.transpose(1, 2), x)
        self.count += emb.shape[0] // self.k

    def minus(self, other: "GaussianSums") -> "GaussianSums":
        out = GaussianSums(self.k, self.p, self.d)
        out.sum_x, out.sum_xx, out.count = self.sum_x - other.sum_x, self.sum_xx - other.sum_xx, self.count - other.count
        return out

    def gaussian(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (K, P, d), inverse covariance (K, P, d, d)) as float32; inverted once, in numpy."""
        if self.count < 2:
            raise DataError(f"need at least 2 training images per statistics set, got {self.count}")
        mean = self.sum_x / self.count
        cov = (self.sum_xx - self.count * mean[:, :, None] * mean[:, None, :]) / (self.count - 1)
        cov += epsilon * torch.eye(self.d, dtype=torch.float64)
        # numpy: torch's batched inverse failed with an MKL error on this size (4096 x 176 x 176) here.
        # One BLAS thread: OpenBLAS threading on thousands of small matrices was 25x slower (measured).
        with threadpool_limits(1, user_api="blas"):
            inv = np.linalg.inv(cov.numpy())
        shape = (self.k, self.p, self.d)
        return mean.float().reshape(shape), torch.from_numpy(inv).float().reshape(*shape, self.d)


class TrainingImages:
    """Readable training images (resized to the frame size of the first, or tiled) with provenance."""

    def __init__(self, folder: Path, options: PadimOptions):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: training folder not found")
        paths = list_images(self.folder)
        if not paths:
            raise DataError(f"{self.folder}: no images (png, jpg, bmp, tiff) found")
        self.options = options
        self.frame_size: tuple[int, int] | None = None
        self.paths = []
        for path, image in iter_readable(paths, log):  # once up front: stable folds, corrupt files reported once
            self.frame_size = self.frame_size or image.shape[:2]
            self.paths.append(path)
        skipped = len(paths) - len(self.paths)
        if not self.paths:
            raise DataError(f"{self.folder}: none of the {len(paths)} image files could be read")
        self.skipped = skipped
        self.tiler = tiling_info(options).tiler(options.input_size)

    @property
    def file_list_sha256(self) -> str:
        names = "\n".join(p.relative_to(self.folder).as_posix() for p in self.paths)
        return hashlib.sha256(names.encode()).hexdigest()

    def tiles_of(self, path: Path) -> np.ndarray:
        """(T, h, w, 3) uint8: the frame's tiles, or the resized frame as one tile."""
        image = read_image(path)
        if self.tiler is not None:
            image = resize_to(image, self.frame_size)  # mixed frame sizes: tile all at the first one's size
            return self.tiler.split(image)
        return resize_to(image, self.options.input_size)[None]

    def batches(self, indices: list[int], desc: str) -> Iterator[tuple[list[int], np.ndarray]]:
        per_batch = max(1, self.options.batch_size // max(1, self.options.rows * self.options.cols))
        for start in progress(range(0, len(indices), per_batch), desc=desc, unit="batch", leave=False):
            chunk = indices[start:start + per_batch]
            yield chunk, np.concatenate([self.tiles_of(self.paths[i]) for i in chunk])


MAX_FOLD_FRAMES = 64  # embeddings of one fold are cached; this bounds that memory (~105 MB at d=100, 256 px)


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.arange(n) % folds
    return ids


def fold_count(n: int, requested: int) -> int:
    """At least `requested` folds, more for big sets so one fold's cached embeddings stay bounded."""
    return min(n, max(requested, -(-n // MAX_FOLD_FRAMES)))


def statistics_shape(options: PadimOptions) -> tuple[int, int]:
    """(statistics sets K, positions P): one set per tile slot for per-tile statistics, on the stride-4 grid."""
    k = options.rows * options.cols if options.tile_mode == "per_tile" else 1
    return k, (options.input_size[0] // 4) * (options.input_size[1] // 4)


@torch.no_grad()
def fit_statistics(data: TrainingImages, features: PadimFeatures, options: PadimOptions
                   ) -> tuple[GaussianSums, np.ndarray]:
    """Totals over all images, and an out-of-sample score per good image from k-fold leave-one-fold-out.

    Two feature passes: one for the totals, one fold at a time whose embeddings are kept just long enough
    to score them against "totals minus this fold".
    """
    k, p = statistics_shape(options)
    n = len(data.paths)
    totals = GaussianSums(k, p, features.dim)
    for _, batch in data.batches(list(range(n)), "fit: features"):
        totals.add(features(torch.from_numpy(batch)))
    oos = np.full(n, np.nan)
    folds = fold_count(n, options.folds)
    if folds < 2:
        return totals, oos
    fold_ids = _fold_ids(n, folds, options.seed)
    head = MapToAnswer(options.input_size, options.blur_sigma)
    for fold in range(folds):
        members = [int(i) for i in np.flatnonzero(fold_ids == fold)]
        fold_sums, cached = GaussianSums(k, p, features.dim), []
        for chunk, batch in data.batches(members, f"fit: fold {fold + 1}/{folds}"):
            emb = features(torch.from_numpy(batch))
            fold_sums.add(emb)
            cached.append((chunk, emb))
        distance = Mahalanobis(*totals.minus(fold_sums).gaussian(options.epsilon),
                               (options.input_size[0] // 4, options.input_size[1] // 4))
        for chunk, emb in cached:
            scores = head(distance(emb))[1].numpy()
            oos[chunk] = scores.reshape(len(chunk), -1).max(axis=1)  # a frame fails if any tile does
    return totals, oos


def tiling_info(options: PadimOptions) -> TilingInfo:
    as_list = (lambda v: None if v is None else [int(x) for x in v])
    return TilingInfo(rows=options.rows, cols=options.cols, mode=options.tile_mode,
                      tile_size=as_list(options.tile_size), stride=as_list(options.stride), roi=as_list(options.roi))


# Float64 (K*P, d, d) sets alive at the peak of a fit: totals, one fold's sums, totals minus fold, and the
# covariance with its temporaries and inverse. Calibrated on bottle (d=100, 256 px: 328 MB a set, 2.5 GB peak
# with torch and the backbone, i.e. about 6 sets + 0.5 GB).
FIT_PEAK_SETS = 6
FIT_BASE_BYTES = 500_000_000


def fit_memory_bytes(options: PadimOptions, dim: int, images: int) -> int:
    """Estimated peak memory of a PaDiM fit: it grows with the grid and d squared, not with the images."""
    k, p = statistics_shape(options)
    tiles = options.rows * options.cols
    cached = min(images, MAX_FOLD_FRAMES) * tiles * p * dim * 4  # one fold's embeddings, float32
    return FIT_PEAK_SETS * k * p * dim * dim * 8 + cached + FIT_BASE_BYTES


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fit_memory(options: PadimOptions, dim: int, images: int) -> None:
    """Refuse a fit that cannot fit in memory before it starts, with the figure and the flag that lowers it.

    `--feature-dim 0` (all 1056 Lite0 channels) at 256 px needs about 36.5 GB per statistics set: without this
    check the fit ran for minutes and then died in the allocator.
    """
    needed, available = fit_memory_bytes(options, dim, images), available_memory_bytes()
    if available is None or needed <= available:
        log.info("estimated fit memory %.1f GB (available %s)", needed / 1e9,
                 "unknown" if available is None else f"{available / 1e9:.1f} GB")
        return
    sets = "per-tile statistics sets" if options.tile_mode == "per_tile" else "positions"
    raise DataError(f"fit needs about {needed / 1e9:.1f} GB of memory at d={dim}, "
                    f"{options.input_size[0]}x{options.input_size[1]} input, but {available / 1e9:.1f} GB is "
                    f"available; lower --feature-dim (memory grows with its square; 100 needs "
                    f"{fit_memory_bytes(options, min(dim, 100), images) / 1e9:.1f} GB) or --input-size ({sets})")


def describe_constants(k: int, p: int, d: int) -> str:
    inv_bytes, mean_bytes = k * p * d * d * 4, k * p * d * 4
    return (f"model constants: inverse covariances {inv_bytes / 1e6:.1f} MB + means {mean_bytes / 1e6:.1f} MB "
            f"({k} statistics set(s) x {p} positions x d={d})")


def fit_padim(train_folder: str | Path, out_dir: str | Path, options: PadimOptions | None = None) -> Bundle:
    """Fit PaDiM on a folder of good images and write a verified model bundle to out_dir."""
    options = options or PadimOptions()
    _check_options(options)
    started = time.perf_counter()
    data = TrainingImages(Path(train_folder), options)
    features = PadimFeatures(options).eval()
    check_fit_memory(options, features.dim, len(data.paths))
    log.info("fitting PaDiM (%s, d=%d) on %d images from %s", options.backbone, features.dim,
             len(data.paths), data.folder)
    totals, oos = fit_statistics(data, features, options)
    mean, inv = totals.gaussian(options.epsilon)
    k, p, d = inv.shape[0], inv.shape[1], inv.shape[2]
    message = describe_constants(k, p, d)
    log.info(message)
    print(message)
    model = PadimModel(features, mean, inv, options.input_size, options.blur_sigma).eval()
    if np.isnan(oos).any():
        raise DataError(f"{data.folder}: need at least 2 images for an out-of-sample threshold, got {len(data.paths)}")
    threshold = conformal_threshold(oos, options.target_false_reject_rate)
    _report_outliers(data, oos, threshold.value)
    if not threshold.certified:
        log.warning(threshold.note)
    meta = BundleMeta(
        model_kind="padim", input_size=tuple(options.input_size), threshold=threshold, score_stats=score_stats(oos),
        training=TrainingInfo(folder=str(data.folder.resolve()), image_count=len(data.paths),
                              file_list_sha256=data.file_list_sha256, skipped_files=data.skipped,
                              seed=options.seed, folds=fold_count(len(data.paths), options.folds),
                              fit_seconds=round(time.perf_counter() - started, 2)),
        backbone=options.backbone, layers=list(features.info.layers), feature_dim=d,
        tiling=tiling_info(options),
        model_params={"epsilon": options.epsilon, "blur_sigma": options.blur_sigma, "grid_stride": 4,
                      "neighbourhood": options.neighbourhood,
                      "statistics_sets": k, "constants_bytes": int(k * p * d * (d + 1) * 4)})
    with staged_bundle_folder(Path(out_dir)) as staging:
        export_onnx(model, staging, options.input_size, constant_bytes=k * p * d * d * 4,
                    trace_batch=2 * k)
        check = data.tiles_of(data.paths[0])[: max(1, k)]
        check = np.concatenate([check, check]) if k == 1 else check
        rel = onnx_reference_check(model, staging / "model.onnx", check)
        log.info("ONNX Runtime matches torch: max relative difference %.2e", rel)
        meta.training.fit_seconds = round(time.perf_counter() - started, 2)
        finalize_bundle(staging, meta)
    return Bundle.load(out_dir)


def _report_outliers(data: TrainingImages, oos: np.ndarray, threshold: float, count: int = 3) -> None:
    """Name the training images that score highest out of sample: a defective part among the "good" ones
    or an odd capture there raises the threshold for every part after it, so the engineer should look."""
    order = np.argsort(oos)[::-1][:count]
    listing = ", ".join(f"{data.paths[i].name} ({oos[i]:.4g})" for i in order)
    log.info("highest out-of-sample training scores (check these are really good parts): %s; "
             "median %.4g, threshold %.4g", listing, float(np.median(oos)), threshold)


def _check_options(options: PadimOptions) -> None:
    if options.backbone not in backbone_names():
        raise DataError(f"unknown backbone {options.backbone!r} (expected one of {', '.join(backbone_names())})")
    h, w = options.input_size
    if h % 16 or w % 16 or h < 32 or w < 32:
        raise DataError(f"input_size must be multiples of 16 and >= 32, got {options.input_size}")
    if options.tile_mode not in ("shared", "per_tile"):
        raise DataError(f"tile_mode must be shared or per_tile, got {options.tile_mode!r}")
    if not 0 < options.target_false_reject_rate < 1:
        raise DataError(f"target false-reject rate must be in (0, 1), got {options.target_false_reject_rate}")
