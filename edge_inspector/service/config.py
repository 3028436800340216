"""The service's one config file, parsed into typed objects and validated once at start.

A line runs for months on the config it started with, so every mistake must surface at start, as one line
naming the file and the key path (`configs/line1.yaml: tiling.rows: expected an integer >= 1, got 'two'`),
never as a KeyError an hour into a shift. Each field carries its own check in its dataclass metadata, so
the rule for a key sits next to its default and its documentation (docs/service.md mirrors these classes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from edge_inspector.core.errors import ConfigError

Check = Callable[[Any, str], Any]


class _Invalid(Exception):
    """Raised by a check with the 'expected ..., got ...' part; the loader adds file and key path."""


def _got(value: Any) -> str:
    """How a bad value is shown in the one-line error: its repr, cut short (a mapping by its type)."""
    if isinstance(value, dict):
        return "a mapping"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any, _path: str) -> int:
        ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            raise _Invalid(f"expected an integer{_range(low, high)}, got {_got(value)}")
        return int(value)
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    def check(value: Any, _path: str) -> float:
        ok = _is_number(value) and (low is None or (value > low if low_open else value >= low)) and (
            high is None or value <= high)
        if not ok:
            raise _Invalid(f"expected a number{_range(low, high, low_open)}, got {_got(value)}")
        return float(value)
    return check


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return f" <= {high}" if high is not None else ""


def text(non_empty: bool = True) -> Check:
    def check(value: Any, _path: str) -> str:
        if not isinstance(value, str) or (non_empty and not value.strip()):
            raise _Invalid(f"expected a{' non-empty' if non_empty else ''} string, got {_got(value)}")
        return value
    return check


def choice(*options: str) -> Check:
    def check(value: Any, _path: str) -> str:
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {_got(value)}")
        return value
    return check


def boolean() -> Check:
    def check(value: Any, _path: str) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {_got(value)}")
        return value
    return check


def optional(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)
    return check


def pair(low: int = 1) -> Check:
    """[height, width]-style pair of integers (YAML list), returned as a tuple."""
    def check(value: Any, _path: str) -> tuple[int, int]:
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= low for v in value)):
            raise _Invalid(f"expected a list of 2 integers >= {low}, got {_got(value)}")
        return int(value[0]), int(value[1])
    return check


def rect() -> Check:
    """[x, y, width, height] with x, y >= 0 and width, height >= 1."""
    def check(value: Any, _path: str) -> tuple[int, int, int, int]:
        ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_int(v) for v in value) and (
            value[0] >= 0 and value[1] >= 0 and value[2] >= 1 and value[3] >= 1)
        if not ok:
            raise _Invalid(f"expected [x, y, width, height] (x, y >= 0; width, height >= 1), got {_got(value)}")
        return tuple(int(v) for v in value)  # type: ignore[return-value]
    return check


def source_spec() -> Check:
    """A device index (integer) or a path / URL / GStreamer pipeline (string)."""
    def check(value: Any, _path: str) -> int | str:
        if _is_int(value) and value >= 0:
            return int(value)
        if isinstance(value, str) and value.strip():
            return value
        raise _Invalid(f"expected a device index (integer >= 0) or a path, URL or GStreamer pipeline, "
                       f"got {_got(value)}")
    return check


def verdict_list() -> Check:
    def check(value: Any, _path: str) -> tuple[str, ...]:
        if not (isinstance(value, list) and value and all(v in ("pass", "fail", "error") for v in value)):
            raise _Invalid(f"expected a non-empty list of pass, fail, error, got {_got(value)}")
        return tuple(dict.fromkeys(value))
    return check


def opt(default: Any, check: Check, doc: str = "") -> Any:
    """A config field: its default, its check, and a one-line description for docs."""
    return field(default=default, metadata={"check": check, "doc": doc})


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


@dataclass
class CameraConfig:
    """Where frames come from. `kind: auto` infers it from `source` (see sources.py)."""

    id: str = opt("cam0", text(), "camera id, used in topics (inspection.<id>) and archive names")
    source: int | str = opt(0, source_spec(), "device index, video file, rtsp/http URL, GStreamer pipeline or image folder")
    kind: str = opt("auto", choice("auto", "device", "file", "url", "gstreamer", "folder"), "source type")
    fps: float | None = opt(None, optional(number(0.0, 1000.0, low_open=True)),
                            "file/folder: pace frames at this rate (null: as fast as possible); device: requested rate")
    loop: bool = opt(False, boolean(), "file/folder: start over at the end instead of ending the stream")
    width: int | None = opt(None, optional(integer(1)), "device: requested capture width")
    height: int | None = opt(None, optional(integer(1)), "device: requested capture height")
    open_timeout_s: float = opt(10.0, number(0.1, 600.0), "give up one open attempt after this long")
    read_timeout_s: float = opt(5.0, number(0.1, 600.0), "a read blocking longer than this counts as a failure")
    reconnect_initial_s: float = opt(0.5, number(0.01, 600.0), "first reconnect delay; doubles per failure")
    reconnect_max_s: float = opt(10.0, number(0.01, 3600.0), "reconnect delay cap")
    max_frame_pixels: int = opt(50_000_000, integer(1, 1_000_000_000),
                                "folder: an image whose header declares more pixels is refused before decoding "
                                "(an error result), so a decompression bomb cannot exhaust memory")


@dataclass
class TilingConfig:
    """How a frame is cut into model inputs (see tiling.py)."""

    rows: int = opt(1, integer(1, 64), "tile rows")
    cols: int = opt(1, integer(1, 64), "tile columns")
    tile_size: tuple[int, int] | None = opt(None, optional(pair()), "[height, width] of each tile (null: ROI / grid)")
    stride: tuple[int, int] | None = opt(None, optional(pair()), "[dy, dx] between tiles (null: spread evenly)")
    roi: tuple[int, int, int, int] | None = opt(None, optional(rect()), "[x, y, width, height] to inspect (null: whole frame)")


@dataclass
class ModelConfig:
    bundle: str = opt("", text(), "model bundle folder (relative paths are relative to this config file)")
    backend: str = opt("auto", choice("auto", "onnxruntime", "tensorrt"), "inference runtime")
    threads: int | None = opt(None, optional(integer(1, 256)), "CPU threads for ONNX Runtime (null: runtime default)")


@dataclass
class DecisionConfig:
    threshold: float | None = opt(None, optional(number(0.0, low_open=True)),
                                  "raw-score threshold override (null: the bundle's)")
    min_defect_area: int = opt(0, integer(0), "fail only when a connected over-threshold region exceeds this many pixels")
    max_boxes: int = opt(20, integer(0, 1000), "defect boxes reported per frame (largest first)")
    threshold_min: float | None = opt(None, optional(number(0.0, low_open=True)),
                                      "lowest threshold allowed (config or set_threshold); null: the bundle's "
                                      "median good-part score")
    threshold_max: float | None = opt(None, optional(number(0.0, low_open=True)),
                                      "highest threshold allowed; null: 4 x the bundle's highest good-part score")


@dataclass
class PipelineConfig:
    queue_size: int = opt(2, integer(1, 64), "frames buffered between capture and inference")
    when_behind: str = opt("auto", choice("auto", "drop", "wait"),
                           "inference slower than capture: drop (freshest frame wins) or wait (lossless); "
                           "auto: wait for unpaced files/folders, drop otherwise")
    stall_timeout_s: float = opt(20.0, number(0.5, 3600.0),
                                 "a stage silent this long is unresponsive (stops the systemd watchdog); "
                                 "must exceed camera.open_timeout_s and camera.read_timeout_s")


@dataclass
class PublishConfig:
    endpoint: str = opt("tcp://*:5556", text(), "ZeroMQ PUB endpoint for results and health")
    control_endpoint: str | None = opt("tcp://127.0.0.1:5557", optional(text()), "ZeroMQ REP control endpoint (null: off)")
    heatmap: str = opt("png", choice("png", "jpeg_overlay", "none"), "third message part")
    heatmap_full_scale: float = opt(2.0, number(0.0, 1000.0, low_open=True),
                                    "normalised score that maps to 255 in the 8-bit heatmap")
    heatmap_scale: float = opt(1.0, number(0.05, 1.0),
                               "heatmap size relative to the frame (e.g. 0.5 for 5-megapixel cameras: 4x less to encode)")
    jpeg_quality: int = opt(85, integer(1, 100), "quality of jpeg_overlay")
    health_interval_s: float = opt(5.0, number(0.05, 3600.0), "seconds between health messages")
    sndhwm: int = opt(20, integer(1, 100000), "messages queued per slow subscriber before dropping")
    wait_for_subscriber_s: float = opt(0.0, number(0.0, 3600.0),
                                       "hold capture until a subscriber connects, at most this long (0: don't)")


@dataclass
class ArchiveConfig:
    enabled: bool = opt(False, boolean(), "keep frames for review")
    folder: str | None = opt(None, optional(text()),
                             "where (relative paths: to this config file); null: $STATE_DIRECTORY/archive/<camera "
                             "id> under systemd, else archive/ beside the config")
    verdicts: tuple[str, ...] = opt(("fail",), verdict_list(), "which verdicts to keep")
    max_files: int = opt(1000, integer(1), "frames kept; oldest removed first")
    max_megabytes: float = opt(500.0, number(0.0, low_open=True), "total size cap; oldest removed first")
    image_format: str = opt("png", choice("png", "jpg"), "frame file format")


@dataclass
class SecurityConfig:
    """Optional ZeroMQ CURVE (edge_inspector/core/keys.py). Key files come from `edge-inspector keys`."""

    curve_secret_key: str | None = opt(None, optional(text()),
                                       "the service's NAME.key_secret; null: no CURVE (plain TCP, no authentication)")
    result_clients: str | None = opt(None, optional(text()),
                                     "folder of client public keys (*.key) allowed to subscribe; null: any client "
                                     "that has the service's public key")
    control_clients: str | None = opt(None, optional(text()),
                                      "folder of client public keys allowed on the control socket (required "
                                      "with CURVE)")


@dataclass
class LoggingConfig:
    level: str = opt("INFO", choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level")


@dataclass
class ServiceConfig:
    camera: CameraConfig = section(CameraConfig)
    tiling: TilingConfig = section(TilingConfig)
    model: ModelConfig = section(ModelConfig)
    decision: DecisionConfig = section(DecisionConfig)
    pipeline: PipelineConfig = section(PipelineConfig)
    publish: PublishConfig = section(PublishConfig)
    archive: ArchiveConfig = section(ArchiveConfig)
    security: SecurityConfig = section(SecurityConfig)
    logging: LoggingConfig = section(LoggingConfig)
    path: str = field(default="<config>", metadata={"internal": True})

    @property
    def bundle_path(self) -> Path:
        return self._resolve(self.model.bundle)

    @property
    def archive_path(self) -> Path:
        """Explicit folders resolve like every path; the default lives in systemd's StateDirectory (the unit's
        only writable place under ProtectSystem=strict), or beside the config outside systemd."""
        if self.archive.folder is not None:
            return self._resolve(self.archive.folder)
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state:
            return Path(state) / "archive" / self.camera.id
        return self._resolve("archive")

    def resolve(self, value: str) -> Path:
        """A path from the config: relative paths are relative to the config file."""
        return self._resolve(value)

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.path.startswith("<") else Path(self.path).parent / path

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError in the file/key format, for checks that need more than the config (e.g. the bundle)."""
        return ConfigError(f"{self.path}: {key}: {message}")


