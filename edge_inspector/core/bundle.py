"""The model bundle: the one contract between `export` (workstation) and `edge_inspector` (device).

A bundle is a folder:

    model.onnx            uint8 BGR (N, H, W, 3) -> anomaly_map float32 (N, H, W), score float32 (N)
    model.onnx.data       (only when the constants exceed ONNX's 2 GB protobuf limit: external data)
    engines/*.engine      (optional TensorRT engines built on/for a device)
    bundle.yaml           metadata below, including the sha256 of every file above and `meta_sha256`,
                          a digest over the metadata itself

Everything the runtime needs to judge a part is in the graph or in bundle.yaml, so the device never needs
torch or the training code. `Bundle.load` verifies every listed file's sha256, so a truncated copy or an
edited model is refused with one clear line instead of producing wrong verdicts on the line. The metadata
(threshold, tiling, ...) decides verdicts as much as the graph does, so it is protected the same way:
`meta_sha256` is the sha256 of the canonical JSON of every other key, checked at load, and the model id
published with every result is derived from that digest, so any change to what judges parts (a one-byte
threshold edit included) is either refused or shows up as a new model id on the wire. This is integrity,
not authenticity: whoever can write the bundle can also recompute the digest, but not without the model
id changing. Every value is type-checked at load (`threshold.value: "4.2"` is one line naming the key),
and `files:` entries must stay inside the bundle folder.

Score convention: `score` is the model's raw anomaly score (PaDiM: max Mahalanobis distance over the blurred
map; AE: max blurred reconstruction error). `normalised_score = score / threshold`, so 1.0 is exactly the
decision threshold, values above 1.0 fail and e.g. 0.5 is half-way from zero to the threshold.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from msgspec import Meta

from edge_inspector import __version__
from edge_inspector.core import schema
from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.errors import BundleError
from edge_inspector.core.schema import Real, shown

# 2: bundle.yaml carries meta_sha256 (a digest of its own metadata). A format-1 runtime meeting a format-2
# bundle says "newer than this runtime supports" instead of tripping over the unknown key.
# 3: map_blur_sigma (how smooth the graph's map is, so the service can send it at the detail it holds);
# format-2 bundles load with 0 (unknown: sent at one pixel per model-input pixel, as before).
FORMAT_VERSION = 3
BUNDLE_FILE = "bundle.yaml"
MODEL_FILE = "model.onnx"
META_DIGEST_KEY = "meta_sha256"
ENGINE_PREFIX = "engines/"
MODEL_KINDS = ("padim", "ae", "vae", "patchcore")
TILE_MODES = ("shared", "per_tile")
READ_ACCESS = "the service user needs read access to the bundle folder and its files"


PositiveReal = Annotated[int, Meta(gt=0)] | Annotated[float, Meta(gt=0)]
Rate = Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)]
Count = Annotated[int, Meta(ge=0)]
# A blur wider than any model input is a damaged file, not a smoother map (and .inf would shrink the heatmap
# to its floor without a word): bounded, so it is refused with one line.
BlurSigma = Annotated[int, Meta(ge=0, le=1024)] | Annotated[float, Meta(ge=0, le=1024)]


@dataclass
class ThresholdInfo:
    """The decision threshold on the raw score and how it was chosen (so an auditor can reproduce it)."""

    value: PositiveReal
    rule: str  # "conformal_false_reject_rate" | "f1_optimal" | "manual"
    target_false_reject_rate: Rate | None = None
    certified: bool = False  # True when enough good images exist to guarantee the target rate
    images_needed: Count | None = None  # good images needed to certify the target rate
    conformal_value: Real | None = None
    f1_optimal_value: Real | None = None
    note: str = ""
    # What the decision threshold costs on labelled validation images (fit --validation), when given:
    target_escape_rate: Rate | None = None  # rule "escape_rate": the share of defects allowed to pass
    validation_escape_rate: Rate | None = None  # share of validation defects passed at `value`
    validation_false_reject_rate: Rate | None = None  # share of validation good images rejected at `value`
    operating_curve: list[dict[str, Real]] | None = None  # {threshold, false_reject_rate, escape_rate} rows


@dataclass
class ScoreStats:
    """Out-of-sample scores of the good validation images (k-fold), on the raw score scale."""

    count: Count
    mean: Real
    std: Real
    min: Real
    max: Real
    p50: Real
    p95: Real
    p99: Real


@dataclass
class TrainingInfo:
    """Provenance: what the model was trained on, so a line engineer can tell two bundles apart."""

    folder: str
    image_count: Count
    file_list_sha256: str
    skipped_files: Count = 0
    seed: int = 0
    folds: Count = 0
    fit_seconds: Real = 0.0


@dataclass
class TilingInfo:
    """How frames were tiled for training; `per_tile` bundles expect batches of `rows*cols` tiles in order."""

    rows: Annotated[int, Meta(ge=1)] = 1
    cols: Annotated[int, Meta(ge=1)] = 1
    mode: str = "shared"  # one of TILE_MODES. "shared": one statistics set for all tiles; "per_tile": one per tile
    tile_size: list[int] | None = None  # [height, width] in frame pixels (None: the grid divides the ROI)
    stride: list[int] | None = None  # [dy, dx] between tiles (None: spread evenly)
    roi: list[int] | None = None  # [x, y, width, height] of the inspected area (None: whole frame)

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    def tiler(self, input_size: tuple[int, int]):
        """The Tiler that cuts frames exactly as they were cut for training (None for whole-frame bundles)."""
        from edge_inspector.core.tiling import Tiler

        if self.tiles == 1 and self.roi is None and self.tile_size is None:
            return None
        def pair(v: list[int] | None) -> tuple[int, int] | None:
            return None if v is None else (int(v[0]), int(v[1]))

        roi = None if self.roi is None else (int(self.roi[0]), int(self.roi[1]), int(self.roi[2]), int(self.roi[3]))
        return Tiler(self.rows, self.cols, input_size, tile_size=pair(self.tile_size), stride=pair(self.stride),
                     roi=roi)


@dataclass
class LabelledInfo:
    """What labelled images (`edge-export fit --labelled`) did: the supervised part they trained and the
    cross-validated rates at the decision threshold, with exact 95% intervals and the counts behind them
    (every image scored by a supervised part that did not train on it; training good images by their k-fold
    anomaly scores)."""

    source: str
    supervised: bool  # a supervised part is in the graph (needs >= 2 labelled defects)
    folds: Count
    penalty: Real
    training_good_images: Count
    labelled_good_images: Count
    labelled_defect_images: Count
    cv_good_images: Count
    cv_false_rejects: Count
    cv_false_reject_rate: Rate
    cv_false_reject_ci: list[Real]
    cv_defect_images: Count
    cv_escapes: Count
    cv_escape_rate: Rate | None  # None: no labelled defects, the escape rate is unknown
    cv_escape_ci: list[Real] | None
    defect_types: dict[str, int] = field(default_factory=dict)  # labelled defects per type
    escapes_by_type: dict[str, int] = field(default_factory=dict)  # cross-validated escapes per type
    anomaly_only_threshold: Real | None = None  # the same rule on the anomaly score alone, for comparison
    anomaly_only_escapes: Count | None = None
    anomaly_only_false_rejects: Count | None = None
    note: str = ""


@dataclass
class BundleMeta:
    """Everything in bundle.yaml. Unknown keys are refused at load so typos never pass silently."""

    model_kind: str  # one of MODEL_KINDS (a str, not a Literal: exporters pass their kind as a variable)
    input_size: tuple[Annotated[int, Meta(ge=1)], Annotated[int, Meta(ge=1)]]  # (height, width)
    threshold: ThresholdInfo
    score_stats: ScoreStats | None
    training: TrainingInfo
    backbone: str | None = None
    layers: list[str] = field(default_factory=list)
    feature_dim: Count = 0
    tiling: TilingInfo = field(default_factory=TilingInfo)
    color_order: str = "BGR"
    format_version: int = FORMAT_VERSION
    created: str = ""
    package_version: str = __version__
    model_params: dict[str, Any] = field(default_factory=dict)  # kind-specific numbers, informative only
    # The Gaussian sigma (model-input pixels) the graph blurs its anomaly map with; 0 = none or not known.
    # A map that smooth holds no detail finer than sigma / 2 pixels (Tiler.detail_scale uses it).
    map_blur_sigma: BlurSigma = 0.0
    # Labelled images and what they did (fit --labelled); None for a bundle fitted on good images only.
    labelled: LabelledInfo | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    meta_sha256: str = ""  # sha256 of the canonical JSON of everything above (set by write_meta)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        if data.get("labelled") is None:  # absent, not null: bundles without labels keep their bytes and model id
            data.pop("labelled", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> BundleMeta:
        """Check bundle.yaml's types (core.schema; numbers keep the YAML's int/float, so the model id, a
        digest of the loaded metadata, is the one the exporter computed) and build the metadata."""
        return schema.load(cls, data, source, error=BundleError)


def canonical_json(data: dict[str, Any]) -> bytes:
    """The bytes a metadata digest is taken over: sorted keys, no whitespace, independent of YAML layout."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def meta_digest(data: dict[str, Any]) -> str:
    """sha256 of the metadata without its own digest key (data: bundle.yaml as parsed, or BundleMeta.to_dict())."""
    return hashlib.sha256(canonical_json({k: v for k, v in data.items() if k != META_DIGEST_KEY})).hexdigest()


