"""Fit the memory-bank kind: features of every good training patch, a greedy coreset as the bank, k-fold
out-of-sample scores for the threshold, one ONNX graph in the usual bundle.

Memory: the pool of projected patch features is kept in float16 (P positions x D x 2 bytes per frame:
0.5 MB per 256x256 frame at stride 8 and D=256, so 450 images take 236 MB) plus a float32 copy in the
selection space (64 KB per frame at 16 dims). Nothing grows with the square of the pool.

Threshold: as for PaDiM, every training image gets an out-of-sample score. For fold j a bank is selected
from the other folds' patches only (same bank size as the final model) and fold j's frames are scored
against it; the conformal rule then picks the threshold from those scores (`export.threshold`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_inspector.core.bundle import Bundle, BundleMeta, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import DataError
from export.backbones import DEFAULT_BACKBONE, backbone_names
from export.graph import MapToAnswer
from export.onnx_export import export_onnx, onnx_reference_check
from export.padim.features import FastEmbedding, PadimFeatures
from export.padim.fit import (
    TrainingImages,
    tiling_info,
)
from export.patchcore.coreset import greedy_coreset, random_projection, selection_device
from export.patchcore.model import BankDistance, BankSearch, PatchcoreModel, offset_step, position_offset
from export.staging import staged_bundle_folder
from export.supervised.fit import LabelledSet, TrainingInputs, attach_supervised, check_untiled, supervised_collector
from export.threshold import conformal_threshold, report_outliers, score_stats
from export.threshold import fold_ids as threshold_fold_ids

log = logging.getLogger(__name__)

SCORE_ROWS = 16384  # pool rows scored against a bank at once: bounds the (rows x bank) distance block


@dataclass
class PatchcoreOptions:
    """Defaults chosen with `benchmarks/accuracy.py` (see README, "Accuracy across data sets")."""

    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    layers: tuple[str, ...] | None = None
    input_size: tuple[int, int] = (256, 256)
    feature_stride: int = 8  # grid of the bank search: 8 -> 32x32 positions at 256 px
    projection_dim: int = 256  # random projection of the backbone channels (1056 for Lite0)
    bank_fraction: float = 0.01  # bank = this share of all training patches ...
    bank_size: int | None = None  # ... or exactly this many
    selection_dim: int = 16  # dimensions the greedy selection works in (speed; see coreset.py)
    search_dims: int = 64  # the bank search's first step in this many principal axes; 0 = exact search
    search_candidates: int = 8  # ... keeping this many entries for the exact second step (model.BankSearch)
    neighbourhood: int = 3
    blur_sigma: float = 4.0
    seed: int = 0
    folds: int = 5
    target_false_reject_rate: float = 0.005
    rows: int = 1
    cols: int = 1
    tile_mode: str = "shared"  # one bank for all tiles (per-tile banks are not implemented)
    tile_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None
    batch_size: int = 8
    feature_dim: None = None  # PadimFeatures' channel subset: all channels, the projection reduces them
    position_offset: bool = False  # subtract each position's typical good distance (see model.PositionOffset)

    def check(self) -> None:
        if self.backbone not in backbone_names():
            raise DataError(f"unknown backbone {self.backbone!r} (expected one of {', '.join(backbone_names())})")
        h, w = self.input_size
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise DataError(f"input_size must be multiples of 16 and >= 32, got {self.input_size}")
        if self.feature_stride not in (4, 8, 16):
            raise DataError(f"feature_stride must be 4, 8 or 16, got {self.feature_stride}")
        if self.projection_dim < 1 or self.selection_dim < 1:
            raise DataError(f"projection_dim and selection_dim must be >= 1, got {self.projection_dim}, "
                            f"{self.selection_dim}")
        if self.search_dims < 0 or self.search_candidates < 1:
            raise DataError(f"search_dims must be >= 0 and search_candidates >= 1, got {self.search_dims}, "
                            f"{self.search_candidates}")
        if self.bank_size is None and not 0 < self.bank_fraction <= 1:
            raise DataError(f"bank_fraction must be in (0, 1], got {self.bank_fraction}")
        if self.bank_size is not None and self.bank_size < 1:
            raise DataError(f"bank_size must be >= 1, got {self.bank_size}")
        if self.tile_mode != "shared":
            raise DataError("the patchcore kind keeps one bank for all tiles: tile_mode must be shared")
        if not 0 < self.target_false_reject_rate < 1:
            raise DataError(f"target false-reject rate must be in (0, 1), got {self.target_false_reject_rate}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.feature_stride, self.input_size[1] // self.feature_stride

    @property
    def search(self) -> BankSearch:
        return BankSearch(self.search_dims, self.search_candidates)


def rows_of(frames: np.ndarray, per_frame: int) -> torch.Tensor:
    """Rows of the given frames in a stack that keeps per_frame consecutive rows (patches, tiles) per frame."""
    return (torch.as_tensor(frames, dtype=torch.int64)[:, None] * per_frame + torch.arange(per_frame)).reshape(-1)


class PatchPool:
    """Projected features of every training patch (float16) and their selection-space copy (float32)."""

    def __init__(self, frames: int, rows_per_frame: int, dim: int, selection: torch.Tensor):
        self.rows_per_frame = rows_per_frame
        self.features = torch.empty(frames * rows_per_frame, dim, dtype=torch.float16)
        self.selection_matrix = selection
        self.selection = torch.empty(frames * rows_per_frame, selection.shape[1], dtype=torch.float32)

    def put(self, frame_indices: list[int], emb: torch.Tensor) -> None:
        """emb (frames x tiles, P, D) for the given frames, tiles in order."""
        block = emb.reshape(len(frame_indices), self.rows_per_frame, -1)
        for frame, rows in zip(frame_indices, block):
            where = slice(frame * self.rows_per_frame, (frame + 1) * self.rows_per_frame)
            self.features[where] = rows.to(torch.float16)
            self.selection[where] = rows @ self.selection_matrix

    def rows_of(self, frames: np.ndarray) -> torch.Tensor:
        """Row indices of the given frames' patches."""
        return rows_of(frames, self.rows_per_frame)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * 2 + self.selection.numel() * 4


