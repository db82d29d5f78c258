"""Surgery: the only place where a network's structure changes while it trains.

`fuse` merges groups of sibling nodes into group nodes; `split` gives a node's tasks separate
copies. Both edit the tree, re-arrange the network (`MultiTaskNetwork.rebuild`) and carry the
optimizer along: surviving parameters keep their state, new copies inherit their origin's
state, and a group node's state is the average of its members' (as the MTSL code averages
the removed members' Adam moments), so training resumes without a cold optimizer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from graphsurgeon.core.network import GroupInit, MultiTaskNetwork, init_group
from graphsurgeon.core.tree import Origin, TaskTree

__all__ = ["compose_origins", "fuse", "split", "transfer_optimizer_state"]

# distill(net, depth, parent_id, members, group) trains ``group`` to stand in for ``members``
Distill = Callable[[MultiTaskNetwork, int, int, Sequence[nn.Module], nn.Module], object]


def compose_origins(first: Origin, second: Origin) -> Origin:
    """Origin of two successive edits: each final node → the nodes it derives from before both."""
    return {new: tuple(dict.fromkeys(o for mid in mids for o in first.get(mid, (mid,)))) for new, mids in second.items()}


def _param_sources(name: str, origin: Origin) -> list[str]:
    """Names the parameter ``seg{d}.n{id}.rest`` had before an edit with ``origin``."""
    level, node, rest = name.split(".", 2)
    if not level.startswith("seg") or not node.startswith("n"):
        return [name]
    return [f"{level}.n{src}.{rest}" for src in origin.get(int(node[1:]), (int(node[1:]),))]


def transfer_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old_named: Mapping[str, nn.Parameter],
    net: MultiTaskNetwork,
    origin: Origin,
) -> None:
    """Point ``optimizer`` at ``net``'s current parameters and carry their state over.

    Parameters that survived keep their state and param group. A new parameter takes the
    mean of its sources' state tensors (scalars such as Adam's ``step``: the maximum) and
    joins its first source's param group.
    """
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    old_state = optimizer.state
    new_state: dict = {}
    groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for name, p in net.named_parameters():
        if id(p) in group_of:
            groups[group_of[id(p)]].append(p)
            if p in old_state:
                new_state[p] = old_state[p]
            continue
        sources = [old_named[s] for s in _param_sources(name, origin) if s in old_named]
        groups[group_of.get(id(sources[0]), 0) if sources else 0].append(p)
        states = [old_state[s] for s in sources if s in old_state]
        if states:
            merged = {}
            for key, value in states[0].items():
                vals = [s[key] for s in states]
                if torch.is_tensor(value) and value.dim() > 0:
                    merged[key] = torch.stack(vals).mean(0).clone()
                elif torch.is_tensor(value):
                    merged[key] = torch.stack(vals).max().clone()
                else:
                    merged[key] = max(vals)
            new_state[p] = merged
    # parameters the optimizer holds beyond the network's (a method's own, e.g. loss weights)
    net_ids = {id(p) for p in old_named.values()}
    for i, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) not in net_ids:
                groups[i].append(p)
                if p in old_state:
                    new_state[p] = old_state[p]
    for g, params in zip(optimizer.param_groups, groups):
        g["params"] = params
    optimizer.state.clear()
    optimizer.state.update(new_state)


def _apply(
    net: MultiTaskNetwork,
    tree: TaskTree,
    origin: Origin,
    init: GroupInit,
    modules: Mapping[int, nn.Module] | None,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    old_named = dict(net.named_parameters())
    device = next(iter(old_named.values())).device if old_named else None
    created = net.rebuild(tree, origin, init=init, modules=modules)
    if device is not None:
        for m in created.values():
            m.to(device)
    net.train(net.training)
    if optimizer is not None:
        transfer_optimizer_state(optimizer, old_named, net, origin)


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
    tree, origin = net.tree, {n.id: (n.id,) for n in net.tree.nodes}
    for group in groups:
        tree, step = tree.merge(depth, group)
        origin = compose_origins(origin, step)
    level = net.level(depth)
    prepared: dict[int, nn.Module] = {}
    for node in tree.at_depth(depth):
        members = origin[node.id]
        if len(members) > 1:
            member_modules = [level[f"n{m}"] for m in members]
            group = init_group(member_modules, init)
            if distill is not None:
                distill(net, depth, node.parent, member_modules, group)
            prepared[node.id] = group
    _apply(net, tree, origin, init, prepared, optimizer)
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
    _apply(net, tree, origin, "copy", None, optimizer)
    return origin
