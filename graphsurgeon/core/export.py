"""Materialising a multi-task network as one flat fx graph, and exporting that graph.

`materialize` inlines each tree node's segment once, names every node after the tree node
that owns it (``seg3_n7_conv1``), and returns ``{task: output}``; a multi-value boundary is
wired value by value (no tuple is built between segments). The result is an ordinary
``fx.GraphModule`` that shares parameters with the network, so TorchScript and
``torch.export`` see plain code with no tree logic in it. A backbone's side inputs
(`MultiTaskNetwork.side_inputs`) are inputs of the graph after ``x``, in that order, and of
every exported format; an example batch is then a mapping by name, as for `graphsurgeon.multitask`.
"""
from __future__ import annotations

import operator
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from graphsurgeon.core.inputs import Inputs, split_inputs
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.optional import require

__all__ = ["ExportError", "materialise", "materialize", "to_export", "to_onnx", "to_torchscript"]


class ExportError(GraphSurgeonError):
    """A materialised network cannot be exported in the requested format."""


def materialize(net: MultiTaskNetwork) -> fx.GraphModule:
    """One fx graph computing ``net(x, **side_inputs)``: every segment copy inlined once, heads
    as module calls; its arguments are ``x`` and then the side inputs."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    inputs = {name: graph.placeholder(name) for name in net.side_inputs}
    inputs[net.input_name] = x
    values = {net.tree.at_depth(0)[0].id: x}
    for depth in range(1, net.depth + 1):
        level = net.level(depth)
        side = [inputs[name] for name in net.segments[depth - 1].side_inputs]
        produced = {}
        for node in net.tree.at_depth(depth):
            prefix = f"seg{depth}.{node.name}"
            seg = level[node.name]
            placeholders = [n for n in seg.graph.nodes if n.op == "placeholder"]
            env: dict[fx.Node, fx.Node] = dict(zip(placeholders, [values[node.parent], *side]))
            out = None
            for n in seg.graph.nodes:
                if n.op == "placeholder":
                    continue  # the parent's output (a node, or a tuple of them: a multi-value boundary), a side input
                elif n.op == "call_function" and n.target is operator.getitem and isinstance(env.get(n.args[0]), tuple):
                    env[n] = env[n.args[0]][n.args[1]]  # a boundary value: the producing node itself
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


def _arguments(net: MultiTaskNetwork, example_input: Inputs, where: str) -> tuple[Any, ...]:
    """``example_input`` as the materialised graph's positional arguments: ``x``, then the side inputs."""
    x, side = split_inputs(example_input, net.input_name, net.side_inputs, where)
    return (x, *(side[name] for name in net.side_inputs))


def to_torchscript(
    net: MultiTaskNetwork, example_input: Inputs | None = None, method: str = "auto"
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
        return torch.jit.trace(gm, _arguments(net, example_input, "to_torchscript"), strict=False)


def to_export(
    net: MultiTaskNetwork, example_input: Inputs, *, dynamic_batch: bool = False, **kwargs: Any
) -> torch.export.ExportedProgram:
    """``torch.export`` of the materialised graph (the current PyTorch deployment format); with
    ``dynamic_batch``, the first dimension of every input is one dynamic batch size."""
    gm = materialise(net)
    args = _arguments(net, example_input, "to_export")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=2)
        dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        return torch.export.export(gm, args, dynamic_shapes=dynamic_shapes, **kwargs)
    except Exception as exc:
        raise ExportError(
            f"torch.export failed on the materialised graph: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Check that the backbone exports on its own (torch.export.export(model, (x,)))."
        ) from exc


class _TaskTuple(torch.nn.Module):
    """The materialised graph with outputs as a tuple in task order: ONNX graphs have a list of
    named outputs, not a dict."""

    def __init__(self, graph: fx.GraphModule, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.graph_module, self.tasks = graph, tasks

    def forward(self, x: torch.Tensor, *side_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.graph_module(x, *side_inputs)
        return tuple(out[t] for t in self.tasks)


def to_onnx(
    net: MultiTaskNetwork,
    example_input: Inputs,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = False,
    check: bool = True,
    atol: float = 1e-5,
    opset_version: int | None = None,
) -> Path:
    """Write the network as an ONNX model (inputs ``x`` and the side inputs by name, one named
    output per task) and check it.

    Exported with ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter,
    which needs ``onnxscript``) in eval mode: ONNX is an inference format, so BatchNorm uses its
    running statistics and dropout is off whatever mode ``net`` is in (its modes are restored).
    With ``check`` the file is loaded in ONNX Runtime and every task's output must match eager
    ``net(example_input)`` within ``atol`` (relative and absolute), or `ExportError` says which
    task differs by how much. The file is written atomically: an export that fails leaves no
    half-written model at ``path``.

    Needs the ``onnx`` extra (``pip install 'graphsurgeon[onnx]'``: onnx, onnxruntime, onnxscript).
    """
    require("onnxscript", "gs.to_onnx")
    onnx = require("onnx", "gs.to_onnx")
    args = _arguments(net, example_input, "to_onnx")
    names = ["x", *net.side_inputs]
    target = Path(path)
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        module = _TaskTuple(materialize(net), net.tasks)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args) if dynamic_batch else None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter reports its passes as warnings
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=True,
                    input_names=names,
                    output_names=list(net.tasks),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset_version,
                    external_data=False,
                    verbose=False,
                )
            onnx.checker.check_model(str(tmp))
            if check:
                with torch.no_grad():
                    eager = net(args[0], **dict(zip(names[1:], args[1:])))
                _check_onnx_outputs(tmp, dict(zip(names, args)), eager, net.tasks, atol)
            os.replace(tmp, target)
        except ExportError:
            raise
        except Exception as exc:  # the exporter raises many types; the user needs the op that failed
            raise ExportError(
                f"ONNX export of the materialised network failed: {_onnx_failure(exc)}. ONNX cannot express every "
                "backbone op: check that the backbone exports on its own (torch.onnx.export(model.eval(), (x,), "
                "'m.onnx', dynamo=True)), or deploy with gs.to_export(net, x) instead."
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return target


def _onnx_failure(exc: BaseException) -> str:
    """The line of the exporter's report that names the failing op ("No ONNX function found for
    <OpOverload(op='aten._linalg_eigh' ...)>"), else the error's first line. The exporter wraps
    the cause in a ConversionError whose first line only says which step failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if "No ONNX function found" in line or "Unsupported" in line:
            return line.split(">: ", 1)[-1].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"


def _check_onnx_outputs(
    path: Path, feeds: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], tasks: tuple[str, ...], atol: float
) -> None:
    ort = require("onnxruntime", "gs.to_onnx(check=True)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(tasks), {name: value.detach().cpu().numpy() for name, value in feeds.items()})
    for task, value in zip(tasks, got):
        want = eager[task].detach().cpu()
        value_t = torch.from_numpy(value).to(want.dtype)
        if value_t.shape != want.shape or not torch.allclose(value_t, want, rtol=atol, atol=atol):
            diff = (value_t - want).abs().max().item() if value_t.shape == want.shape else float("nan")
            raise ExportError(
                f"the ONNX model's output {task!r} differs from eager: max |difference| {diff:.3g} > {atol:g} "
                f"(shapes {tuple(value_t.shape)} vs {tuple(want.shape)}). Export in float32, or pass a larger atol= "
                "if the backbone uses ops ONNX Runtime computes differently."
            )