def bank_size_for(options: PatchcoreOptions, pool_rows: int) -> int:
    size = options.bank_size if options.bank_size is not None else round(options.bank_fraction * pool_rows)
    return max(1, min(int(size), pool_rows))


@torch.no_grad()
def build_pool(data: TrainingImages, features: PadimFeatures, options: PatchcoreOptions) -> PatchPool:
    tiles = options.rows * options.cols
    p = options.grid[0] * options.grid[1]
    selection = random_projection(features.dim, options.selection_dim, options.seed + 1)
    pool = PatchPool(len(data.paths), tiles * p, features.dim, selection)
    log.info("patch pool: %d frames x %d patches, %.0f MB", len(data.paths), tiles * p, pool.nbytes / 1e6)
    embedding = FastEmbedding(features, options.input_size)
    for chunk, batch in data.batches(list(range(len(data.paths))), "fit: features"):
        pool.put(chunk, embedding(batch))
    return pool


def select_rows(pool: PatchPool, rows: torch.Tensor | None, size: int, seed: int, desc: str,
                initial: np.ndarray | None = None) -> torch.Tensor:
    """Greedy coreset over the given pool rows (all when None) -> chosen pool row indices."""
    candidates = pool.selection if rows is None else pool.selection[rows]
    picked = torch.from_numpy(greedy_coreset(candidates, size, seed, selection_device(), desc=desc,
                                             initial=initial))
    return picked if rows is None else rows[picked]


