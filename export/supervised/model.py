"""The supervised part of the one graph: what it reads from the anomaly model, and how its answer joins the
anomaly score.

Inputs per image (`SupervisedInputs`, all computed in the graph from tensors the anomaly model already has):
the low-resolution anomaly map's maximum, top-k mean, mean and standard deviation; the backbone embedding
averaged over the image; and the embedding averaged with weights that peak where the map is high (a softmax of
the map standardised within the image). The last one says what the most anomalous region *looks like*, which is
what tells a real defect from a harmless variation that merely scores high; the first ones say how anomalous
it is. A regularised logistic classifier (`classifier.py`) turns them into a logit.

Combination (`CombinedModel`): the logit is standardised on good parts and put on the anomaly score's scale
(mean and standard deviation of the out-of-sample good scores), then

    score = max(anomaly score, supervised score on the anomaly scale)

so a part whose anomaly score alone is past the threshold still fails whatever the classifier says: on a defect
type absent from the labels the bundle is never more lenient than its anomaly part at the same threshold (the
threshold itself is set on the combined scores of good parts, see fit.py). The map is the anomaly map scaled by
score / anomaly score, so it still shows where the anomaly part looks and its maximum is the score, as the
bundle contract has it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Softmax sharpness on the within-image z-score of the map: at 3, a patch 3 standard deviations above the
# image's mean weighs e^9 (8,100) times an average one, so a few high patches dominate a 1,024-patch grid.
ATTENTION_SHARPNESS = 3.0
STATISTICS = ("map_max", "map_top_mean", "map_mean", "map_std")


def top_count(positions: int) -> int:
    """k of the top-k mean: 1/64 of the grid (16 of 32x32), at least 1."""
    return max(1, positions // 64)


class SupervisedInputs(nn.Module):
    """(embedding (N, P, D), low-resolution map (N, 1, h, w)) -> inputs (N, 4 + 2 D) of the classifier."""

    def __init__(self, positions: int):
        super().__init__()
        self.top = top_count(positions)

    def forward(self, emb: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        values = low.reshape(low.shape[0], -1)  # (N, P)
        mean = values.mean(1, keepdim=True)
        std = torch.sqrt(((values - mean) ** 2).mean(1, keepdim=True) + 1e-12)
        top = torch.topk(values, self.top, dim=1).values.mean(1, keepdim=True)
        peak = values.amax(1, keepdim=True)
        weights = torch.softmax((values - mean) / std * ATTENTION_SHARPNESS, dim=1)  # (N, P)
        focused = torch.matmul(weights.unsqueeze(1), emb)[:, 0]  # (N, D)
        return torch.cat([peak, top, mean, std, focused, emb.mean(1)], dim=1)


class SupervisedHead(nn.Module):
    """Inputs (N, F) -> the supervised score on the anomaly scale (N): standardise, logistic logit, then
    (logit - good mean) / good std * anomaly std + anomaly mean, folded into one weight vector and bias."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: float):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32).reshape(-1, 1))
        self.register_buffer("bias", torch.tensor([float(bias)], dtype=torch.float32))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.matmul(inputs, self.weight)[:, 0] + self.bias


def anomaly_parts(model: Any, emb: torch.Tensor) -> torch.Tensor:
    """The anomaly model's low-resolution map from its embedding: PaDiM's Mahalanobis distance, or patchcore's
    bank distance less its position offset. Called on the wrapped model's own submodules, so the ONNX nodes keep
    their scope names (`/mahalanobis/`, `/bank/`) that export/mixed_precision.py keeps in fp32."""
    if hasattr(model, "mahalanobis"):
        return model.mahalanobis(emb)
    return model.offset(model.bank(emb))


class CombinedModel(nn.Module):
    """The exported graph with a supervised part: uint8 BGR (N, H, W, 3) -> anomaly_map (N, H, W), score (N)."""

    def __init__(self, anomaly: nn.Module, head: SupervisedHead, positions: int):
        super().__init__()
        self.anomaly = anomaly
        self.inputs = SupervisedInputs(positions)
        self.supervised = head

    def parts(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(anomaly map (N, H, W), anomaly score (N), classifier inputs (N, F))."""
        anomaly: Any = self.anomaly  # PadimModel or PatchcoreModel
        emb = anomaly.features(image)
        low = anomaly_parts(anomaly, emb)
        full, score = anomaly.head(low)
        return full, score, self.inputs(emb, low)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full, anomaly, inputs = self.parts(image)
        score = torch.maximum(anomaly, self.supervised(inputs))
        # Scale the map so its maximum is the score; an anomaly score at or below 0 (possible only with
        # patchcore's position offset on a very plain part) is clamped, and the map then tops out below it.
        ratio = score / torch.clamp(anomaly, min=1e-6)
        return full * ratio.reshape(-1, 1, 1), score
