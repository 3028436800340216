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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge_inspector import __version__
from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.errors import BundleError

# 2: bundle.yaml carries meta_sha256 (a digest of its own metadata). A format-1 runtime meeting a format-2
# bundle says "newer than this runtime supports" instead of tripping over the unknown key.
FORMAT_VERSION = 2
BUNDLE_FILE = "bundle.yaml"
MODEL_FILE = "model.onnx"
META_DIGEST_KEY = "meta_sha256"
ENGINE_PREFIX = "engines/"
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
    # What the decision threshold costs on labelled validation images (fit --validation), when given:
    target_escape_rate: float | None = None  # rule "escape_rate": the share of defects allowed to pass
    validation_escape_rate: float | None = None  # share of validation defects passed at `value`
    validation_false_reject_rate: float | None = None  # share of validation good images rejected at `value`
    operating_curve: list[dict[str, float]] | None = None  # {threshold, false_reject_rate, escape_rate} rows


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
        from edge_inspector.core.tiling import Tiler

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
    meta_sha256: str = ""  # sha256 of the canonical JSON of everything above (set by write_meta)

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


def _build(cls, data: Any, where: str, prefix: str = ""):
    """Build a (nested) dataclass from a dict, naming the offending key on any mismatch."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: {prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        raise BundleError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        hint = hints.get(name, Any)
        nested = _dataclass_in(hint)
        if nested is not None and value is not None:
            value = _build(nested, value, where, key + ".")
        elif not _matches(value, hint):
            raise BundleError(f"{where}: {key}: expected {_describe(hint)}, got {_shown(value)}")
        kwargs[name] = value
    missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), else None."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    found = [o for o in options if dataclasses.is_dataclass(o)]
    return found[0] if found else None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type hint (ints pass for floats; bools never pass for numbers)."""
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        key_hint, value_hint = args or (Any, Any)
        return all(_matches(k, key_hint) and _matches(v, value_hint) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    names = {float: "a number", int: "an integer", str: "a string", bool: "true or false", type(None): "null"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def canonical_json(data: dict[str, Any]) -> bytes:
    """The bytes a metadata digest is taken over: sorted keys, no whitespace, independent of YAML layout."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def meta_digest(data: dict[str, Any]) -> str:
    """sha256 of the metadata without its own digest key (data: bundle.yaml as parsed, or BundleMeta.to_dict())."""
    return hashlib.sha256(canonical_json({k: v for k, v in data.items() if k != META_DIGEST_KEY})).hexdigest()


def identity_digest(meta: "BundleMeta") -> str:
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
        raise BundleError(f"{where}: files: entry {_shown(rel)} is not a relative file path")
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
        except (OSError, UnicodeDecodeError) as err:
            raise BundleError(f"{meta_path}: cannot read ({_os_reason(err)}; the service user needs read "
                              "access to the bundle folder and its files)") from None
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
                raise BundleError(f"{file}: cannot read ({_os_reason(err)}; the service user needs read "
                                  "access to the bundle folder and its files)") from None
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


def _check_digest(data: dict[str, Any], where: Path) -> None:
    recorded = data.get(META_DIGEST_KEY)
    if not recorded:
        raise BundleError(f"{where}: {META_DIGEST_KEY} missing (a format-1 bundle from an older edge-export, or "
                          "written by hand; its metadata is unprotected: export it again with this version)")
    actual = meta_digest(data)
    if recorded != actual:
        raise BundleError(f"{where}: {META_DIGEST_KEY} mismatch (metadata edited after export; expected "
                          f"{str(recorded)[:12]}..., found {actual[:12]}...)")


def _os_reason(err: OSError | UnicodeDecodeError) -> str:
    return err.strerror or str(err) if isinstance(err, OSError) else "not UTF-8 text"


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
