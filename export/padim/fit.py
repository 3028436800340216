"""Fit PaDiM on a folder of good images: one feature pass, streamed statistics, k-fold threshold, bundle.

One feature pass: each frame's embedding is added to the totals and kept in a cache of fixed size
(`CACHE_BYTES`); the k-fold scoring reuses the cached embeddings, so the backbone runs once per image.
Frames past the cache are added to their fold's sums during the pass (one set per fold at most) and
extracted once more to be scored: slower, never more memory, so the peak does not grow with the images.

Why k-fold: the threshold needs out-of-sample scores of good images. With sums, the statistics "without
fold j" are the totals minus fold j's sums (statistics.py), so every good image gets an out-of-sample score
without holding back a validation set.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from edge_inspector.core.bundle import Bundle, BundleMeta, TilingInfo, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import DataError
from edge_inspector.core.images import iter_readable, list_images, read_image, resize_to
from edge_inspector.core.progress import progress
from export.backbones import DEFAULT_BACKBONE, backbone_names
from export.onnx_export import export_onnx, onnx_reference_check
from export.padim.features import FastEmbedding, PadimFeatures, semi_orthogonal, whitened_projection
from export.padim.model import Mahalanobis, PadimModel, UpsampleBlurHead
from export.padim.statistics import ChannelCovariance, GaussianSums, available_memory_bytes, fit_memory_bytes, set_bytes
from export.staging import staged_bundle_folder
from export.supervised.fit import LabelledSet, attach_supervised, check_untiled, supervised_collector
from export.threshold import conformal_threshold, report_outliers, score_stats
from export.threshold import fold_ids as threshold_fold_ids

log = logging.getLogger(__name__)

PROJECTIONS = ("subset", "orthogonal", "whitened")


@dataclass
class PadimOptions:
    """Defaults chosen with `benchmarks/padim_bench.py --tradeoff` (fit + replay of bottle and fryum).

    Measured on the 2-core VM against the previous default (random subset of d=100 channels on the stride-4
    grid; image / pixel AUROC / AUPRO): bottle 1.000 / 0.981 / 0.922 (was 1.000 / 0.981 / 0.920), fryum
    0.942 / 0.955 / 0.633 (was 0.934 / 0.939 / 0.621), model 20 MB (was 169 MB), batch-1 latency 11.2 ms
    (was 20.7 ms, same run). The whitened projection keeps more of the information in d=64 than a random
    subset keeps in d=100; the stride-8 grid localised as well as stride 4 (bottle pixel AUROC 0.981 both).
    """

    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    input_size: tuple[int, int] = (256, 256)
    feature_dim: int | None = 64  # embedding size d; None keeps all channels (projection "subset" only)
    # How the backbone's channels become d: "subset" (a random subset, the original PaDiM), "orthogonal"
    # (a random semi-orthogonal embedding) or "whitened" (fitted on the training features; features.py).
    projection: str = "whitened"
    grid_stride: int = 8  # statistics grid in input pixels: 8 -> 32x32 positions at 256 px, 4 -> 64x64
    seed: int = 0
    folds: int = 5
    target_false_reject_rate: float = 0.005
    rows: int = 1
    cols: int = 1
    tile_mode: str = "shared"  # or "per_tile"
    tile_size: tuple[int, int] | None = None  # as the service's tiling.tile_size / stride / roi
    stride: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None
    # Added to the covariance diagonal: keeps it invertible for flat regions, and damps directions with little
    # variation. None: 0.03 for the whitened projection, 0.1 otherwise (see EPSILON_DEFAULTS).
    epsilon: float | None = None
    neighbourhood: int = 3  # average each feature over k x k positions before modelling (1 = off)
    blur_sigma: float = 4.0
    batch_size: int = 8
    layers: tuple[str, ...] | None = None  # backbone tap points; None = the backbone's default


# Embeddings kept between the feature pass and the k-fold scoring. At the default (32x32 grid, d=64, one
# tile: 262 KB a frame) 244 frames fit (bottle's 209 do); past that, frames are extracted again instead of
# the cache growing. Measured on bottle (whole CLI fit, 2-core VM): a 256 MB cache let the peak RSS grow
# from 983 MB at 209 images to 1174 MB at 836.
CACHE_BYTES = 64_000_000
# The whitened projection is fitted on the first images' all-channel embeddings (4.3 MB a frame for Lite0 at
# stride 8). Measured: 32 or 64 images give the same accuracy on bottle and fryum (within 0.001 AUROC).
PROJECTION_IMAGES = 32
PROJECTION_BYTES = 160_000_000
WHITEN_FLOOR_RANK = 16
# Measured on the cached stride-8 features, d=64, 3 seeds each (image / pixel AUROC / AUPRO): whitened at
# 0.1, fryum 0.922-0.934 / 0.954-0.958 / 0.65; at 0.03, fryum 0.938-0.942 / 0.952-0.955 / 0.630-0.636 and
# bottle 1.000 / 0.980-0.981 / 0.920-0.922. The random subset keeps the original PaDiM's 0.1.
EPSILON_DEFAULTS = {"whitened": 0.03, "orthogonal": 0.1, "subset": 0.1}


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

    @property
    def tiles(self) -> int:
        return self.options.rows * self.options.cols

    def tiles_of(self, path: Path) -> np.ndarray:
        """(T, h, w, 3) uint8: the frame's tiles, or the resized frame as one tile."""
        image = read_image(path)
        if self.tiler is not None:
            assert self.frame_size is not None  # set by the first readable image in __init__
            image = resize_to(image, self.frame_size)  # mixed frame sizes: tile all at the first one's size
            return self.tiler.split(image)
        return resize_to(image, self.options.input_size)[None]

    def batches(self, indices: list[int], desc: str) -> Iterator[tuple[list[int], np.ndarray]]:
        per_batch = max(1, self.options.batch_size // max(1, self.options.rows * self.options.cols))
        for start in progress(range(0, len(indices), per_batch), desc=desc, unit="batch", leave=False):
            chunk = indices[start:start + per_batch]
            yield chunk, np.concatenate([self.tiles_of(self.paths[i]) for i in chunk])


def fold_count(n: int, requested: int) -> int:
    """The requested folds, fewer when there are fewer images (memory no longer depends on the fold size)."""
    return min(n, requested)


def statistics_shape(options: PadimOptions) -> tuple[int, int]:
    """(statistics sets K, positions P): one set per tile slot for per-tile statistics, on the statistics grid."""
    k = options.rows * options.cols if options.tile_mode == "per_tile" else 1
    return k, (options.input_size[0] // options.grid_stride) * (options.input_size[1] // options.grid_stride)


def embedding_dim(options: PadimOptions, channels: int) -> int:
    """d of the fitted model: feature_dim, or every channel (the subset projection with feature_dim None or
    larger than the channels, as the original PaDiM's subset did)."""
    if options.feature_dim is None:
        return channels
    if options.feature_dim > channels and options.projection != "subset":
        raise DataError(f"feature_dim {options.feature_dim} is more than the backbone's {channels} channels")
    return min(options.feature_dim, channels)


Batches = Iterable[tuple[list[int], torch.Tensor]]
MapSink = Callable[[list[int], torch.Tensor, torch.Tensor], None]


class EmbeddingCache:
    """Per-frame embeddings (tiles, P, d) up to a byte budget; frames past it are not kept (`put` returns them)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.frames: dict[int, torch.Tensor] = {}

    def put(self, chunk: list[int], emb: torch.Tensor) -> list[int]:
        """Keep what fits; return the positions in `chunk` of the frames that did not."""
        per_frame = emb.reshape(len(chunk), -1, *emb.shape[1:])
        left_out = []
        for position, (index, frame) in enumerate(zip(chunk, per_frame)):
            size = frame.numel() * frame.element_size()
            if self.used + size > self.budget:
                left_out.append(position)
                continue
            self.frames[index] = frame.clone()
            self.used += size
        return left_out


@dataclass
class PassResult:
    """What the feature pass leaves for the k-fold scoring: the totals, the cached embeddings, and per-fold
    sums of the frames the cache had no room for (created only when it overflows)."""

    totals: GaussianSums
    cache: EmbeddingCache
    fold_ids: np.ndarray
    spilled: dict[int, GaussianSums]


def build_features(options: PadimOptions) -> PadimFeatures:
    """The feature extractor, its projection drawn; for "whitened" still unprojected (all channels): the
    feature pass fits its projection."""
    if options.projection == "subset":
        return PadimFeatures(options, options.grid_stride).eval()
    features = PadimFeatures(replace(options, feature_dim=None), options.grid_stride).eval()
    if options.projection == "orthogonal":
        features.project(semi_orthogonal(features.channels, embedding_dim(options, features.channels),
                                         options.seed))
    return features


@torch.no_grad()
def feature_pass(data: TrainingImages, embedding: FastEmbedding, options: PadimOptions) -> PassResult:
    """The one pass over the training images (for the whitened projection, also fitting the projection on
    the first frames and setting it on `embedding.features`)."""
    k, p = statistics_shape(options)
    n = len(data.paths)
    indices = list(range(n))
    features = embedding.features
    if options.projection == "whitened" and not features.projected:
        batches = _fit_whitening(data, embedding, options, indices)
    else:
        batches = _embed(embedding, data, indices, "fit: features")
    fold_ids = threshold_fold_ids(n, max(1, fold_count(n, options.folds)), options.seed)
    result: PassResult | None = None
    for chunk, emb in batches:
        if result is None:
            result = PassResult(GaussianSums(k, p, features.dim), EmbeddingCache(CACHE_BYTES), fold_ids, {})
        result.totals.add(emb)
        left_out = result.cache.put(chunk, emb)
        if left_out:
            _spill(result, chunk, emb, left_out)
    assert result is not None
    return result


def _spill(result: PassResult, chunk: list[int], emb: torch.Tensor, left_out: list[int]) -> None:
    """Frames past the cache: add them to their fold's sums now, so their fold needs them only once more
    (to be scored). At most one set per fold, however many images."""
    per_frame = emb.reshape(len(chunk), -1, *emb.shape[1:])
    for position in left_out:
        fold = int(result.fold_ids[chunk[position]])
        if fold not in result.spilled:
            result.spilled[fold] = result.totals.empty_like()
        result.spilled[fold].add(per_frame[position])


def _fit_whitening(data: TrainingImages, embedding: FastEmbedding, options: PadimOptions, indices: list[int]
                   ) -> Batches:
    """All frames' projected embeddings in order; the first frames' all-channel embeddings fit the
    projection (then are projected themselves), so each frame goes through the backbone once."""
    grid = (options.input_size[0] // options.grid_stride) * (options.input_size[1] // options.grid_stride)
    features = embedding.features
    per_frame = data.tiles * features.channels * grid * 4
    first = indices[: max(2, min(PROJECTION_IMAGES, PROJECTION_BYTES // per_frame))]
    covariance, kept = ChannelCovariance(), []
    for chunk, emb in _embed(embedding, data, first, "fit: projection"):
        covariance.add(emb)
        kept.append((chunk, emb))
    projection = whitened_projection(covariance.covariance(), embedding_dim(options, features.channels),
                                     options.seed, WHITEN_FLOOR_RANK)
    features.project(projection)
    embedding.refresh()
    log.info("whitened projection fitted on %d images (%d -> %d channels)", len(first), features.channels,
             features.dim)
    while kept:
        chunk, emb = kept.pop(0)
        yield chunk, torch.matmul(emb, projection)
    yield from _embed(embedding, data, indices[len(first):], "fit: features")


def _embed(embedding: FastEmbedding, data: TrainingImages, indices: list[int], desc: str) -> Batches:
    for chunk, batch in data.batches(indices, desc):
        yield chunk, embedding(batch)


def _cached_batches(indices: list[int], cache: EmbeddingCache, size: int = 16) -> Batches:
    for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        yield chunk, torch.cat([cache.frames[i] for i in chunk])


@torch.no_grad()
def out_of_sample_scores(data: TrainingImages, embedding: FastEmbedding, passed: PassResult,
                         options: PadimOptions, head: UpsampleBlurHead, sink: MapSink | None = None) -> np.ndarray:
    """A score per good image from a model that never saw it: k-fold, "totals minus fold j" in place.

    Fold j's sums are its spilled sums (frames past the cache, summed during the pass) plus its cached
    frames; its cached frames are scored from the cache, the others extracted once more. `sink(frames, emb,
    low-resolution maps)` sees each scored chunk (fit --labelled: the supervised part's inputs).
    """
    n = len(data.paths)
    oos = np.full(n, np.nan)
    folds = fold_count(n, options.folds)
    if folds < 2:
        return oos
    grid = (options.input_size[0] // options.grid_stride, options.input_size[1] // options.grid_stride)
    epsilon = resolved(options).epsilon
    assert epsilon is not None
    for fold in progress(range(folds), desc="fit: k-fold scores", unit="fold", leave=False):
        members = [int(i) for i in np.flatnonzero(passed.fold_ids == fold)]
        cached = [i for i in members if i in passed.cache.frames]
        missing = [i for i in members if i not in passed.cache.frames]
        without = passed.spilled.pop(fold, None) or passed.totals.empty_like()
        for _, emb in _cached_batches(cached, passed.cache):
            without.add(emb)
        distance = Mahalanobis(*without.complement_of(passed.totals).gaussian(epsilon), grid)
        del without
        scored = chain(_cached_batches(cached, passed.cache),
                       _embed(embedding, data, missing, "fit: features again (past the cache)"))
        for chunk, emb in scored:
            low = distance(emb)
            if sink is not None:
                sink(chunk, emb, low)
            scores = head(low)[1].numpy()
            oos[chunk] = scores.reshape(len(chunk), -1).max(axis=1)  # a frame fails if any tile does
    return oos


def tiling_info(options: PadimOptions) -> TilingInfo:
    as_list = (lambda v: None if v is None else [int(x) for x in v])
    return TilingInfo(rows=options.rows, cols=options.cols, mode=options.tile_mode,
                      tile_size=as_list(options.tile_size), stride=as_list(options.stride), roi=as_list(options.roi))


def check_fit_memory(options: PadimOptions, dim: int, images: int) -> None:
    """Refuse a fit that cannot fit in memory before it starts, with the figure and the flag that lowers it.

    `--feature-dim 0` (all 1056 Lite0 channels) at 256 px and stride 4 needs about 18 GB per statistics set:
    without this check the fit ran for minutes and then died in the allocator.
    """
    k, p = statistics_shape(options)
    tiles = options.rows * options.cols
    folds = fold_count(images, options.folds)
    needed = fit_memory_bytes(k, p, dim, tiles, images, CACHE_BYTES, folds)
    available = available_memory_bytes()
    if available is None or needed <= available:
        log.info("estimated fit memory %.1f GB (available %s)", needed / 1e9,
                 "unknown" if available is None else f"{available / 1e9:.1f} GB")
        return
    sets = "per-tile statistics sets" if options.tile_mode == "per_tile" else "positions"
    raise DataError(f"fit needs about {needed / 1e9:.1f} GB of memory at d={dim}, "
                    f"{options.input_size[0]}x{options.input_size[1]} input, but {available / 1e9:.1f} GB is "
                    f"available; lower --feature-dim (memory grows with its square; 64 needs "
                    f"{fit_memory_bytes(k, p, min(dim, 64), tiles, images, CACHE_BYTES, folds) / 1e9:.1f} GB) "
                    f"or --input-size ({sets})")


def describe_constants(k: int, p: int, d: int) -> str:
    inv_bytes, mean_bytes = set_bytes(k, p, d), k * p * d * 4
    return (f"model constants: inverse covariances {inv_bytes / 1e6:.1f} MB + means {mean_bytes / 1e6:.1f} MB "
            f"({k} statistics set(s) x {p} positions x d={d})")


def resolved(options: PadimOptions) -> PadimOptions:
    """The options with defaults that depend on other options filled in (epsilon by projection)."""
    if options.epsilon is None:
        return replace(options, epsilon=EPSILON_DEFAULTS.get(options.projection, 0.1))
    return options


def fit_padim(train_folder: str | Path, out_dir: str | Path, options: PadimOptions | None = None,
              labelled: LabelledSet | None = None) -> Bundle:
    """Fit PaDiM on a folder of good images and write a verified model bundle to out_dir; with `labelled`, a
    supervised part trained and cross-validated on labelled images joins the graph (export/supervised)."""
    _check_options(options or PadimOptions())
    options = resolved(options or PadimOptions())
    if labelled is not None:
        check_untiled(options.rows * options.cols, options.roi, options.tile_size)
    assert options.epsilon is not None
    started = time.perf_counter()
    data = TrainingImages(Path(train_folder), options)
    features = build_features(options)
    dim = embedding_dim(options, features.channels)
    check_fit_memory(options, dim, len(data.paths))
    log.info("fitting PaDiM (%s, %s projection, d=%d, stride %d) on %d images from %s", options.backbone,
             options.projection, dim, options.grid_stride, len(data.paths), data.folder)
    if len(data.paths) < 2:
        raise DataError(f"{data.folder}: need at least 2 images for an out-of-sample threshold, got {len(data.paths)}")
    embedding = FastEmbedding(features, options.input_size)
    passed = feature_pass(data, embedding, options)
    grid = (options.input_size[0] // options.grid_stride, options.input_size[1] // options.grid_stride)
    head = UpsampleBlurHead(grid, options.input_size, options.blur_sigma)
    collector = supervised_collector(len(data.paths), grid) if labelled is not None else None
    oos = out_of_sample_scores(data, embedding, passed, options, head, collector)
    mean, inv = passed.totals.gaussian(options.epsilon)
    del passed, embedding
    k, p, d = inv.shape[0], inv.shape[1], inv.shape[2]
    print(describe_constants(k, p, d))  # once: a log line as well printed it twice under the CLI's INFO logging
    model: torch.nn.Module = PadimModel(features, mean, inv, options.input_size, options.blur_sigma, head).eval()
    threshold = conformal_threshold(oos, options.target_false_reject_rate)
    report_outliers(data.paths, oos, threshold.value)
    good_scores, labelled_info = oos, None
    if labelled is not None and collector is not None:
        attached = attach_supervised(model, collector.result(oos), labelled, options.input_size,
                                     options.target_false_reject_rate, options.seed, options.batch_size, threshold)
        model, threshold, labelled_info = attached.model, attached.threshold, attached.info
        good_scores = attached.good_scores if attached.good_scores.size else oos
    if not threshold.certified:
        log.warning(threshold.note)
    meta = BundleMeta(
        model_kind="padim", input_size=(int(options.input_size[0]), int(options.input_size[1])),
        threshold=threshold, score_stats=score_stats(good_scores), labelled=labelled_info,
        training=TrainingInfo(folder=str(data.folder.resolve()), image_count=len(data.paths),
                              file_list_sha256=data.file_list_sha256, skipped_files=data.skipped,
                              seed=options.seed, folds=fold_count(len(data.paths), options.folds),
                              fit_seconds=round(time.perf_counter() - started, 2)),
        backbone=options.backbone, layers=list(features.info.layers), feature_dim=d,
        tiling=tiling_info(options),
        model_params={"epsilon": options.epsilon, "blur_sigma": options.blur_sigma,
                      "grid_stride": options.grid_stride, "projection": options.projection,
                      "neighbourhood": options.neighbourhood,
                      "statistics_sets": k, "constants_bytes": int(k * p * d * (d + 1) * 4)},
        map_blur_sigma=head.sigma)
    with staged_bundle_folder(Path(out_dir)) as staging:
        export_onnx(model, staging, options.input_size, constant_bytes=set_bytes(k, p, d), trace_batch=2 * k)
        check = data.tiles_of(data.paths[0])[: max(1, k)]
        check = np.concatenate([check, check]) if k == 1 else check
        rel = onnx_reference_check(model, staging / "model.onnx", check)
        log.info("ONNX Runtime matches torch: max relative difference %.2e", rel)
        meta.training.fit_seconds = round(time.perf_counter() - started, 2)
        finalize_bundle(staging, meta)
    return Bundle.load(out_dir)


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
    if options.projection not in PROJECTIONS:
        raise DataError(f"projection must be one of {', '.join(PROJECTIONS)}, got {options.projection!r}")
    if options.grid_stride not in (4, 8):
        raise DataError(f"grid_stride must be 4 or 8, got {options.grid_stride}")
    if options.feature_dim is not None and options.feature_dim < 1:
        raise DataError(f"feature_dim must be >= 1, got {options.feature_dim}")
    if options.epsilon is not None and not options.epsilon > 0:
        raise DataError(f"epsilon must be > 0, got {options.epsilon}")
    if options.feature_dim is None and options.projection != "subset":
        raise DataError(f"feature_dim None (all channels) needs projection subset, got {options.projection!r}")
