"""Small backbones for the embedded data, and task heads sized from a trunk's output.

`small_resnet` is an ordinary user-style nn.Module (stem + residual stages + classifier):
the engine traces it like any torchvision model. It exists so that the demo trains on two
CPU cores in minutes.

`UNet` and `ResNetEncoderDecoder` are whole encoder-decoder backbones for dense tasks: their
decoders read encoder skips, so the engine cuts them at multi-value boundaries (see
`graphsurgeon.core.segments`) and a task tree can branch at every encoder and decoder stage.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

__all__ = ["ChannelRepeat", "DecoderStage", "DenseHead", "ResNetEncoderDecoder", "UNet", "make_head", "small_resnet"]


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


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Down(nn.Module):
    """A U-Net encoder stage: halve the resolution (none for the first), two conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pool(x))


class _Up(nn.Module):
    """A U-Net decoder stage: upsample to the skip's size, concatenate it, two conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin + skip, cout), *_conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """A small U-Net (Ronneberger et al., 2015) returning its last decoder feature map.

    Encoder stages ``down0`` .. ``down{L-1}`` and decoder stages ``up{L-2}`` .. ``up0`` are
    top-level modules, so block granularity cuts between every two of them; at the cut after
    ``down2`` the skips of ``down0`` and ``down1`` are live too. There is no classifier: pass
    ``trunk="up0"`` and per-task 1x1 conv heads.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (8, 16, 32)) -> None:
        super().__init__()
        self.depth = len(widths)
        cin = in_channels
        for i, w in enumerate(widths):
            setattr(self, f"down{i}", _Down(cin, w, pool=i > 0))
            cin = w
        for i in reversed(range(self.depth - 1)):
            setattr(self, f"up{i}", _Up(cin, widths[i], widths[i]))
            cin = widths[i]
        self.out_channels = widths[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"down{i}")(x)
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = getattr(self, f"up{i}")(x, skips[i])
        return x


class DecoderStage(nn.Module):
    """One stage of an MTSL-style decoder (the layout of the official NeurAI-Lab/MTSL decoder,
    written anew): the coarser map is upsampled to the skip's size and concatenated with it,
    then a 1x1-3x3-1x1 bottleneck whose residual is the upsampled map, projected to the output
    width."""

    def __init__(self, cin: int, skip: int, cout: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(cout // 4, 4)
        self.reduce = nn.Sequential(*_conv_bn_relu(cin + skip, hidden, 1))
        self.conv = nn.Sequential(*_conv_bn_relu(hidden, hidden, 3))
        self.expand = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.project = nn.Conv2d(cin, cout, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        out = self.bn(self.expand(self.conv(self.reduce(torch.cat([x, skip], dim=1)))))
        return self.relu(out + self.project(x))


class ResNetEncoderDecoder(nn.Module):
    """A torchvision ResNet-18 encoder with an MTSL-style decoder over its skips.

    The encoder is torchvision's ``resnet18`` without ``avgpool`` / ``fc`` (its stem and
    ``layer1`` .. ``layer4``, by the same names); ``decoder`` is an ``nn.ModuleList`` of
    `DecoderStage` s from ``layer4`` up: stage ``k`` fuses the map so far with ``layer3``,
    ``layer2``, ``layer1`` and the stem's output (1/2 resolution). Every BasicBlock and every
    decoder stage is a block of its own, so a task tree may branch after any of them. Returns
    the last decoder map (``decoder_width`` channels at 1/2 resolution): pass
    ``trunk="decoder.3"`` and per-task heads (a 1x1 conv, upsampled to the input size).
    """

    def __init__(self, in_channels: int = 3, decoder_width: int = 32, width_scale: float = 1.0) -> None:
        super().__init__()
        base = torchvision.models.resnet18()
        if in_channels != 3 or width_scale != 1.0:
            base = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
            base.inplanes = int(64 * width_scale)
            widths = [int(w * width_scale) for w in (64, 128, 256, 512)]
            base.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            base.bn1 = nn.BatchNorm2d(widths[0])
            base.layer1 = base._make_layer(torchvision.models.resnet.BasicBlock, widths[0], 2)
            base.layer2 = base._make_layer(torchvision.models.resnet.BasicBlock, widths[1], 2, stride=2)
            base.layer3 = base._make_layer(torchvision.models.resnet.BasicBlock, widths[2], 2, stride=2)
            base.layer4 = base._make_layer(torchvision.models.resnet.BasicBlock, widths[3], 2, stride=2)
        else:
            widths = [64, 128, 256, 512]
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = base.layer1, base.layer2, base.layer3, base.layer4
        skips = [widths[2], widths[1], widths[0], widths[0]]  # layer3, layer2, layer1, stem
        stages, cin = [], widths[3]
        for skip in skips:
            stages.append(DecoderStage(cin, skip, decoder_width))
            cin = decoder_width
        self.decoder = nn.ModuleList(stages)
        self.out_channels = decoder_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        x = self.layer4(f3)
        for stage, skip in zip(self.decoder, (f3, f2, f1, stem)):
            x = stage(x, skip)
        return x


class DenseHead(nn.Module):
    """A per-task dense head: a 1x1 conv on the trunk's map, upsampled to ``size``."""

    def __init__(self, channels: int, outputs: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(channels, outputs, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(z), size=self.size, mode="bilinear", align_corners=False)


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
