"""The service's one config file, parsed into typed objects and validated once at start.

A line runs for months on the config it started with, so every mistake must surface at start, as one line
naming the file and the key path (`configs/line1.yaml: tiling.rows: expected an integer in [1, 64], got
'two'`), never as a KeyError an hour into a shift. Each field declares its type, range or choices and its
documentation in its annotation, next to its default (docs/service.md mirrors these classes); the checking
is edge_inspector.core.schema's (msgspec), shared with bundle.yaml and the training config. Rules that
involve more than one key are `_cross_checks`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from edge_inspector.core import schema
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.schema import NON_BLANK, Pair, Rect, Text, expect, internal
from edge_inspector.core.signing import TrustPolicy, load_public_key
from edge_inspector.core.tiling import MIN_MAP_SCALE
from edge_inspector.core.wire import check_camera_id
from edge_inspector.service.outputs.config import OutputsConfig, cross_check

Source = Annotated[Annotated[int, Meta(ge=0)] | Annotated[str, Meta(pattern=NON_BLANK)],
                   expect("a device index (integer >= 0) or a path, URL or GStreamer pipeline")]
Verdicts = Annotated[tuple[Literal["pass", "review", "fail", "error"], ...], Meta(min_length=1),
                     expect("a non-empty list of pass, review, fail, error")]


def doc(text: str) -> Meta:
    """A field's one-line description (docs/service.md; also msgspec.json.schema's `description`)."""
    return Meta(description=text)


@dataclass
class CameraConfig:
    """Where frames come from. `kind: auto` infers it from `source` (see sources.py)."""

    id: Annotated[Text, doc("camera id, used in topics (inspection.<id>) and archive names")] = "cam0"
    source: Annotated[Source, doc("device index, video file, rtsp/http URL, GStreamer pipeline or image folder")] = 0
    kind: Annotated[Literal["auto", "device", "file", "url", "gstreamer", "folder"], doc("source type")] = "auto"
    fps: Annotated[Annotated[float, Meta(gt=0.0, le=1000.0)] | None,
                   doc("file/folder: pace frames at this rate (null: as fast as possible); device: requested "
                       "rate")] = None
    loop: Annotated[bool, doc("file/folder: start over at the end instead of ending the stream")] = False
    width: Annotated[Annotated[int, Meta(ge=1)] | None, doc("device: requested capture width")] = None
    height: Annotated[Annotated[int, Meta(ge=1)] | None, doc("device: requested capture height")] = None
    open_timeout_s: Annotated[float, Meta(ge=0.1, le=600.0), doc("give up one open attempt after this long")] = 10.0
    read_timeout_s: Annotated[float, Meta(ge=0.1, le=600.0),
                              doc("a read blocking longer than this counts as a failure")] = 5.0
    reconnect_initial_s: Annotated[float, Meta(ge=0.01, le=600.0),
                                   doc("first reconnect delay; doubles per failure")] = 0.5
    reconnect_max_s: Annotated[float, Meta(ge=0.01, le=3600.0), doc("reconnect delay cap")] = 10.0
    max_frame_pixels: Annotated[int, Meta(ge=1, le=1_000_000_000),
                                doc("folder: an image whose header declares more pixels is refused before decoding "
                                    "(an error result), so a decompression bomb cannot exhaust memory")] = 50_000_000
    trigger: Annotated[Literal["free_run", "external", "presence"],
                       doc("free_run: every frame is a part (folders, hardware-triggered cameras); external: one "
                           "part per `trigger` command on the control socket, judged on the next frame after it "
                           "(plus its delay_ms), frames in between skipped; presence: the service finds parts "
                           "in presence_roi and judges each on its best-placed frame")] = "free_run"
    trigger_timeout_ms: Annotated[int, Meta(ge=1, le=600_000),
                                  doc("external: a trigger with no frame this long after its due time is an error "
                                      "result for its part")] = 1000
    trigger_queue: Annotated[int, Meta(ge=1, le=1024),
                             doc("external: triggers waiting for a frame or inference; one more is refused (an error "
                                 "result for its part)")] = 16
    part_counter_file: Annotated[Text | None,
                                 doc("external/presence: file keeping the service's part-id counter across restarts "
                                     "(relative: to this config file); null: $STATE_DIRECTORY/parts/ under "
                                     "systemd, else not kept (ids start at 1 each run)")] = None
    presence_roi: Annotated[Rect | None, doc("presence: [x, y, width, height] where parts are looked for (null: "
                                             "the whole frame); narrower than the gap between two parts")] = None
    presence_threshold: Annotated[float, Meta(gt=0.0, le=255.0),
                                  doc("presence: grey levels a pixel must differ from the empty belt")] = 25.0
    presence_min_area: Annotated[float, Meta(gt=0.0, le=1.0),
                                 doc("presence: share of the ROI that must differ for a part to be in view")] = 0.05
    presence_frames_on: Annotated[int, Meta(ge=1, le=100),
                                  doc("presence: frames in view before a part has entered")] = 2
    presence_frames_off: Annotated[int, Meta(ge=1, le=100),
                                   doc("presence: empty frames before a part has left")] = 2
    presence_max_s: Annotated[float, Meta(gt=0.0, le=3600.0),
                              doc("presence: a part in view longer (stopped) is judged then, once")] = 10.0
    presence_background_frames: Annotated[int, Meta(ge=1, le=1000),
                                          doc("presence: the empty-belt reference is the median of this many "
                                              "first frames (start with the belt empty)")] = 5
    presence_judge: Annotated[Literal["best_placed", "worst"],
                              doc("presence: judge each part on its best-placed frame (one inference per part), "
                                  "or on up to presence_max_frames of its frames keeping the worst result")] = (
        "best_placed")
    presence_max_frames: Annotated[int, Meta(ge=1, le=1000),
                                   doc("presence worst: frames judged per part at most (the rest skipped)")] = 8


@dataclass
class TilingConfig:
    """How a frame is cut into model inputs (see tiling.py)."""

    rows: Annotated[int, Meta(ge=1, le=64), doc("tile rows")] = 1
    cols: Annotated[int, Meta(ge=1, le=64), doc("tile columns")] = 1
    tile_size: Annotated[Pair | None, doc("[height, width] of each tile (null: ROI / grid)")] = None
    stride: Annotated[Pair | None, doc("[dy, dx] between tiles (null: spread evenly)")] = None
    roi: Annotated[Rect | None, doc("[x, y, width, height] to inspect (null: whole frame)")] = None


@dataclass
class ModelConfig:
    bundle: Annotated[Text, doc("model bundle folder (relative paths are relative to this config file)")] = ""
    backend: Annotated[Literal["auto", "onnxruntime", "tensorrt"], doc("inference runtime")] = "auto"
    threads: Annotated[Annotated[int, Meta(ge=1, le=256)] | None,
                       doc("CPU threads for ONNX Runtime (null: runtime default)")] = None
    workers: Annotated[int, Meta(ge=1, le=16),
                       doc("frames judged at once, each on its own thread (CPU: with threads 1, one per core gives "
                           "more frames/s, each frame slower; a backend that is not thread-safe runs one at a "
                           "time)")] = 1


@dataclass
class DecisionConfig:
    threshold: Annotated[Annotated[float, Meta(gt=0.0)] | None,
                         doc("raw-score threshold override (null: the bundle's)")] = None
    min_defect_area: Annotated[int, Meta(ge=0), doc("fail only when a connected over-threshold region exceeds "
                                                    "this many pixels")] = 0
    max_boxes: Annotated[int, Meta(ge=0, le=1000), doc("defect boxes reported per frame (largest first)")] = 20
    review_threshold: Annotated[Annotated[float, Meta(gt=0.0)] | Literal["off"] | None,
                                doc("review band's pass threshold override: parts over it that do not fail get "
                                    "the verdict review (off: no band; null: the bundle's band, if any)")] = None
    threshold_min: Annotated[Annotated[float, Meta(gt=0.0)] | None,
                             doc("lowest threshold allowed (config or set_threshold); null: the bundle's median "
                                 "good-part score")] = None
    threshold_max: Annotated[Annotated[float, Meta(gt=0.0)] | None,
                             doc("highest threshold allowed; null: 4 x the bundle's highest good-part score")] = None


@dataclass
class PipelineConfig:
    queue_size: Annotated[int, Meta(ge=1, le=64), doc("frames buffered between capture and inference")] = 2
    when_behind: Annotated[Literal["auto", "drop", "wait"],
                           doc("inference slower than capture: drop (freshest frame wins) or wait (lossless); "
                               "auto: wait for unpaced files/folders, drop otherwise")] = "auto"
    stall_timeout_s: Annotated[float, Meta(ge=0.5, le=3600.0),
                               doc("a stage silent this long is unresponsive (stops the systemd watchdog); "
                                   "must exceed camera.open_timeout_s and camera.read_timeout_s")] = 20.0


@dataclass
class PublishConfig:
    endpoint: Annotated[Text, doc("ZeroMQ PUB endpoint for results and health (loopback by default: to serve "
                                  "the plant network bind tcp://*:5556 with CURVE, docs/service.md)")] = (
        "tcp://127.0.0.1:5556")
    control_endpoint: Annotated[Text | None, doc("ZeroMQ REP control endpoint (null: off)")] = "tcp://127.0.0.1:5557"
    heatmap: Annotated[Literal["png", "jpeg_overlay", "none"], doc("third message part")] = "png"
    heatmap_full_scale: Annotated[float, Meta(gt=0.0, le=1000.0),
                                  doc("normalised score that maps to 255 in the 8-bit heatmap")] = 2.0
    heatmap_scale: Annotated[Annotated[float, Meta(ge=MIN_MAP_SCALE, le=1.0)] | Literal["auto"],
                             doc("heatmap size relative to the frame (0.05-1), or auto: the detail the model's map "
                                 "holds, one heatmap pixel per sigma/2 model-input pixels of its blur (sigma 4: "
                                 "0.25 for 2x2 tiles of 1280x1024 at 256x256, 0.125 for one tile)")] = "auto"
    jpeg_quality: Annotated[int, Meta(ge=1, le=100), doc("quality of jpeg_overlay")] = 85
    health_interval_s: Annotated[float, Meta(ge=0.05, le=3600.0), doc("seconds between health messages")] = 5.0
    sndhwm: Annotated[int, Meta(ge=1, le=100000), doc("messages queued per slow subscriber before dropping")] = 20
    wait_for_subscriber_s: Annotated[float, Meta(ge=0.0, le=3600.0),
                                     doc("hold capture until a subscriber connects, at most this long "
                                         "(0: don't)")] = 0.0


@dataclass
class ArchiveConfig:
    enabled: Annotated[bool, doc("keep frames for review")] = False
    folder: Annotated[Text | None, doc("where (relative paths: to this config file); null: "
                                       "$STATE_DIRECTORY/archive/<camera id> under systemd, else archive/ beside "
                                       "the config")] = None
    verdicts: Annotated[Verdicts, doc("which verdicts to keep (review: the review band's uncertain parts)")] = (
        "fail", "review")
    max_files: Annotated[int, Meta(ge=1), doc("frames kept; oldest removed first")] = 1000
    max_megabytes: Annotated[float, Meta(gt=0.0), doc("total size cap; oldest removed first")] = 500.0
    image_format: Annotated[Literal["png", "jpg"], doc("frame file format")] = "png"
    pass_sample: Annotated[int, Meta(ge=0, le=1000000),
                           doc("also keep 1 in this many passed parts (escapes hide among them; 0: none)")] = 0
    pass_margin: Annotated[Annotated[float, Meta(gt=0.0, lt=1.0)] | None,
                           doc("also keep every passed part scoring above this fraction of the threshold "
                               "(0.8: the top 20% below it; null: none)")] = None

    def __post_init__(self) -> None:
        self.verdicts = tuple(dict.fromkeys(self.verdicts))  # [fail, fail] keeps one


@dataclass
class SecurityConfig:
    """Optional ZeroMQ CURVE (edge_inspector/core/keys.py). Key files come from `edge-inspector keys`."""

    curve_secret_key: Annotated[Text | None, doc("the service's NAME.key_secret; null: no CURVE (plain TCP, no "
                                                 "authentication)")] = None
    result_clients: Annotated[Text | None, doc("folder of client public keys (*.key) allowed to subscribe; null: "
                                               "any client that has the service's public key")] = None
    control_clients: Annotated[Text | None, doc("folder of client public keys allowed on the control socket "
                                                "(required with CURVE)")] = None
    trusted_keys: Annotated[tuple[Text, ...], doc("public keys (.pub files from `edge-export keygen`) whose bundle "
                                                  "signatures this device trusts; a signed bundle is checked "
                                                  "against them (relative paths: to this config file)")] = ()
    require_signed_bundles: Annotated[bool, doc("refuse, at start and reload, a bundle not signed by one of "
                                                "trusted_keys (the production setting: true)")] = False
    bundle_root: Annotated[Text | None, doc("`reload` takes only bundle folders under this folder (relative: to "
                                            "this config file); null: the folder holding model.bundle")] = None


@dataclass
class LoggingConfig:
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], doc("log level")] = "INFO"


@dataclass
class ServiceConfig:
    camera: CameraConfig = field(default_factory=CameraConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)  # MQTT, OPC UA (service/outputs/)
    path: str = internal("<config>")  # the file it was read from (set by parse_config, not a key in it)

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


def trust_policy(config: ServiceConfig) -> TrustPolicy | None:
    """The signature rule for this service's bundles (None: no keys named, signatures are not checked)."""
    security = config.security
    if not security.trusted_keys:
        return None
    keys = [load_public_key(config.resolve(name)) for name in security.trusted_keys]
    return TrustPolicy(keys, security.require_signed_bundles)


