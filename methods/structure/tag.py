"""TAG — Task Affinity Grouping (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task
Groupings for Multi-Task Learning"), on the graph engine.

Stage 1 trains the network as it is given (hard sharing: the ordinary sum-of-losses step) and,
every ``every`` steps, measures the inter-task affinity by lookahead: for each task i, a step
on the shared parameters along task i's gradient alone (plain SGD, or with ``lookahead=
"optimizer"`` the optimizer's own update, as the official CelebA code), and

    Z[i, j] = 1 - L_j(after the step on task i) / L_j(before)

on the same batch (`graphsurgeon.methods.structure.lookahead`). Z is averaged over stage 1. Then
`graphsurgeon.methods.structure.partition.tag_groups` splits the tasks into at most ``num_groups`` disjoint groups
maximising the total affinity each task receives from the rest of its group (disjoint where
TAG's notebook allows overlapping groups: a tree gives each task one branch), the tree is split into one branch per group at
``split_depth`` (0: at the input, i.e. one network per group) by `graphsurgeon.core.surgery.split`,
and stage 2 trains the branched network — from scratch by default (``restart``), as TAG
trains its chosen networks; or continuing from the stage-1 weights, each branch starting as
a copy of the shared one, with its optimizer state.

The affinity stage and the grouped training share the run's epoch budget: stage 2 trains for
the epochs left after ``affinity_epochs``.

Under torchrun the step's gradient is the ordinary backward (DDP averages it), so TAG does not
set ``reduces_gradients``; the per-task gradients of a measuring step (``autograd.grad``, which
DDP never sees) and the lookahead losses are averaged over ranks before Z is formed, and the
grouping is rank 0's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from graphsurgeon.core.surgery import reinitialise, split
from graphsurgeon.errors import MethodError, OptionError
from graphsurgeon.methods.aggregation.base import per_task_gradients, split_parameters
from graphsurgeon.methods.base import Step
from graphsurgeon.methods.structure.lookahead import (
    LookaheadMethod,
    affinity,
    lookahead_losses,
    optimizer_displacements,
)
from graphsurgeon.methods.structure.partition import tag_groups
from graphsurgeon.training.distributed import all_reduce_mean, broadcast_object

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["TAG", "TAGConfig"]


@dataclass
class TAGConfig:
    """Every knob of TAG."""

    num_groups: int = 2
    every: int = 10
    """Measure the affinity every ``every`` training steps of stage 1."""
    affinity_epochs: int | None = None
    """Length of stage 1; ``None``: a quarter of the training epochs, at least 1. The official
    TAG averages over its whole joint run: ``affinity_epochs=E`` with the experiment's
    ``equal_final_budget`` is that protocol (E joint epochs, then E for the groups)."""
    split_depth: int = 0
    """Depths 1..split_depth stay shared; from split_depth + 1 on each group has its own branch."""
    restart: bool = True
    """Re-initialise the grouped network and its optimizer (TAG trains its groupings from scratch)."""
    restart_from: Literal["random", "pristine"] = "random"
    """What a restart starts from: random weights (TAG's from-scratch networks) or the network as
    it was built (the backbone's pretrained weights and the heads as given)."""
    lookahead: Literal["sgd", "optimizer"] = "sgd"
    """The lookahead step along task i's gradient: ``"sgd"``, θ − lookahead_lr·g_i; or
    ``"optimizer"``, the training optimizer's own update from its current state (Adam's
    lr·m̂/(√v̂ + eps)), as the official CelebA code looks ahead. With Adam at 1e-3 the SGD step
    is tiny and the affinities are of order 1e-3 (the grouping uses only their ranking, noisier
    at that scale); the optimizer's step is the size training takes."""
    lookahead_lr: float | None = None
    """The ``"sgd"`` lookahead's step; ``None``: the optimizer's learning rate."""
    exact_limit: int = 12
    beam_width: int = 64


@dataclass
class TAG(LookaheadMethod):
    """Measure affinity on the shared network, then train the chosen groups' branches.

    ``decisions`` holds the grouping (affinity matrix, groups, score, tree); each stage-1 epoch
    logs the running affinity matrix as ``tag_affinity``.
    """

    config: TAGConfig = field(default_factory=TAGConfig)
    decisions: list[dict] = field(default_factory=list)
    grouped: bool = False
    affinity_sum: torch.Tensor | None = None
    measurements: int = 0

    name = "tag"

    # ------------------------------------------------------------------ stage 1
    def on_start(self, trainer: Trainer) -> None:
        net = trainer.net
        c = self.config
        if isinstance(c.every, bool) or not isinstance(c.every, int) or c.every < 1:
            raise OptionError(f"TAG every={c.every!r} must be an integer >= 1 (steps between measurements).")
        if not 0 <= c.split_depth < net.depth:
            raise OptionError(
                f"TAG split_depth={c.split_depth} must lie in 0..{net.depth - 1} for this network of "
                f"{net.depth} segments (0 splits at the input: one network per group)."
            )
        if c.lookahead not in ("sgd", "optimizer"):
            raise OptionError(f"TAG lookahead={c.lookahead!r}; use 'sgd' (θ − lr·g) or 'optimizer' (its own update, official).")
        if c.affinity_epochs is not None and c.affinity_epochs < 1:
            raise OptionError(f"TAG affinity_epochs={c.affinity_epochs} must be >= 1 (or None for a quarter).")
        if self.grouped:
            return
        if not split_parameters(net)[0]:
            raise MethodError(
                "TAG measures affinity through shared parameters, but no segment is shared by two tasks; "
                "start TAG from a hard-sharing network (sharing='shared')."
            )
        if self.affinity_sum is None:
            self.affinity_sum = torch.zeros(len(net.tasks), len(net.tasks), dtype=torch.float64)

    def affinity_epochs(self, trainer: Trainer) -> int:
        if self.config.affinity_epochs is not None:
            return self.config.affinity_epochs
        return max(1, math.ceil(trainer.config.epochs / 4))

    def backward(self, trainer: Trainer, step: Step) -> None:
        """The plain step; on measuring steps, also the per-task lookahead (after the backward,
        as the lookahead edits the parameters in place)."""
        if self.grouped or trainer.step % self.config.every:
            return super().backward(trainer, step)
        order = list(trainer.net.tasks)
        shared, _ = split_parameters(trainer.net)
        values = [step.losses[t] for t in order]
        grads = all_reduce_mean(per_task_gradients(values, shared, retain_graph=True))
        super().backward(trainer, step)
        if self.config.lookahead == "optimizer":
            grads, lr = optimizer_displacements(trainer.optimizer, shared, grads), 1.0
        else:
            lr = self.step_size(trainer, self.config.lookahead_lr)
        # "before" is a lookahead along the zero direction rather than the training forward's
        # losses: every row then runs under the same forked RNG state, so a network with
        # dropout compares the same masks before and after (one extra forward per measurement)
        directions = torch.cat([grads.new_zeros(1, grads.shape[1]), grads])
        rows = all_reduce_mean(lookahead_losses(trainer.net, shared, directions, lr, self.batch_losses(trainer, step, order)))
        self.affinity_sum += affinity(rows[0], rows[1:]).double().cpu()
        self.measurements += 1

    def affinity_matrix(self) -> torch.Tensor:
        """Z averaged over the measurements so far (``Z[i, j]``: task i onto task j)."""
        if self.affinity_sum is None or not self.measurements:
            raise MethodError(
                "TAG has no affinity measurement yet; train at least one step of stage 1 "
                "(lower `every` if stage 1 is shorter than it)."
            )
        return self.affinity_sum / self.measurements

    # ------------------------------------------------------------------ grouping
    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        if self.grouped:
            return None
        if trainer.epoch < self.affinity_epochs(trainer):
            return {"tag_affinity": self.affinity_matrix().tolist()}
        return {"tag": self.group(trainer)}

    def group(self, trainer: Trainer) -> dict[str, Any]:
        """Choose the groups from the averaged affinity and rebuild the network as their branches."""
        net = trainer.net
        c = self.config
        tasks = list(net.tasks)
        z = self.affinity_matrix()
        grouping = broadcast_object(tag_groups(z.numpy(), c.num_groups, exact_limit=c.exact_limit, beam_width=c.beam_width))
        groups = [[tasks[i] for i in block] for block in grouping.groups]
        before = sum(p.numel() for p in net.parameters())
        depth = c.split_depth + 1

        def pieces(node) -> list[list[str]]:
            return [kept for g in groups if (kept := [t for t in g if t in node.tasks])]

        while node := next((n for n in net.tree.at_depth(depth) if len(pieces(n)) > 1), None):
            split(net, node.id, pieces(node), optimizer=trainer.optimizer)
        if c.restart:
            # seeded, so that every rank of a distributed run starts stage 2 from the same weights;
            # the optimizer forgets the moments of the discarded weights
            devices = sorted({str(p.device) for p in net.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(trainer.config.seed + trainer.epoch)
                reinitialise(net, heads=True, from_=c.restart_from, optimizer=trainer.optimizer)
        trainer.structure_changed()  # re-wraps the network for DDP (rank 0's weights); no-op in one process
        self.grouped = True
        event = {
            "epoch": trainer.epoch,
            "tasks": tasks,
            "affinity": z.tolist(),
            "measurements": self.measurements,
            "num_groups": c.num_groups,
            "groups": groups,
            "total_affinity": grouping.total_affinity,
            "score": grouping.total_affinity / len(tasks),
            "search": grouping.method,
            "split_depth": c.split_depth,
            "restart": c.restart,
            "parameters_before": before,
            "parameters_after": sum(p.numel() for p in net.parameters()),
            "tree": [list(map(list, p)) for p in net.tree.partitions()],
        }
        self.decisions.append(event)
        return event

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "grouped": self.grouped,
            "affinity_sum": None if self.affinity_sum is None else self.affinity_sum.tolist(),
            "measurements": self.measurements,
            "decisions": self.decisions,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.grouped = bool(state.get("grouped", False))
        total = state.get("affinity_sum")
        self.affinity_sum = None if total is None else torch.tensor(total, dtype=torch.float64)
        self.measurements = int(state.get("measurements", 0))
        self.decisions = list(state.get("decisions", []))
