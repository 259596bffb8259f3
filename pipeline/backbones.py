"""Encoders by name: a small conv net for tiny images, ResNets (no pretrained weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline import PipelineError


class SmallConv(nn.Module):
    """Three conv blocks for 8-28 px images, pooled to a 2x2 grid and flattened.

    Keeping a coarse 2x2 layout (rather than a global average) preserves where strokes are,
    which is most of what distinguishes digits; the width is small enough that a 30-epoch
    BYOL run on scikit-learn's digits takes about half a minute on one CPU thread.

    Args:
        in_channels: 1 or 3.
        width: channels of the first block; the next two use 2x and 4x.
    """

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width, 1), *block(width, 2 * width, 2),
            *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.out_dim = 4 * width * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return self.features(x)


def _resnet(arch: str, in_channels: int, cifar: bool) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if cifar:
        # 32 px images: a 3x3 stride-1 stem and no max-pool keep the 32x32 resolution into
        # layer1, as in the SimCLR/BYOL CIFAR recipes.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "smallconv": lambda c: SmallConv(c),
    "resnet18_cifar": lambda c: _resnet("resnet18", c, cifar=True),
    "resnet18": lambda c: _resnet("resnet18", c, cifar=False),
    "resnet50": lambda c: _resnet("resnet50", c, cifar=False),
}


def resolve_backbone(name: str, image_size: int) -> str:
    """``auto`` -> smallconv below 32 px, resnet18_cifar for 32-63 px, resnet18 from 64 px."""
    if name == "auto":
        if image_size < 32:
            return "smallconv"
        return "resnet18_cifar" if image_size < 64 else "resnet18"
    if name not in BACKBONES:
        raise PipelineError(
            f"unknown backbone {name!r}; choose one of: auto, {', '.join(BACKBONES)}"
        )
    return name


def build_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """Randomly initialised encoder mapping (B, in_channels, S, S) to (B, module.out_dim)."""
    if in_channels not in (1, 3):
        raise PipelineError(f"images must have 1 or 3 channels, got {in_channels}")
    return BACKBONES[resolve_backbone(name, image_size)](in_channels)
