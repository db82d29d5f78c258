"""The multi-task network: segment copies arranged by a task tree, plus one head per task.

Only this module executes the tree; methods decide edits and `graphsurgeon.core.surgery` applies
them through `MultiTaskNetwork.rebuild`. The network also keeps the *pristine templates*: the
segments as cut from the backbone (its possibly pretrained weights) and the heads as given,
held as plain attributes, so they are neither parameters nor in the state dict nor seen by an
optimizer; surgery copies them where a node or head must start over from the backbone
(``init="pristine"``, a checkpoint's layout, a restart). Parameter names are stable and readable:
``seg3.n7.layer2.0.conv1.weight`` is segment 3's copy held by tree node 7, and
``heads.depth.0.weight`` belongs to the head of task ``depth``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from graphsurgeon.core.fused import FusedExecutor
from graphsurgeon.core.inputs import check_side_inputs
from graphsurgeon.core.modes import copy_modes
from graphsurgeon.core.segments import Segment
from graphsurgeon.core.tree import Origin, TaskTree, TreeNode
from graphsurgeon.errors import HeadMismatchError, TaskSpecError, TreeEditError

__all__ = ["GroupInit", "MultiTaskNetwork", "Task", "main_value"]

GroupInit = Literal["fresh", "pristine", "mean", "copy"] | Callable[[Sequence[nn.Module]], nn.Module]


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


def main_value(boundary: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The main value of what a segment returns: the tensor itself, or the last (latest
    computed) of a multi-value boundary's tuple (see `graphsurgeon.core.segments`)."""
    return boundary[-1] if isinstance(boundary, tuple) else boundary


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


def init_group(members: Sequence[nn.Module], init: GroupInit, pristine: nn.Module | None = None) -> nn.Module:
    """A new group node's segment copy, built from the copies it replaces.

    ``fresh`` re-initialises randomly, so the group is learned by distillation rather than
    inherited from one task; ``pristine`` starts from the segment as cut from the backbone
    (``pristine``, the network's template: the pretrained weights, as the official MTSL code
    reloads them); ``mean`` averages the members' parameters and keeps the first member's
    buffers (averaging BatchNorm statistics of different feature distributions is
    meaningless); ``copy`` takes the first member as is.
    """
    if callable(init):
        return init(members)
    if init == "pristine":
        if pristine is None:
            raise TaskSpecError(
                "group init 'pristine' needs the segment's template; build the group through "
                "MultiTaskNetwork.rebuild or graphsurgeon.core.surgery.fuse, which pass it."
            )
        reference = next(iter(members[0].parameters()), None)
        group = copy.deepcopy(pristine)
        return group if reference is None else group.to(reference.device, reference.dtype)
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
    raise TaskSpecError(
        f"unknown group init {init!r}; use 'fresh', 'pristine', 'mean', 'copy' or a callable(members) -> module."
    )


