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

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
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
from edge_inspector.core.signing import MAX_SIGNATURE_BYTES, SIGNATURE_FILE, Signature, TrustPolicy

# 2: bundle.yaml carries meta_sha256 (a digest of its own metadata). A format-1 runtime meeting a format-2
# bundle says "newer than this runtime supports" instead of tripping over the unknown key.
# 3: map_blur_sigma (how smooth the graph's map is, so the service can send it at the detail it holds);
# format-2 bundles load with 0 (unknown: sent at one pixel per model-input pixel, as before).
# 4: threshold.review (the review band), threshold's in-sample counts, the `labelled:` section (the supervised
# part's cross-validated rates) and report/good_scores.json; a format-3 runtime meeting them says "newer than
# this runtime supports" instead of "unknown key". Format-3 bundles load as before.
FORMAT_VERSION = 4
BUNDLE_FILE = "bundle.yaml"
MODEL_FILE = "model.onnx"
META_DIGEST_KEY = "meta_sha256"
ENGINE_PREFIX = "engines/"
MODEL_KINDS = ("padim", "ae", "vae", "patchcore")
TILE_MODES = ("shared", "per_tile")
GOOD_SCORES_FILE = "report/good_scores.json"  # the good training images' out-of-sample scores (see ThresholdInfo)
READ_ACCESS = "the service user needs read access to the bundle folder and its files"

log = logging.getLogger(__name__)


PositiveReal = Annotated[int, Meta(gt=0)] | Annotated[float, Meta(gt=0)]
Rate = Annotated[int, Meta(ge=0, le=1)] | Annotated[float, Meta(ge=0, le=1)]
Count = Annotated[int, Meta(ge=0)]
# A blur wider than any model input is a damaged file, not a smoother map (and .inf would shrink the heatmap
# to its floor without a word): bounded, so it is refused with one line.
BlurSigma = Annotated[int, Meta(ge=0, le=1024)] | Annotated[float, Meta(ge=0, le=1024)]


@dataclass
class ReviewBand:
    """The review band (fit --review-rate): parts scoring over `value` and not failing get the verdict review.

    `value` is the pass threshold on the raw score, below ThresholdInfo.value (the fail threshold). It is a
    split-conformal quantile of the good parts' out-of-sample scores chosen so that at most `target_rate` of new
    good parts like them land in the band; `cross_validated_*` counts the good parts sent to review by bands
    chosen without them (k folds), so the rate recorded never comes from an image judging itself.
    """

    value: PositiveReal
    target_rate: Rate  # most of the good parts allowed to go to review
    good_count: Count  # out-of-sample good scores the band was chosen from (training k-fold + labelled good)
    good_in_band: Count  # of those, in the band
    cross_validated_in_band: Count  # good parts in the band when each fold's band is chosen without that fold
    cross_validated_rate: Rate
    guaranteed: bool  # enough good scores for the split-conformal bound at target_rate
    note: str = ""
    # On labelled images (fit --validation), when given: defects auto-passed (escapes among the parts the
    # band lets through), defects in review, and good parts auto-failed.
    labelled_defect_count: Count | None = None
    defects_auto_passed: Count | None = None
    defects_in_band: Count | None = None
    labelled_good_count: Count | None = None
    labelled_good_in_band: Count | None = None
    labelled_good_failed: Count | None = None


