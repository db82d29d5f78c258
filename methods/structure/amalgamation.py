"""Knowledge amalgamation: training a group node to stand in for the members it replaces.

MTSL does not simply average the members: the group node G is trained so that, for each
member t, a channel gate g_t = sigmoid(MLP(GAP(F_G))) recovers the member's features,
minimising Σ_t MSE(F_t, g_t ⊙ F_G). The gates let one shared representation serve members
that weight channels differently; they are discarded after the phase (the children
downstream adapt during the next task-learning phase). Without gates (``gated=False``) the
group node is fitted to every member's features as they are, the least-squares stand-in for
all of them: what a merge of trained models needs, where no task learning follows to adapt the
children to features a gate would have rescaled (`graphsurgeon.methods.structure.merge_trained`).
With ``target="outputs"`` what is fitted is each task's output instead: the group node, in its
member's place, feeds the nodes below and the head unchanged, and the task's output is fitted
to the one its member gives, so the group node keeps what each task reads of it rather than
every feature alike. With ``adapt_below=True`` as well, the nodes below the members and their
tasks' heads train too, each task's path fitted to reproduce its own output as a frozen copy
taken before the merge gives it: a shallow group node need then not reproduce every member's
features exactly for deep paths that cannot move, as in a merge of trained models, where no
task learning follows to adapt them.

A segment at a multi-value boundary (a decoder stage carrying encoder skips) returns a tuple:
every value gets its own gate and MSE term (values the segment only passes on are equal in G
and the members, so they add nothing); with ``target="outputs"`` the tuple feeds the nodes
below as it is.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.methods.structure.similarity import global_avg_pool
from graphsurgeon.training import distributed

__all__ = ["Amalgamation", "BoundaryGate", "ChannelGate", "feature_mse"]

Boundary = torch.Tensor | tuple[torch.Tensor, ...]


def _values(f: Boundary) -> tuple[torch.Tensor, ...]:
    return f if isinstance(f, tuple) else (f,)


def _mse_sum(a: Boundary, b: Boundary) -> torch.Tensor:
    """Summed squared error over every value of two boundaries."""
    return sum(F.mse_loss(x, y, reduction="sum") for x, y in zip(_values(a), _values(b), strict=True))


def _numel(f: Boundary) -> int:
    return sum(t.numel() for t in _values(f))


def _mse_mean(a: Boundary, b: Boundary) -> torch.Tensor:
    """Mean squared error over every value of two boundaries (``F.mse_loss`` for tensors)."""
    return F.mse_loss(a, b) if isinstance(a, torch.Tensor) else _mse_sum(a, b) / _numel(b)


def _broadcast_gate(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if f.dim() == 3:
        return g[:, None, :]
    return g.reshape(*g.shape, *([1] * (f.dim() - 2)))


class ChannelGate(nn.Module):
    """Linear → ReLU → Linear → Sigmoid on the pooled group features: one gate per member.

    The hidden width is ``channels // reduction``; ``reduction=1`` (C → C → C) is the official
    MTSL gate, a larger one a cheaper squeeze-and-excitation-style bottleneck."""

    def __init__(self, channels: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return _broadcast_gate(self.mlp(global_avg_pool(f)), f) * f


class BoundaryGate(nn.Module):
    """One member's gates on a segment's output: a `ChannelGate` per value of the boundary."""

    def __init__(self, sample: Boundary, reduction: int = 1) -> None:
        super().__init__()
        self.multi = isinstance(sample, tuple)
        self.gates = nn.ModuleList(ChannelGate(global_avg_pool(v).shape[1], reduction) for v in _values(sample))

    def forward(self, f: Boundary) -> Boundary:
        out = tuple(g(v) for g, v in zip(self.gates, _values(f), strict=True))
        return out if self.multi else out[0]


def feature_mse(
    net: MultiTaskNetwork,
    depth: int,
    parent: int,
    members: Sequence[nn.Module],
    group: nn.Module,
    gates: Sequence[nn.Module] | None,
    batches: Iterable[torch.Tensor],
) -> list[float]:
    """Per-member MSE between the member's features and the (gated) group features, no grad."""
    totals, count = [0.0] * len(members), 0
    with eval_mode(net, *members, group), torch.no_grad():
        for x in batches:
            inp = net.features(x, depth=depth - 1)[parent]
            fg = group(inp)
            for i, m in enumerate(members):
                pred = gates[i](fg) if gates is not None else fg
                totals[i] += _mse_sum(pred, m(inp)).item()
            count += _numel(fg)
    return [t / max(count, 1) for t in totals]


