"""Surgery: the only place where a network's structure changes, and the optimizer's view with it.

Methods, checkpoints and the trainer decide *what* to edit; these primitives perform every
edit, so none of them writes a network's module slots, fabricates segments or rewrites an
optimizer's param groups by hand:

- `relayout` re-arranges a network for a new tree whose nodes come from existing nodes (or
  from the pristine segment templates) by origin; `fuse` and `split` are relayouts.
- `derive` builds a new network for other tasks (DMTG's search network and its pruning) from an
  existing network's nodes.
- `reinitialise` starts nodes and heads over, from the pristine templates or at random.
- `carry_optimizer` points an optimizer at new parameters and carries its state over.

Optimizer state follows parameter *identity*: a surviving parameter keeps its very state; a new
parameter is paired, when its module is created, with the parameters of the same relative name
in the modules it is created from (never by parsing the network's ``seg{d}.n{id}`` names), and
takes their mean state (as the MTSL code averages the removed members' Adam moments), so
training resumes without a cold optimizer.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from graphsurgeon.core.modes import copy_modes
from graphsurgeon.core.network import GroupInit, MultiTaskNetwork, Task, init_group
from graphsurgeon.core.network import reinitialise as reinitialise_module
from graphsurgeon.core.tree import Origin, TaskTree
from graphsurgeon.errors import TreeEditError

__all__ = [
    "ParamSources",
    "carry_optimizer",
    "compose_origins",
    "derive",
    "fuse",
    "pair_parameters",
    "reinitialise",
    "relayout",
    "split",
]

# distill(net, depth, parent_id, members, group) trains ``group`` to stand in for ``members``
Distill = Callable[[MultiTaskNetwork, int, int, Sequence[nn.Module], nn.Module], object]
# each new parameter -> the parameters it was made from (keys hash by identity, as optimizer.state)
ParamSources = dict[nn.Parameter, tuple[nn.Parameter, ...]]


def compose_origins(first: Origin, second: Origin) -> Origin:
    """Origin of two successive edits: each final node → the nodes it derives from before both."""
    return {new: tuple(dict.fromkeys(o for mid in mids for o in first.get(mid, (mid,)))) for new, mids in second.items()}


def pair_parameters(module: nn.Module, sources: Sequence[nn.Module]) -> ParamSources:
    """Each parameter of ``module`` (made from ``sources``) → the sources' parameters of the same
    relative name; a parameter of itself (a module that *is* one of its sources) is left out."""
    named = [dict(m.named_parameters()) for m in sources]
    pairs: ParamSources = {}
    for name, p in module.named_parameters():
        found = tuple(n[name] for n in named if name in n and n[name] is not p)
        if found:
            pairs[p] = found
    return pairs


def _merged_state(states: Sequence[dict]) -> dict:
    """The mean of the state tensors (a copy even for one source: a copy must not share its
    origin's moments); scalars such as Adam's ``step``: the maximum."""
    merged = {}
    for key, value in states[0].items():
        vals = [s[key] for s in states]
        if torch.is_tensor(value) and value.dim() > 0:
            merged[key] = torch.stack(vals).mean(0).clone()
        elif torch.is_tensor(value):
            merged[key] = torch.stack(vals).max().clone()
        else:
            merged[key] = max(vals)
    return merged


def carry_optimizer(
    optimizer: torch.optim.Optimizer,
    old: Iterable[nn.Parameter],
    new: Iterable[nn.Parameter],
    sources: Mapping[nn.Parameter, Sequence[nn.Parameter]] | None = None,
) -> None:
    """Point ``optimizer`` at the parameters ``new`` instead of ``old`` and carry its state over.

    A parameter in both keeps its state (the same tensors) and param group. A parameter only in
    ``new`` takes the merged state of its ``sources`` (`pair_parameters`) and joins its first
    source's group (group 0 without one). Parameters of ``old`` not in ``new`` leave the
    optimizer; those it holds beyond ``old`` (a method's own, e.g. loss weights) stay. Within a
    group the order is ``new``'s, then the others', as a freshly built optimizer would list them.
    """
    sources = sources or {}
    old_ids = {id(p) for p in old}
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    state = optimizer.state
    carried: dict = {}
    groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    placed: set[int] = set()
    for p in new:
        if id(p) in placed:
            continue
        placed.add(id(p))
        if id(p) in group_of:
            groups[group_of[id(p)]].append(p)
            if p in state:
                carried[p] = state[p]
            continue
        srcs = tuple(sources.get(p, ()))
        groups[next((group_of[id(s)] for s in srcs if id(s) in group_of), 0)].append(p)
        states = [state[s] for s in srcs if s in state]
        if states:
            carried[p] = _merged_state(states)
    for i, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) not in old_ids and id(p) not in placed:
                groups[i].append(p)
                if p in state:
                    carried[p] = state[p]
    for g, params in zip(optimizer.param_groups, groups):
        g["params"] = params
    state.clear()
    state.update(carried)


def relayout(
    net: MultiTaskNetwork,
    tree: TaskTree,
    origin: Origin,
    *,
    init: GroupInit = "fresh",
    modules: Mapping[int, nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[int, nn.Module]:
    """Lay ``net`` out as ``tree``; each node comes from the old nodes ``origin`` names.

    ``origin[n] == (n,)`` keeps node ``n``'s module; one old node: a copy of it; several: a group
    node (``init``, or ``modules[n]`` when given); ``()``: a copy of the pristine segment (a
    checkpoint's layout, whose weights are loaded next). New modules run in the modes their
    first origin ran in (a user-frozen BatchNorm stays frozen; pristine ones in the network's
    mode; `MultiTaskNetwork.new_node`). With ``optimizer``, its state is carried by parameter identity (`carry_optimizer`).
    Returns the new modules by node id; a bad origin raises `TreeEditError` and changes nothing.
    """
    old_params = list(net.parameters())
    device = old_params[0].device if old_params else None
    old_modules = {n.id: net.node_module(n) for n in net.tree.nodes if n.depth}
    created = net.rebuild(tree, origin, init=init, modules=modules)
    sources: ParamSources = {}
    for node_id, module in created.items():
        if device is not None:
            module.to(device)
        members = [old_modules[s] for s in origin.get(node_id, ())]
        if modules and node_id in modules:  # built by the caller (a distilled group node)
            if members:
                copy_modes(members[0], module)
            else:
                module.train(net.training)
        sources.update(pair_parameters(module, members))
    if optimizer is not None:
        carry_optimizer(optimizer, old_params, net.parameters(), sources)
    return created


def derive(
    net: MultiTaskNetwork,
    tree: TaskTree,
    origin: Origin,
    tasks: Mapping[str, Task],
    *,
    init: GroupInit = "fresh",
) -> tuple[MultiTaskNetwork, ParamSources]:
    """A new network on ``net``'s backbone for ``tree``'s tasks, its nodes made from ``net``'s.

    ``origin`` maps each node of ``tree`` to nodes of ``net`` at the same depth (as `relayout`,
    except that every node is new: one source is copied, several make a group node by
    ``init``, none copies the pristine segment). Each task's head is a copy of
    ``tasks[t].head``. The new network shares nothing with ``net`` but its (read-only)
    templates, and runs in ``net``'s mode. Returns it and the pairing of its parameters with
    the ones they were made from, for `carry_optimizer` (or ``Trainer.set_network(..., sources=)``).
    """
    if tree.depth != net.depth:
        raise TreeEditError(
            f"the derived tree has depth {tree.depth} but the network has {net.depth} segments; "
            f"build it with depth={net.depth}."
        )
    modules: dict[int, nn.Module] = {}
    sources: ParamSources = {}
    for d in range(1, tree.depth + 1):
        old = {n.id: net.node_module(n) for n in net.tree.at_depth(d)}
        for n in tree.at_depth(d):
            ids = tuple(origin.get(n.id, ()))
            bad = [s for s in ids if s not in old]
            if bad:
                raise TreeEditError(
                    f"origin[{n.id}] = {ids} names {bad}, which are not nodes at depth {d} of the source network "
                    f"(those are {sorted(old)}); a node derives only from nodes of its depth."
                )
            members = [old[s] for s in ids]
            modules[n.id] = net.new_node(d, members, init)
            sources.update(pair_parameters(modules[n.id], members))
    specs = {}
    for t, spec in tasks.items():
        head = copy.deepcopy(spec.head)
        sources.update(pair_parameters(head, [spec.head]))
        specs[t] = Task(head=head, loss=spec.loss, metrics=spec.metrics)
    derived = MultiTaskNetwork(
        net.segments, tree, specs, trunk_name=net.trunk_name, config=net.config, modules=modules
    )
    derived.training = net.training
    return derived, sources


def reinitialise(
    net: MultiTaskNetwork,
    node_ids: Iterable[int] | None = None,
    *,
    heads: bool | Iterable[str] = False,
    from_: Literal["pristine", "random"] = "pristine",
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Start nodes (default: every node) and heads (``True``: every task's) over, in place.

    ``pristine`` reloads the weights and buffers the network was built with (the backbone's,
    e.g. pretrained, and the heads as given: what "from scratch" means for a pretrained
    backbone); ``random`` re-initialises (`graphsurgeon.core.network.reinitialise`, in module
    order, so a seeded call draws the same weights on every rank). Parameters keep their
    identity, so an optimizer still holds them; with ``optimizer``, their state is dropped (its
    moments belong to the weights just discarded).
    """
    ids = [n.id for n in net.tree.nodes if n.depth] if node_ids is None else list(node_ids)
    unknown = sorted(set(ids) - {n.id for n in net.tree.nodes if n.depth})
    if unknown:
        raise TreeEditError(
            f"reinitialise: nodes {unknown} are not segment nodes of the tree; pass ids from net.tree.nodes (depth >= 1)."
        )
    head_tasks = list(net.tasks) if heads is True else [] if heads is False else list(heads)
    unknown_tasks = sorted(set(head_tasks) - set(net.tasks))
    if unknown_tasks:
        raise TreeEditError(f"reinitialise: tasks {unknown_tasks} are not the network's {list(net.tasks)}.")
    targets: list[tuple[nn.Module, nn.Module]] = [(net.node_module(i), net.pristine(net.tree.node(i).depth)) for i in ids]
    targets += [(net.heads[t], net.pristine_head(t)) for t in head_tasks]
    if from_ == "random":
        reinitialise_module(nn.ModuleList([m for m, _ in targets]))
    elif from_ == "pristine":
        for module, template in targets:
            module.load_state_dict(template.state_dict())
    else:
        raise TreeEditError(f"reinitialise: from_={from_!r}; use 'pristine' or 'random'.")
    if optimizer is not None:
        for module, _ in targets:
            for p in module.parameters():
                optimizer.state.pop(p, None)


def fuse(
    net: MultiTaskNetwork,
    depth: int,
    groups: Sequence[Sequence[int]],
    *,
    init: GroupInit = "fresh",
    distill: Distill | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Origin:
    """Merge each group of sibling nodes at ``depth`` into one group node.

    The group node is built from its members (`init`), optionally trained to reproduce
    every member's output (``distill``) while the members still exist, then the members are
    removed and their children re-parented under it. Returns the composed origin map.
    """
    tree = net.tree
    origin: Origin = {n.id: (n.id,) for n in net.tree.nodes}
    for group in groups:
        tree, step = tree.merge(depth, group)
        origin = compose_origins(origin, step)
    prepared: dict[int, nn.Module] = {}
    for node in tree.at_depth(depth):
        members = origin[node.id]
        if len(members) > 1:
            member_modules = [net.node_module(m) for m in members]
            prepared[node.id] = init_group(member_modules, init, net.pristine(depth))
            if distill is not None:
                assert node.parent is not None  # every node below the root has a parent
                distill(net, depth, node.parent, member_modules, prepared[node.id])
    relayout(net, tree, origin, init=init, modules=prepared, optimizer=optimizer)
    return origin


def split(
    net: MultiTaskNetwork,
    node_id: int,
    groups: Sequence[Sequence[str]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> Origin:
    """Give each group of a node's tasks its own copy of the node and of everything below it."""
    tree, origin = net.tree.split(node_id, groups)
    relayout(net, tree, origin, init="copy", optimizer=optimizer)
    return origin
