"""The training config of `edge-export train`: one YAML file, parsed once into a typed object.

A training run costs minutes to hours, so every key is checked before the first image is read: an unknown
key (a typo such as `ephocs`) or a value of the wrong type is refused with one line naming the key, instead
of being ignored and silently training something else. Types and ranges are declared on TrainConfig's fields
and checked by edge_inspector.core.schema, the mechanism that also reads the service config and bundle.yaml;
rules between keys are check_config. Relative paths are resolved against the config file's folder, so a
config works the same from any working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from edge_inspector.core import schema
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.schema import Pair, Rect, expect

MODEL_KINDS = ("ae", "vae")

DEVICES = ("auto", "cpu", "cuda")
NORMALISATIONS = ("zscore", "none")

Positive = Annotated[int, Meta(ge=1)]
# A size is [height, width], or one integer for a square (config_from_dict turns 256 into [256, 256]).
Size = Annotated[Pair, expect("[height, width] (integers >= 1) or one integer")]
NonNegative = Annotated[float, Meta(ge=0)]
SIZE_KEYS = ("input_size", "patch_size", "tile_size", "stride")


@dataclass
class TrainConfig:
    """What to train on, how the frames are cut into patches, the network, the optimiser and the threshold."""

    train_folder: Path  # good images (searched recursively)
    # -- patches: the same frame tiling the edge service uses (edge_inspector.core.tiling) --
    input_size: Size | None = None  # (height, width) each patch is resized to; default patch_size or 256
    rows: Positive | None = None  # frame grid; give rows/cols OR patch_size (default 1 x 1)
    cols: Positive | None = None
    patch_size: Size | None = None  # (height, width) in frame pixels; must tile the frames exactly
    tile_size: Size | None = None  # as the service's tiling.tile_size / stride / roi
    stride: Size | None = None
    roi: Rect | None = None  # [x, y, width, height] of the inspected area
    # -- network --
    base_channels: Positive = 8  # channels of the full-resolution stage, doubled per stage up to max_channels
    depth: Annotated[int, Meta(ge=1, le=6)] = 5  # stride-2 stages; the bottleneck is input / 2**depth per side
    latent_channels: Positive = 32  # bottleneck width: too wide and defects get redrawn too
    max_channels: Positive = 64  # >= base_channels
    kl_weight: NonNegative = 0.001  # VAE only: weight of the KL term against the reconstruction error
    ssim_weight: NonNegative = 0.0  # loss and anomaly map = MSE + ssim_weight * (1 - SSIM of the luminance)
    blur_sigma: NonNegative = 4.0  # Gaussian blur of the anomaly map (pixels at input size)
    # zscore: error per pixel against its spread on good patches | none
    error_normalisation: Literal["zscore", "none"] = "zscore"
    # -- optimisation --
    epochs: Positive = 60
    batch_size: Positive = 16
    lr: Annotated[float, Meta(gt=0)] = 0.002
    weight_decay: NonNegative = 0.0
    flip_augment: bool = False  # random horizontal/vertical flips: for textures without a preferred direction
    # share of good frames held out: early stopping and the threshold
    val_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.2
    patience: Positive = 10  # epochs without a better validation loss before stopping
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # -- threshold --
    target_false_reject_rate: Annotated[float, Meta(gt=0, lt=1), expect("a rate in (0, 1), e.g. 0.005")] = 0.005
    # Out-of-sample scores for the threshold: K >= 2 trains K fold models (each on the other folds, as the final
    # model is trained) so every good image gets a score and 199 images certify 0.5%; it costs K more trainings
    # (export.autoencoder.folds). 0 or 1: score only the val_fraction hold-out (needs ~1,000 images for 0.5%).
    threshold_folds: Annotated[int, Meta(ge=0)] = 5
    defects_folder: Path | None = None  # optional defective images: adds the F1-optimal threshold
    use_f1_threshold: bool = False  # decide with the F1-optimal threshold instead of the conformal one
    # -- output --
    out: Path | None = None  # bundle folder; `--out` overrides

    def tiling_given(self) -> bool:
        return self.rows is not None or self.cols is not None


def load_train_config(path: str | Path) -> TrainConfig:
    """Parse and check a training YAML; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    data = schema.read_yaml(path, ConfigError, missing="config file not found")
    return config_from_dict(data if data is not None else {}, str(path), base=path.parent)


def config_from_dict(data: Any, source: str, base: Path | None = None) -> TrainConfig:
    """Types and ranges are declared on TrainConfig (core.schema checks them); paths resolve against `base`."""
    if isinstance(data, dict):  # one integer is a square size
        data = {key: [value, value] if key in SIZE_KEYS and _is_int(value) else value for key, value in data.items()}

    def path_hook(kind: type, value: Any) -> Any:
        if kind is not Path:
            raise NotImplementedError(kind)
        if not isinstance(value, str) or not value:
            raise ValueError("expected a path")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path

    config = schema.load(TrainConfig, data, source, finite=True, dec_hook=path_hook)
    check_config(config, source)
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: TrainConfig, source: str) -> None:
    """The rules that involve more than one key: patch geometry (needs no image) and channel widths."""
    if config.max_channels < config.base_channels:
        raise ConfigError(f"{source}: max_channels: expected >= base_channels ({config.base_channels}), got "
                          f"{config.max_channels}")
    if config.patch_size is not None and (config.tiling_given() or config.tile_size or config.stride):
        raise ConfigError(f"{source}: patch_size: give either patch_size or rows/cols/tile_size/stride, not both "
                          "(patch_size sets the grid)")
    if config.stride is not None and config.tile_size is None:
        raise ConfigError(f"{source}: stride: needs tile_size")
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