@dataclass
class ThresholdInfo:
    """The decision threshold on the raw score and how it was chosen (so an auditor can reproduce it)."""

    value: PositiveReal
    rule: str  # "conformal_false_reject_rate" | "f1_optimal" | "escape_rate" | "manual"
    target_false_reject_rate: Rate | None = None
    # True only for the conformal rule with enough good images to guarantee the target rate; a threshold chosen on
    # labelled images (f1_optimal, escape_rate) guarantees nothing, whatever the conformal one would have.
    certified: bool = False
    images_needed: Count | None = None  # good images needed to certify the target rate
    conformal_value: Real | None = None
    f1_optimal_value: Real | None = None
    note: str = ""
    # What the decision threshold costs on labelled validation images (fit --validation), when given:
    target_escape_rate: Rate | None = None  # rule "escape_rate": the share of defects allowed to pass
    validation_escape_rate: Rate | None = None  # share of validation defects passed at `value`
    validation_false_reject_rate: Rate | None = None  # share of validation good images rejected at `value`
    operating_curve: list[dict[str, Real]] | None = None  # {threshold, false_reject_rate, escape_rate} rows
    # The counts those two rates come from, and whether they are in-sample: True when `value` was chosen on the
    # same labelled images (rules "f1_optimal" and "escape_rate"), so they describe those images, not new parts.
    validation_good_count: Count | None = None
    validation_false_rejects: Count | None = None
    validation_defect_count: Count | None = None
    validation_escapes: Count | None = None
    in_sample: bool = False
    # Whether the conformal threshold (`conformal_value`) certifies its target; `certified` above says whether
    # the threshold in use does, and only the conformal rule's can.
    conformal_certified: bool | None = None
    # The out-of-sample scores of the good training images (k-fold, ascending) the threshold was set from: the
    # evidence a review band or any later threshold is judged on (an auditor can recompute every rate from it).
    # In memory only between a fit and write_meta, which moves them to GOOD_SCORES_FILE (one score per training
    # image: 10,000 images would pass bundle.yaml's node cap, and the device never needs them); read them with
    # Bundle.good_scores(). An older bundle.yaml that holds them inline still loads.
    good_scores: list[Real] | None = None
    review: ReviewBand | None = None  # the review band's pass threshold and its rates (None: pass/fail only)

    @property
    def guarantees_false_reject_rate(self) -> bool:
        """Whether `value` carries a false-reject guarantee: only a certified conformal threshold does (a bundle
        written before that was enforced may say `certified: true` beside an escape-rate threshold)."""
        return bool(self.certified and self.rule == "conformal_false_reject_rate")


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
        """bundle.yaml's content: the good scores live in their own file (GOOD_SCORES_FILE), not here."""
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["threshold"].pop("good_scores", None)
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


# -- reading a bundle's files safely -----------------------------------------------------------------------
#
# Every bundle file is opened relative to the bundle folder's descriptor, one path component at a time with
# O_NOFOLLOW, and checked on the opened descriptor (fstat: a regular file): a symlink planted anywhere inside
# the bundle, a FIFO or a device is refused, and what is hashed is read from the same descriptor as what is
# used. Only the bundle folder itself may be a link (`bundles/current -> line1-v7` is a common deployment).

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang open()
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY


def _open_inside(folder_fd: int, rel: str, where: Path) -> int:
    """A descriptor on `rel` (a checked `files:` entry) under the folder open as `folder_fd`, no link followed."""
    parts = PurePosixPath(rel).parts
    current = folder_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                fd = os.open(part, _OPEN_FILE if last else _OPEN_DIR, dir_fd=current)
            except FileNotFoundError:
                raise BundleError(f"{where}: listed in bundle.yaml but missing") from None
            except PermissionError as err:
                raise BundleError(f"{where}: cannot read ({err.strerror}; {READ_ACCESS})") from None
            except OSError as err:  # ELOOP / ENOTDIR: a link where a file or folder should be
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BundleError(f"{where}: a symbolic link or not a regular file (bundle files must be "
                                      "plain files; refused)") from None
                raise BundleError(f"{where}: cannot open ({err.strerror or err})") from None
            if current != folder_fd:
                os.close(current)
            current = fd
    except BaseException:
        if current != folder_fd:
            os.close(current)
        raise
    if not stat.S_ISREG(os.fstat(current).st_mode):
        os.close(current)
        raise BundleError(f"{where}: not a regular file (refused)")
    return current


def _read_fd(fd: int, where: Path, digest: Any | None = None, keep: bool = True) -> bytes:
    """Read an open file to its end, feeding `digest`; the bytes are returned when `keep`."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            if digest is not None:
                digest.update(chunk)
            if keep:
                chunks.append(chunk)
    except OSError as err:
        raise BundleError(f"{where}: cannot read ({err.strerror or err}; {READ_ACCESS})") from None
    return b"".join(chunks)


@contextlib.contextmanager
def _folder(path: Path, within: Path | None = None) -> Iterator[int]:
    """The bundle folder open as a descriptor; with `within`, it must really lie under that folder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{path}: bundle folder not found") from None
    except OSError as err:
        raise BundleError(f"{path}: cannot open the bundle folder ({err.strerror or err}; {READ_ACCESS})") from None
    try:
        if within is not None:
            _check_within(fd, path, within)
        yield fd
    finally:
        os.close(fd)


