"""The model bundle: the one contract between `export` (workstation) and `edge_inspector` (device).

A bundle is a folder:

    model.onnx            uint8 BGR (N, H, W, 3) -> anomaly_map float32 (N, H, W), score float32 (N)
    model.onnx.data       (only when the constants exceed ONNX's 2 GB protobuf limit: external data)
    engines/*.engine      (optional TensorRT engines built on/for a device)
    bundle.yaml           metadata below, including the sha256 of every file above

Everything the runtime needs to judge a part is in the graph or in bundle.yaml, so the device never needs
torch or the training code. `Bundle.load` verifies every listed file's sha256, so a truncated copy or an
edited model is refused with one clear line instead of producing wrong verdicts on the line.

Score convention: `score` is the model's raw anomaly score (PaDiM: max Mahalanobis distance over the blurred
map; AE: max blurred reconstruction error). `normalised_score = score / threshold`, so 1.0 is exactly the
decision threshold, values above 1.0 fail and e.g. 0.5 is half-way from zero to the threshold.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import BundleError

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.yaml"
MODEL_FILE = "model.onnx"
MODEL_KINDS = ("padim", "ae", "vae", "patchcore")


@dataclass
class ThresholdInfo:
    """The decision threshold on the raw score and how it was chosen (so an auditor can reproduce it)."""

    value: float
    rule: str  # "conformal_false_reject_rate" | "f1_optimal" | "manual"
    target_false_reject_rate: float | None = None
    certified: bool = False  # True when enough good images exist to guarantee the target rate
    images_needed: int | None = None  # good images needed to certify the target rate
    conformal_value: float | None = None
    f1_optimal_value: float | None = None
    note: str = ""


@dataclass
class ScoreStats:
    """Out-of-sample scores of the good validation images (k-fold), on the raw score scale."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float


@dataclass
class TrainingInfo:
    """Provenance: what the model was trained on, so a line engineer can tell two bundles apart."""

    folder: str
    image_count: int
    file_list_sha256: str
    skipped_files: int = 0
    seed: int = 0
    folds: int = 0
    fit_seconds: float = 0.0


@dataclass
class TilingInfo:
    """How frames were tiled for training; `per_tile` bundles expect batches of `rows*cols` tiles in order."""

    rows: int = 1
    cols: int = 1
    mode: str = "shared"  # "shared": one statistics set for all tiles; "per_tile": one per tile position
    tile_size: list[int] | None = None  # [height, width] in frame pixels (None: the grid divides the ROI)
    stride: list[int] | None = None  # [dy, dx] between tiles (None: spread evenly)
    roi: list[int] | None = None  # [x, y, width, height] of the inspected area (None: whole frame)

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    def tiler(self, input_size: tuple[int, int]):
        """The Tiler that cuts frames exactly as they were cut for training (None for whole-frame bundles)."""
        from .tiling import Tiler

        if self.tiles == 1 and self.roi is None and self.tile_size is None:
            return None
        as_tuple = (lambda v: None if v is None else tuple(int(x) for x in v))
        return Tiler(self.rows, self.cols, input_size, tile_size=as_tuple(self.tile_size),
                     stride=as_tuple(self.stride), roi=as_tuple(self.roi))


@dataclass
class BundleMeta:
    """Everything in bundle.yaml. Unknown keys are refused at load so typos never pass silently."""

    model_kind: str
    input_size: tuple[int, int]  # (height, width)
    threshold: ThresholdInfo
    score_stats: ScoreStats | None
    training: TrainingInfo
    backbone: str | None = None
    layers: list[str] = field(default_factory=list)
    feature_dim: int = 0
    tiling: TilingInfo = field(default_factory=TilingInfo)
    color_order: str = "BGR"
    format_version: int = FORMAT_VERSION
    created: str = ""
    package_version: str = __version__
    model_params: dict[str, Any] = field(default_factory=dict)  # kind-specific numbers, informative only
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "BundleMeta":
        try:
            return _build(cls, data, source)
        except (TypeError, ValueError, KeyError) as err:
            raise BundleError(f"{source}: {err}") from None


