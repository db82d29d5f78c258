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

__all__ = ["ExportError", "materialise", "materialize", "output_scale", "to_export", "to_onnx", "to_torchscript"]


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
                return torch.jit.script(_scriptable_ops(gm))
        except Exception as exc:  # TorchScript raises its own frontend error types
            if method == "script" or example_input is None:
                raise ExportError(
                    f"torch.jit.script failed on the materialised graph: {_script_failure(exc)}. A leaf module "
                    "is compiled from its own source, so the line may be the backbone's. Pass example_input=... "
                    "with method='auto' to fall back to tracing, or use to_export()."
                ) from exc
            warnings.warn(f"torch.jit.script failed ({_script_failure(exc)}); tracing instead.", stacklevel=2)
    if example_input is None:
        raise ExportError("tracing needs example_input=<a batch>. Pass one.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(gm, _arguments(net, example_input, "to_torchscript"), strict=False)


def _scriptable_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` calling each aten op by its name (``torch.ops.aten.conv2d``) rather than one
    overload of it (``torch.ops.aten.conv2d.default``), which TorchScript cannot look up: a
    backbone captured with torch.export (`graphsurgeon.core.capture`) is a graph of overloads.
    TorchScript picks the overload from the arguments, as eager dispatch does."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            n.target = n.target.overloadpacket
    gm.recompile()
    return gm


def _script_failure(exc: BaseException) -> str:
    """TorchScript's complaint and the source line it points at, in one line. Its messages start
    with a blank line and put the line after a ``File "...", line N`` marker, so their first
    line alone is empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    where = next((i for i, line in enumerate(lines) if re.match(r'File ".*", line \d+', line)), None)
    here = next((i for i, line in enumerate(lines) if line.endswith("<--- HERE")), None)
    if where is None or here is None or here <= where + 1:
        return lines[0]
    place = re.sub(r'File "(.*)", line (\d+).*', r"\1 near line \2", lines[where])
    return f"{lines[0].rstrip(':')} ({place}: {lines[here - 1]})"


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
    ``net(example_input)`` within ``atol`` times the output's scale (its largest magnitude, at
    least 1), or `ExportError` says which task differs by how much: float32 rounds to about 1e-7
    of a value, so a randomly initialised deep CNN whose outputs reach 1e10 (timm's inception_v3)
    cannot agree to an absolute 1e-5, nor, near zero, element by element to a relative one.
    Fused attention (``F.scaled_dot_product_attention``) is exported written out as matmuls and
    a softmax (see `_attention`), which the exporter takes at any rank and with any mask. The
    file is written atomically: an export that fails leaves no half-written model at ``path``.

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
            with warnings.catch_warnings(), _WrittenOutAttention():
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


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out as matmuls and a softmax (its documented
    reference computation), for the ONNX exporter, which cannot take the fused op as timm calls it:
    its ONNX function accepts 4-d inputs only (Hiera, NesT, Twins and SAM's ViT attend over 5-d or
    3-d ones), and with a mask (BEiT, relative-position ViTs) its decomposition changes the
    output's strides after a ``view`` of them was recorded ("Cannot view a tensor with shape
    ..."). Written out, the exporter sees ordinary ops of any rank."""
    if enable_gqa:  # grouped-query attention: each key/value head serves several query heads
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * (query.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = scores.softmax(-1)
    if dropout_p > 0:  # the fused op drops out whatever the module's mode: so does this
        weights = torch.dropout(weights, dropout_p, True)
    return weights @ value


class _WrittenOutAttention(torch.overrides.TorchFunctionMode):
    """While active, every ``F.scaled_dot_product_attention`` call computes `_attention`
    instead: the calls inside leaf modules too (timm's attention blocks read ``self.training``,
    so they are one opaque call in the graph), which a rewrite of the graph would not reach."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _onnx_failure(exc: BaseException) -> str:
    """What made the exporter fail, in one line: the line that names the failing op ("No ONNX
    function found for <OpOverload(op='aten._linalg_eigh' ...)>"), else the exception its report
    summarises ("ValueError: Cannot view a tensor with shape ..."), else the innermost cause's
    first line. The exporter wraps the cause in a ConversionError whose first line only says
    which of its steps failed, so that line alone hides the cause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "No ONNX function found" in line or "Unsupported" in line:
            return line.split(">: ", 1)[-1].strip()
    step = re.search(r"step \d/\d", text)
    where = f"{type(exc).__name__} in the exporter's {step.group(0)}" if step else type(exc).__name__
    if "## Exception summary" in lines:  # the exporter's report: "<class 'ValueError'>: message"
        summary = lines[lines.index("## Exception summary") + 1 :]
        if summary:
            return f"{where}: " + re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", summary[0])
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not exc:
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        return f"{where}: {type(cause).__name__}: {first}"
    return f"{where}: {lines[0] if lines else ''}"


def output_scale(value: torch.Tensor) -> float:
    """What an output's rounding error is measured against: its largest magnitude, at least 1.
    An element's error comes from the values summed into it, not from the element, so one near
    zero in an output of magnitude 10 may differ by more than a tolerance of itself."""
    return max(1.0, value.abs().max().item()) if value.numel() else 1.0


def _check_onnx_outputs(
    path: Path, feeds: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], tasks: tuple[str, ...], atol: float
) -> None:
    ort = require("onnxruntime", "gs.to_onnx(check=True)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(tasks), {name: value.detach().cpu().numpy() for name, value in feeds.items()})
    for task, value in zip(tasks, got):
        want = eager[task].detach().cpu()
        value_t = torch.from_numpy(value).to(want.dtype)
        scale = output_scale(want)
        same = value_t.shape == want.shape
        diff = (value_t - want).abs().max().item() if same and want.numel() else (0.0 if same else float("nan"))
        if not diff <= atol * scale:  # a NaN (an output of the wrong shape, or not finite) fails too
            raise ExportError(
                f"the ONNX model's output {task!r} differs from eager: max |difference| {diff:.3g} > {atol:g} x "
                f"{scale:.3g} (atol x the output's scale; shapes {tuple(value_t.shape)} vs {tuple(want.shape)}). "
                "Export in float32, or pass a larger atol= if the backbone uses ops ONNX Runtime computes differently."
            )
