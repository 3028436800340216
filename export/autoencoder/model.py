"""Reconstruction models (AE and VAE) and the pixels-to-answer graph built around them.

A small fully-convolutional autoencoder learns to redraw good patches through a narrow spatial bottleneck;
what it has never seen (a scratch, a stain, a missing chunk) it cannot redraw, so the per-pixel
reconstruction error is the anomaly map. It is the cheapest model kind to run (no backbone, a few hundred
thousand weights) and needs no fixed part position, which suits surfaces and textures.

The exported graph shares its ends with PaDiM (`export.graph`): uint8 BGR in, blurred map and its maximum
out, so the device runtime cannot tell the two kinds apart. The error used for the map is the training loss
itself (MSE plus the optional SSIM term), so the model flags exactly what it was taught to minimise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from export.autoencoder.config import MODEL_KINDS  # defined torch-free, so `edge-export` starts without torch
from export.graph import BgrToInput, GaussianBlur, MapToAnswer, max_blur_radius

# The network sees RGB scaled to [-1, 1]; its tanh output lives on the same scale.
AE_MEAN = (0.5, 0.5, 0.5)
AE_STD = (0.5, 0.5, 0.5)
DATA_RANGE = 2.0
SSIM_WINDOW = 7  # box window of the SSIM statistics (odd)
LUMA_RGB = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights


@dataclass(frozen=True)
class Architecture:
    """The numbers that define a network, stored in bundle.yaml's model_params and in checkpoints."""

    kind: str = "ae"  # "ae" | "vae"
    base_channels: int = 8  # channels of the first (full-resolution) stage; doubled per stage
    depth: int = 5  # stride-2 stages: the bottleneck is input / 2**depth on each side
    latent_channels: int = 32  # channels at the bottleneck: the width of what the model can remember
    max_channels: int = 64  # cap of the doubling: deep stages are cheap, wide shallow ones are not

    @property
    def stride(self) -> int:
        """Input sides must be a multiple of this so encoder and decoder shapes line up."""
        return 2 ** self.depth

    def stage_channels(self) -> list[int]:
        return [min(self.base_channels * 2 ** i, self.max_channels) for i in range(self.depth)]


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    # 4x4/stride-2 transposed conv: every output pixel gets the same number of taps (no checkerboard), and it
    # costs under half of upsample+3x3 conv at the same resolution.
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


class ConvAutoencoder(nn.Module):
    """Encoder of stride-2 convs, a 1x1 bottleneck, and a mirrored decoder of transposed convs.

    The VAE variant predicts a mean and log-variance per latent cell and samples in training; inference
    (and the exported graph) uses the mean, so its output is deterministic.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        if arch.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {arch.kind!r} unknown (expected one of {', '.join(MODEL_KINDS)})")
        self.arch = arch
        chans = arch.stage_channels()
        ins = [3] + chans[:-1]
        self.encoder = nn.Sequential(*[_down(i, o) for i, o in zip(ins, chans)])
        out_latent = arch.latent_channels * (2 if arch.kind == "vae" else 1)
        self.to_latent = nn.Conv2d(chans[-1], out_latent, 1)
        self.from_latent = nn.Sequential(nn.Conv2d(arch.latent_channels, chans[-1], 1), nn.LeakyReLU(0.2, True))
        rev = chans[::-1]
        ups = [_up(i, o) for i, o in zip(rev[:-1], rev[1:])]
        self.decoder = nn.Sequential(*ups, nn.ConvTranspose2d(rev[-1], 3, 4, stride=2, padding=1), nn.Tanh())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, log-variance) of the latent; log-variance is None for the plain AE."""
        z = self.to_latent(self.encoder(x))
        if self.arch.kind == "vae":
            mu, logvar = z.chunk(2, dim=1)
            return mu, logvar.clamp(-10.0, 10.0)
        return z, None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Training pass: (reconstruction, mean, log-variance); VAE samples z only while training."""
        mu, logvar = self.encode(x)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, 1)) averaged over latent elements, so its weight does not depend on input size."""
    return -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())


class SsimMap(nn.Module):
    """Per-pixel SSIM of the luminance of two (N, 3, H, W) images in [-1, 1] -> (N, 1, H, W).

    Luminance with a 7x7 box window (scikit-image's default window) rather than per-channel Gaussian
    windows: on 2 CPU threads at 256x256 the per-channel Gaussian version measured 23 ms per image (longer
    than the whole network), this one under 4 ms, with the same bottle AUROC. Colour differences are still
    caught by the MSE term. The box
    mean is an AveragePool that ignores padding, so borders need no special case in ONNX or TensorRT.
    """

    luma: torch.Tensor

    def __init__(self, window: int = SSIM_WINDOW, data_range: float = DATA_RANGE):
        super().__init__()
        self.window = int(window)
        self.register_buffer("luma", torch.tensor(LUMA_RGB).view(1, 3, 1, 1), persistent=False)
        self.c1 = (0.01 * data_range) ** 2
        self.c2 = (0.03 * data_range) ** 2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = (x * self.luma).sum(dim=1, keepdim=True)
        y = (y * self.luma).sum(dim=1, keepdim=True)
        # One pooling pass for all five moments (x, y, x^2, y^2, xy).
        moments = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), self.window, stride=1,
                               padding=self.window // 2, count_include_pad=False)
        mx, my, mxx, myy, mxy = moments.chunk(5, dim=1)
        vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
        return ((2 * mx * my + self.c1) * (2 * cov + self.c2)) / ((mx * mx + my * my + self.c1) * (vx + vy + self.c2))


