"""Small backbones for the embedded data, and task heads sized from a trunk's output.

`small_resnet` is an ordinary user-style nn.Module (stem + residual stages + classifier):
the engine traces it like any torchvision model. It exists so that the demo trains on two
CPU cores in minutes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ChannelRepeat", "make_head", "small_resnet"]


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(ResidualBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(in_channels: int = 1, widths: Sequence[int] = (8, 16, 32, 32), num_classes: int = 10) -> nn.Module:
    """A 5-segment residual CNN (stem + 4 stages) for 28–64 px images."""
    return SmallResNet(in_channels, widths, num_classes)


class ChannelRepeat(nn.Module):
    """Grey images into 3-channel backbones (torchvision's), as the first traced op."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


class _Pooled(nn.Module):
    """Global average pooling of a spatial or token trunk, then a linear classifier."""

    def __init__(self, channels: int, outputs: int, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.fc = nn.Linear(channels, outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4:
            z = z.mean((2, 3))
        elif z.dim() == 3:
            z = z.mean(1)
        return self.fc(z)


class _Decoder(nn.Module):
    """Spatial trunk → per-pixel outputs at the input resolution."""

    def __init__(self, channels: int, outputs: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, outputs, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = nn.functional.interpolate(z, size=self.size, mode="bilinear", align_corners=False)
        return self.body(z)


def make_head(kind: str, trunk_shape: Sequence[int], outputs: int, image_size: tuple[int, int]) -> nn.Module:
    """A head for a task of ``kind`` on a trunk whose per-sample output shape is ``trunk_shape``."""
    if kind == "classification":
        if len(trunk_shape) == 1:
            return nn.Linear(trunk_shape[0], outputs)
        return _Pooled(trunk_shape[0] if len(trunk_shape) == 3 else trunk_shape[-1], outputs, len(trunk_shape) == 2)
    if len(trunk_shape) != 3:
        from graphsurgeon.errors import HeadMismatchError

        raise HeadMismatchError(
            f"a {kind} task needs a spatial trunk (C, H, W); this trunk gives {tuple(trunk_shape)}. "
            "Pass trunk=<a feature-map node> (graphsurgeon.get_graph_node_names(model))."
        )
    return _Decoder(trunk_shape[0], outputs, image_size)
