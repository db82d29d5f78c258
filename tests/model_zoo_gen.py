"""Random small PyTorch models, as a hypothesis strategy, for property tests of the graph engine.

torchvision's backbones are all variations on one shape (a stem, then chains of residual
stages), so tests that only use them never see the graphs that break cut finding and graph
rewriting: long skips that keep several values live at once, branches that start at the
input, a module called twice, parameters read through ``get_attr``, channel concatenations.
`random_models()` draws such graphs; decoder-style stages (`SkipFusion`: a module that takes the
latest value and an earlier one, as a U-Net stage takes its skip) make the segment cut between
module blocks carry several values, and ``skip_stage=True`` ends every program with one.

A model is built from a drawn `Program`: a list of `Op`s over a growing list of values, each op
reading one or two earlier values and adding one. Value 0 is the input; every value is a
``(B, C, H, W)`` tensor with the input's H and W. The last value (the trunk) feeds a fixed
head: adaptive average pool, flatten, ``fc1``, ReLU, ``classifier``. Weights come from the
program's seed, so a shrunk example rebuilds exactly the model that failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = [
    "BATCH", "GeneratedNet", "Op", "Program", "ResidualBlock", "SkipFusion", "build_model", "programs", "random_models",
]

BATCH = 2
"""Batch size of every example input: two rows, so that a test can see whether rows differ."""

OpKind = Literal["conv", "norm", "act", "scale", "block", "stage", "add", "cat", "fuse"]

# Listed simplest first: hypothesis shrinks `sampled_from` towards the front.
ONE_INPUT_KINDS: tuple[OpKind, ...] = ("conv", "act", "norm", "scale", "block", "stage")
TWO_INPUT_KINDS: tuple[OpKind, ...] = ("add", "cat", "fuse")
# How each activation reaches the fx graph: a submodule (call_module), a function
# (call_function) or a tensor method (call_method).
ACT_VARIANTS = ("ReLU", "F.relu", "Tensor.relu", "GELU")
NORM_VARIANTS = ("batch", "group")
CONV_VARIANTS = ("3x3", "1x1")
MAX_DRAWN_WIDTH = 8
"""Widest a conv or block output is drawn; only concatenation goes wider (up to max_channels)."""


@dataclass(frozen=True)
class Op:
    """One layer of a program: reads ``inputs`` (indices into the value list), adds one value.

    Attributes:
        kind: what the layer computes.
        name: the attribute the layer's submodule or parameter is registered under
            (``conv3``, ``block5``...), so that fx node names are readable in failures.
        inputs: indices of the values read; two for add and cat, one otherwise.
        channels: channels of the value produced.
        variant: kind-specific choice: kernel for conv (``CONV_VARIANTS``), flavour for act
            (``ACT_VARIANTS``), normalisation for norm, block, stage and fuse (``NORM_VARIANTS``),
            ``"proj"`` for an add whose second operand needs a 1x1 conv to match channels.
        layer_scale: block and stage only: the residual branch is multiplied by a learnable
            per-channel parameter, which is read with ``get_attr`` inside a submodule.
        depth: stage only: how many blocks the ``nn.Sequential`` holds.
    """

    kind: OpKind
    name: str
    inputs: tuple[int, ...]
    channels: int
    variant: str = ""
    layer_scale: bool = False
    depth: int = 1


@dataclass(frozen=True)
class Program:
    """Everything needed to rebuild one model and its example input, deterministically."""

    seed: int
    in_channels: int
    height: int
    width: int
    ops: tuple[Op, ...]
    hidden: int
    num_classes: int

    def value_channels(self) -> list[int]:
        """Channels of every value: the input's, then each op's output."""
        return [self.in_channels, *(op.channels for op in self.ops)]

    def summary(self) -> str:
        """One line per op, so a failing example says which graph it was."""
        lines = [f"input: {self.in_channels}x{self.height}x{self.width} (seed {self.seed})"]
        for position, op in enumerate(self.ops, start=1):
            extra = "".join(
                [
                    f" {op.variant}" if op.variant else "",
                    " layer_scale" if op.layer_scale else "",
                    f" depth={op.depth}" if op.kind == "stage" else "",
                ]
            )
            lines.append(f"v{position} = {op.name}({', '.join(f'v{i}' for i in op.inputs)}) -> {op.channels}ch{extra}")
        lines.append(f"head: pool, fc1 -> {self.hidden}, relu, classifier -> {self.num_classes}")
        return "\n".join(lines)


def _norm(variant: str, channels: int) -> nn.Module:
    """A BatchNorm2d, or a GroupNorm with two or more channels in every group.

    A group of one channel (instance norm) fixes that channel's spatial mean, so a trunk
    ending in one, followed by average pooling, would give an output that ignores the input.
    Drawn programs never ask for a GroupNorm of one channel; a hand-written one gets a single group.
    """
    if variant == "batch":
        return nn.BatchNorm2d(channels)
    groups = max((g for g in range(1, channels // 2 + 1) if channels % g == 0 and channels // g >= 2), default=1)
    return nn.GroupNorm(groups, channels)


class ResidualBlock(nn.Module):
    """conv-norm-relu-conv-norm plus a skip, then relu: a block with no cut point inside.

    The input stays live until the final add, which is what the cut finder must notice.
    ``relu`` is called twice, as in torchvision's BasicBlock, so the graph also holds two
    call_module nodes with one target.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, layer_scale: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), _norm(norm, out_channels)
            )
        self.gamma: nn.Parameter | None = None
        if layer_scale:
            self.gamma = nn.Parameter(torch.empty(1, out_channels, 1, 1).uniform_(0.5, 1.5))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.gamma is not None:
            out = self.gamma * out
        return self.relu(out + identity)


