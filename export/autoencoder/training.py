"""Train an AE/VAE on patches of good frames and export it as a model bundle.

Patches are cut by `edge_inspector.core.tiling.Tiler`, the same code the edge service runs on live frames, so the
model is trained on exactly what it will see. Good frames (not patches) are split into training and
validation sets: the validation frames steer early stopping; the z-score statistics of the map come from the
training patches so they do not touch the validation frames at all.

The threshold is chosen from out-of-sample good scores by the conformal rule (as PaDiM; a frame's score is
the maximum over its tiles, because a frame fails if any tile does). By default (threshold_folds K >= 2) K
fold models trained like the final one score every good image they never saw (export.autoencoder.folds), so
a few hundred images certify 0.5%. With threshold_folds 0 only the validation frames are scored, as before:
they pick the stopping epoch through one number (their mean error), which biases their scores only slightly
low, and 20% of the images certify 0.5% only from about 1,000 good images.

A run checkpoints after every epoch (`<out>.checkpoint/last.pt`, written atomically), so `--resume` continues
an interrupted run from the last finished epoch with the same optimiser and random state. A loss that stops
being finite ends the run with one line; the bundle is staged beside `out` and only renamed into place once
complete, so a failed run never leaves a half-written bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_inspector.core.atomic import write_atomic_with
from edge_inspector.core.bundle import Bundle, BundleMeta, ThresholdInfo, TilingInfo, TrainingInfo, finalize_bundle
from edge_inspector.core.errors import ConfigError, DataError, InspectorError
from edge_inspector.core.images import iter_readable, list_images, read_image, resize_to
from edge_inspector.core.operating_point import f1_optimal_threshold
from edge_inspector.core.progress import is_interactive, progress
from export.autoencoder.config import TrainConfig, effective_input_size
from export.autoencoder.folds import FoldStore, cross_fit_scores, fold_seed, resolve_folds
from export.autoencoder.model import (
    AE_MEAN,
    AE_STD,
    Architecture,
    ConvAutoencoder,
    ReconstructionError,
    ReconstructionGraph,
    count_parameters,
    fit_normaliser,
    kl_divergence,
)
from export.graph import BgrToInput
from export.onnx_export import export_onnx, onnx_reference_check
from export.staging import staged_bundle_folder
from export.threshold import apply_f1_rule, conformal_threshold, images_needed, report_outliers, score_stats

log = logging.getLogger(__name__)

MIN_SPLIT_FRAMES = 2  # fewest frames on each side of the train/validation split
CHECKPOINT_VERSION = 1
SCORE_BATCH = 32


class TrainingError(InspectorError):
    """Training could not produce a usable model (e.g. the loss diverged)."""


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------

@dataclass
class FrameGrid:
    """How frames become model inputs: the bundle's TilingInfo, and the Tiler the service builds from it."""

    tiling: TilingInfo
    input_size: tuple[int, int]
    frame_size: tuple[int, int]  # (height, width) all frames are brought to before tiling

    def __post_init__(self) -> None:
        self.tiler = self.tiling.tiler(self.input_size)  # None: whole frame resized to the input
        if self.tiler is not None:
            self.tiler.boxes(self.frame_size)  # raises a one-line ConfigError when the grid does not fit

    @property
    def tiles(self) -> int:
        return self.tiling.tiles

    def cut(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 frame -> (T, h, w, 3) patches, exactly as the edge service feeds the bundle."""
        if self.tiler is None:
            return resize_to(image, self.input_size)[None]
        return self.tiler.split(resize_to(image, self.frame_size))


def frame_grid(config: TrainConfig, frame_size: tuple[int, int], source: str) -> FrameGrid:
    """Grid from rows/cols (with the service's tile_size/stride/roi), or from a patch size that must tile the
    frame (or its ROI) exactly."""
    as_list = (lambda v: None if v is None else [int(x) for x in v])  # noqa: E731
    roi = as_list(config.roi)
    if config.patch_size is None:
        tiling = TilingInfo(rows=config.rows or 1, cols=config.cols or 1, mode="shared",
                            tile_size=as_list(config.tile_size), stride=as_list(config.stride), roi=roi)
        return FrameGrid(tiling, effective_input_size(config), frame_size)
    height, width = (roi[3], roi[2]) if roi else frame_size
    ph, pw = config.patch_size
    if ph > height or pw > width or height % ph or width % pw:
        area = "ROI" if roi else "frames"
        raise ConfigError(f"patch_size: {ph}x{pw} does not fit the {height}x{width} (height x width) {area} of "
                          f"{source} (its sides must be whole multiples of the patch; or set rows/cols)")
    tiling = TilingInfo(rows=height // ph, cols=width // pw, mode="shared", roi=roi)
    return FrameGrid(tiling, effective_input_size(config), frame_size)


@dataclass
class PatchSet:
    """All good frames of the training folder as patches, (frames, tiles, h, w, 3) uint8, with provenance."""

    folder: Path
    paths: list[Path]
    patches: np.ndarray
    grid: FrameGrid
    skipped: int = 0

    def flat(self, frames: np.ndarray) -> torch.Tensor:
        """The patches of the given frames as one (P, h, w, 3) uint8 tensor."""
        return torch.from_numpy(self.patches[frames].reshape((-1,) + self.patches.shape[2:]))

    @property
    def file_list_sha256(self) -> str:

        names = "\n".join(p.relative_to(self.folder).as_posix() for p in self.paths)
        return hashlib.sha256(names.encode()).hexdigest()


def load_patches(config: TrainConfig) -> PatchSet:
    folder = Path(config.train_folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: training folder not found")
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder}: no images (png, jpg, bmp, tiff) found")
    paths: list[Path] = []
    frames: list[np.ndarray] = []
    grid: FrameGrid | None = None
    for path, image in iter_readable(progress(files, desc="read good images", unit="img", leave=False),
                                     log):
        if grid is None:
            grid = frame_grid(config, image.shape[:2], str(folder))
        frames.append(grid.cut(image))
        paths.append(path)
    if grid is None:
        raise DataError(f"{folder}: none of the {len(files)} image files could be read")
    return PatchSet(folder, paths, np.stack(frames), grid, len(files) - len(paths))


def split_frames(count: int, val_fraction: float, seed: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of frame indices into (train, validation); both sides need MIN_SPLIT_FRAMES frames."""
    n_val = int(round(count * val_fraction))
    n_train = count - n_val
    if n_val < MIN_SPLIT_FRAMES or n_train < MIN_SPLIT_FRAMES:
        raise DataError(f"{source}: {count} good images give {n_train} training and {n_val} validation images at "
                        f"val_fraction {val_fraction:g}; need >= {MIN_SPLIT_FRAMES} of each (add good images or "
                        f"change val_fraction)")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def checkpoint_folder(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.checkpoint"


# May differ on --resume: how long to train, where to run, and what happens after training.
# threshold_folds changes only what follows the final model (the fold scores are kept under their own key).
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "out", "device", "target_false_reject_rate", "defects_folder",
                               "use_f1_threshold", "blur_sigma", "error_normalisation", "threshold_folds"})


def fingerprint(config: TrainConfig, kind: str, data: PatchSet) -> dict[str, Any]:
    """What must not change between a run and its resumption: the data, the model and the optimisation."""
    fields = {k: str(v) for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {"kind": kind, "files": data.file_list_sha256, **fields}


@dataclass
class TrainState:
    """Everything that evolves during training; a checkpoint is this plus the fingerprint."""

    epoch: int = 0  # finished epochs
    best_val: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None


def save_checkpoint(path: Path, state: TrainState, net: ConvAutoencoder, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, mark: dict[str, Any]) -> None:
    """Write atomically: an interrupt during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": CHECKPOINT_VERSION, "fingerprint": mark, "state": dataclasses.asdict(state),
               "model": net.state_dict(), "optimizer": optimizer.state_dict(),
               "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    write_atomic_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, net: ConvAutoencoder, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, mark: dict[str, Any]) -> TrainState:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise DataError(f"{path}: cannot read checkpoint ({str(err).splitlines()[0]}); delete it to start over"
                        ) from None
    if payload.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: checkpoint version {payload.get('version')} unsupported; delete it to start over")
    old = payload["fingerprint"]
    changed = sorted(k for k in set(old) | set(mark) if old.get(k) != mark.get(k))
    if changed:
        raise ConfigError(f"{path}: checkpoint was written for a different run (changed: {', '.join(changed)}); "
                          "train without --resume or delete the checkpoint folder")
    net.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    return TrainState(**payload["state"])


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def architecture(config: TrainConfig, kind: str) -> Architecture:
    return Architecture(kind, config.base_channels, config.depth, config.latent_channels, config.max_channels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA GPU (use cpu or auto)")
    return torch.device(name)


class Trainer:
    """One epoch at a time over uint8 patches, with the same preprocessing the exported graph applies."""

    def __init__(self, net: ConvAutoencoder, config: TrainConfig, device: torch.device, seed: int | None = None,
                 epochs: int | None = None, label: str = "epoch"):
        self.net = net.to(device)
        self.config = config
        self.device = device
        self.pre = BgrToInput(mean=AE_MEAN, std=AE_STD).to(device)
        self.error = ReconstructionError(config.ssim_weight).to(device)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
        self.epochs = config.epochs if epochs is None else epochs  # for the batch bar's "epoch i/n" only
        self.label = label

    def _inputs(self, patches: torch.Tensor, augment: bool) -> torch.Tensor:
        x = self.pre(patches.to(self.device, non_blocking=True))
        if augment:
            flips = torch.randint(0, 2, (2,), generator=self.generator).tolist()
            dims = [d for d, f in zip((3, 2), flips) if f]
            if dims:
                x = torch.flip(x, dims)
        return x

    def train_epoch(self, patches: torch.Tensor, epoch: int) -> float:
        self.net.train()
        order = torch.randperm(len(patches), generator=self.generator)
        chunks = list(order.split(self.config.batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks.pop()  # batch norm cannot learn statistics from a single patch
        total, seen = 0.0, 0
        batches = progress(chunks, desc=f"{self.label} {epoch + 1}/{self.epochs}", unit="batch", leave=False)
        for step, idx in enumerate(batches):
            x = self._inputs(patches[idx], self.config.flip_augment)
            recon, mu, logvar = self.net(x)
            loss = self.error(x, recon).mean()
            if logvar is not None:
                loss = loss + self.config.kl_weight * kl_divergence(mu, logvar)
            if not torch.isfinite(loss):
                raise TrainingError(f"training diverged: loss became {loss.item()} at epoch {epoch + 1}, batch "
                                    f"{step + 1}; lower lr (now {self.config.lr:g}) and train again")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return total / max(seen, 1)

    @torch.no_grad()
    def validation_error(self, patches: torch.Tensor) -> float:
        """Mean reconstruction error (the anomaly map's quantity, no KL term) of held-out good patches."""
        self.net.eval()
        total = 0.0
        for idx in torch.arange(len(patches)).split(SCORE_BATCH):
            x = self._inputs(patches[idx], augment=False)
            total += float(self.error(x, self.net.reconstruct(x)).mean()) * len(idx)
        return total / len(patches)


def fit_network(trainer: Trainer, train: torch.Tensor, val: torch.Tensor, state: TrainState,
                checkpoint: Path, mark: dict[str, Any]) -> TrainState:
    """Epochs with early stopping on validation error; checkpoint after each epoch."""
    config = trainer.config
    bar = progress(range(state.epoch, config.epochs), desc=f"train {trainer.net.arch.kind}", unit="epoch",
                   initial=state.epoch, total=config.epochs)
    # Without a terminal (journald, CI) the bar is off: one INFO line per epoch shows the run is alive.
    epoch_level = logging.DEBUG if is_interactive() else logging.INFO
    stopped_early = state.bad_epochs >= config.patience
    for epoch in bar:
        if stopped_early:
            break
        started = time.perf_counter()
        train_loss = trainer.train_epoch(train, epoch)
        val_error = trainer.validation_error(val)
        if not np.isfinite(val_error):
            raise TrainingError(f"training diverged: validation error became {val_error} at epoch {epoch + 1}; "
                                f"lower lr (now {config.lr:g}) and train again")
        seconds = time.perf_counter() - started
        state.epoch = epoch + 1
        state.seconds += seconds
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_error": val_error,
                              "seconds": round(seconds, 3)})
        if val_error < state.best_val:
            state.best_val, state.best_epoch, state.bad_epochs = val_error, epoch + 1, 0
            state.best_model = {k: v.detach().cpu().clone() for k, v in trainer.net.state_dict().items()}
        else:
            state.bad_epochs += 1
        bar.set_postfix(loss=f"{train_loss:.5f}", val=f"{val_error:.5f}", best=f"{state.best_val:.5f}")
        log.log(epoch_level, "epoch %d/%d: train loss %.6f, validation error %.6f (%.1f s)", epoch + 1,
                config.epochs, train_loss, val_error, seconds)
        save_checkpoint(checkpoint, state, trainer.net, trainer.optimizer, trainer.generator, mark)
        stopped_early = state.bad_epochs >= config.patience
    bar.close()
    if stopped_early:
        log.info("early stop after epoch %d: no better validation error for %d epochs (best at epoch %d)",
                 state.epoch, config.patience, state.best_epoch)
    return state


# --------------------------------------------------------------------------------------------------
# Scoring, threshold and export
# --------------------------------------------------------------------------------------------------

def build_graph(net: ConvAutoencoder, config: TrainConfig, input_size: tuple[int, int],
                train: torch.Tensor) -> ReconstructionGraph:
    """The exported graph; with zscore, error statistics come from the training patches (the validation
    frames stay out-of-sample for the threshold)."""
    graph = ReconstructionGraph(net, input_size, config.ssim_weight, config.blur_sigma).eval()
    if config.error_normalisation == "none":
        return graph
    normaliser = fit_normaliser(graph, (train[i:i + SCORE_BATCH] for i in range(0, len(train), SCORE_BATCH)))
    return ReconstructionGraph(net, input_size, config.ssim_weight, config.blur_sigma, normaliser).eval()


@torch.no_grad()
def frame_scores(graph: ReconstructionGraph, frames: np.ndarray) -> np.ndarray:
    """(frames, tiles, h, w, 3) -> (frames,) score: the maximum over a frame's tiles."""
    graph.eval()
    flat = frames.reshape((-1,) + frames.shape[2:])
    scores = np.concatenate([graph(torch.from_numpy(flat[i:i + SCORE_BATCH]))[1].numpy()
                             for i in range(0, len(flat), SCORE_BATCH)])
    return scores.reshape(frames.shape[0], frames.shape[1]).max(axis=1)


def load_defect_frames(config: TrainConfig, grid: FrameGrid) -> np.ndarray:
    if config.defects_folder is None:
        raise ConfigError("defects_folder: needed to load defect frames")
    folder = Path(config.defects_folder)
    paths = list_images(folder)  # raises DataError for a missing folder
    frames = []
    for path in paths:
        try:
            frames.append(grid.cut(read_image(path)))
        except InspectorError as err:
            log.warning("skipping unreadable defect image: %s", err)
    if not frames:
        raise DataError(f"{folder}: defects_folder holds no readable images")
    return np.stack(frames)


def choose_threshold(good: np.ndarray, graph: ReconstructionGraph, config: TrainConfig, grid: FrameGrid,
                     source: str) -> ThresholdInfo:
    """Conformal threshold on out-of-sample good scores (`source` says where they came from, for the note);
    plus the F1-optimal one when defective images are given (scored by the final model)."""
    info = conformal_threshold(good, config.target_false_reject_rate)
    info.note += f"; scores: {source}"
    if not info.certified:
        log.warning(info.note)
    if config.defects_folder is not None:
        bad = frame_scores(graph, load_defect_frames(config, grid))
        scores = np.concatenate([good, bad])
        labels = np.concatenate([np.zeros(good.size, bool), np.ones(bad.size, bool)])
        value, confusion = f1_optimal_threshold(scores, labels)
        log.info("F1-optimal threshold %.6g on %d out-of-sample good + %d defective images: F1 %.3f", value,
                 good.size, bad.size, confusion.f1)
        info = apply_f1_rule(info, value, config.use_f1_threshold, good, bad)
    return info


# --------------------------------------------------------------------------------------------------
# k-fold out-of-sample scores (export.autoencoder.folds says why this rule)
# --------------------------------------------------------------------------------------------------

@dataclass
class FoldResult:
    """What the k-fold pass gives the bundle: a score per good image and how it was made."""

    scores: np.ndarray
    folds: int
    epochs: int
    seconds: float


def train_fold_graph(config: TrainConfig, kind: str, device: torch.device, data: PatchSet, train_idx: np.ndarray,
                     epochs: int, fold: int, folds: int) -> ReconstructionGraph:
    """Fold model `fold`: the final model's recipe on train_idx's frames for exactly `epochs` epochs (no
    validation pass, no best-epoch selection), z-score statistics from its own patches. One bar per fold,
    off when stderr is not a terminal; the trainer and its optimiser are gone before the graph is returned."""
    seed = fold_seed(config.seed, fold)
    torch.manual_seed(seed)  # weights and the VAE's sampling
    label = f"fold {fold + 1}/{folds}"
    trainer = Trainer(ConvAutoencoder(architecture(config, kind)), config, device, seed=seed, epochs=epochs,
                      label=f"{label} epoch")
    train = data.flat(train_idx)
    bar = progress(range(epochs), desc=label, unit="epoch", leave=False)
    for epoch in bar:
        bar.set_postfix(loss=f"{trainer.train_epoch(train, epoch):.5f}")
    bar.close()
    net = trainer.net.cpu().eval()
    del trainer
    return build_graph(net, config, data.grid.input_size, train)


def kfold_scores(config: TrainConfig, kind: str, device: torch.device, data: PatchSet, folds: int, epochs: int,
                 store: FoldStore) -> FoldResult:
    """Every good frame scored by the fold model that never saw it; one fold model in memory at a time."""
    started = time.perf_counter()

    def score_fold(fold: int, train_idx: np.ndarray, members: np.ndarray) -> np.ndarray:
        begun = time.perf_counter()
        graph = train_fold_graph(config, kind, device, data, train_idx, epochs, fold, folds)
        scores = frame_scores(graph, data.patches[members])
        log.info("fold %d/%d: %d epochs on %d images, scored the other %d (%.1f s)", fold + 1, folds, epochs,
                 len(train_idx), len(members), time.perf_counter() - begun)
        return scores

    scores = cross_fit_scores(len(data.paths), folds, config.seed, score_fold, store)
    return FoldResult(scores, folds, epochs, round(time.perf_counter() - started, 2))


def log_plan(folds: int, images: int, n_val: int, config: TrainConfig) -> None:
    """Say before training what the threshold will cost (k-fold) or why it may not certify (hold-out)."""
    if folds:
        log.info("threshold from %d-fold out-of-sample scores of all %d good images: trains %d models, the final "
                 "one (early stopping on %d held-out images), then %d fold models of its best epoch count on about "
                 "%d images each; up to %dx the training time of threshold_folds 0", folds, images, folds + 1,
                 n_val, folds, images - images // folds, folds + 1)
        return
    needed = images_needed(config.target_false_reject_rate)
    if n_val < needed:
        log.info("threshold from the %d held-out good images: too few to certify %g (needs %d); threshold_folds "
                 ">= 2 scores all %d", n_val, config.target_false_reject_rate, needed, images)


def log_fold_estimate(folds: int, epochs: int, state: TrainState, n_train: int, images: int) -> None:
    """After the final model: the fold models' epochs, and their time at the final model's pace."""
    per_epoch = state.seconds / max(len(state.history), 1)
    log.info("k-fold threshold: %d fold models x %d epochs (the final model's best epoch) on about %d images each; "
             "about %.0f s at the final model's %.1f s per epoch", folds, epochs, images - images // folds,
             folds * epochs * per_epoch * (images - images // folds) / max(n_train, 1), per_epoch)


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------

def train_autoencoder(config: TrainConfig, kind: str, out_dir: str | Path, resume: bool = False,
                      threshold_folds: int | None = None) -> Bundle:
    """Train an AE ('ae') or VAE ('vae') per config and write a verified bundle to out_dir.

    threshold_folds overrides config.threshold_folds (the CLI's --threshold-folds; errors name the option).
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    folds_name = "threshold_folds" if threshold_folds is None else "--threshold-folds"
    requested = config.threshold_folds if threshold_folds is None else threshold_folds
    resolve_folds(requested, None, folds_name)  # a negative count fails before any image is read
    arch = architecture(config, kind)
    device = resolve_device(config.device)
    data = load_patches(config)
    folds = resolve_folds(requested, len(data.paths), folds_name)
    train_idx, val_idx = split_frames(len(data.paths), config.val_fraction, config.seed, str(data.folder))
    tiles = data.grid.tiles
    grid_text = data.grid.tiler.describe() if data.grid.tiler else f"whole frame -> {data.grid.input_size}"
    log.info("training %s on %d frames x %d tiles (%s) from %s, validating on %d frames; device %s", kind,
             len(train_idx), tiles, grid_text, data.folder, len(val_idx), device)
    log_plan(folds, len(data.paths), len(val_idx), config)
    train, val = data.flat(train_idx), data.flat(val_idx)

    torch.manual_seed(config.seed)
    net = ConvAutoencoder(arch)
    trainer = Trainer(net, config, device)
    checkpoint = checkpoint_folder(out_dir) / "last.pt"
    mark = fingerprint(config, kind, data)
    state = TrainState()
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, trainer.net, trainer.optimizer, trainer.generator, mark)
        log.info("resuming from %s after epoch %d (best validation error %.6f at epoch %d)", checkpoint,
                 state.epoch, state.best_val, state.best_epoch)
    elif resume:
        log.warning("--resume: no checkpoint at %s; starting from scratch", checkpoint)
    elif checkpoint.is_file():
        log.warning("%s holds an interrupted run; starting from scratch (pass --resume to continue it)", checkpoint)
    if not resume:
        FoldStore(checkpoint.parent, {}).clear()  # fold scores of an earlier run are not this run's
    try:
        state = fit_network(trainer, train, val, state, checkpoint, mark)
    except KeyboardInterrupt:
        if checkpoint.is_file():
            log.warning("interrupted: continue with --resume (checkpoint %s)", checkpoint)
        raise
    if state.best_model is None:
        raise TrainingError(f"{checkpoint}: no finished epoch to export (epochs {config.epochs} already done?)")

    net.load_state_dict(state.best_model)
    del trainer  # its optimiser's moments; the final model waits on the CPU while the fold models train
    graph = build_graph(net.cpu().eval(), config, data.grid.input_size, train)
    del train
    held_out = frame_scores(graph, data.patches[val_idx])
    fold_result = None
    if folds:
        log_fold_estimate(folds, state.best_epoch, state, len(train_idx), len(data.paths))
        store = FoldStore(checkpoint.parent, {"fingerprint": mark, "folds": folds, "epochs": state.best_epoch,
                                              "blur_sigma": config.blur_sigma,
                                              "error_normalisation": config.error_normalisation})
        try:
            fold_result = kfold_scores(config, kind, device, data, folds, state.best_epoch, store)
        except KeyboardInterrupt:
            log.warning("interrupted: continue with --resume (finished folds are kept in %s)", checkpoint.parent)
            raise
        good = fold_result.scores
        names = list(data.paths)
        source = (f"{folds}-fold cross-fitting (threshold_folds {folds}): each of the {good.size} good images "
                  f"scored by a model trained for {state.best_epoch} epochs on the other {folds - 1} folds")
    else:
        good = held_out
        names = [data.paths[i] for i in val_idx]
        source = (f"the {good.size} held-out good images (val_fraction {config.val_fraction:g}, threshold_folds 0:"
                  " hold-out)")
    threshold = choose_threshold(good, graph, config, data.grid, source)
    report_outliers(names, good, threshold.conformal_value or threshold.value)
    params = _model_params(arch, config, net, state, len(train_idx), len(val_idx))
    params.update(_fold_params(fold_result, held_out, val_idx))
    meta = BundleMeta(
        model_kind=kind, input_size=data.grid.input_size, threshold=threshold, score_stats=score_stats(good),
        training=TrainingInfo(folder=str(data.folder.resolve()), image_count=len(data.paths),
                              file_list_sha256=data.file_list_sha256, skipped_files=data.skipped,
                              seed=config.seed, folds=folds, fit_seconds=0.0),
        tiling=data.grid.tiling, model_params=params, map_blur_sigma=graph.answer.sigma)
    with staged_bundle_folder(out_dir) as staging:
        export_onnx(graph, staging, data.grid.input_size)
        rel = onnx_reference_check(graph, staging / "model.onnx", val[:4].numpy())
        log.info("ONNX Runtime matches torch: max relative difference %.2e", rel)
        meta.training.fit_seconds = round(time.perf_counter() - started, 2)
        finalize_bundle(staging, meta)
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return Bundle.load(out_dir)


def _fold_params(result: FoldResult | None, held_out: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    """How the threshold's scores were made; with folds, the fold models' and the final model's median score on
    the same held-out frames (near 1:1 when fold models are on the final model's scale)."""
    if result is None:
        return {"threshold_folds": 0}
    return {"threshold_folds": result.folds, "fold_epochs": result.epochs, "fold_seconds": result.seconds,
            "held_out_median_final": round(float(np.median(held_out)), 6),
            "held_out_median_folds": round(float(np.median(result.scores[val_idx])), 6)}


def _model_params(arch: Architecture, config: TrainConfig, net: ConvAutoencoder, state: TrainState,
                  n_train: int, n_val: int) -> dict[str, Any]:
    """Informative numbers for bundle.yaml: architecture, loss, and how training went."""
    epochs = max(len(state.history), 1)
    return {"base_channels": arch.base_channels, "depth": arch.depth, "latent_channels": arch.latent_channels,
            "max_channels": arch.max_channels, "stage_channels": arch.stage_channels(),
            "parameters": count_parameters(net), "ssim_weight": config.ssim_weight, "blur_sigma": config.blur_sigma,
            "kl_weight": config.kl_weight if arch.kind == "vae" else 0.0,
            "error_normalisation": config.error_normalisation,
            "normalisation": "rgb/127.5 - 1", "train_frames": n_train, "validation_frames": n_val,
            "epochs_run": state.epoch, "best_epoch": state.best_epoch,
            "best_validation_error": round(state.best_val, 8),
            "epoch_seconds": round(state.seconds / epochs, 3), "lr": config.lr, "batch_size": config.batch_size}
