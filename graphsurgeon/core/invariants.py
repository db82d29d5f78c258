"""`check(net)`: the engine's invariants, each violation reported with its place; and the two
costs of a network every report quotes, `count_parameters` and `count_flops`.

Property tests drive random trees, edits and models through this one function, so every
invariant the engine promises is written down here exactly once.
"""
from __future__ import annotations

import torch
from torch import nn

from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.core.segments import fingerprint
from graphsurgeon.errors import InvariantError

__all__ = ["check", "count_flops", "count_parameters"]


def count_parameters(net: MultiTaskNetwork) -> int:
    """Σ over segment copies and heads of their parameter counts (shared tensors counted twice)."""
    total = 0
    for d in range(1, net.depth + 1):
        for module in net.level(d).values():
            total += sum(p.numel() for p in module.parameters())
    return total + sum(p.numel() for head in net.heads.values() for p in head.parameters())


def count_flops(net: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs for one sample (torch's flop counter); a node shared by several tasks runs,
    and so counts, once."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with eval_mode(net), counter, torch.no_grad():
        net(example[:1])
    return int(counter.get_total_flops())


def check(net: MultiTaskNetwork) -> None:
    """Raise `InvariantError` if the network and its tree disagree anywhere.

    Checks: the tree's own invariants; exactly one segment copy per tree node, at its depth;
    every copy runs the code of its segment; no parameter is held by two copies (so the
    network's parameter count equals the sum over copies plus heads); one head per task.
    """
    tree = net.tree
    tree.check()
    expected_children = {f"seg{d}" for d in range(1, tree.depth + 1)} | {"heads"}
    children = {name for name, _ in net.named_children()}
    extra = sorted(children - expected_children)
    missing = sorted(expected_children - children)
    if extra or missing:
        raise InvariantError(f"network modules {extra} are not in the tree / tree levels {missing} have no modules")
    for d in range(1, tree.depth + 1):
        level = net.level(d)
        want = {n.name for n in tree.at_depth(d)}
        have = set(level.keys())
        if want != have:
            raise InvariantError(
                f"depth {d}: tree nodes {sorted(want - have)} have no segment copy, copies {sorted(have - want)} no node"
            )
        for name, module in level.items():
            if fingerprint(module) != net.fingerprints[d - 1]:
                raise InvariantError(f"seg{d}.{name} does not run segment {d}'s code")
    if set(net.heads.keys()) != set(tree.tasks):
        raise InvariantError(f"heads {sorted(net.heads.keys())} differ from tasks {sorted(tree.tasks)}")
    seen: dict[int, str] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        if id(p) in seen and not name.startswith("heads."):
            raise InvariantError(f"parameter {name} is the same tensor as {seen[id(p)]}: copies must own their weights")
        seen.setdefault(id(p), name)
    unique = sum(p.numel() for p in net.parameters())
    if unique != count_parameters(net):
        raise InvariantError(f"parameter count {unique} != Σ segment copies + heads {count_parameters(net)}")
