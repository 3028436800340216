"""ResNet18 and WideResNet50-2 feature extractors with torchvision-compatible state_dict keys.

torchvision is not a dependency (it does not install beside our torch build), so the few modules PaDiM needs
are written here; a weights file saved from torchvision (`model.state_dict()`) loads into them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int = 64):
        super().__init__()
        mid = int(planes * (width / 64.0))
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetFeatures(nn.Module):
    """conv1..layer3 of a torchvision ResNet; returns layer1 (stride 4), layer2 (8), layer3 (16)."""

    layer1: nn.Sequential  # set by name in __init__ (torchvision's state_dict keys)
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, block: Any, layers: tuple[int, ...], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.channels: list[int] = []
        cin = 64
        for index, (planes, repeats) in enumerate(zip((64, 128, 256), layers), start=1):
            stride = 1 if index == 1 else 2
            blocks = []
            for i in range(repeats):
                blocks.append(block(cin, planes, stride if i == 0 else 1, width))
                cin = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            self.channels.append(cin)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def resnet18_features() -> ResNetFeatures:
    return ResNetFeatures(BasicBlock, (2, 2, 2))


def wide_resnet50_2_features() -> ResNetFeatures:
    return ResNetFeatures(Bottleneck, (3, 4, 6), width=128)