def bundle_root(config: ServiceConfig) -> Path:
    """The folder `reload` may take bundles from, absolute (resolved against the config file's folder)."""
    root = config.resolve(config.security.bundle_root) if config.security.bundle_root else config.bundle_path.parent
    return root.absolute()


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
    bad_id = check_camera_id(camera.id)
    if bad_id:
        raise config.error("camera.id", bad_id)
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
    if camera.trigger == "external" and not config.publish.control_endpoint:
        raise config.error("camera.trigger", "external needs publish.control_endpoint (triggers arrive there)")
    mqtt = config.outputs.mqtt
    if mqtt is not None and mqtt.takes_triggers and camera.trigger != "external":
        raise config.error("outputs.mqtt.trigger_topic" if mqtt.trigger_topic else "outputs.mqtt.trigger",
                           f"MQTT triggers need camera.trigger external, got {camera.trigger}")
    opcua = config.outputs.opcua
    if opcua is not None and opcua.allow_trigger and camera.trigger != "external":
        raise config.error("outputs.opcua.allow_trigger", f"needs camera.trigger external, got {camera.trigger}")
    if camera.trigger != "free_run" and config.pipeline.when_behind == "drop":
        raise config.error("pipeline.when_behind", f"drop would lose parts; use auto or wait with "
                           f"camera.trigger {camera.trigger}")
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
    if security.require_signed_bundles and not security.trusted_keys:
        raise config.error("security.trusted_keys", "required with require_signed_bundles: the public key files "
                           "of the workstations allowed to sign bundles")
    if security.curve_secret_key and config.publish.control_endpoint and not security.control_clients:
        raise config.error("security.control_clients", "required with CURVE: a folder with the public keys of the "
                           "clients allowed to change the threshold")


def parse_config(data: Any, where: str = "<config>") -> ServiceConfig:
    """Validate an already-parsed YAML document (used by tests and the demo's generated configs)."""
    config = schema.load(ServiceConfig, _empty_sections_as_defaults(data), where, finite=True)
    config.path = where
    _cross_checks(config)
    broken = cross_check(config.outputs)
    if broken:
        raise config.error(*broken)
    return config


def _empty_sections_as_defaults(data: Any) -> Any:
    """An empty file, or a section left empty (`camera:` with nothing under it, which YAML reads as null),
    means the defaults, as a section left out does."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        return data
    return {key: {} if value is None and key in _SECTIONS else value for key, value in data.items()}


_SECTIONS = {name for name, hint in ServiceConfig.__annotations__.items() if hint.endswith("Config")}


def read_yaml_file(path: Path) -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is one ConfigError line with the position."""
    return schema.read_yaml(path, ConfigError, missing="config file not found")


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
    """Plain-data view (for `check-config` output and the control socket's `status`): tuples as lists."""
    data = _plain(dataclasses.asdict(config))
    data.pop("path", None)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