def _build(cls, data: Any, where: str):
    """Build a (nested) dataclass from a dict, naming the offending key on any mismatch."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise BundleError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    nested = {"threshold": ThresholdInfo, "score_stats": ScoreStats, "training": TrainingInfo, "tiling": TilingInfo}
    for name, value in data.items():
        if name in nested and cls is BundleMeta and value is not None:
            value = _build(nested[name], value, f"{where}: {name}")
        kwargs[name] = value
    missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**kwargs)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A verified model bundle on disk."""

    def __init__(self, path: Path, meta: BundleMeta):
        self.path = path
        self.meta = meta

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold.value)

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.meta.input_size[0]), int(self.meta.input_size[1])

    @property
    def sha256(self) -> str:
        return self.meta.files[MODEL_FILE]

    @property
    def model_id(self) -> str:
        name = self.meta.model_kind + (f"-{self.meta.backbone}" if self.meta.backbone else "")
        return f"{name}-{self.sha256[:12]}"

    def normalise(self, score: float) -> float:
        return float(score) / self.threshold if self.threshold > 0 else float("inf")

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        if not path.is_dir():
            raise BundleError(f"{path}: bundle folder not found")
        if not meta_path.is_file():
            raise BundleError(f"{meta_path}: missing (not a model bundle?)")
        try:
            data = yaml.safe_load(meta_path.read_text())
        except yaml.YAMLError as err:
            raise BundleError(f"{meta_path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise BundleError(f"{meta_path}: format_version {data['format_version']} is newer than this "
                              f"runtime supports ({FORMAT_VERSION}); upgrade edge-inspector")
        meta = BundleMeta.from_dict(data, str(meta_path))
        _validate(meta, meta_path)
        bundle = cls(path, meta)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every file listed in bundle.yaml exists and has the recorded sha256."""
        if MODEL_FILE not in self.meta.files:
            raise BundleError(f"{self.path / BUNDLE_FILE}: files has no entry for {MODEL_FILE}")
        for rel, expected in self.meta.files.items():
            file = self.path / rel
            if not file.is_file():
                raise BundleError(f"{file}: listed in bundle.yaml but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(f"{file}: sha256 mismatch (file altered or truncated; expected "
                                  f"{expected[:12]}..., found {actual[:12]}...)")

    def add_file(self, rel: str) -> None:
        """Record a file added after export (e.g. a TensorRT engine) so it is verified like the rest."""
        self.meta.files[rel] = sha256_file(self.path / rel)
        write_meta(self.path, self.meta)


def _validate(meta: BundleMeta, where: Path) -> None:
    if meta.model_kind not in MODEL_KINDS:
        raise BundleError(f"{where}: model_kind {meta.model_kind!r} is not one of {', '.join(MODEL_KINDS)}")
    if meta.color_order != "BGR":
        raise BundleError(f"{where}: color_order {meta.color_order!r} unsupported (expected BGR)")
    if len(meta.input_size) != 2 or min(meta.input_size) <= 0:
        raise BundleError(f"{where}: input_size must be [height, width], got {meta.input_size}")
    if not meta.threshold.value > 0:
        raise BundleError(f"{where}: threshold.value must be > 0, got {meta.threshold.value}")
    if meta.tiling.mode not in ("shared", "per_tile"):
        raise BundleError(f"{where}: tiling.mode must be shared or per_tile, got {meta.tiling.mode!r}")


def write_meta(folder: Path, meta: BundleMeta) -> None:
    """Write bundle.yaml atomically (a reader never sees half a file)."""
    tmp = folder / (BUNDLE_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(meta.to_dict(), sort_keys=False))
    os.replace(tmp, folder / BUNDLE_FILE)


def finalize_bundle(folder: str | Path, meta: BundleMeta) -> Bundle:
    """Hash the model files already written into `folder`, write bundle.yaml and return the loaded bundle.

    Exporters write model.onnx (and model.onnx.data) into a staging folder, then call this; bundle.yaml is
    written last, so a folder without it is recognisably incomplete.
    """
    folder = Path(folder)
    meta.created = meta.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta.files = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name != BUNDLE_FILE and not file.name.endswith(".tmp"):
            meta.files[file.relative_to(folder).as_posix()] = sha256_file(file)
    write_meta(folder, meta)
    return Bundle.load(folder)
