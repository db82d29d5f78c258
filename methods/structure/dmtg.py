"""DMTG — one-shot differentiable multi-task grouping (Gao et al., ICML 2024), on the graph engine.

The search network holds K *branches* (copies of the backbone's segments, optionally behind a
shared stem of the first ``shared_depth`` segments), N heads on every branch (K×N heads) and an
N×K matrix of assignment logits. In training each task's loss is the sum over branches of its
head losses weighted by a relaxed categorical sample ``gumbel_softmax(logits[t], tau)``; at
evaluation each task uses its argmax branch. After ``search_epochs`` every task keeps its argmax
branch and that branch's head for it, branches no task chose are dropped, and the result — a
`TaskTree` shared to depth ``shared_depth`` and split into the chosen groups below it — becomes
the network the remaining epochs fine-tune with ordinary per-task losses.

The branches are an ordinary `MultiTaskNetwork` whose "tasks" are the branches; its head for a
branch is the `BranchHeads` of the N tasks, so the engine executes the search network, saves it
and checks its invariants like any other.

Facts from the official code (ethanygao/DMTG: ``models/learnToGroup.py``, ``models/loss.py``,
``train.py``, ``configs/``), and where this implementation differs:

- logits ("group_matrix") start at ones (+ ``eps``·U[0,1) noise, eps = 0 in every config), so
  the first draws are uniform; branches and their heads start as identical copies (deepcopy).
- one Gumbel-softmax draw of the whole N×K matrix per step, shared by the batch; ``hard=False``
  (soft weights) in every config; evaluation uses the one-hot argmax.
- loss = Σ_t Σ_k w_tk · L_t(head_tk(branch_k(x)), y_t); the optional entropy term is off in
  every config and is not implemented here, nor is the taskonomy configs' gradient regulator.
- one Adam over every parameter, the logits included, at the model's lr (8e-4 CelebA, 1e-3
  Taskonomy): ``logits_lr=None`` keeps that; a number gives the logits their own lr.
- temperature: the official training script holds ``tau`` constant (2.5 CelebA, 4 Taskonomy):
  ``tau_schedule="constant"`` does that (at ``tau_start``). The default anneals ``tau``
  exponentially per step from ``tau_start`` to ``tau_end`` over the search, so that the relaxed
  weights approach the one-hot grouping the pruning takes (a documented deviation).
- fine-tuning: the repository ships no fine-tuning script; its ``FineTuningGroup`` trains one
  group at a time with the shared stem frozen. Here the pruned network is fine-tuned whole, with
  the trainer's optimizer, starting from the search's weights.

Resume: every checkpoint from the pruning on (the end of the last search epoch, and any
checkpoint of the fine-tuning, mid-epoch ones included) holds the pruned tree, so `Trainer.resume`
on the plain network rebuilds the pruned network and this method's state marks the search done.
A checkpoint written during the search holds the search network, which `Trainer.resume` cannot
lay out on the plain network (it raises `CheckpointError`): restart such a run.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from graphsurgeon.core.network import MultiTaskNetwork, Task
from graphsurgeon.core.surgery import carry_optimizer, derive
from graphsurgeon.core.tree import Origin, TaskTree
from graphsurgeon.errors import TaskSpecError
from graphsurgeon.methods.base import Method
from graphsurgeon.training.distributed import broadcast_object

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["DMTG", "BranchHeads", "DMTGConfig", "Supernet", "group_weights", "prune", "temperature"]


def branch_name(k: int) -> str:
    return f"branch{k}"


@dataclass
class DMTGConfig:
    """Every knob of DMTG; the defaults follow the official code except for the annealing."""

    branches: int = 2  # K
    search_epochs: int = 3
    shared_depth: int = 0  # segments shared by all branches (the official "backbone")
    tau_start: float = 4.0  # the official configs' constant: 4 (Taskonomy), 2.5 (CelebA)
    tau_end: float = 0.5
    # "exponential": tau_start → tau_end over the search; "constant": tau_start throughout (official)
    tau_schedule: Literal["exponential", "constant"] = "exponential"
    hard: bool = False  # straight-through one-hot draws instead of soft weights
    logits_lr: float | None = None  # None: the trainer's lr, as the official single Adam
    init_noise: float = 0.0  # the official eps

    def __post_init__(self) -> None:
        if self.branches < 1 or self.search_epochs < 1:
            raise TaskSpecError(
                f"DMTG needs branches >= 1 and search_epochs >= 1, got {self.branches} and {self.search_epochs}."
            )
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise TaskSpecError(f"DMTG temperatures must be positive, got tau_start={self.tau_start}, tau_end={self.tau_end}.")
        if self.tau_schedule not in ("exponential", "constant"):
            raise TaskSpecError(
                f"DMTG tau_schedule={self.tau_schedule!r}; use 'exponential' (tau_start → tau_end) or 'constant' (official)."
            )
        if self.logits_lr is not None and self.logits_lr <= 0:
            raise TaskSpecError(f"DMTG logits_lr must be positive or None (the trainer's lr), got {self.logits_lr}.")


def temperature(config: DMTGConfig, progress: float) -> float:
    """``tau_start · (tau_end / tau_start) ** progress``, ``progress`` in [0, 1] of the search
    (``tau_start`` throughout under ``tau_schedule="constant"``)."""
    if config.tau_schedule == "constant":
        return config.tau_start
    progress = min(max(progress, 0.0), 1.0)
    return config.tau_start * (config.tau_end / config.tau_start) ** progress


def group_weights(logits: torch.Tensor, tau: float, hard: bool = False, training: bool = True) -> torch.Tensor:
    """The N×K task-to-branch weights: a Gumbel-softmax draw in training, the one-hot argmax otherwise."""
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


class BranchHeads(nn.ModuleDict):
    """The N task heads on one branch: ``forward(z) -> {task: head(z)}``."""

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: head(z) for t, head in self.items()}


class Supernet(nn.Module):
    """K branches × N heads and the N×K assignment logits.

    ``forward`` in training returns ``{task: (prediction of branch 0, …, branch K-1)}``; in
    evaluation ``{task: prediction of its argmax branch}`` (the official evaluation's one-hot
    grouping), so the trainer's evaluation scores the grouping the search currently holds.
    """

    def __init__(self, branches: MultiTaskNetwork, task_specs: Mapping[str, Task], shared_depth: int, init_noise: float = 0.0):
        super().__init__()
        self.branches = branches
        self.task_specs = dict(task_specs)
        self.shared_depth = shared_depth
        n, k = len(self.task_specs), len(branches.tasks)
        self.group_logits = nn.Parameter(torch.ones(n, k) + init_noise * torch.rand(n, k))

    @classmethod
    def from_network(cls, net: MultiTaskNetwork, branches: int, shared_depth: int = 0, init_noise: float = 0.0) -> Supernet:
        """The search network for ``net``'s backbone and heads: every branch and every branch's
        head start as copies of ``net``'s first segment copies and of its heads."""
        if not 0 <= shared_depth < net.depth:
            raise TaskSpecError(
                f"DMTG shared_depth={shared_depth} must lie in 0..{net.depth - 1}: the backbone has {net.depth} "
                "segments and at least the last one is branched."
            )
        names = [branch_name(k) for k in range(branches)]
        tree = TaskTree.branched(names, net.depth, [[b] for b in names], split_at=shared_depth + 1)
        heads = {b: Task(head=BranchHeads({t: net.heads[t] for t in net.tasks})) for b in names}
        first = {d: net.tree.at_depth(d)[0].id for d in range(1, net.depth + 1)}
        origin: Origin = {n.id: (first[n.depth],) for n in tree.nodes if n.depth}
        body, _ = derive(net, tree, origin, heads)
        return cls(body, net.task_specs, shared_depth, init_noise)

    # the trainer's view of a network: tasks, tree (logged and checkpointed), config, fingerprints
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_specs)

    @property
    def tree(self) -> TaskTree:
        return self.branches.tree

    @property
    def config(self) -> dict[str, Any]:
        return self.branches.config

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return self.branches.fingerprints

    @property
    def num_branches(self) -> int:
        return len(self.branches.tasks)

    def assignment(self) -> dict[str, int]:
        """Each task's argmax branch."""
        return dict(zip(self.tasks, self.group_logits.argmax(-1).tolist()))

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if self.training:
            out = self.branches(x)
            return {t: tuple(out[branch_name(k)][t] for k in range(self.num_branches)) for t in self.tasks}
        chosen = self.assignment()
        out = self.branches(x, tasks=sorted({branch_name(k) for k in chosen.values()}))
        return {t: out[branch_name(k)][t] for t, k in chosen.items()}