class SkipFusion(nn.Module):
    """A decoder stage: the latest value concatenated with an earlier one (its skip), then a
    1x1 conv, a norm and a ReLU. A module of its own with two inputs, so the skip is live across
    the block boundary in front of it."""

    def __init__(self, channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + skip_channels, out_channels, 1, bias=False)
        self.norm = _norm(norm, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(torch.cat([x, skip], dim=1))))


class GeneratedNet(nn.Module):
    """The model a `Program` describes; ``features`` is the drawn DAG, ``forward`` adds the head."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        channels = program.value_channels()
        for op in program.ops:
            c_in = channels[op.inputs[0]]
            if op.kind == "conv":
                kernel = 3 if op.variant == "3x3" else 1
                setattr(self, op.name, nn.Conv2d(c_in, op.channels, kernel, padding=kernel // 2))
            elif op.kind == "norm":
                setattr(self, op.name, _norm(op.variant, c_in))
            elif op.kind == "act" and op.variant in ("ReLU", "GELU"):
                setattr(self, op.name, nn.ReLU() if op.variant == "ReLU" else nn.GELU())
            elif op.kind == "scale":
                self.register_parameter(op.name, nn.Parameter(torch.empty(1, c_in, 1, 1).uniform_(0.5, 1.5)))
            elif op.kind == "block":
                setattr(self, op.name, ResidualBlock(c_in, op.channels, op.variant, op.layer_scale))
            elif op.kind == "stage":
                blocks = [
                    ResidualBlock(c_in if i == 0 else op.channels, op.channels, op.variant, op.layer_scale)
                    for i in range(op.depth)
                ]
                setattr(self, op.name, nn.Sequential(*blocks))
            elif op.kind == "fuse":
                setattr(self, op.name, SkipFusion(c_in, channels[op.inputs[1]], op.channels, op.variant))
            elif op.kind == "add" and op.variant == "proj":
                setattr(self, op.name, nn.Conv2d(channels[op.inputs[1]], op.channels, 1, bias=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels[-1], program.hidden)
        self.classifier = nn.Linear(program.hidden, program.num_classes)

    def extra_repr(self) -> str:
        return self.program.summary()

    def _run(self, op: Op, args: list[Tensor]) -> Tensor:
        """One op; the branches decide which fx node kind (module, function, method) it becomes."""
        if op.kind == "act" and op.variant == "F.relu":
            return F.relu(args[0])
        if op.kind == "act" and op.variant == "Tensor.relu":
            return args[0].relu()
        if op.kind == "scale":
            return getattr(self, op.name) * args[0]
        if op.kind == "add":
            first, second = args
            if op.variant == "proj":
                second = getattr(self, op.name)(second)
            return first + second
        if op.kind == "cat":
            return torch.cat(args, dim=1)
        if op.kind == "fuse":
            return getattr(self, op.name)(*args)
        return getattr(self, op.name)(args[0])

    def features(self, x: Tensor) -> Tensor:
        """The trunk: the drawn DAG, unrolled by fx because the program is plain Python data."""
        values = [x]
        for op in self.program.ops:
            values.append(self._run(op, [values[i] for i in op.inputs]))
        return values[-1]

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.classifier(F.relu(self.fc1(h)))


def _draw_operand(draw: st.DrawFn, n_values: int) -> int:
    """The latest value most of the time, sometimes an earlier one (a branch or a long skip)."""
    if n_values > 1 and draw(st.sampled_from((False, False, False, True))):
        return n_values - 1 - draw(st.integers(1, n_values - 1))
    return n_values - 1


def _merge(kind: OpKind, first: int, second: int, channels: list[int], max_channels: int) -> Op:
    """An add, a cat or a decoder stage (`SkipFusion`) of two values; a cat that would be too
    wide becomes an add."""
    position = len(channels)
    if kind == "fuse":
        norm = "group" if channels[first] >= 2 else "batch"
        return Op("fuse", f"fuse{position}", (first, second), channels[first], norm)
    if kind == "cat" and channels[first] + channels[second] <= max_channels:
        return Op("cat", f"cat{position}", (first, second), channels[first] + channels[second])
    variant = "proj" if channels[first] != channels[second] else ""
    return Op("add", f"{'proj' if variant else 'add'}{position}", (first, second), channels[first], variant)


def _draw_norm(draw: st.DrawFn, channels: int) -> str:
    """BatchNorm or GroupNorm; a single channel gets BatchNorm, as it cannot form a group of two."""
    return draw(st.sampled_from(NORM_VARIANTS)) if channels >= 2 else "batch"


def _draw_op(draw: st.DrawFn, channels: list[int], max_channels: int) -> Op:
    """One op over the current values; its submodule is named after the value it produces."""
    n = len(channels)
    kind = draw(st.sampled_from(ONE_INPUT_KINDS + (TWO_INPUT_KINDS if n >= 2 else ())))
    if kind in TWO_INPUT_KINDS:
        earlier = n - 1 - draw(st.integers(1, n - 1))
        return _merge(kind, n - 1, earlier, channels, max_channels)
    source = _draw_operand(draw, n)
    c_in = channels[source]
    width = st.integers(1, min(MAX_DRAWN_WIDTH, max_channels))
    if kind == "conv":
        return Op("conv", f"conv{n}", (source,), draw(width), draw(st.sampled_from(CONV_VARIANTS)))
    if kind == "norm":
        variant = _draw_norm(draw, c_in)
        return Op("norm", f"{'bn' if variant == 'batch' else 'gn'}{n}", (source,), c_in, variant)
    if kind == "act":
        return Op("act", f"act{n}", (source,), c_in, draw(st.sampled_from(ACT_VARIANTS)))
    if kind == "scale":
        return Op("scale", f"scale{n}", (source,), c_in)
    out_channels = draw(width)
    norm = _draw_norm(draw, out_channels)
    layer_scale = draw(st.booleans())
    depth = draw(st.integers(1, 2)) if kind == "stage" else 1
    return Op(kind, f"{kind}{n}", (source,), out_channels, norm, layer_scale, depth)


@st.composite
def programs(draw: st.DrawFn, max_ops: int = 8, max_channels: int = 16, skip_stage: bool = False) -> Program:
    """Draw a `Program` of 1..``max_ops`` layers, plus the merges that leave no value unused.

    A value nobody reads would be dead code, which real backbones do not have and which would
    make "values live at this point" ambiguous, so after the drawn ops every unread value is
    added or concatenated into the latest one. Those merges are long skips by construction.

    ``skip_stage``: then a residual block and a `SkipFusion` of its output with an earlier
    value: the boundaries around that block carry two values (an encoder-decoder in miniature).
    """
    seed = draw(st.integers(0, 2**32 - 1))
    in_channels = draw(st.integers(1, min(4, max_channels)))
    height = draw(st.integers(6, 12))
    width = draw(st.integers(6, 12))
    channels = [in_channels]
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, max_ops))):
        ops.append(_draw_op(draw, channels, max_channels))
        channels.append(ops[-1].channels)
    if skip_stage:
        skip = draw(st.integers(0, len(channels) - 1))
        c = channels[-1]
        ops.append(Op("block", f"block{len(channels)}", (len(channels) - 1,), c, "group" if c >= 2 else "batch"))
        channels.append(c)
        ops.append(_merge("fuse", len(channels) - 1, skip, channels, max_channels))
        channels.append(ops[-1].channels)
    read = {i for op in ops for i in op.inputs}
    for unread in [i for i in range(len(channels) - 1) if i not in read]:
        kind = draw(st.sampled_from(TWO_INPUT_KINDS))
        ops.append(_merge(kind, len(channels) - 1, unread, channels, max_channels))
        channels.append(ops[-1].channels)
    hidden = draw(st.integers(8, 16))
    num_classes = draw(st.integers(2, 5))
    return Program(seed, in_channels, height, width, tuple(ops), hidden, num_classes)


def _randomise_norms(model: GeneratedNet, example: Tensor) -> None:
    """Give every norm statistics and affine terms that are neither default nor degenerate.

    With the defaults (mean 0, var 1, weight 1, bias 0) an eval-mode BatchNorm is the
    identity, so a bug that drops or misplaces one would go unseen. Purely random statistics
    are no better: activations shrink through the random convs, a running mean far from them
    pushes a whole channel below zero, and the next ReLU kills it (often the only channel of a
    narrow trunk, making the output constant). So the statistics are measured on the example
    batch first (one train-mode pass with a cumulative average), then perturbed.
    """
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in batch_norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model.features(example)
        model.eval()
        for m in batch_norms:
            m.momentum = 0.1  # back to PyTorch's default, as a user's model would have
            m.running_mean += 0.2 * m.running_var.sqrt() * torch.randn_like(m.running_mean)
            m.running_var *= torch.empty_like(m.running_var).uniform_(0.5, 2.0)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _centre_hidden_units(model: GeneratedNet, example: Tensor) -> None:
    """Shift ``fc1``'s bias so each hidden unit is active for one of the two example rows.

    With few hidden units every one of them can be negative for every input, and then the
    head's ReLU makes the output constant, so equivalence tests would pass vacuously.
    Centring each unit on the example batch leaves it positive for exactly one row whenever
    the trunk tells the rows apart, so a constant output now means a degenerate trunk.
    """
    with torch.no_grad():
        pre = model.fc1(model.pool(model.features(example)).flatten(1))
        model.fc1.bias -= pre.mean(dim=0)


def build_model(program: Program) -> tuple[GeneratedNet, Tensor]:
    """The eval-mode float64 model and example input a program describes.

    Everything random comes from ``program.seed`` inside a forked RNG, so the same program
    always gives the same weights and input, and the caller's global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(program.seed)
        model = GeneratedNet(program).double()
        example = torch.randn(BATCH, program.in_channels, program.height, program.width, dtype=torch.float64)
        _randomise_norms(model, example)
    _centre_hidden_units(model, example)
    return model, example


@st.composite
def random_models(
    draw: st.DrawFn, max_ops: int = 8, max_channels: int = 16, skip_stage: bool = False
) -> tuple[GeneratedNet, Tensor]:
    """A random small traceable model and an example input for it.

    Returns ``(model, example)``: ``model`` is an eval-mode float64 `GeneratedNet` that
    ``torch.fx.symbolic_trace`` can trace; ``example`` has shape ``(2, C, H, W)`` with C in
    1..4 and H, W in 6..12. ``model.program`` is the drawn `Program` (its summary is in the
    model's repr). ``max_ops`` bounds the drawn layers (merges of unread values come on top);
    ``max_channels`` bounds the width of any value; ``skip_stage`` see `programs`.
    """
    return build_model(draw(programs(max_ops=max_ops, max_channels=max_channels, skip_stage=skip_stage)))
