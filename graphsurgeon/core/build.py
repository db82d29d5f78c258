"""`multitask`: from a backbone and task heads to a `MultiTaskNetwork` in one call."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from graphsurgeon.core.inputs import Inputs, split_inputs
from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork, Task
from graphsurgeon.core.segments import MAX_BOUNDARY_VALUES, Granularity, Segment, graph_inputs, segment
from graphsurgeon.core.trace import CAPTURE, LeafSpec, qualified_name, trace
from graphsurgeon.core.tree import TaskTree
from graphsurgeon.errors import TaskSpecError, TreeEditError

__all__ = ["multitask", "normalise_tasks"]

# a head factory receives the trunk output's per-sample shape, e.g. (512,) or (64, 5, 5)
HeadFactory = Callable[[tuple[int, ...]], nn.Module]
TaskSpec = nn.Module | Task | HeadFactory
Sharing = Literal["separate", "shared"] | TaskTree


def _task_pairs(tasks: Mapping[str, TaskSpec] | Sequence[tuple[str, TaskSpec]]) -> list[tuple[str, TaskSpec]]:
    """Validated ``(name, spec)`` pairs: names non-empty and unique, specs of a known kind."""
    if isinstance(tasks, Mapping):
        pairs = list(tasks.items())
    else:
        try:
            pairs = [(name, spec) for name, spec in tasks]
        except (TypeError, ValueError) as exc:
            raise TaskSpecError(
                "tasks must be a mapping {name: head module or Task} or a list of (name, head) pairs."
            ) from exc
    if not pairs:
        raise TaskSpecError("no tasks given. Pass at least one, e.g. tasks={'digit': nn.Linear(512, 10)}.")
    TaskTree._check_tasks(name for name, _ in pairs)
    for name, spec in pairs:
        head = spec.head if isinstance(spec, Task) else spec
        if not (isinstance(head, nn.Module) or callable(head)):
            raise TaskSpecError(
                f"task {name!r} is given as {type(spec).__name__}; pass an nn.Module head, a head factory "
                "f(trunk_shape) -> nn.Module, or graphsurgeon.Task(head=...)."
            )
    return pairs


def normalise_tasks(
    tasks: Mapping[str, TaskSpec] | Sequence[tuple[str, TaskSpec]], trunk_shape: tuple[int, ...] | None = None
) -> dict[str, Task]:
    """Turn ``{name: head}``, ``{name: Task}`` or ``[(name, head), ...]`` into ``{name: Task}``.

    Head factories are called with ``trunk_shape`` (which needs an example input).
    """
    out = {}
    seen: dict[int, str] = {}
    for name, spec in _task_pairs(tasks):
        head = spec.head if isinstance(spec, Task) else spec
        if isinstance(head, nn.Module):
            if id(head) in seen:
                raise TaskSpecError(
                    f"tasks {seen[id(head)]!r} and {name!r} are given the same head module; every task owns its "
                    "head. Pass copy.deepcopy(head) for one of them."
                )
            seen[id(head)] = name
        task = spec if isinstance(spec, Task) else Task(head=spec)
        if not isinstance(task.head, nn.Module):
            task = dataclasses.replace(task, head=_call_factory(name, task.head, trunk_shape))
        out[name] = task
    return out


def _call_factory(name: str, factory: HeadFactory, trunk_shape: tuple[int, ...] | None) -> nn.Module:
    if trunk_shape is None:
        raise TaskSpecError(
            f"task {name!r} has a head factory, which needs the trunk's output shape: pass example_input=<a batch>."
        )
    head = factory(trunk_shape)
    if not isinstance(head, nn.Module):
        raise TaskSpecError(f"the head factory of task {name!r} returned {type(head).__name__}, not an nn.Module.")
    return head


@torch.no_grad()
def _trunk_shape(segments: Sequence[Segment], inputs: Mapping[str, Any], main: str) -> tuple[int, ...]:
    """Per-sample shape of the trunk output, without touching BatchNorm statistics."""
    z = inputs[main]
    with eval_mode(*(s.module for s in segments)):
        for s in segments:
            z = s.module(z, *(inputs[n] for n in s.side_inputs))
    return tuple(z.shape[1:])


def multitask(
    model: nn.Module,
    tasks: Mapping[str, TaskSpec] | Sequence[tuple[str, TaskSpec]],
    *,
    trunk: str | None = None,
    sharing: Sharing = "separate",
    granularity: Granularity = "block",
    example_input: Inputs | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
    capture: Literal["fx", "export", "auto"] = "fx",
    side_inputs: Iterable[str] = (),
    max_boundary_values: int = MAX_BOUNDARY_VALUES,
) -> MultiTaskNetwork:
    """Turn ``model`` into a multi-task network with one head per task.

    Args:
        model: any torch.fx-traceable backbone (every torchvision classifier is).
        tasks: ``{name: head}`` or ``{name: graphsurgeon.Task(head, loss, metrics)}``; a head may
            also be a factory ``f(trunk_shape) -> nn.Module`` (needs ``example_input``).
        trunk: where the shared backbone ends: a qualified node name from
            `graphsurgeon.get_graph_node_names` (``"layer4.1.relu_1"``), a module path
            (``"layer4"``: its output), a field of a Hugging Face model's output
            (``"pooler_output"``, ``"last_hidden_state"``) or an fx node name; default: the final
            classifier's input, or the model's output when its classifier was replaced by
            ``nn.Identity``; for a Hugging Face model, ``pooler_output`` if it has one, else
            ``last_hidden_state``.
        sharing: ``"separate"`` (a copy of every segment per task: MTSL's start), ``"shared"``
            (hard sharing), or a `TaskTree` of depth ``len(segments)``.
        granularity: ``"block"`` or ``"fine"`` segments (see `graphsurgeon.segment`).
        example_input: one input batch; when given, cut points are checked to carry tensors and
            every head is run once, so a head that does not fit fails here, not in training. For
            a backbone with side inputs, a mapping of its inputs by forward argument name
            (``{"input_ids": ids, "attention_mask": mask}``).
        leaf_modules, concrete_args: passed to `graphsurgeon.core.trace`.
        side_inputs: forward arguments with a default that are inputs besides the main one
            (``["attention_mask"]``; arguments without a default always are): the network
            takes them by name, ``net(ids, attention_mask=mask)``, and passes them unchanged to
            every segment that reads them (see `graphsurgeon.core.inputs`).
        capture: how the backbone becomes a graph: ``"fx"`` (``symbolic_trace``), ``"export"``
            (``torch.export``, for shape-dependent control flow or code fx cannot proxy; needs
            ``example_input``) or ``"auto"`` (fx, else export); see `graphsurgeon.core.capture`.
        max_boundary_values: the most tensors one segment boundary may carry (an encoder-decoder's
            skips plus its decoder feature); see `graphsurgeon.segment`.
    """
    _task_pairs(tasks)  # fail on bad names or specs before the (slower) trace
    gm = trace(
        model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        capture=capture,
        example_input=example_input,
        side_inputs=side_inputs,
    )
    segments = segment(gm, trunk, granularity, example_input=example_input, max_boundary_values=max_boundary_values)
    main = next(str(n.target) for n in gm.graph.nodes if n.name == segments[0].input_name)
    read = tuple(dict.fromkeys(n for s in segments for n in s.side_inputs if n != main))
    inputs: dict[str, Any] = {}
    if example_input is not None:
        others = [str(n.target) for n in graph_inputs(gm) if str(n.target) != main]
        x, side = split_inputs(example_input, main, others, "example_input")
        inputs = {**side, main: x}
    shape = _trunk_shape(segments, inputs, main) if example_input is not None else None
    specs = normalise_tasks(tasks, trunk_shape=shape)
    names = list(specs)
    if isinstance(sharing, TaskTree):
        tree = sharing
        tree.check()
        if tree.depth != len(segments) or set(tree.tasks) != set(names):
            raise TreeEditError(
                f"the given TaskTree has depth {tree.depth} and tasks {list(tree.tasks)}, but the backbone has "
                f"{len(segments)} segments and the tasks are {names}. Build it for exactly those."
            )
    elif sharing == "separate":
        tree = TaskTree.separate(names, len(segments))
    elif sharing == "shared":
        tree = TaskTree.shared(names, len(segments))
    else:
        raise TaskSpecError(f"sharing must be 'separate', 'shared' or a TaskTree, got {sharing!r}.")
    # the trunk by its qualified name: unique, and the name a user passes (fx names still load)
    trunk_name = next(qualified_name(n) for n in gm.graph.nodes if n.name == segments[-1].output_name)
    config = {
        "trunk": trunk_name,
        "granularity": granularity,
        "backbone": type(model).__name__,
        "max_boundary_values": max_boundary_values,
        "input": main,
        "side_inputs": list(read),
        "capture": gm.meta.get(CAPTURE, "fx"),  # the path taken, also under capture="auto"
    }
    if config["capture"] == "export":  # what gs.load needs to capture the backbone again
        config["example_input"] = {"shape": list(inputs[main].shape), "dtype": str(inputs[main].dtype).removeprefix("torch.")}
    net = MultiTaskNetwork(segments, tree, specs, trunk_name=trunk_name, config=config)
    # the network runs in the model's mode; a head already in that mode keeps the submodules the
    # user put in eval (a frozen BatchNorm)
    frozen = [m for h in net.heads.values() if h.training == model.training for m in h.modules() if not m.training]
    net.train(model.training)
    for m in frozen:
        m.eval()
    if example_input is not None:  # every head runs once, so a head that does not fit fails here
        with eval_mode(net), torch.no_grad():
            net(inputs[main], **{n: inputs[n] for n in read})
    return net
