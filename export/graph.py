"""Graph pieces every model kind shares, so all bundles speak the same contract.

The exported graph starts at the bytes OpenCV delivers (uint8, NHWC, BGR) and ends at the answer
(anomaly map at input resolution, blurred, and its maximum as the score). Putting pre- and post-processing
inside the graph means the torch reference, ONNX Runtime and TensorRT all compute the same thing and the
device runtime carries no model-specific code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BgrToInput(nn.Module):
    """uint8 (N, H, W, 3) BGR -> float32 (N, 3, H, W) RGB, normalised as the network was trained."""

    scale: torch.Tensor
    bias: torch.Tensor
    rgb_order: torch.Tensor

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        # Fold /255, -mean and /std into one multiply-add; reverse channels (BGR -> RGB) in the constants' order.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
        bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bias", bias.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_order", torch.tensor([2, 1, 0]), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Cast first: TensorRT accepts uint8 only as a network input converted straight to float.
        x = image.to(torch.float32).permute(0, 3, 1, 2)
        x = torch.index_select(x, 1, self.rgb_order)
        return x * self.scale + self.bias


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma (the same support anomalib uses)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def blur_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """(size, size) matrix B with x @ B = 1-D convolution of x with `kernel` under reflect padding."""
    radius = (kernel.numel() - 1) // 2
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for out in range(size):
        for tap in range(-radius, radius + 1):
            src = out + tap
            src = -src if src < 0 else (2 * (size - 1) - src if src >= size else src)  # reflect
            matrix[src, out] += float(kernel[tap + radius])
    return matrix.to(torch.float32)


def map_blur_kernel(sigma: float, size: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """(1-D Gaussian kernel, the sigma it applies) for blurring a map of `size`; sigma <= 0: no blur (kernel
    [1], sigma 0.0, what bundle.yaml's map_blur_sigma records). A kernel wider than the map is a ValueError.
    One rule for both blur heads (GaussianBlur here, padim.model.UpsampleBlurHead)."""
    kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
    if (kernel.numel() - 1) // 2 >= min(size):
        raise ValueError(f"blur sigma {sigma} too large for a {size[0]}x{size[1]} map")
    return kernel, (float(sigma) if sigma > 0 else 0.0)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (N, 1, H, W) maps with reflect padding (no dark borders).

    Written as two MatMuls with banded constant matrices (reflect padding folded in) rather than two
    1x33 convolutions: same result, and 3-4x faster in ONNX Runtime, whose convolution kernels are not
    made for one channel and long kernels.
    """

    cols: torch.Tensor
    rows: torch.Tensor

    def __init__(self, sigma: float, size: tuple[int, int]):
        super().__init__()
        kernel, self.sigma = map_blur_kernel(sigma, size)  # sigma: recorded in bundle.yaml (map_blur_sigma)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("cols", blur_matrix(size[1], kernel), persistent=False)
        self.register_buffer("rows", blur_matrix(size[0], kernel).t().contiguous(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return maps
        return torch.matmul(self.rows, torch.matmul(maps, self.cols))


class MapToAnswer(nn.Module):
    """Low-resolution anomaly map (N, 1, h, w) -> (anomaly_map (N, H, W), score (N,))."""

    def __init__(self, input_size: tuple[int, int], sigma: float = 4.0):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.blur = GaussianBlur(sigma, self.input_size)

    @property
    def sigma(self) -> float:
        """The blur actually applied (bundle.yaml's map_blur_sigma)."""
        return self.blur.sigma

    def forward(self, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(low_res.shape[-2:]) != self.input_size:
            low_res = F.interpolate(low_res, size=self.input_size, mode="bilinear", align_corners=False)
        full = self.blur(low_res)[:, 0]
        score = torch.amax(full, dim=(1, 2))
        return full, score


def max_blur_radius(input_size: tuple[int, int]) -> float:
    """Reflect padding needs the radius below the map size; cap sigma for tiny inputs."""
    return math.floor((min(input_size) - 1) / 4.0)
