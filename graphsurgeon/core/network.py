"""The multi-task network: segment copies arranged by a task tree, plus one head per task.

Only this module executes the tree; methods decide edits and `graphsurgeon.core.surgery` applies
them through `MultiTaskNetwork.rebuild`. Parameter names are stable and readable:
``seg3.n7.layer2.0.conv1.weight`` is segment 3's copy held by tree node 7, and
``heads.depth.0.weight`` belongs to the head of task ``depth``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from graphsurgeon.core.fused import FusedExecutor
from graphsurgeon.core.segments import Segment
from graphsurgeon.core.tree import Origin, TaskTree, TreeNode
from graphsurgeon.errors import HeadMismatchError, TaskSpecError

__all__ = ["GroupInit", "MultiTaskNetwork", "Task"]

GroupInit = Literal["fresh", "mean", "copy"] | Callable[[Sequence[nn.Module]], nn.Module]


@dataclass
class Task:
    """A task: its head, and what training needs of it (the one task type of the library).

    ``multitask`` builds the head (``head`` may be a factory ``f(trunk_shape) -> nn.Module``
    until then); the `Trainer` reads ``loss(pred, target) -> scalar``, ``metrics`` (a name to
    ``f(pred, target) -> float``) and ``higher_is_better`` (a metric name to its direction, for
    selecting the best epoch on a metric) from ``net.task_specs``, so a task is declared once.
    """

    head: nn.Module | Callable[[tuple[int, ...]], nn.Module]
    loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    metrics: Mapping[str, Callable[[torch.Tensor, Any], float]] = field(default_factory=dict)
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)


def reinitialise(module: nn.Module) -> nn.Module:
    """Re-initialise every parameter: submodules that know how (``reset_parameters``, BN
    statistics included) do it themselves; bare parameters read through ``get_attr`` (ViT's
    ``class_token``, layer-scale ``gamma``) get a truncated normal (std 0.02, as ViT inits them).
    """
    owned: set[int] = set()
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
            owned.update(id(p) for p in m.parameters())
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in owned:
                nn.init.trunc_normal_(p, std=0.02)
    return module


def init_group(members: Sequence[nn.Module], init: GroupInit) -> nn.Module:
    """A new group node's segment copy, built from the copies it replaces.

    ``fresh`` re-initialises (as the official MTSL code does, so the group is learned by
    distillation rather than inherited from one task); ``mean`` averages the members'
    parameters and keeps the first member's buffers (averaging BatchNorm statistics of
    different feature distributions is meaningless); ``copy`` takes the first member as is.
    """
    if callable(init):
        return init(members)
    group = copy.deepcopy(members[0])
    if init == "copy":
        return group
    if init == "fresh":
        return reinitialise(group)
    if init == "mean":
        with torch.no_grad():
            named = [dict(m.named_parameters()) for m in members]
            for name, p in group.named_parameters():
                # first + mean of differences: exact when the members are equal (x+x+x != 3x in floats)
                first = named[0][name].detach()
                p.copy_(first + torch.stack([n[name].detach() - first for n in named]).mean(0))
        return group
    raise TaskSpecError(f"unknown group init {init!r}; use 'fresh', 'mean', 'copy' or a callable(members) -> module.")


class MultiTaskNetwork(nn.Module):
    """Segment copies keyed by tree node, executed along the tree, and one head per task."""

    def __init__(
        self,
        segments: Sequence[Segment],
        tree: TaskTree,
        tasks: Mapping[str, Task],
        *,
        trunk_name: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if tree.depth != len(segments):
            raise TaskSpecError(
                f"the task tree has depth {tree.depth} but the backbone has {len(segments)} segments. "
                "Build the tree with depth=len(segments) (see graphsurgeon.segment)."
            )
        if set(tree.tasks) != set(tasks):
            raise TaskSpecError(f"the tree's tasks {list(tree.tasks)} differ from the heads' tasks {list(tasks)}.")
        self.tree = tree
        self.trunk_name = trunk_name
        self.config = dict(config or {})
        self.task_specs = dict(tasks)
        self.fingerprints = tuple(s.fingerprint for s in segments)
        for d, seg in enumerate(segments, start=1):
            setattr(self, f"seg{d}", nn.ModuleDict({n.name: copy.deepcopy(seg.module) for n in tree.at_depth(d)}))
        self.heads = nn.ModuleDict({t: tasks[t].head for t in tree.tasks})
        self._plan = self._make_plan(tree)
        self._fusion: FusedExecutor | None = None

    # ------------------------------------------------------------------ structure
    @property
    def tasks(self) -> tuple[str, ...]:
        return self.tree.tasks

    @property
    def depth(self) -> int:
        return self.tree.depth

    def level(self, depth: int) -> nn.ModuleDict:
        """The segment copies at ``depth`` (1..L), keyed by node name."""
        return getattr(self, f"seg{depth}")

    def node_module(self, node: TreeNode | int) -> fx.GraphModule:
        node = self.tree.node(node) if isinstance(node, int) else node
        return self.level(node.depth)[node.name]

    @staticmethod
    def _make_plan(tree: TaskTree) -> list[list[tuple[str, int, int, frozenset[str]]]]:
        return [
            [(n.name, n.id, n.parent, frozenset(n.tasks)) for n in tree.at_depth(d)] for d in range(1, tree.depth + 1)
        ]

    def rebuild(
        self,
        tree: TaskTree,
        origin: Origin,
        init: GroupInit = "fresh",
        modules: Mapping[int, nn.Module] | None = None,
    ) -> dict[int, nn.Module]:
        """Re-arrange the segment copies for an edited tree.

        A node whose id survives keeps its module (and so its parameters and optimizer
        state); a node derived from one old node gets a copy of it; a node derived from several
        (a group node) is built by `init_group`, unless ``modules`` already holds one for it
        (a group node trained by distillation). Returns the modules that are new.
        """
        modules = dict(modules or {})
        old_tree = self.tree
        created: dict[int, nn.Module] = {}
        for d in range(1, tree.depth + 1):
            old_level = self.level(d)
            old_by_id = {n.id: old_level[n.name] for n in old_tree.at_depth(d)}
            level = nn.ModuleDict()
            for n in tree.at_depth(d):
                sources = origin[n.id]
                if n.id in modules:
                    level[n.name] = created[n.id] = modules[n.id]
                elif len(sources) == 1 and sources[0] == n.id:
                    level[n.name] = old_by_id[n.id]
                elif len(sources) == 1:
                    level[n.name] = created[n.id] = copy.deepcopy(old_by_id[sources[0]])
                else:
                    level[n.name] = created[n.id] = init_group([old_by_id[s] for s in sources], init)
            setattr(self, f"seg{d}", level)
        self.tree = tree
        self._plan = self._make_plan(tree)
        return created

    # ------------------------------------------------------------------ execution
    def fuse_execution(self, enabled: bool = True) -> MultiTaskNetwork:
        """Run the nodes of each depth as one vmapped call (`graphsurgeon.core.fused`), or in a loop.

        Fused and loop compute the same outputs, gradients and BatchNorm statistics (tested
        against each other); only random draws (dropout) differ. Off by default because on CPU
        it is mostly SLOWER: vmap turns the T convolutions into one grouped convolution, which
        CPU kernels run slower than T plain ones, and stacks the T copies' parameters on every
        call. Measured (benchmarks/results/branches_cpu.md, one thread, fused / loop time): a
        resnet18 stage 1.04-1.3x at T = 2..40 (2.3x training at T=40, batch 32); a small
        16-channel block 1.1-3.4x at batch 32 and for T <= 4, faster (0.6-0.9x) only at batch 4
        with T >= 8, where the loop's per-call overhead dominates. Turn it on where one batched
        call replaces many small kernel launches (GPUs, many tasks, small per-task work).
        Parameters, names, optimizer state and export are the same either way. Returns self.
        """
        self._fusion = FusedExecutor() if enabled else None
        return self

    @property
    def fused_execution(self) -> bool:
        """Whether `fuse_execution` is on."""
        return self._fusion is not None

    def _wanted(self, tasks: Iterable[str] | None) -> tuple[str, ...]:
        if tasks is None:
            return self.tree.tasks
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise TaskSpecError(f"forward(tasks=...) names unknown tasks {unknown}; this network has {list(self.tasks)}.")
        return tasks

    def features(
        self, x: torch.Tensor, tasks: Iterable[str] | None = None, depth: int | None = None
    ) -> dict[int, torch.Tensor]:
        """Outputs of the nodes at ``depth`` (default: the trunk) the requested tasks need, by node id.

        ``depth=0`` returns the input itself under the root's id.
        """
        wanted = frozenset(self._wanted(tasks))
        values = {self.tree.at_depth(0)[0].id: x}
        for d, level_plan in enumerate(self._plan[:depth], start=1):
            level = self.level(d)
            nodes = [(name, node_id, parent) for name, node_id, parent, node_tasks in level_plan if node_tasks & wanted]
            if self._fusion is not None and len(nodes) > 1:
                values = self._fusion.run_level(d, level, nodes, values)
            else:
                values = {node_id: level[name](values[parent]) for name, node_id, parent in nodes}
        return values

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: output}`` for every task, or only ``tasks`` (computing only their paths)."""
        wanted = self._wanted(tasks)
        leaves = self.features(x, wanted)
        leaf_of = {t: n[1] for n in self._plan[-1] for t in n[3]} if self._plan else {}
        if self._fusion is not None and self._plan:
            fused = self._fusion.run_heads(self.heads, wanted, leaf_of, leaves)
            if fused is not None:
                return fused
        out = {}
        for t in wanted:
            z = leaves[leaf_of[t]] if self._plan else x
            try:
                out[t] = self.heads[t](z)
            except RuntimeError as exc:
                shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise HeadMismatchError(
                    f"the head of task {t!r} ({type(self.heads[t]).__name__}) cannot take the trunk output "
                    f"of shape {shape} (trunk node {self.trunk_name!r}): {str(exc).splitlines()[0]}. "
                    f"Fix: build the head for inputs of shape {shape[1:] if isinstance(shape, tuple) else shape}, "
                    "or pick another trunk= node (graphsurgeon.get_graph_node_names(model))."
                ) from exc
        return out

    def extra_repr(self) -> str:
        return f"trunk={self.trunk_name!r}, tasks={list(self.tasks)}, segments={self.depth}"
