"""The exported PaDiM graph: uint8 BGR -> embedding -> Mahalanobis distance per position -> map and score."""

from __future__ import annotations

import torch
from torch import nn

from export.graph import MapToAnswer
from export.padim.features import PadimFeatures
from export.padim.statistics import by_position


class Mahalanobis(nn.Module):
    """Embedding (N, P, d) -> distance map (N, 1, h, w) against per-position Gaussians.

    `mean` is (K, P, d) and `inv_cov` (K, P, d, d), K = 1 for statistics shared by all tiles, or K = tiles
    per frame for per-tile statistics (then N must be a multiple of K, tiles in row-major order).
    The distance is one batched MatMul over positions: (K*P, N/K, d) x (K*P, d, d). At batch 1 it reads every
    constant once per call, so it is memory-bound: its cost follows K*P*d*d (measured on the 2-core VM:
    8.6 ms of 24 at P=4096, d=100). A submodule of its own so its ONNX nodes are named `/mahalanobis/...`:
    the TensorRT builder keeps those in fp32, since squared distances overflow fp16.
    """

    mean: torch.Tensor
    inv_cov: torch.Tensor

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


class PadimModel(nn.Module):
    """The exported graph: uint8 BGR (N, H, W, 3) -> anomaly_map (N, H, W), score (N)."""

    def __init__(self, features: PadimFeatures, mean: torch.Tensor, inv_cov: torch.Tensor,
                 input_size: tuple[int, int], blur_sigma: float, head: MapToAnswer | None = None):
        super().__init__()
        self.features = features
        stride = features.grid_stride
        self.mahalanobis = Mahalanobis(mean, inv_cov, (input_size[0] // stride, input_size[1] // stride))
        # `head`: the fit's own (same size and sigma), so its blur matrices are not built twice (0.3 s at 256 px)
        self.head = head or MapToAnswer(input_size, blur_sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.mahalanobis(self.features(image)))