def identity_digest(meta: BundleMeta) -> str:
    """The digest the model id is made of: all metadata except the digest itself and engine entries.

    Engines are derived from model.onnx (and verified by their own sha256), so building one on the device
    does not change which model judges the parts; everything else (threshold, tiling, model.onnx's sha256)
    does.
    """
    data = meta.to_dict()
    data["files"] = {k: v for k, v in meta.files.items() if not k.startswith(ENGINE_PREFIX)}
    return meta_digest(data)


def check_file_entry(rel: Any, where: Path) -> None:
    """A `files:` key must be a relative path inside the bundle: no `..`, no absolute path, no backslash."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise BundleError(f"{where}: files: entry {shown(rel)} is not a relative file path")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or rel.startswith("~"):
        raise BundleError(f"{where}: files: entry {rel!r} points outside the bundle folder (refused)")


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
    def meta_sha256(self) -> str:
        return self.meta.meta_sha256

    @property
    def model_id(self) -> str:
        """`<kind>-<backbone>-<12 hex>`: the hex is the identity digest over model.onnx's sha256 and all the
        metadata, so a changed threshold or tiling is a new model id on the wire, like a changed graph."""
        name = self.meta.model_kind + (f"-{self.meta.backbone}" if self.meta.backbone else "")
        return f"{name}-{identity_digest(self.meta)[:12]}"

    def normalise(self, score: float) -> float:
        return float(score) / self.threshold if self.threshold > 0 else float("inf")

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        if not path.is_dir():
            raise BundleError(f"{path}: bundle folder not found")
        if not meta_path.is_file():
            raise BundleError(f"{meta_path}: missing (not a model bundle?)")
        data = schema.read_yaml(meta_path, BundleError, access=READ_ACCESS)
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise BundleError(f"{meta_path}: format_version {data['format_version']} is newer than this "
                              f"runtime supports ({FORMAT_VERSION}); upgrade edge-inspector")
        meta = BundleMeta.from_dict(data, str(meta_path))
        _validate(meta, meta_path)
        _check_digest(data, meta_path)
        for rel in meta.files:
            check_file_entry(rel, meta_path)
        bundle = cls(path, meta)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every file listed in bundle.yaml exists and has the recorded sha256."""
        if MODEL_FILE not in self.meta.files:
            raise BundleError(f"{self.path / BUNDLE_FILE}: files has no entry for {MODEL_FILE}")
        root = self.path.resolve()
        for rel, expected in self.meta.files.items():
            check_file_entry(rel, self.path / BUNDLE_FILE)
            file = self.path / rel
            if not file.resolve().is_relative_to(root):
                raise BundleError(f"{file}: a link out of the bundle folder (refused)")
            if not file.is_file():
                raise BundleError(f"{file}: listed in bundle.yaml but missing")
            try:
                actual = sha256_file(file)
            except OSError as err:
                raise BundleError(f"{file}: cannot read ({err.strerror or err}; {READ_ACCESS})") from None
            if actual != expected:
                raise BundleError(f"{file}: sha256 mismatch (file altered or truncated; expected "
                                  f"{expected[:12]}..., found {actual[:12]}...)")

    def add_file(self, rel: str) -> None:
        """Record a file added after export (e.g. a TensorRT engine) so it is verified like the rest."""
        self.meta.files[rel] = sha256_file(self.path / rel)
        write_meta(self.path, self.meta)


