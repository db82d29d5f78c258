"""Mode flags passed as arguments in a model's own ``forward``, made to follow the mode at run time.

A model's own ``forward`` may call a function with its mode as an argument:
``F.dropout(x, p, training=self.training)`` in timm's GhostNet head. fx records the flag's value,
so the graph traced in one mode would run that mode's call in both, and the call is not inside
a submodule that could become a leaf module (the fix for a submodule that reads its mode). When
the train-mode and eval-mode graphs differ at a top-level call only in arguments that are
``True`` in one and ``False`` in the other, those arguments are replaced, in both graphs, by a
read of the graph module's own ``training`` flag (a ``get_attr`` of ``training``). Both graphs
are then the same, and the flag is read when the code runs: a segment, a tree node's copy of it
and the materialised network all follow ``.train()`` / ``.eval()`` as the root module did, and
the call stays a plain function call (TorchScript and ``torch.export`` see
``F.dropout(x, 0.2, training=self.training)``).
"""
from __future__ import annotations

from typing import Any

from torch import fx

__all__ = ["MODE_FLAG", "follow_mode"]

MODE_FLAG = "training"  # the get_attr target that reads the running module's mode


def _mode_slots(train: fx.Node, eval_: fx.Node) -> tuple[list[int], list[str]] | None:
    """The positional indices and keyword names where ``train`` passes ``True`` and ``eval_``
    ``False``, all other arguments being equal; ``None`` when the calls differ otherwise or not at all."""
    if (train.op, train.target, len(train.args), set(train.kwargs)) != (eval_.op, eval_.target, len(eval_.args), set(eval_.kwargs)):
        return None

    def flag(a: Any, b: Any) -> bool:
        return a is True and b is False

    def same(a: Any, b: Any) -> bool:  # a node's repr is its name: both graphs were traced alike
        return type(a) is type(b) and repr(a) == repr(b)

    positions = [i for i, (a, b) in enumerate(zip(train.args, eval_.args)) if flag(a, b)]
    keys = [k for k in train.kwargs if flag(train.kwargs[k], eval_.kwargs[k])]
    rest_equal = all(same(a, b) for i, (a, b) in enumerate(zip(train.args, eval_.args)) if i not in positions) and all(
        same(train.kwargs[k], eval_.kwargs[k]) for k in train.kwargs if k not in keys
    )
    return (positions, keys) if (positions or keys) and rest_equal else None


def _read_mode(gm: fx.GraphModule, node: fx.Node, positions: list[int], keys: list[str]) -> None:
    with gm.graph.inserting_before(node):
        mode = gm.graph.create_node("get_attr", MODE_FLAG)  # graph.get_attr warns on a non-tensor
    node.args = tuple(mode if i in positions else a for i, a in enumerate(node.args))
    node.kwargs = {k: mode if k in keys else v for k, v in node.kwargs.items()}


def follow_mode(graphs: dict[bool, fx.GraphModule]) -> None:
    """Make the top-level calls of ``graphs`` (the train-mode graph under ``True``, the eval-mode
    one under ``False``) whose only difference is their mode flag read the flag at run time
    (see the module docstring). Graphs that differ in their nodes are left as they are: their
    difference is a branch, which `graphsurgeon.segment` reports."""
    train, eval_ = list(graphs[True].graph.nodes), list(graphs[False].graph.nodes)
    if len(train) != len(eval_):
        return
    for a, b in zip(train, eval_):
        if a.op != "call_function" or a.meta.get("nn_module_stack"):  # a submodule's call: a leaf's business
            continue
        slots = _mode_slots(a, b)
        if slots is not None:
            _read_mode(graphs[True], a, *slots)
            _read_mode(graphs[False], b, *slots)
    for gm in graphs.values():
        gm.recompile()