@dataclass
class Amalgamation:
    """A `graphsurgeon.core.surgery.fuse` ``distill`` callback: MTSL's knowledge amalgamation.

    Args:
        batches: a callable returning an iterable of input batches (one epoch of real data).
        epochs: passes over ``batches`` per fuse.
        lr: Adam learning rate for the group node and the gates (a separate optimizer).
        progress: wraps each epoch's batches (e.g. a tqdm factory) or ``None``.
        reduction: the gates' hidden width is channels // reduction (1: the official C).
        gated: learn a channel gate per member (MTSL); ``False`` fits the group node to the
            members' features directly.
        target: ``"features"`` (MTSL): the group node's output is fitted to each member's;
            ``"outputs"``: every task's output, computed through the rest of its path with the
            group node in its member's place, is fitted to the output its member gives (the
            nodes below and the heads stay as they are, unless ``adapt_below``; no gates).
        adapt_below: with ``"outputs"``, train the nodes below the members and their tasks'
            heads too, towards the outputs a frozen copy of them gives (module docstring).
    """

    batches: Callable[[], Iterable[torch.Tensor]]
    epochs: int = 1
    lr: float = 1e-3
    reduction: int = 1
    gated: bool = True
    target: Literal["features", "outputs"] = "features"
    adapt_below: bool = False
    progress: Callable[[Iterable], Iterable] | None = None
    history: list[dict] = field(default_factory=list)
    gates: list[BoundaryGate] | None = field(default=None, repr=False)
    """The gates trained by the last call (kept to measure held-out MSE)."""

    def __call__(
        self, net: MultiTaskNetwork, depth: int, parent: int, members: Sequence[nn.Module], group: nn.Module
    ) -> dict:
        # the network and the members (the targets) in eval: their BatchNorm statistics stay as
        # they are; the group node in train mode, as MTSL distils (surgery gives it its first
        # member's modes when it takes its place)
        with eval_mode(net, *members):
            group.train()
            curve, gates = self._distil(net, depth, parent, members, group)
        self.gates = gates
        record = {"depth": depth, "parent": parent, "members": len(members), "loss_curve": curve}
        self.history.append(record)
        return record

    def _distil(
        self, net: MultiTaskNetwork, depth: int, parent: int, members: Sequence[nn.Module], group: nn.Module
    ) -> tuple[list[float], list[BoundaryGate] | None]:
        device = next(group.parameters()).device
        outputs = self.target == "outputs"
        node_of = {id(net.node_module(n)): n for n in net.tree.at_depth(depth)}
        member_tasks = [node_of[id(m)].tasks for m in members] if outputs else []
        below = self._below(net, depth, [t for tasks in member_tasks for t in tasks]) if outputs and self.adapt_below else []
        # the targets' paths as they were before the merge (a copy, as the live ones train)
        teacher = copy.deepcopy(net) if below else net
        gates: list[BoundaryGate] | None = None
        params: list[nn.Parameter] = []
        opt: torch.optim.Optimizer | None = None
        curve: list[float] = []
        for _ in range(self.epochs):
            batches = self.batches()
            if self.progress is not None:
                batches = self.progress(batches)
            for x in batches:
                with torch.no_grad():
                    inp = net.features(x, depth=depth - 1)[parent]
                    targets = [m(inp) for m in members]
                    if outputs:
                        targets = [teacher.outputs_from(depth, f, tasks) for f, tasks in zip(targets, member_tasks)]
                fg = group(inp)
                if opt is None:
                    if self.gated and not outputs:
                        gates = [BoundaryGate(fg, self.reduction).to(device) for _ in members]
                    params = list(group.parameters()) + [p for g in gates or () for p in g.parameters()]
                    params += [p for m in below for p in m.parameters() if p.requires_grad]
                    opt = torch.optim.Adam(params, lr=self.lr)
                if outputs:
                    preds = [net.outputs_from(depth, fg, tasks) for tasks in member_tasks]
                    loss = torch.stack([F.mse_loss(p[t], y[t]) for p, y in zip(preds, targets) for t in y]).sum()
                else:
                    feats = [gate(fg) for gate in gates] if gates is not None else [fg] * len(targets)
                    loss = torch.stack([_mse_mean(f, t) for f, t in zip(feats, targets)]).sum()
                # gradients of the group node (and gates, or with adapt_below the nodes and heads
                # below) only: the rest of the network stays as it is
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                # under torchrun each rank distils on its share of the batches: average the
                # gradients so that every rank ends with the same group node (no-op alone)
                distributed.all_reduce_gradients(params)
                opt.step()
                curve.append(float(loss.detach()))
        return curve, gates

    @staticmethod
    def _below(net: MultiTaskNetwork, depth: int, tasks: Sequence[str]) -> list[nn.Module]:
        """The nodes below ``depth`` on ``tasks``' paths and their heads, each once. Merging
        goes from shallow to deep, so they are the members' descendants: no other task's."""
        seen: dict[int, nn.Module] = {}
        for t in tasks:
            for node in net.tree.path(t)[depth + 1:]:
                seen.setdefault(node.id, net.node_module(node))
        return [*seen.values(), *(net.heads[t] for t in tasks)]
