"""Per-position Gaussians from streamed sums: memory set by the grid and d, never by the number of images.

Why sums: the reference PaDiM and anomalib keep every training embedding to compute the covariances
(users report 35-50 GB peaks). Mean and covariance only need sum(x) and sum(x x^T) per position.

Why float32 around a reference mean: sums of raw features in float32 lose the covariance to cancellation
(sum(x x^T) - n m m^T with |m| >> spread), which is why this used float64 (two 4096 x 100 x 100 sets of
330 MB each at the old default). Subtracting a per-position reference (the first batch's mean) before
summing leaves only the spread to accumulate, which float32 holds to ~1e-6 relative: half the memory, and
the matrices are updated in place (`baddbmm_`), so no temporary set is allocated per batch.

Why k-fold with sums: the threshold needs out-of-sample scores of good images. The statistics "without
fold j" are the totals minus fold j's sums, computed in place in fold j's buffer, so every good image gets
an out-of-sample score while at most three sets (totals, one complement, one inverse) are alive.
"""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from edge_inspector.core.errors import DataError

# Positions inverted at once: bounds the float64 covariance and inverse temporaries (512 x 100 x 100 x 8 bytes
# = 41 MB each at d=100) instead of materialising a float64 copy of the whole set.
INVERT_CHUNK = 512