def folder_of(fd: int, path: Path) -> Path:
    """Where an open folder really is (Linux names it under /proc/self/fd; elsewhere the resolved path)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # pragma: no cover - no /proc
        return path.resolve()


def _check_within(fd: int, path: Path, root: Path) -> None:
    real, allowed = folder_of(fd, path), root.resolve()
    if not real.is_relative_to(allowed):
        raise BundleError(f"{path}: not a bundle folder under {allowed} (security.bundle_root; refused)")


class Bundle:
    """A verified model bundle on disk."""

    def __init__(self, path: Path, meta: BundleMeta, signature: Signature | None = None):
        self.path = path
        self.meta = meta
        self.signature = signature  # the bundle.sig that verified against a trusted key, when there was one
        self._verified: dict[str, bytes] = {}  # bytes read and hashed by verify(), handed out once
        # True when signatures are required: nothing this process writes into the bundle folder (a TensorRT
        # engine it builds) would be trusted on the next start, so such files go to the state directory.
        self.signed_only = False

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold.value)

    @property
    def review_threshold(self) -> float | None:
        """The review band's pass threshold, or None (bundles without a band decide pass/fail as before)."""
        review = self.meta.threshold.review
        return None if review is None else float(review.value)

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
    def identity_sha256(self) -> str:
        """The digest a signature covers and the model id is made of (see identity_digest)."""
        return identity_digest(self.meta)

    @property
    def model_id(self) -> str:
        """`<kind>-<backbone>-<12 hex>`: the hex is the identity digest over model.onnx's sha256 and all the
        metadata, so a changed threshold or tiling is a new model id on the wire, like a changed graph."""
        name = self.meta.model_kind + (f"-{self.meta.backbone}" if self.meta.backbone else "")
        return f"{name}-{identity_digest(self.meta)[:12]}"

    def normalise(self, score: float) -> float:
        return float(score) / self.threshold if self.threshold > 0 else float("inf")

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, trust: TrustPolicy | None = None,
             within: Path | None = None) -> Bundle:
        """Read bundle.yaml (once: the metadata used is the metadata checked), check it and, with `verify`,
        every listed file's sha256. `trust`: the signature rule (security.trusted_keys and
        require_signed_bundles); `within`: the folder the bundle must lie under (security.bundle_root)."""
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        with _folder(path, within) as folder_fd:
            data = _read_meta(folder_fd, meta_path)
            version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise BundleError(f"{meta_path}: format_version {data['format_version']} is newer than this "
                                  f"runtime supports ({FORMAT_VERSION}); upgrade edge-inspector")
            meta = BundleMeta.from_dict(data, str(meta_path))
            _validate(meta, meta_path)
            _check_digest(data, meta_path)
            for rel in meta.files:
                check_file_entry(rel, meta_path)
            signature = None
            if trust is not None:
                signature = trust.check(_read_signature(folder_fd, path / SIGNATURE_FILE), identity_digest(meta),
                                        path / SIGNATURE_FILE)
                if trust.required:
                    _drop_unsigned_engines(meta, signature, path)
            bundle = cls(path, meta, signature)
            bundle.signed_only = trust is not None and trust.required
            if verify:
                bundle._verify(folder_fd, keep=(MODEL_FILE,))
        return bundle

    def verify(self) -> None:
        """Check every file listed in bundle.yaml exists, is a plain file and has the recorded sha256."""
        with _folder(self.path) as folder_fd:
            self._verify(folder_fd, keep=())

    def _verify(self, folder_fd: int, keep: Iterable[str]) -> None:
        if MODEL_FILE not in self.meta.files:
            raise BundleError(f"{self.path / BUNDLE_FILE}: files has no entry for {MODEL_FILE}")
        for rel in self.meta.files:
            data = self._read_checked(folder_fd, rel, keep=rel in keep)
            if rel in keep:
                self._verified[rel] = data

    def _read_checked(self, folder_fd: int, rel: str, keep: bool) -> bytes:
        check_file_entry(rel, self.path / BUNDLE_FILE)
        where = self.path / rel
        fd = _open_inside(folder_fd, rel, where)
        digest = hashlib.sha256()
        try:
            data = _read_fd(fd, where, digest, keep)
        finally:
            os.close(fd)
        actual, expected = digest.hexdigest(), self.meta.files[rel]
        if actual != expected:
            raise BundleError(f"{where}: sha256 mismatch (file altered or truncated; expected "
                              f"{expected[:12]}..., found {actual[:12]}...)")
        return data

    def read_verified(self, rel: str) -> bytes:
        """The bytes of a listed file, hashed from exactly these bytes: what a backend loads is what was
        verified, whatever happens to the file afterwards. model.onnx's bytes from load() are handed out
        once (no second read); any other call reads and hashes again."""
        if rel not in self.meta.files:
            raise BundleError(f"{self.path / BUNDLE_FILE}: files has no entry for {rel}")
        data = self._verified.pop(rel, None)
        if data is not None:
            return data
        with _folder(self.path) as folder_fd:
            return self._read_checked(folder_fd, rel, keep=True)

    def good_scores(self) -> list[float] | None:
        """The good training images' out-of-sample scores (GOOD_SCORES_FILE, verified), None when the bundle
        has none (fitted before they were kept)."""
        if self.meta.threshold.good_scores is not None:  # an older bundle.yaml holding them inline
            return [float(v) for v in self.meta.threshold.good_scores]
        if GOOD_SCORES_FILE not in self.meta.files:
            return None
        where = self.path / GOOD_SCORES_FILE
        try:
            scores = json.loads(self.read_verified(GOOD_SCORES_FILE))
        except ValueError:
            raise BundleError(f"{where}: not a JSON list of numbers") from None
        if not isinstance(scores, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in scores):
            raise BundleError(f"{where}: not a JSON list of numbers")
        return [float(v) for v in scores]

    def release(self) -> None:
        """Drop bytes kept from load() that no backend took (e.g. a TensorRT start that used an engine)."""
        self._verified.clear()

    @contextlib.contextmanager
    def verified_copy(self, rels: Iterable[str]) -> Iterator[Path]:
        """A private folder (mode 0700, this process's user) holding verified copies of `rels`, for a loader
        that must read from a path (ONNX external data); removed on exit."""
        folder = Path(tempfile.mkdtemp(prefix="edge-bundle-"))
        try:
            for rel in rels:
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(self.read_verified(rel))
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def add_file(self, rel: str) -> None:
        """Record a file added after export (e.g. a TensorRT engine) so it is verified like the rest."""
        self.meta.files[rel] = sha256_file(self.path / rel)
        write_meta(self.path, self.meta)


