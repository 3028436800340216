"""The exported PaDiM graph: uint8 BGR -> embedding -> Mahalanobis distance per position -> map and score."""

from __future__ import annotations

import torch
from torch import nn

from export.graph import blur_matrix, map_blur_kernel
from export.padim.features import PadimFeatures, _linear_taps
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


def upsample_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix U with U @ x = bilinear resizing of x along that axis (as F.interpolate)."""
    low, high, w_low, w_high = _linear_taps(size_in, size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), w_low.double(), accumulate=True)
    matrix.index_put_((rows, high), w_high.double(), accumulate=True)
    return matrix


class UpsampleBlurHead(nn.Module):
    """The same answer as `export.graph.MapToAnswer` (bilinear upsampling to the input size, then the
    reflect-padded Gaussian blur, then the maximum), with both linear steps folded into one matrix per axis:
    full = (B_rows U_rows) map (U_cols^T B_cols). At a 32x32 map and 256 px that is 2.4 MFLOP instead of a
    Resize and 34 MFLOP of blur MatMuls (measured on the 2-core VM: head 0.8 ms -> see padim_bench.py).
    """

    def __init__(self, grid: tuple[int, int], input_size: tuple[int, int], sigma: float):
        super().__init__()
        h, w = int(input_size[0]), int(input_size[1])
        kernel, self.sigma = map_blur_kernel(sigma, (h, w))  # sigma: recorded in bundle.yaml (map_blur_sigma)
        rows = blur_matrix(h, kernel).double().t() @ upsample_matrix(int(grid[0]), h)  # (H, h)
        cols = upsample_matrix(int(grid[1]), w).t() @ blur_matrix(w, kernel).double()  # (w, W)
        self.register_buffer("rows", rows.to(torch.float32), persistent=False)
        self.register_buffer("cols", cols.to(torch.float32), persistent=False)

    rows: torch.Tensor
    cols: torch.Tensor

    def forward(self, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = torch.matmul(self.rows, torch.matmul(low_res, self.cols))[:, 0]
        return full, torch.amax(full, dim=(1, 2))


class PadimModel(nn.Module):
    """The exported graph: uint8 BGR (N, H, W, 3) -> anomaly_map (N, H, W), score (N)."""

    def __init__(self, features: PadimFeatures, mean: torch.Tensor, inv_cov: torch.Tensor,
                 input_size: tuple[int, int], blur_sigma: float, head: UpsampleBlurHead | None = None):
        super().__init__()
        self.features = features
        stride = features.grid_stride
        grid = (input_size[0] // stride, input_size[1] // stride)
        self.mahalanobis = Mahalanobis(mean, inv_cov, grid)
        # `head`: the fit's own (same size and sigma), so its matrices are not built twice (0.3 s at 256 px)
        self.head = head or UpsampleBlurHead(grid, input_size, blur_sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.mahalanobis(self.features(image)))