def _build(cls: type, data: Any, where: str, key: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {key or 'top level'}: expected a mapping, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name in data:
        if name not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: {_join(key, str(name))}: unknown key (expected one of {known})")
    kwargs = {}
    for name, value in data.items():
        meta = fields[name].metadata
        path = _join(key, name)
        if "section" in meta:
            kwargs[name] = _build(meta["section"], value, where, path)
            continue
        try:
            kwargs[name] = meta["check"](value, path)
        except _Invalid as err:
            raise ConfigError(f"{where}: {path}: {err}") from None
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _cross_checks(config: ServiceConfig) -> None:
    """Rules that involve more than one key."""
    if not config.model.bundle:
        raise config.error("model.bundle", "required (path to a model bundle folder)")
    tiling = config.tiling
    if tiling.stride is not None and tiling.tile_size is None:
        raise config.error("tiling.stride", "needs tiling.tile_size")
    if tiling.stride is not None and tiling.tile_size is not None and (
            tiling.stride[0] > tiling.tile_size[0] or tiling.stride[1] > tiling.tile_size[1]):
        raise config.error("tiling.stride", f"{list(tiling.stride)} is larger than tiling.tile_size "
                           f"{list(tiling.tile_size)} (tiles would leave gaps)")
    camera = config.camera
    if camera.reconnect_max_s < camera.reconnect_initial_s:
        raise config.error("camera.reconnect_max_s", f"expected >= camera.reconnect_initial_s "
                           f"({camera.reconnect_initial_s}), got {camera.reconnect_max_s}")
    if (camera.width is None) != (camera.height is None):
        raise config.error("camera.width" if camera.width is None else "camera.height",
                           "set camera.width and camera.height together")
    slowest_camera_call = max(camera.open_timeout_s, camera.read_timeout_s)
    if config.pipeline.stall_timeout_s <= slowest_camera_call:
        raise config.error("pipeline.stall_timeout_s", f"must exceed the camera's open/read timeouts "
                           f"({slowest_camera_call:g} s), or a slow camera would look like a hung service")
    if config.publish.control_endpoint == config.publish.endpoint and not config.publish.endpoint.endswith(":*"):
        raise config.error("publish.control_endpoint", "must differ from publish.endpoint")
    decision = config.decision
    if decision.threshold_min is not None and decision.threshold_max is not None and (
            decision.threshold_max < decision.threshold_min):
        raise config.error("decision.threshold_max", f"expected >= decision.threshold_min "
                           f"({decision.threshold_min}), got {decision.threshold_max}")
    security = config.security
    if security.curve_secret_key is None and (security.result_clients or security.control_clients):
        raise config.error("security.curve_secret_key", "required when result_clients or control_clients is set")
    if security.curve_secret_key and config.publish.control_endpoint and not security.control_clients:
        raise config.error("security.control_clients", "required with CURVE: a folder with the public keys of the "
                           "clients allowed to change the threshold")


def parse_config(data: Any, where: str = "<config>") -> ServiceConfig:
    """Validate an already-parsed YAML document (used by tests and the demo's generated configs)."""
    config = _build(ServiceConfig, data, where, "")
    config.path = where
    _cross_checks(config)
    return config


def read_yaml_file(path: Path) -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is one ConfigError line with the position."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror}; the service user needs read access to it)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where} ({problem})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    return data


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate a YAML config file; any problem is a ConfigError naming the file and key."""
    path = Path(path)
    config = parse_config(read_yaml_file(path), str(path))
    _resolve_source(config)
    return config


def _resolve_source(config: ServiceConfig) -> None:
    """A relative video file or image folder is relative to the config file, like the bundle path."""
    source = config.camera.source
    if not isinstance(source, str) or "!" in source or "://" in source or source.startswith(("/", "~")):
        return
    resolved = str(config._resolve(source))
    config.camera.source = resolved + ("/" if source.endswith("/") and not resolved.endswith("/") else "")


def config_to_dict(config: ServiceConfig) -> dict[str, Any]:
    """Plain-data view (for `check-config` output and the control socket's `status`)."""
    data = dataclasses.asdict(config)
    data.pop("path", None)
    return _plain(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
