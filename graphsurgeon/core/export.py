"""Materialising a multi-task network as one flat fx graph, and exporting that graph.

`materialize` inlines each tree node's segment once, names every node after the tree node
that owns it (``seg3_n7_conv1``), and returns ``{task: output}``. The result is an ordinary
``fx.GraphModule`` that shares parameters with the network, so TorchScript and
``torch.export`` see plain code with no tree logic in it.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx

from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.errors import GraphSurgeonError

__all__ = ["ExportError", "materialise", "materialize", "to_export", "to_torchscript"]


class ExportError(GraphSurgeonError):
    """A materialised network cannot be exported in the requested format."""


def materialize(net: MultiTaskNetwork) -> fx.GraphModule:
    """One fx graph computing ``net(x)``: every segment copy inlined once, heads as module calls."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    values = {net.tree.at_depth(0)[0].id: x}
    for depth in range(1, net.depth + 1):
        level = net.level(depth)
        produced = {}
        for node in net.tree.at_depth(depth):
            prefix = f"seg{depth}.{node.name}"
            seg = level[node.name]
            env: dict[fx.Node, fx.Node] = {}
            out = None
            for n in seg.graph.nodes:
                if n.op == "placeholder":
                    env[n] = values[node.parent]
                elif n.op == "output":
                    out = fx.node.map_arg(n.args[0], env.__getitem__)
                else:
                    target = f"{prefix}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
                    new = graph.create_node(
                        n.op,
                        target,
                        fx.node.map_arg(n.args, env.__getitem__),
                        fx.node.map_arg(n.kwargs, env.__getitem__),
                        name=f"{prefix.replace('.', '_')}_{n.name}",
                    )
                    new.meta = dict(n.meta)
                    env[n] = new
            produced[node.id] = out
        values = produced
    leaf_of = {t: n.id for n in net.tree.at_depth(net.depth) for t in n.tasks}
    outputs = {}
    for task in net.tasks:
        outputs[task] = graph.call_module(f"heads.{task}", (values[leaf_of[task]],))
    graph.output(outputs)
    graph.lint()
    gm = fx.GraphModule(net, graph, class_name="MaterialisedMultiTask")
    gm.train(net.training)
    return gm


materialise = materialize  # the spelling of earlier releases


def to_torchscript(
    net: MultiTaskNetwork, example_input: torch.Tensor | None = None, method: str = "auto"
) -> torch.jit.ScriptModule:
    """TorchScript of the materialised graph; returns ``Dict[str, Tensor]``.

    ``method="script"`` compiles the graph's code; ``"trace"`` records it on ``example_input``;
    ``"auto"`` scripts and falls back to tracing (with a warning) when a backbone op is not
    scriptable. TorchScript is deprecated upstream; prefer `to_export`.
    """
    gm = materialise(net)
    if method not in ("auto", "script", "trace"):
        raise ExportError(f"method must be 'auto', 'script' or 'trace', got {method!r}.")
    if method in ("auto", "script"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; users asked for it
                return torch.jit.script(gm)
        except Exception as exc:  # TorchScript raises its own frontend error types
            if method == "script" or example_input is None:
                raise ExportError(
                    f"torch.jit.script failed on the materialised graph: {str(exc).splitlines()[0]}. "
                    "Pass example_input=... to fall back to tracing, or use to_export()."
                ) from exc
            warnings.warn(f"torch.jit.script failed ({str(exc).splitlines()[0]}); tracing instead.", stacklevel=2)
    if example_input is None:
        raise ExportError("tracing needs example_input=<a batch>. Pass one.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(gm, (example_input,), strict=False)


def to_export(
    net: MultiTaskNetwork, example_input: torch.Tensor, *, dynamic_batch: bool = False, **kwargs: Any
) -> torch.export.ExportedProgram:
    """``torch.export`` of the materialised graph (the current PyTorch deployment format)."""
    gm = materialise(net)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=2)},)
    try:
        return torch.export.export(gm, (example_input,), dynamic_shapes=dynamic_shapes, **kwargs)
    except Exception as exc:
        raise ExportError(
            f"torch.export failed on the materialised graph: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Check that the backbone exports on its own (torch.export.export(model, (x,)))."
        ) from exc