def prune(supernet: Supernet, assignment: Mapping[str, int] | None = None) -> MultiTaskNetwork:
    """The network for the real tasks that ``assignment`` (default: the argmax) induces.

    Tasks on one branch form one group; branches without tasks disappear. The tree shares
    depths ≤ ``shared_depth`` and splits into the groups below; each node takes a copy of its
    branch's segment (the stem's for shared depths) and each task a copy of its branch's head,
    so the pruned network computes exactly what the chosen branches and heads computed.
    """
    assignment = dict(assignment or supernet.assignment())
    tasks = supernet.tasks
    if set(assignment) != set(tasks) or not all(0 <= k < supernet.num_branches for k in assignment.values()):
        raise TaskSpecError(
            f"a DMTG assignment maps every task {list(tasks)} to a branch in 0..{supernet.num_branches - 1}; "
            f"got {assignment}."
        )
    used = sorted(set(assignment.values()))
    groups = [[t for t in tasks if assignment[t] == k] for k in used]
    body = supernet.branches
    depth, shared = body.depth, supernet.shared_depth
    tree = TaskTree.from_partitions(tasks, [[list(tasks)]] * shared + [groups] * (depth - shared))
    specs = {
        t: replace(supernet.task_specs[t], head=body.heads[branch_name(k)][t])  # derive copies the heads
        for t, k in assignment.items()
    }
    origin: Origin = {n.id: (body.tree.path(branch_name(assignment[n.tasks[0]]))[n.depth].id,) for n in tree.nodes if n.depth}
    return derive(body, tree, origin, specs)[0]


