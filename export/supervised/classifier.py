"""The supervised part's classifier and its cross-validation: small, regularised, fast on a CPU.

A logistic regression on standardised inputs with an L2 penalty and balanced class weights (good parts far
outnumber labelled defects), fitted by L-BFGS in float64. Measured on the loaded 2-core VM: 248 images x 516
inputs, one fit 4.3 s and five cross-validation folds 2.7 s; the whole labelled step of the bottle fit 15 s of
174. Why this and not a network: with 10-50 labelled defects anything bigger memorises them; a linear model on
frozen features generalises from few examples, and the penalty keeps it from leaning on the one input that
happens to separate the few defects seen.

Cross-validation (`cross_validated_scores`): every image is scored by a classifier fitted without it, in
stratified folds; images with the same pixels (a file copied twice) share a fold, so a duplicate never
scores its twin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

# L2 penalty on the mean weighted log-loss of standardised inputs. Chosen once, a priori (not fitted to any
# category): strong enough that ~500 inputs on ~20 defects do not memorise them.
PENALTY = 0.1
ITERATIONS = 200


@dataclass
class Classifier:
    """A fitted logistic classifier, with the logit's mean and spread on its own good training images."""

    mean: np.ndarray  # (F,) input standardisation
    scale: np.ndarray  # (F,)
    weight: np.ndarray  # (F,) on standardised inputs
    bias: float
    good_mean: float  # logit mean / std of its good training images
    good_std: float

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return ((inputs - self.mean) / self.scale) @ self.weight + self.bias

    def on_scale(self, inputs: np.ndarray, centre: float, spread: float) -> np.ndarray:
        """Logits standardised on good parts, then put on another score's scale (centre + spread * z)."""
        return centre + spread * (self.logits(inputs) - self.good_mean) / self.good_std

    def folded(self, centre: float, spread: float) -> tuple[np.ndarray, float]:
        """(weight, bias) on raw inputs that compute `on_scale` in one product (the graph's SupervisedHead)."""
        factor = spread / self.good_std
        weight = self.weight / self.scale * factor
        bias = (self.bias - float(self.mean / self.scale @ self.weight) - self.good_mean) * factor + centre
        return weight, float(bias)


def fit_classifier(inputs: np.ndarray, labels: np.ndarray, penalty: float = PENALTY) -> Classifier:
    """Logistic regression (labels 1 = defect) with balanced class weights and an L2 penalty."""
    x = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("the classifier needs good and defective images")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    xs = torch.from_numpy((x - mean) / scale)
    yt = torch.from_numpy(y)
    sample = torch.where(yt == 1, 0.5 / yt.sum(), 0.5 / (1 - yt).sum())  # each class weighs one half
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=ITERATIONS, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimiser.zero_grad()
        logits = xs @ w + b
        loss = (sample * torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")).sum()
        loss = loss + 0.5 * penalty * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(loss_fn)
    weight, bias = w.detach().numpy().copy(), float(b.detach()[0])
    good_logits = ((x[y == 0] - mean) / scale) @ weight + bias
    spread = float(good_logits.std()) if good_logits.size > 1 else 1.0
    return Classifier(mean, scale, weight, bias, float(good_logits.mean()), max(spread, 1e-6))


def content_groups(keys: list[str]) -> np.ndarray:
    """A group id per image: equal keys (a digest of the pixels) share one."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(key, len(ids)) for key in keys], dtype=np.int64)


def pixel_digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def stratified_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each image: per label, whole groups dealt round-robin in a seeded order, so each fold holds about
    1/folds of the good and of the defective images and identical images land in one fold."""
    labels = np.asarray(labels)
    fold_of = np.empty(labels.size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        member_groups = np.unique(groups[members])
        order = rng.permutation(member_groups.size)
        slot = {int(g): i % folds for i, g in zip(range(order.size), member_groups[order])}
        for index in members:
            fold_of[index] = slot[int(groups[index])]
    return fold_of


def cross_validated_scores(inputs: np.ndarray, labels: np.ndarray, anomaly: np.ndarray, fold_of: np.ndarray,
                           centre: float, spread: float, penalty: float = PENALTY) -> np.ndarray:
    """Every image's combined score, max(anomaly, supervised on the anomaly scale), its supervised part fitted
    on the other folds only (a fold whose rest lacks a class scores its images by the anomaly score alone)."""
    combined = np.asarray(anomaly, dtype=np.float64).copy()
    for fold in np.unique(fold_of):
        held = fold_of == fold
        rest = ~held
        if not (labels[rest] == 1).any() or not (labels[rest] == 0).any():
            continue
        model = fit_classifier(inputs[rest], labels[rest], penalty)
        combined[held] = np.maximum(combined[held], model.on_scale(inputs[held], centre, spread))
    return combined