def _drop_unsigned_engines(meta: BundleMeta, signature: Signature | None, where: Path) -> None:
    """With signatures required, an engines/ file the signature does not cover (recorded after signing, by a
    device or by anyone who could write the folder) is left out of the files a backend may choose."""
    signed = signature.engines if signature is not None else {}
    for rel in [r for r in meta.files if r.startswith(ENGINE_PREFIX) and signed.get(r) != meta.files[r]]:
        log.warning("%s: %s is not covered by the bundle's signature: not used (signed bundles required)", where,
                    rel)
        del meta.files[rel]


def _read_meta(folder_fd: int, where: Path) -> Any:
    """bundle.yaml, parsed within core.schema's caps. Refused when it is a link (symbolic or a second hard
    link): an error reply about a file must never let a client read a file it could not read itself."""
    try:
        fd = os.open(BUNDLE_FILE, _OPEN_FILE, dir_fd=folder_fd)
    except FileNotFoundError:
        raise BundleError(f"{where}: missing (not a model bundle?)") from None
    except PermissionError as err:
        raise BundleError(f"{where}: cannot read ({err.strerror}; {READ_ACCESS})") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BundleError(f"{where}: a symbolic link (bundle files must be plain files; refused)") from None
        raise BundleError(f"{where}: cannot open ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            raise BundleError(f"{where}: has {info.st_nlink} hard links (bundle.yaml must be a file of its own; "
                              "copy the bundle instead of linking it; refused)")
        text = schema.read_capped(fd, where, BundleError)
    except OSError as err:
        raise BundleError(f"{where}: cannot read ({err.strerror or err}; {READ_ACCESS})") from None
    finally:
        os.close(fd)
    return schema.parse_yaml(text, where, BundleError)


def _read_signature(folder_fd: int, where: Path) -> bytes | None:
    """bundle.sig's bytes (None when there is none); links and non-regular files refused like every file."""
    try:
        fd = os.open(SIGNATURE_FILE, _OPEN_FILE, dir_fd=folder_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BundleError(f"{where}: a symbolic link (bundle files must be plain files; refused)") from None
        raise BundleError(f"{where}: cannot open ({err.strerror or err}; {READ_ACCESS})") from None
    try:
        return schema.read_capped(fd, where, BundleError, limit=MAX_SIGNATURE_BYTES)
    finally:
        os.close(fd)


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
    """Write bundle.yaml atomically (a reader never sees half a file), with its metadata digest; good scores
    held in memory go to GOOD_SCORES_FILE first, which is listed and hashed like every bundle file."""
    if meta.threshold.good_scores is not None:
        text = json.dumps([float(v) for v in meta.threshold.good_scores])
        write_atomic(folder / GOOD_SCORES_FILE, text)
        meta.files[GOOD_SCORES_FILE] = hashlib.sha256(text.encode()).hexdigest()
        meta.threshold.good_scores = None
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
        if file.is_file() and file.name not in (BUNDLE_FILE, SIGNATURE_FILE) and not file.name.endswith(".tmp"):
            meta.files[file.relative_to(folder).as_posix()] = sha256_file(file)
    write_meta(folder, meta)
    return Bundle.load(folder)
