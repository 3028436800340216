"""Out-of-sample scores of every good image for the autoencoder's threshold (k-fold cross-fitting).

Why: the conformal rule (export.threshold) needs (1 - alpha) / alpha out-of-sample good scores to certify a
false-reject rate alpha: 199 for 0.5%. Scoring only a 20% hold-out needs about 1,000 good images for that;
scoring every good image with a model that never saw it needs 199. PaDiM and PatchCore do the same.

The rule (one of the two the issue allowed; this one keeps the shipped model exactly as before):
- The final (shipped) model trains as with the hold-out: on 1 - val_fraction of the images, early stopping
  on the rest. Its best epoch E becomes the fold models' epoch count.
- Fold model j trains with the same recipe (architecture, optimiser, batch size, augmentation) on the other
  K - 1 folds for exactly E epochs, no validation and no selection, takes its z-score statistics from its own
  training patches, and scores fold j only. Fold j touches nothing of model j: not its weights, not its
  stopping epoch, not its normalisation, so its scores are out-of-sample in the strict sense.
- K = 5 by default: with val_fraction 0.2 a fold model trains on 4/5 of the images, as many as the final
  model, for as many epochs, so its scores estimate the final model's on new good parts (fewer folds train
  on less and score higher: a safe but looser threshold). Measured on MVTec bottle (128 px, 15 epochs, 209
  images): on the final model's 42 held-out frames the fold models' median score was 0.84 against the
  final model's 0.95 (model_params held_out_median_folds / _final record both for every run).
The other rule (final model on all images for the median of the folds' best epochs) would need the fold
models to stop early too, either on the fold they score (biasing its scores low) or on an inner split (fold
models would then see 64% of the images against the final model's 100%: scores high, more escapes), and the final
model would lose its validation curve, the resume checkpoint and the measured early stop it has today.

Cost: K + 1 trainings. Fold models skip the validation pass and run E epochs, so a run takes about
1 + K * E / epochs_run times the hold-out run (bottle above, 6 models: 2.5 -> 11.5 min wall clock and
2.3 -> 7.9 min CPU time on a shared 2-core VM at load 3.5-5.9).
Memory: one fold model (with its optimiser) at a time; the final model waits as a CPU copy of its weights.
Determinism: fold membership comes from a seeded permutation and fold j's torch seed from (seed, j), so a
run is repeatable and a resumed run redoes an unfinished fold exactly. Each finished fold's scores are kept
in the checkpoint folder, so `--resume` after an interrupt trains only the folds still missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.errors import ConfigError
from export.threshold import fold_ids

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
STORE_NAME = "folds.json"
STORE_VERSION = 1


def resolve_folds(requested: int, images: int | None, name: str = "threshold_folds") -> int:
    """The fold count to use: 0 for the hold-out (0 or 1 asked), else 2..images; anything else is one line.

    images None checks only what needs no image count (called before the images are read).
    """
    if requested < 0 or (images is not None and requested > images):
        limit = "the number of good images" if images is None else f"the {images} good images"
        raise ConfigError(f"{name}: expected 0 or 1 (score the val_fraction hold-out) or a fold count from 2 to "
                          f"{limit}, got {requested}")
    return 0 if requested < 2 else requested


def fold_seed(seed: int, fold: int) -> int:
    """Torch seed of fold model `fold`: fixed by (seed, fold), different from the final model's and each other's."""
    return int(np.random.SeedSequence([seed, fold + 1]).generate_state(1)[0])


class FoldStore:
    """Finished folds' scores in the checkpoint folder, valid only for the same run, fold count and epochs."""

    def __init__(self, folder: Path, key: dict[str, Any]):
        self.path = folder / STORE_NAME
        self.key = {"version": STORE_VERSION, **key}

    def load(self) -> dict[int, np.ndarray]:
        try:
            payload = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(payload, dict) or payload.get("key") != self.key:
            log.info("%s: fold scores of another run or fold count; training every fold", self.path)
            return {}
        return {int(fold): np.asarray(scores, dtype=np.float64) for fold, scores in payload["scores"].items()}

    def save(self, done: dict[int, np.ndarray]) -> None:
        scores = {str(fold): [float(s) for s in values] for fold, values in sorted(done.items())}
        write_atomic(self.path, json.dumps({"key": self.key, "scores": scores}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


ScoreFold = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def cross_fit_scores(count: int, folds: int, seed: int, score_fold: ScoreFold,
                     store: FoldStore | None = None) -> np.ndarray:
    """One out-of-sample score per image: score_fold(fold, train_indices, scored_indices) for each fold.

    score_fold trains a model on train_indices only and returns the scores of scored_indices; it is called
    for one fold at a time, so only one fold model lives at once. Folds already in `store` are not redone.
    """
    ids = fold_ids(count, folds, seed)
    done = store.load() if store is not None else {}
    scores = np.full(count, np.nan)
    for fold in range(folds):
        members = np.flatnonzero(ids == fold)
        if fold in done and done[fold].shape == members.shape:
            log.info("fold %d/%d: scores kept from the interrupted run", fold + 1, folds)
        else:
            done[fold] = np.asarray(score_fold(fold, np.flatnonzero(ids != fold), members), dtype=np.float64)
            if store is not None:
                store.save(done)
        scores[members] = done[fold]
    if not np.all(np.isfinite(scores)):
        raise ValueError("k-fold scoring left images without a finite score")
    return scores