@dataclass
class DMTG(Method):
    """Search (K branches × N heads, Gumbel-softmax assignment), prune, fine-tune; see the module."""

    config: DMTGConfig = field(default_factory=DMTGConfig)
    decisions: list[dict] = field(default_factory=list)
    pruned: bool = False

    name = "dmtg"

    def on_start(self, trainer: Trainer) -> None:
        if trainer.config.epochs < self.config.search_epochs:
            raise TaskSpecError(
                f"DMTG searches for {self.config.search_epochs} epochs but training runs {trainer.config.epochs}: "
                "the search would never end in a pruned network. Lower search_epochs or raise epochs."
            )
        # the annealing runs over the search's steps; the trainer's step counter starts with it
        self._search_steps = self.config.search_epochs * len(trainer.loader(trainer.train_data, shuffle=True))
        if self.pruned or isinstance(trainer.net, Supernet):
            return
        c = self.config
        supernet = Supernet.from_network(trainer.net, c.branches, c.shared_depth, c.init_noise)
        trainer.set_network(supernet)
        # the logits in a param group of their own (the fresh optimizer has no state to move):
        # out of the network's group, then back in with their own settings
        logits = supernet.group_logits
        carry_optimizer(trainer.optimizer, [logits], [])
        lr = c.logits_lr if c.logits_lr is not None else trainer.config.lr
        # no weight decay: it would pull the assignment towards uniform, which the search must not
        trainer.optimizer.add_param_group({"params": [logits], "lr": lr, "weight_decay": 0.0})

    def tau(self, trainer: Trainer) -> float:
        """The temperature of the current step: ``tau_start`` at the first, ``tau_end`` at the last."""
        return temperature(self.config, trainer.step / max(self._search_steps - 1, 1))

    def task_losses(self, trainer: Trainer, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.pruned:
            return trainer.task_losses(outputs, targets)
        net: Supernet = trainer.net
        w = group_weights(net.group_logits, self.tau(trainer), self.config.hard, training=True)
        losses = {}
        for i, t in enumerate(net.tasks):
            loss = trainer.tasks[t].loss
            losses[t] = sum(w[i, k] * loss(pred, targets[t]) for k, pred in enumerate(outputs[t]))
        return losses

    def probabilities(self, net: Supernet) -> dict[str, list[float]]:
        """Each task's categorical over the branches, softmax(logits)."""
        p = F.softmax(net.group_logits.detach().float(), -1)
        return {t: [round(v, 4) for v in p[i].tolist()] for i, t in enumerate(net.tasks)}

    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        if self.pruned:
            return None
        net: Supernet = trainer.net
        event = {
            "tau": self.tau(trainer),
            "probabilities": self.probabilities(net),
            "assignment": net.assignment(),
        }
        if trainer.epoch < self.config.search_epochs:
            return {"dmtg": event}
        assignment = broadcast_object(net.assignment())  # rank 0 decides
        pruned = prune(net, assignment)
        groups = [list(n.tasks) for n in pruned.tree.at_depth(pruned.depth)]
        decision = {"epoch": trainer.epoch, **event, "assignment": assignment, "groups": groups, "tree": str(pruned.tree)}
        self.decisions.append(decision)
        trainer.set_network(pruned)
        self.pruned = True
        return {"dmtg": decision}

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "decisions": self.decisions, "config": asdict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
        self.decisions = list(state.get("decisions", []))
