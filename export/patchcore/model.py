"""The memory-bank graph: uint8 BGR -> backbone features, randomly projected per tap -> distance to the
nearest bank patch (a Gemm in the bank's principal axes, TopK, the exact distance to those candidates; or one
exact Gemm + an argmax) -> upsampling, blur, score. Same contract as every bundle, so the
device runs it with no change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.graph import MapToAnswer
from export.padim.features import PadimFeatures


@dataclass(frozen=True)
class BankSearch:
    """How the nearest bank entry is found: exactly (`dims` 0), or among `candidates` entries nearest in the
    bank's first `dims` principal axes (then exactly among those).

    Why a two-step search: the exact search is one (P x D) x (D x M) product, compute-bound and most of the
    graph (fryum, 4,608 x 256: 17.5 ms of about 30). Projected patch features are nearly low-rank (the bank's
    first 32 / 64 principal axes hold 93 / 97% of its variance on fryum, 90 / 96% on magnetic_tile), so a
    product over 64 axes ranks the bank almost as the full one does. Measured 2026-11-24 on every test image
    (fryum 75, magnetic_tile 582; bundles with today's defaults): the exact nearest entry was among the 8
    nearest in 64 axes for all of fryum's patches and all but fewer than 30 of magnetic_tile's 596,000
    (recall 1.0000 to four places), and no image score (max of the map) moved; with 48 axes 100 / 99.99% and
    scores moved by at most 0.8%, with 32 99.95 / 99.81%. The returned distance is always an exact distance to
    a real bank entry, so a miss can only raise a patch's distance to its second-nearest entry's.
    """

    dims: int = 64
    candidates: int = 8
    group: int = 16  # bank entries per group for the candidates' selection (`BankDistance._best`); 1 = plain TopK

    def applies_to(self, bank_shape: tuple[int, ...]) -> bool:
        """Worth it only when the search space is smaller than the bank's: else the exact search is cheaper."""
        return 0 < self.dims < int(bank_shape[1]) and 0 < self.candidates < int(bank_shape[0])


EXACT_SEARCH = BankSearch(dims=0)


def principal_axes(centred: torch.Tensor, count: int) -> torch.Tensor:
    """(D, count) float32: the first principal axes of centred rows (M, D), largest variance first."""
    rows = centred.detach().cpu().double().numpy()
    _, vectors = np.linalg.eigh(rows.T @ rows)  # ascending eigenvalues
    axes = torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1][:, :count])).to(torch.float32)
    return axes.to(centred.device)