class ReconstructionError(nn.Module):
    """Per-pixel error (N, 1, H, W): channel-mean squared error plus ssim_weight * (1 - SSIM).

    The training loss is the mean of this map, so map and loss always measure the same thing.
    """

    def __init__(self, ssim_weight: float = 0.0):
        super().__init__()
        self.ssim_weight = float(ssim_weight)
        self.ssim = SsimMap() if self.ssim_weight > 0 else None

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        error = (x - recon).pow(2).mean(dim=1, keepdim=True)
        if self.ssim is not None:
            error = error + self.ssim_weight * (1.0 - self.ssim(x, recon))
        return error


class ErrorNormaliser(nn.Module):
    """Per-pixel z-score of the error against good parts: max(error - mean, 0) / (std + floor).

    An autoencoder never redraws edges, highlights and fine texture perfectly, so on a placed part the raw
    error of a good image is high in the same places every time (a bottle's rim) and can hide a defect
    elsewhere. Measuring each pixel against its own spread on good parts removes that fixed pattern; for
    textures the statistics come out nearly flat and this is only a rescaling. The floor (the mean spread
    over the image) keeps pixels that are always redrawn almost perfectly, such as a flat background, from
    turning sensor noise into alarms: on MVTec bottle a floor of 0.1x the mean spread lost 0.01-0.02 image
    AUROC and up to 0.05 pixel AUROC against 0.5-1x. Negative deviations (better than usual) are not
    anomalies, so the map is clipped at 0 and stays non-negative.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, floor_ratio: float = 1.0):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, 1, *mean.shape[-2:]).float())
        floor = floor_ratio * float(std.mean()) + 1e-12
        self.register_buffer("inv_std", 1.0 / (std.reshape(1, 1, *std.shape[-2:]).float() + floor))

    def forward(self, error: torch.Tensor) -> torch.Tensor:
        return torch.clamp(error - self.mean, min=0.0) * self.inv_std


class ReconstructionGraph(nn.Module):
    """uint8 BGR (N, H, W, 3) -> (anomaly_map (N, H, W), score (N,)): the graph an AE/VAE bundle ships."""

    def __init__(self, net: ConvAutoencoder, input_size: tuple[int, int], ssim_weight: float = 0.0,
                 blur_sigma: float = 4.0, normaliser: ErrorNormaliser | None = None):
        super().__init__()
        self.pre = BgrToInput(mean=AE_MEAN, std=AE_STD)
        self.net = net
        self.error = ReconstructionError(ssim_weight)
        self.normaliser = normaliser
        self.answer = MapToAnswer(input_size, min(float(blur_sigma), float(max_blur_radius(input_size))))

    def error_map(self, image: torch.Tensor) -> torch.Tensor:
        """Raw per-pixel reconstruction error (N, 1, H, W), before normalisation and blur."""
        x = self.pre(image)
        return self.error(x, self.net.reconstruct(x))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = self.error_map(image)
        if self.normaliser is not None:
            error = self.normaliser(error)
        return self.answer(error)


@torch.no_grad()
def fit_normaliser(graph: ReconstructionGraph, batches, smooth_sigma: float = 2.0) -> ErrorNormaliser:
    """Per-pixel mean and std of the raw error over good uint8 batches, lightly smoothed.

    A few hundred images give a noisy per-pixel std; a small Gaussian blur shares strength between
    neighbours without washing out the fixed structures the normalisation is for.
    """
    count = 0
    total = total_sq = torch.zeros(())
    for batch in batches:
        error = graph.error_map(batch).double()
        total = total + error.sum(0, keepdim=True)  # a 0-d zero broadcasts to the map's shape
        total_sq = total_sq + error.pow(2).sum(0, keepdim=True)
        count += error.shape[0]
    if count < 2:
        raise ValueError("error statistics need at least 2 good patches")
    mean = total / count
    std = ((total_sq / count - mean.pow(2)).clamp(min=0.0) * count / (count - 1)).sqrt()
    size = (int(mean.shape[-2]), int(mean.shape[-1]))
    blur = GaussianBlur(min(smooth_sigma, float(max_blur_radius(size))), size)
    return ErrorNormaliser(blur(mean.float()), blur(std.float()))


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