def by_position(emb: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P, d), N = frames x k tile slots -> (k*P, frames, d): one row block per statistics set and position."""
    n, p, d = emb.shape
    return emb.reshape(-1, k, p, d).permute(1, 2, 0, 3).reshape(k * p, -1, d)


class GaussianSums:
    """sum(x - r), sum((x - r)(x - r)^T) and the frame count per (tile slot, position), in float32.

    `reference` r (K*P, d) is taken from the first batch added unless given; sums that will be subtracted
    from each other (totals and a fold) must share it, so a fold is created with `totals.empty_like()`.
    """

    def __init__(self, k: int, p: int, d: int, reference: torch.Tensor | None = None):
        self.k, self.p, self.d = int(k), int(p), int(d)
        self.count = 0
        self.reference = reference
        self.sum_x = torch.zeros(self.k * self.p, self.d, dtype=torch.float32)
        self.sum_xx = torch.zeros(self.k * self.p, self.d, self.d, dtype=torch.float32)

    def empty_like(self) -> GaussianSums:
        """Zero sums of the same shape and reference (for a fold whose sums are subtracted from these)."""
        return GaussianSums(self.k, self.p, self.d, self.reference)

    @property
    def nbytes(self) -> int:
        return (self.sum_x.numel() + self.sum_xx.numel()) * 4

    def add(self, emb: torch.Tensor) -> None:
        """emb: (N, P, d) with N a multiple of k (whole frames, tiles in row-major order)."""
        x = by_position(emb.to(torch.float32), self.k)
        if self.reference is None:
            self.reference = x.mean(1)
        x = x - self.reference[:, None, :]
        self.sum_x += x.sum(1)
        self.sum_xx.baddbmm_(x.transpose(1, 2), x)
        self.count += emb.shape[0] // self.k

    def complement_of(self, totals: GaussianSums) -> GaussianSums:
        """Turn these (one fold's) sums into totals minus them, in place: the statistics without this fold."""
        if self.reference is not totals.reference and self.count:
            raise ValueError("fold sums must share the totals' reference (create them with totals.empty_like())")
        self.sum_x.neg_().add_(totals.sum_x)
        self.sum_xx.neg_().add_(totals.sum_xx)
        self.count = totals.count - self.count
        self.reference = totals.reference
        return self

    def gaussian(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (K, P, d), inverse covariance (K, P, d, d)) as float32, inverted chunk by chunk in float64."""
        if self.count < 2:
            raise DataError(f"need at least 2 training images per statistics set, got {self.count}")
        if self.reference is None:
            raise DataError("no features were added")
        n = self.count
        shift = self.sum_x.double() / n
        inverse = np.empty((self.k * self.p, self.d, self.d), dtype=np.float32)
        eye = epsilon * np.eye(self.d)
        # numpy: torch's batched inverse failed with an MKL error on 4096 x 176 x 176 here. One BLAS thread:
        # OpenBLAS threading on thousands of small matrices was 25x slower (measured).
        with threadpool_limits(1, user_api="blas"):
            for lo in range(0, self.k * self.p, INVERT_CHUNK):
                hi = min(lo + INVERT_CHUNK, self.k * self.p)
                m = shift[lo:hi].numpy()
                cov = (self.sum_xx[lo:hi].double().numpy() - n * m[:, :, None] * m[:, None, :]) / (n - 1)
                inverse[lo:hi] = np.linalg.inv(cov + eye)
        mean = (self.reference.double() + shift).float()
        shape = (self.k, self.p, self.d)
        return mean.reshape(shape), torch.from_numpy(inverse).reshape(*shape, self.d)


class ChannelCovariance:
    """Covariance of all backbone channels around each position's own mean, over a few training images.

    What the fitted (whitened) projection needs: how good parts vary at a place, not how places differ
    from each other (object vs background), which a global covariance would be dominated by. Float64
    (C x C = 9 MB for Lite0's 1056 channels) around a reference, as GaussianSums.
    """

    def __init__(self) -> None:
        self.count = 0
        self.reference: torch.Tensor | None = None
        self.sum_x: torch.Tensor | None = None
        self.sum_xx: torch.Tensor | None = None

    def add(self, emb: torch.Tensor) -> None:
        """emb (N, P, C): N images (or tiles) on the grid, all channels."""
        if self.reference is None:
            self.reference = emb.mean(0)
            self.sum_x = torch.zeros(emb.shape[1:], dtype=torch.float64)
            self.sum_xx = torch.zeros(emb.shape[2], emb.shape[2], dtype=torch.float64)
        assert self.sum_x is not None and self.sum_xx is not None
        x = emb - self.reference
        self.sum_x += x.sum(0).double()
        flat = x.reshape(-1, x.shape[2])
        self.sum_xx += (flat.t() @ flat).double()
        self.count += emb.shape[0]

    def covariance(self) -> np.ndarray:
        """(C, C): sum over positions of each position's scatter, divided by the degrees of freedom."""
        if self.count < 2 or self.sum_x is None or self.sum_xx is None:
            raise DataError(f"need at least 2 training images to fit a projection, got {self.count}")
        positions = self.sum_x.shape[0]
        between = self.sum_x.t() @ self.sum_x / self.count  # sum_p n m_p m_p^T
        return ((self.sum_xx - between) / (positions * (self.count - 1))).numpy()


def set_bytes(k: int, p: int, d: int) -> int:
    """Bytes of one float32 (K*P, d, d) set: the unit the fit's memory is counted in."""
    return k * p * d * d * 4


# Float32 (K*P, d, d) sets alive at the peak of a fit: the totals, one fold's sums turned into their
# complement, and the inverse covariance (the float64 temporaries are bounded by INVERT_CHUNK).
FIT_PEAK_SETS = 3
# torch, the backbone, its activations at batch 8 and ONNX export: measured about 0.5 GB on the 2-core VM.
FIT_BASE_BYTES = 500_000_000


def fit_memory_bytes(k: int, p: int, d: int, tiles: int, images: int, cache_bytes: int, folds: int) -> int:
    """Estimated peak memory of a PaDiM fit: it grows with the grid and d squared, never with the images
    beyond the embedding cache's fixed budget (past it, one set of sums per fold for the frames left out)."""
    embeddings = images * tiles * p * d * 4
    spilled = folds * set_bytes(k, p, d) if embeddings > cache_bytes else 0
    return FIT_PEAK_SETS * set_bytes(k, p, d) + min(embeddings, cache_bytes) + spilled + FIT_BASE_BYTES


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
