"""The training config of `edge-export train`: one YAML file, parsed once into a typed object.

A training run costs minutes to hours, so every key is checked before the first image is read: an unknown
key (a typo such as `ephocs`) or a value of the wrong type is refused with one line naming the key, instead
of being ignored and silently training something else. Relative paths are resolved against the config
file's folder, so a config works the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from edge_inspector.service.config import read_yaml_file
from edge_inspector.core.errors import ConfigError

MODEL_KINDS = ("ae", "vae")

DEVICES = ("auto", "cpu", "cuda")
NORMALISATIONS = ("zscore", "none")


@dataclass
class TrainConfig:
    """What to train on, how the frames are cut into patches, the network, the optimiser and the threshold."""

    train_folder: Path  # good images (searched recursively)
    # -- patches: the same frame tiling the edge service uses (edge_inspector.core.tiling) --
    input_size: tuple[int, int] | None = None  # (height, width) each patch is resized to; default patch_size or 256
    rows: int | None = None  # frame grid; give rows/cols OR patch_size (default 1 x 1)
    cols: int | None = None
    patch_size: tuple[int, int] | None = None  # (height, width) in frame pixels; must tile the frames exactly
    tile_size: tuple[int, int] | None = None  # as the service's tiling.tile_size / stride / roi
    stride: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None  # [x, y, width, height] of the inspected area
    # -- network --
    base_channels: int = 8  # channels of the full-resolution stage, doubled per stage up to max_channels
    depth: int = 5  # stride-2 stages; the bottleneck is input / 2**depth per side
    latent_channels: int = 32  # bottleneck width: too wide and defects get redrawn too
    max_channels: int = 64
    kl_weight: float = 0.001  # VAE only: weight of the KL term against the reconstruction error
    ssim_weight: float = 0.0  # loss and anomaly map = MSE + ssim_weight * (1 - SSIM of the luminance)
    blur_sigma: float = 4.0  # Gaussian blur of the anomaly map (pixels at input size)
    error_normalisation: str = "zscore"  # zscore: error per pixel against its spread on good patches | none
    # -- optimisation --
    epochs: int = 60
    batch_size: int = 16
    lr: float = 0.002
    weight_decay: float = 0.0
    flip_augment: bool = False  # random horizontal/vertical flips: for textures without a preferred direction
    val_fraction: float = 0.2  # share of good frames held out: early stopping and the threshold
    patience: int = 10  # epochs without a better validation loss before stopping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # -- threshold --
    target_false_reject_rate: float = 0.005
    defects_folder: Path | None = None  # optional defective images: adds the F1-optimal threshold
    use_f1_threshold: bool = False  # decide with the F1-optimal threshold instead of the conformal one
    # -- output --
    out: Path | None = None  # bundle folder; `--out` overrides

    def tiling_given(self) -> bool:
        return self.rows is not None or self.cols is not None


def load_train_config(path: str | Path) -> TrainConfig:
    """Parse and check a training YAML; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    data = read_yaml_file(path)
    return config_from_dict(data if data is not None else {}, str(path), base=path.parent)


def config_from_dict(data: Any, source: str, base: Path | None = None) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
    values = {name: _coerce(value, hints[name], f"{source}: {name}", base) for name, value in data.items()}
    config = TrainConfig(**values)
    check_config(config, source)
    return config


def _coerce(value: Any, hint: Any, where: str, base: Path | None) -> Any:
    """Check one value against its annotation (int, float, bool, str, Path, tuple[int, int], Optional)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path
    if typing.get_origin(hint) is tuple and len(typing.get_args(hint)) == 4:
        return _box(value, where)
    if typing.get_origin(hint) is tuple:
        return _size(value, where)
    raise TypeError(f"{where}: unsupported annotation {hint}")  # a bug in TrainConfig, not user input


def _size(value: Any, where: str) -> tuple[int, int]:
    """A size is [height, width], or one integer for a square."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
        raise ConfigError(f"{where}: expected [height, width] (positive integers) or one integer, got {value!r}")
    return int(value[0]), int(value[1])


def _box(value: Any, where: str) -> tuple[int, int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value) or min(value[2:]) <= 0):
        raise ConfigError(f"{where}: expected [x, y, width, height] (integers, width and height > 0), got {value!r}")
    return int(value[0]), int(value[1]), int(value[2]), int(value[3])


def check_config(config: TrainConfig, source: str) -> None:
    """Range checks, and the patch-geometry rules that need no image to be read."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {getattr(config, key)!r}")

    require(config.epochs >= 1, "epochs", ">= 1")
    require(config.batch_size >= 1, "batch_size", ">= 1")
    require(config.lr > 0, "lr", "> 0")
    require(config.weight_decay >= 0, "weight_decay", ">= 0")
    require(1 <= config.depth <= 6, "depth", "1..6")
    require(config.base_channels >= 1, "base_channels", ">= 1")
    require(config.latent_channels >= 1, "latent_channels", ">= 1")
    require(config.max_channels >= config.base_channels, "max_channels", ">= base_channels")
    require(config.kl_weight >= 0, "kl_weight", ">= 0")
    require(config.ssim_weight >= 0, "ssim_weight", ">= 0")
    require(config.blur_sigma >= 0, "blur_sigma", ">= 0")
    require(0 < config.val_fraction < 1, "val_fraction", "a fraction in (0, 1)")
    require(config.patience >= 1, "patience", ">= 1")
    require(0 < config.target_false_reject_rate < 1, "target_false_reject_rate", "a rate in (0, 1), e.g. 0.005")
    require(config.device in DEVICES, "device", " or ".join(DEVICES))
    require(config.error_normalisation in NORMALISATIONS, "error_normalisation", " or ".join(NORMALISATIONS))
    if config.patch_size is not None and (config.tiling_given() or config.tile_size or config.stride):
        raise ConfigError(f"{source}: patch_size: give either patch_size or rows/cols/tile_size/stride, not both "
                          "(patch_size sets the grid)")
    if config.stride is not None and config.tile_size is None:
        raise ConfigError(f"{source}: stride: needs tile_size")
    for key in ("rows", "cols"):
        require(getattr(config, key) is None or getattr(config, key) >= 1, key, ">= 1")
    size = effective_input_size(config)
    stride = 2 ** config.depth
    if size[0] % stride or size[1] % stride:
        key = "input_size" if config.input_size is not None else "patch_size"
        raise ConfigError(f"{source}: {key}: {size[0]}x{size[1]} does not fit a depth-{config.depth} autoencoder "
                          f"(height and width must be multiples of {stride})")
    if config.use_f1_threshold and config.defects_folder is None:
        raise ConfigError(f"{source}: use_f1_threshold: needs defects_folder (defective images to choose it from)")


def effective_input_size(config: TrainConfig) -> tuple[int, int]:
    """The model's input: input_size when given, else the native patch size, else 256 x 256."""
    return config.input_size or config.patch_size or (256, 256)