def pad_to_groups(coarse: torch.Tensor, half_sq: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's rows and biases padded to whole groups with entries that never win (a zero row with bias
    -1e30: finite, so no inf or NaN enters the graph). The full bank is not padded: a padding index is never
    among the candidates, as every chosen group holds a real entry above it."""
    extra = -coarse.shape[0] % group
    if extra == 0:
        return coarse, half_sq
    return (torch.cat([coarse, coarse.new_zeros(extra, coarse.shape[1])]),
            torch.cat([half_sq, half_sq.new_full((extra,), -1e30)]))


class BankDistance(nn.Module):
    """Projected features (N, P, D) -> map (N, 1, h, w) of Euclidean distances to the nearest bank entry.

    Exact search: the nearest entry maximises x.b - |b|^2 / 2 (|x|^2 does not depend on b): one Gemm with that
    bias folded in (ONNX `Gemm`, transB) and an argmax over M. Measured on the fryum bundle (4,608 x 256, 2
    threads, ONNX Runtime's profiler): the separate (P x M) subtraction this folds in took 1.7 ms and gathering
    columns of a transposed copy 1.9 ms, of about 35 ms; the Gemm itself is 15-17 ms. The two-step search
    (`BankSearch`, the default) does the same product in the bank's first principal axes, keeps the best
    `candidates` entries (`TopK`), gathers them and takes the exact distance to the nearest of them. A
    submodule of its own so its ONNX nodes are named `/bank/...`: export/mixed_precision.py keeps them (and all
    after) in fp32, as it does `/mahalanobis/`.
    """

    centre: torch.Tensor
    bank: torch.Tensor
    half_sq: torch.Tensor
    axes: torch.Tensor
    coarse_bank: torch.Tensor

    def __init__(self, bank: torch.Tensor, grid: tuple[int, int], search: BankSearch = EXACT_SEARCH):
        super().__init__()
        bank = bank.to(torch.float32)
        self.grid = (int(grid[0]), int(grid[1]))
        # Distances do not change when both sides are shifted by the bank's mean, but x.b shrinks, and with
        # it the float32 rounding that could pick a different (near-tie) nearest entry in ORT than in torch.
        centre = bank.mean(0)
        bank = (bank - centre).contiguous()
        self.register_buffer("centre", centre)
        self.register_buffer("bank", bank)
        self.candidates = search.candidates if search.applies_to(tuple(bank.shape)) else 0
        # Groups only help when there are more of them than candidates (else the first TopK keeps them all).
        group = max(1, search.group)
        self.group = group if -(-int(bank.shape[0]) // group) > self.candidates else 1
        # half_sq is the bias of the search's Gemm: -|b|^2/2 in the space that Gemm works in (the principal axes
        # for the two-step search, the full features for the exact one).
        if self.candidates:
            axes = principal_axes(bank, search.dims)
            coarse = bank @ axes
            self.register_buffer("axes", axes)
            coarse, half_sq = pad_to_groups(coarse, -0.5 * (coarse * coarse).sum(1), self.group)
            self.register_buffer("coarse_bank", coarse.contiguous())
            self.register_buffer("half_sq", half_sq)
        else:
            self.register_buffer("half_sq", -0.5 * (bank * bank).sum(1))

    @property
    def size(self) -> int:
        return int(self.bank.shape[0])

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        n, p, d = emb.shape
        x = emb.reshape(n * p, d) - self.centre
        dist = self._two_step(x) if self.candidates else self._exact(x)
        return dist.reshape(n, 1, *self.grid)

    def _two_step(self, x: torch.Tensor) -> torch.Tensor:
        """Centred rows (R, D) -> (R,): the best `candidates` in the principal axes, then the exact nearest."""
        scores = F.linear(x @ self.axes, self.coarse_bank, self.half_sq)
        nearest = self._best(scores)  # (R, K)
        diff = x.unsqueeze(1) - self.bank[nearest]  # (R, K, D)
        return torch.sqrt((diff * diff).sum(2).min(1).values)

    def _best(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (R, M) -> indices (R, K) of the K highest per row, found through the bank's groups.

        Each of the K best entries lies in a group whose maximum is at least the K-th best score, so the K groups
        with the highest maxima hold all of them (up to ties): a TopK over M / group maxima, then over those
        groups' K x group members, returns the same entries as one TopK over M. Measured 2026-11-24 on the fryum
        bundle (ONNX Runtime's profiler, 2 threads): 3.2 ms (TopK 1.4, ReduceMax 1.2, GatherElements 0.6) where one
        TopK over 4,608 entries took 4.5; maps and scores bit-identical on every test image of the three data sets.
        """
        if self.group == 1:
            return torch.topk(scores, self.candidates, dim=1).indices
        k, g = self.candidates, self.group
        maxima = scores.reshape(-1, scores.shape[1] // g, g).amax(2)  # (R, M / g)
        groups = torch.topk(maxima, k, dim=1).indices  # (R, K)
        members = (groups.unsqueeze(2) * g + torch.arange(g, device=scores.device)).reshape(-1, k * g)
        best = torch.topk(torch.gather(scores, 1, members), k, dim=1).indices  # (R, K) into members
        return torch.gather(members, 1, best)

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        """Centred rows (R, D) -> (R,): one search over the whole bank."""
        nearest = torch.argmax(F.linear(x, self.bank, self.half_sq), dim=1)
        # The distance itself is recomputed from the nearest entry: the expanded form cancels for patches
        # that sit on a bank entry (training-like patches), and sqrt magnifies that near 0 (measured: ORT vs
        # torch differed by 6e-4 of the map's maximum with it, far less with the exact difference).
        diff = x - torch.index_select(self.bank, 0, nearest)  # (R, D)
        return torch.sqrt((diff * diff).sum(1))


class PositionOffset(nn.Module):
    """Distance map (N, 1, h, w) minus what good parts typically score at each position (the `position_offset`
    option).

    Where good parts vary (a snack's surface, an edge) every part scores high, and a defect there must beat that;
    where they do not (background) a small speck wins. Subtracting each position's mean out-of-sample distance
    (less the mean over all positions, so the map keeps its units) ranks the two fairly. Measured on VisA fryum
    (README): image AUROC 0.962 -> 0.991.
    """

    offset: torch.Tensor

    def __init__(self, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("offset", offset.to(torch.float32).reshape(1, 1, *offset.shape[-2:]))

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return distance - self.offset


def offset_step(offset: torch.Tensor | None) -> nn.Module:
    """The step between distance and head: the offset's subtraction, or nothing when the option is off."""
    return nn.Identity() if offset is None else PositionOffset(offset)


def position_offset(maps: torch.Tensor) -> torch.Tensor:
    """Low-resolution maps (n, 1, h, w) of good parts -> (1, 1, h, w): each position's mean minus the overall mean."""
    mean = maps.mean(dim=0, keepdim=True)
    return mean - mean.mean()


class PatchcoreModel(nn.Module):
    """The exported graph: uint8 BGR (N, H, W, 3) -> anomaly_map (N, H, W), score (N)."""

    def __init__(self, features: PadimFeatures, bank: torch.Tensor, input_size: tuple[int, int],
                 feature_stride: int, blur_sigma: float, offset: torch.Tensor | None = None,
                 search: BankSearch = EXACT_SEARCH):
        super().__init__()
        self.features = features
        self.bank = BankDistance(bank, (input_size[0] // feature_stride, input_size[1] // feature_stride), search)
        self.offset = offset_step(offset)
        self.head = MapToAnswer(input_size, blur_sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.offset(self.bank(self.features(image))))