def tiles_per_chunk(options: PatchcoreOptions, rows: int = SCORE_ROWS) -> int:
    """Tiles scored at once: bounds the (rows x bank) distance block and the full-size maps of the head."""
    return max(1, rows // (options.grid[0] * options.grid[1]))


@torch.no_grad()
def pool_maps(pool: PatchPool, frames: np.ndarray, bank: torch.Tensor, options: PatchcoreOptions) -> torch.Tensor:
    """Low-resolution distance maps (frames x tiles, 1, h, w) of pool frames against a bank, as the graph does."""
    distance = BankDistance(bank, options.grid, options.search)
    tiles = options.rows * options.cols
    p = options.grid[0] * options.grid[1]
    # The two-step search also holds (rows, candidates, D) gathered rows and their differences: half the rows
    # keep the peak where the exact search had it (fryum fit, whole process: 1,115 MB exact; two-step 1,337 MB
    # with whole chunks, 1,078 MB with half).
    per_chunk = tiles_per_chunk(options, SCORE_ROWS // 2 if distance.candidates else SCORE_ROWS)
    emb = pool.features[pool.rows_of(frames)].reshape(len(frames) * tiles, p, -1)
    return torch.cat([distance(emb[start:start + per_chunk].float()) for start in range(0, emb.shape[0], per_chunk)])


@torch.no_grad()
def frame_scores(maps: torch.Tensor, offset: torch.Tensor | None, options: PatchcoreOptions) -> np.ndarray:
    """Frame scores (max over tiles of the blurred map's max) of low-resolution maps, as the graph does."""
    shift, head = offset_step(offset), MapToAnswer(options.input_size, options.blur_sigma)
    tiles = options.rows * options.cols
    per_chunk = tiles_per_chunk(options)
    scores = [head(shift(maps[start:start + per_chunk]))[1] for start in range(0, maps.shape[0], per_chunk)]
    return torch.cat(scores).numpy().reshape(-1, tiles).max(axis=1)


def out_of_sample_maps(pool: PatchPool, frames: int, bank_rows: torch.Tensor, options: PatchcoreOptions
                       ) -> tuple[torch.Tensor, np.ndarray] | None:
    """k-fold: fold j's frames mapped against a bank of the same size chosen from the other folds only.

    Returns the maps (frames x tiles, 1, h, w) and each frame's fold, or None with fewer than 2 folds. The fold
    bank starts from the final bank's entries that come from the other folds and greedy selection fills the
    holes the held-out entries leave (same size as the final bank). Measured on fryum: about 5x less time than
    selecting each fold's bank from scratch.
    """
    folds = min(frames, options.folds)
    if folds < 2:
        return None
    fold_ids = threshold_fold_ids(frames, folds, options.seed)
    tiles = options.rows * options.cols
    maps = torch.empty(frames * tiles, 1, *options.grid)
    frame_of_row = bank_rows // pool.rows_per_frame
    for fold in range(folds):
        held = np.flatnonzero(fold_ids == fold)
        kept_frames = np.flatnonzero(fold_ids != fold)
        kept_rows = pool.rows_of(kept_frames)
        # positions of the surviving final-bank rows inside kept_rows (rows_of keeps frame order)
        survivors = bank_rows[torch.from_numpy(fold_ids[frame_of_row.numpy()] != fold)]
        slot = torch.from_numpy(np.searchsorted(kept_frames, (survivors // pool.rows_per_frame).numpy()))
        initial = (slot * pool.rows_per_frame + survivors % pool.rows_per_frame).numpy()
        rows = select_rows(pool, kept_rows, len(bank_rows), options.seed, f"fit: fold {fold + 1}/{folds} coreset",
                           initial=initial)
        maps[rows_of(held, tiles)] = pool_maps(pool, held, pool.features[rows].float(), options)
    return maps, fold_ids


def out_of_sample_scores(found: tuple[torch.Tensor, np.ndarray] | None, frames: int, options: PatchcoreOptions
                         ) -> tuple[np.ndarray, torch.Tensor | None]:
    """Every frame's out-of-sample score, and the position offset the graph subtracts (None when off).

    With `position_offset` a fold's frames are scored with the offset of the other folds' maps only, so the
    offset is as out-of-sample as the bank; the shipped offset comes from all the maps. With tiles, one offset
    serves every tile (the tiles share one bank and the graph does not know which tile it sees).
    """
    if found is None:
        return np.full(frames, np.nan), None
    maps, fold_ids = found
    if not options.position_offset:
        return frame_scores(maps, None, options), None
    tiles = options.rows * options.cols
    oos = np.empty(frames)
    for fold in np.unique(fold_ids):
        held = np.flatnonzero(fold_ids == fold)
        others = rows_of(np.flatnonzero(fold_ids != fold), tiles)
        oos[held] = frame_scores(maps[rows_of(held, tiles)], position_offset(maps[others]), options)
    return oos, position_offset(maps)


def create_features(options: PatchcoreOptions) -> PadimFeatures:
    """All the backbone's tapped channels, randomly projected to `projection_dim`.

    The projection is applied to each tap at its own resolution (a 1x1 convolution, before upsampling: see
    PadimFeatures), the same linear map as projecting the concatenated channels on the grid, which the graph
    did until 2026-11-24. Measured on the fryum bundle (ONNX Runtime's profiler, 2 threads): the three 1x1
    convolutions take 2.0 ms where the 1056-channel concatenation and its MatMul took 4.1 ms; with the bank
    search's changes (BankDistance) the graph went from 29.8 to 24.9 ms (best of ten blocks, in turns).
    """
    features = PadimFeatures(options, grid_stride=options.feature_stride)
    features.project(random_projection(features.channels, options.projection_dim, options.seed))
    return features.eval()


def training_inputs(pool: PatchPool, found: tuple[torch.Tensor, np.ndarray] | None, options: PatchcoreOptions,
                    oos: np.ndarray) -> TrainingInputs:
    """The good training images' classifier inputs (fit --labelled) from their k-fold maps, each less the
    position offset of the other folds (as `out_of_sample_scores` scores them), and their pooled features."""
    if found is None:
        raise DataError("--labelled needs out-of-sample scores of every good training image (at least 2 images)")
    maps, fold_ids = found
    collector = supervised_collector(fold_ids.size, options.grid)
    p = options.grid[0] * options.grid[1]
    for fold in np.unique(fold_ids):
        held = np.flatnonzero(fold_ids == fold)
        shift = offset_step(position_offset(maps[np.flatnonzero(fold_ids != fold)])
                            if options.position_offset else None)
        for start in range(0, held.size, 64):
            frames = held[start:start + 64]
            emb = pool.features[pool.rows_of(frames)].reshape(frames.size, p, -1).float()
            collector([int(f) for f in frames], emb, shift(maps[torch.from_numpy(frames)]))
    return collector.result(oos)


def fit_patchcore(train_folder: str | Path, out_dir: str | Path, options: PatchcoreOptions | None = None,
                  labelled: LabelledSet | None = None) -> Bundle:
    """Fit the memory-bank kind on a folder of good images and write a verified model bundle to out_dir; with
    `labelled`, a supervised part trained and cross-validated on labelled images joins the graph
    (export/supervised)."""
    options = options or PatchcoreOptions()
    options.check()
    if labelled is not None:
        check_untiled(options.rows * options.cols, options.roi, options.tile_size)
    started = time.perf_counter()
    data = TrainingImages(Path(train_folder), options)  # type: ignore[arg-type]  # same fields as PadimOptions
    if len(data.paths) < 2:
        raise DataError(f"{data.folder}: need at least 2 images for an out-of-sample threshold, got {len(data.paths)}")
    features = create_features(options)
    log.info("fitting patchcore (%s, stride %d, D=%d) on %d images from %s", options.backbone,
             options.feature_stride, features.dim, len(data.paths), data.folder)
    pool = build_pool(data, features, options)
    size = bank_size_for(options, pool.features.shape[0])
    coreset_started = time.perf_counter()
    bank_rows = select_rows(pool, None, size, options.seed, "fit: coreset")
    bank = pool.features[bank_rows].float()
    coreset_seconds = time.perf_counter() - coreset_started
    log.info("bank: %d of %d patches (%.1f MB) chosen in %.1f s on %s", size, pool.features.shape[0],
             bank.numel() * 4 / 1e6, coreset_seconds, selection_device())
    found = out_of_sample_maps(pool, len(data.paths), bank_rows, options)
    oos, offset = out_of_sample_scores(found, len(data.paths), options)
    training = training_inputs(pool, found, options, oos) if labelled is not None else None
    del pool, found
    threshold = conformal_threshold(oos, options.target_false_reject_rate)
    report_outliers(data.paths, oos, threshold.value)
    model = PatchcoreModel(features, bank, options.input_size, options.feature_stride, options.blur_sigma,
                           offset, options.search).eval()
    graph: torch.nn.Module = model
    good_scores, labelled_info = oos, None
    if labelled is not None and training is not None:
        attached = attach_supervised(model, training, labelled, options.input_size,
                                     options.target_false_reject_rate, options.seed, options.batch_size, threshold)
        graph, threshold, labelled_info = attached.model, attached.threshold, attached.info
        good_scores = attached.good_scores if attached.good_scores.size else oos
    if not threshold.certified:
        log.warning(threshold.note)
    meta = BundleMeta(
        model_kind="patchcore", input_size=(int(options.input_size[0]), int(options.input_size[1])),
        threshold=threshold,
        score_stats=score_stats(good_scores), labelled=labelled_info,
        training=TrainingInfo(folder=str(data.folder.resolve()), image_count=len(data.paths),
                              file_list_sha256=data.file_list_sha256, skipped_files=data.skipped,
                              seed=options.seed, folds=min(len(data.paths), options.folds),
                              fit_seconds=round(time.perf_counter() - started, 2)),
        backbone=options.backbone, layers=list(features.info.layers), feature_dim=features.dim,
        tiling=tiling_info(options),  # type: ignore[arg-type]
        model_params={"feature_stride": options.feature_stride, "projection_dim": options.projection_dim,
                      "bank_size": size, "bank_fraction_of_patches": round(size / max(1, len(data.paths)
                                                                                     * options.rows * options.cols
                                                                                     * options.grid[0]
                                                                                     * options.grid[1]), 5),
                      "selection_dim": options.selection_dim, "neighbourhood": options.neighbourhood,
                      "blur_sigma": options.blur_sigma, "coreset_seconds": round(coreset_seconds, 2),
                      "position_offset": offset is not None,
                      "search_dims": int(model.bank.axes.shape[1]) if model.bank.candidates else 0,
                      "search_candidates": model.bank.candidates,
                      "search_group": model.bank.group if model.bank.candidates else 0,
                      "constants_bytes": int(sum(b.numel() * 4 for b in model.bank.buffers())
                                             + features.dim * features.channels * 4)},
        map_blur_sigma=model.head.sigma)
    with staged_bundle_folder(Path(out_dir)) as staging:
        export_onnx(graph, staging, options.input_size)
        check = data.tiles_of(data.paths[0])[:1]
        rel = onnx_reference_check(graph, staging / "model.onnx", np.concatenate([check, check[:, ::-1]]))
        log.info("ONNX Runtime matches torch: max relative difference %.2e", rel)
        meta.training.fit_seconds = round(time.perf_counter() - started, 2)
        finalize_bundle(staging, meta)
    return Bundle.load(out_dir)