class MultiTaskNetwork(nn.Module):
    """Segment copies keyed by tree node, executed along the tree, and one head per task.

    Every node starts as a copy of its segment, unless ``modules`` gives its module by node id
    (a network derived from another one's nodes: `graphsurgeon.core.surgery.derive`).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        tree: TaskTree,
        tasks: Mapping[str, Task],
        *,
        trunk_name: str = "",
        config: Mapping[str, Any] | None = None,
        modules: Mapping[int, nn.Module] | None = None,
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
        # the templates: private copies (the caller's segments may share tensors with a model it
        # goes on training), in a tuple and a dict so that nn.Module does not register them
        self._segments = tuple(dataclasses.replace(s, module=copy.deepcopy(s.module)) for s in segments)
        self._head_templates = {t: copy.deepcopy(tasks[t].head) for t in tree.tasks}
        modules = modules or {}
        for d, seg in enumerate(self._segments, start=1):
            level = {n.name: modules[n.id] if n.id in modules else copy.deepcopy(seg.module) for n in tree.at_depth(d)}
            setattr(self, f"seg{d}", nn.ModuleDict(level))
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

    @property
    def input_name(self) -> str:
        """The forward argument of the backbone's main input (the one `forward` takes as ``x``)."""
        return self.config.get("input", self._segments[0].input_name)

    @property
    def side_inputs(self) -> tuple[str, ...]:
        """The backbone's other inputs some segment reads (``("attention_mask",)``): `forward`
        takes each by name, and passes it unchanged to every segment that reads it."""
        names = (n for s in self._segments for n in s.side_inputs if n != self.input_name)
        return tuple(dict.fromkeys(names))

    def _inputs(self, x: torch.Tensor, side_inputs: Mapping[str, Any]) -> tuple[tuple[Any, ...], ...]:
        """For every depth, the model inputs its segment takes after its chained value."""
        check_side_inputs(side_inputs, self.side_inputs, f"{type(self).__name__}.forward")
        values = {**side_inputs, self.input_name: x}
        return tuple(tuple(values[n] for n in s.side_inputs) for s in self._segments)

    def level(self, depth: int) -> nn.ModuleDict:
        """The segment copies at ``depth`` (1..L), keyed by node name."""
        return getattr(self, f"seg{depth}")

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The pristine segment templates, 1..L, as cut from the backbone (never trained: copy them)."""
        return self._segments

    def pristine(self, depth: int) -> nn.Module:
        """The template of segment ``depth`` (1..L); read-only, copy it."""
        return self._segments[depth - 1].module

    def pristine_head(self, task: str) -> nn.Module:
        """``task``'s head as the network was built with it; read-only, copy it."""
        return self._head_templates[task]

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
        """Re-arrange the segment copies for an edited tree; the engine's one slot writer.

        ``origin`` maps each node of ``tree`` to the old nodes it derives from. A node whose id
        survives (``origin[n] == (n,)``) keeps its module (and so its parameters and optimizer
        state); a node derived from one old node gets a copy of it; a node derived from several
        (a group node) is built by `init_group`, unless ``modules`` already holds one for it (a
        group node trained by distillation); a node derived from none (``()``) starts as a copy
        of its segment's pristine template. Returns the modules that are new, by node id.

        Transactional: the whole edit is validated and built before any slot changes, so a bad
        entry raises `TreeEditError` (or an unknown ``init`` `TaskSpecError`) and leaves the
        network exactly as it was.
        """
        modules = dict(modules or {})
        self._check_edit(tree, origin, modules)
        old_tree = self.tree
        created: dict[int, nn.Module] = {}
        levels: list[nn.ModuleDict] = []
        for d in range(1, tree.depth + 1):
            old_level = self.level(d)
            old_by_id = {n.id: old_level[n.name] for n in old_tree.at_depth(d)}
            level = nn.ModuleDict()
            for n in tree.at_depth(d):
                sources = tuple(origin[n.id]) if n.id in origin else ()
                if n.id in modules:
                    level[n.name] = created[n.id] = modules[n.id]
                elif sources == (n.id,):
                    level[n.name] = old_by_id[n.id]
                else:
                    level[n.name] = created[n.id] = self.new_node(d, [old_by_id[s] for s in sources], init)
            levels.append(level)
        for d, level in enumerate(levels, start=1):
            setattr(self, f"seg{d}", level)
        self.tree = tree
        self._plan = self._make_plan(tree)
        return created

    def new_node(self, depth: int, members: Sequence[nn.Module], init: GroupInit = "fresh") -> nn.Module:
        """The module of a new node at ``depth`` made from ``members``: a copy of the one member,
        a group node of several (`init_group`), or a copy of the pristine segment for none.
        It runs in the modes its first member runs in (the network's mode without one)."""
        if not members:
            return self.place(copy.deepcopy(self.pristine(depth))).train(self.training)
        module = copy.deepcopy(members[0]) if len(members) == 1 else init_group(members, init, self.pristine(depth))
        copy_modes(members[0], module)
        return module

    def _check_edit(self, tree: TaskTree, origin: Origin, modules: Mapping[int, nn.Module]) -> None:
        """Raise `TreeEditError` naming the first entry of an edit `rebuild` cannot apply."""
        if tree.depth != self.depth:
            raise TreeEditError(
                f"the new tree has depth {tree.depth} but the network has {self.depth} segments; "
                f"build the tree with depth={self.depth}."
            )
        if set(tree.tasks) != set(self.tasks):
            raise TreeEditError(
                f"the new tree's tasks {list(tree.tasks)} differ from the network's {list(self.tasks)}; "
                "an edit keeps the tasks (graphsurgeon.core.surgery.derive builds a network for other tasks)."
            )
        for d in range(1, tree.depth + 1):
            old_ids = {n.id for n in self.tree.at_depth(d)}
            for n in tree.at_depth(d):
                if n.id in modules:
                    continue
                if n.id not in origin:
                    raise TreeEditError(
                        f"origin has no entry for node {n.id} (depth {d}, tasks {list(n.tasks)}); give it the old "
                        "nodes it derives from, or () to start it from the pristine segment."
                    )
                bad = [s for s in origin[n.id] if s not in old_ids]
                if bad:
                    raise TreeEditError(
                        f"origin[{n.id}] = {tuple(origin[n.id])} names {bad}, which are not nodes at depth {d} of the "
                        f"network's tree (those are {sorted(old_ids)}); a node derives only from old nodes of its depth."
                    )

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` on the device and floating dtype of the network's parameters (templates stay
        where they were cut: ``net.to(...)`` does not move them)."""
        reference = next((p for p in self.parameters() if p.is_floating_point()), None)
        return module if reference is None else module.to(reference.device, reference.dtype)

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
        self, x: torch.Tensor, tasks: Iterable[str] | None = None, depth: int | None = None, **side_inputs: Any
    ) -> dict[int, torch.Tensor | tuple[torch.Tensor, ...]]:
        """Outputs of the nodes at ``depth`` (default: the trunk) the requested tasks need, by node id.

        ``depth=0`` returns the input itself under the root's id. A node whose segment ends at a
        multi-value boundary outputs the tuple of its values (what the next segment takes); see
        `representations` for one tensor per node. ``side_inputs``: as for `forward`.
        """
        wanted = frozenset(self._wanted(tasks))
        inputs = self._inputs(x, side_inputs)
        values: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = {self.tree.at_depth(0)[0].id: x}
        for d, level_plan in enumerate(self._plan[:depth], start=1):
            level, side = self.level(d), inputs[d - 1]
            nodes = [(name, node_id, parent) for name, node_id, parent, node_tasks in level_plan if node_tasks & wanted]
            if self._fusion is not None and len(nodes) > 1:
                values = self._fusion.run_level(d, level, nodes, values, side)
            else:
                values = {node_id: level[name](values[parent], *side) for name, node_id, parent in nodes}
        return values

    def boundary_names(self, depth: int) -> tuple[str, ...]:
        """fx names of the values the boundary after segment ``depth`` carries (the input's at 0),
        in the order they are computed; the last is the main value."""
        return self._segments[depth - 1].output_names if depth else self._segments[0].input_names

    def representations(
        self,
        x: torch.Tensor,
        depth: int,
        tasks: Iterable[str] | None = None,
        value: str | None = None,
        **side_inputs: Any,
    ) -> dict[int, torch.Tensor]:
        """One tensor per node at ``depth``: the boundary's main value (the latest computed: a
        decoder stage's output rather than the encoder skips it carries along), or the value
        named ``value`` (an fx name from `boundary_names`). What similarity measures (MTSL's
        CKA) compare: a boundary of several values is not one representation. ``side_inputs``:
        as for `forward`."""
        names = self.boundary_names(depth)
        if value is None:
            k = len(names) - 1
        elif value in names:
            k = names.index(value)
        else:
            raise TaskSpecError(
                f"value={value!r} is not carried by the boundary after segment {depth}; it carries {list(names)}. "
                "Pass one of those (or value=None for the last, the main value)."
            )
        values = self.features(x, tasks, depth, **side_inputs)
        return {i: v[k] if isinstance(v, tuple) else v for i, v in values.items()}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None, **side_inputs: Any) -> dict[str, torch.Tensor]:
        """``{task: output}`` for every task, or only ``tasks`` (computing only their paths).

        ``side_inputs``: the backbone's other inputs by name (``attention_mask=mask``; see
        `side_inputs`), each passed unchanged to the segments that read it.
        """
        wanted = self._wanted(tasks)
        leaves = self.features(x, wanted, **side_inputs)
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

    def outputs_from(
        self, depth: int, value: torch.Tensor | tuple[torch.Tensor, ...], tasks: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """Each task's output when ``value`` stands for its node's output at ``depth``: the rest of
        its path below ``depth``, then its head. A module not yet in the tree (a group node being
        distilled) can so be trained through the nodes it will feed."""
        out = {}
        for t in self._wanted(tasks):
            z = value
            for node in self.tree.path(t)[depth + 1 :]:
                z = self.node_module(node)(z)
            out[t] = self.heads[t](z)
        return out

    def extra_repr(self) -> str:
        return f"trunk={self.trunk_name!r}, tasks={list(self.tasks)}, segments={self.depth}"