def _validate(meta: BundleMeta, where: Path) -> None:
    """The choices kept as plain str fields (exporters set them from variables); every other type and range
    is declared on the dataclasses above and checked by BundleMeta.from_dict."""
    for key, value, allowed in (("model_kind", meta.model_kind, MODEL_KINDS), ("color_order", meta.color_order,
                                ("BGR",)), ("tiling.mode", meta.tiling.mode, TILE_MODES)):
        if value not in allowed:
            raise BundleError(f"{where}: {key}: expected one of {', '.join(allowed)}, got {shown(value)}")


def _check_digest(data: dict[str, Any], where: Path) -> None:
    recorded = data.get(META_DIGEST_KEY)
    if not recorded:
        raise BundleError(f"{where}: {META_DIGEST_KEY} missing (a format-1 bundle from an older edge-export, or "
                          "written by hand; its metadata is unprotected: export it again with this version)")
    actual = meta_digest(data)
    if recorded != actual:
        raise BundleError(f"{where}: {META_DIGEST_KEY} mismatch (metadata edited after export; expected "
                          f"{str(recorded)[:12]}..., found {actual[:12]}...)")


def write_meta(folder: Path, meta: BundleMeta) -> None:
    """Write bundle.yaml atomically (a reader never sees half a file), with its metadata digest."""
    meta.meta_sha256 = meta_digest(meta.to_dict())
    write_atomic(folder / BUNDLE_FILE, yaml.safe_dump(meta.to_dict(), sort_keys=False))


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
