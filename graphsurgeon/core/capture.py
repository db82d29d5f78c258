"""A second capture path, on ``torch.export``, for backbones ``torch.fx.symbolic_trace`` rejects.

``symbolic_trace`` runs ``forward`` on proxies, so Python control flow on tensor shapes
(``if x.shape[-1] > 8``), ``len(x)``, iteration over a tensor and third-party code that does
not accept a proxy all fail. ``torch.export`` (non-strict) runs ``forward`` on fake tensors of
the example input's shape instead: shapes are concrete, so that code runs, and the graph it
records is specialised to that shape. ``ep.module()`` is an ``fx.GraphModule`` of aten ops with
parameters and buffers read by ``get_attr`` and ``nn_module_stack`` on every node, which is
what `graphsurgeon.segment` needs; this module adds the rest of what `graphsurgeon.core.trace`
records (qualified node names, module outputs, the other mode's graph, the default trunk).

Train and eval mode. Export captures one mode, and modules whose code reads ``self.training``
(BatchNorm, Dropout, DropPath) record different aten ops in each (``batch_norm(...,
training=True)`` plus an in-place ``add_`` on ``num_batches_tracked``, against
``training=False``). As on the fx path such modules become *leaves*: their nodes are collapsed
back into one ``call_module`` of the (copied) module itself, which follows the mode at run time,
so one graph is right in both modes. When the graphs still differ (mode-dependent code in the
root's own ``forward``, or a module whose nodes cannot be collapsed because it takes or returns
several values), the other mode's graph is kept in ``gm.meta["graphsurgeon_other_mode"]`` and
`graphsurgeon.segment` refuses the trunk with the module to fix, exactly as for fx graphs.

A module is collapsed only when each of its calls is one tensor in, one tensor out, and its
``forward`` takes one required argument (the graph does not record how a call passed its values:
MultiheadAttention's ``(x, x, x)`` stays traced through). A leaf module gets the module's own
keyword defaults, which is what torch.nn's mode-dependent layers are called with.

Shapes. The batch dimension is exported as dynamic (``Dim.AUTO``) unless the code specialises it
(a loop over the rows is unrolled into that many) or the graph computes with it (a live batch
size would leave no cut point); every other dimension is fixed to the example input's. The graph
is valid only for such inputs, so it starts with a shape check that raises `ExampleInputError`
on any other shape instead of computing a wrong result.
"""
from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import fx, nn

from graphsurgeon.core.trace import (
    CAPTURE,
    DEFAULT_TRUNK,
    MODULE_OUTPUTS,
    QUALNAME,
    LeafSpec,
    _check_leaf_names,
    _code_reads,
    _record_output_fields,
    graph_signature,
    trace,
)
from graphsurgeon.errors import ExampleInputError, OptionError, TraceError

__all__ = [
    "Capture",
    "capture_graph",
    "check_input_shape",
    "export_trace",
    "is_torch_layer",
    "is_view",
    "writes_first_argument",
]

Capture = Literal["fx", "export", "auto"]

def check_input_shape(x: torch.Tensor, shape: list[int]) -> None:
    """The first node of an exported graph: refuse an input of another shape than the one the
    graph was captured for (``-1``: a dimension export kept dynamic, the batch unless the code
    specialised it), whose specialisations (unrolled loops, taken branches) would silently
    compute something else. Written for TorchScript too (a list of ints, no generators), since
    `graphsurgeon.to_torchscript` compiles the graph that calls it."""
    same = x.dim() == len(shape)
    if same:
        for got, want in zip(x.shape, shape):
            if want != -1 and got != want:
                same = False
    if not same:
        wanted = ", ".join(["*" if d == -1 else str(d) for d in shape])
        raise ExampleInputError(
            "this backbone was captured with torch.export for inputs of shape (" + wanted + "), got "
            + str(list(x.shape)) + "; the captured graph is specialised to that shape. Build it again with an "
            "example_input of this shape."
        )


def _stack(node: fx.Node) -> list[tuple[str, Any]]:
    return list(node.meta.get("nn_module_stack", {}).values())


def _in_module(node: fx.Node, path: str) -> bool:
    return any(p == path for p, _ in _stack(node))


def _calls_of(gm: fx.GraphModule, path: str) -> list[tuple[list[fx.Node], fx.Node, fx.Node]] | None:
    """Each call of the module at ``path`` as (its nodes, its one input, its one output), in
    order; ``None`` when a call takes or returns several values (or reads another module's
    state), so that it cannot be one ``call_module``. Export tells the calls of a module apart
    by their ``nn_module_stack`` key (``L__self__bn``, ``L__self__bn@1``)."""
    regions: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            key = next((k for k, (p, _) in n.meta.get("nn_module_stack", {}).items() if p == path), None)
            if key is not None:
                regions.setdefault(key, []).append(n)
    own = f"{path}."

    def state(a: fx.Node) -> bool:
        """The module's own parameter or buffer, or an in-place write to one (a second call's
        ``add_`` on ``num_batches_tracked`` reads the first call's)."""
        while a.op == "call_function" and writes_first_argument(a) and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        return a.op == "get_attr" and str(a.target).startswith(own)

    calls = []
    for region in regions.values():
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes if a not in inside and not state(a)}
        outputs = [n for n in region if not state(n) and any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1 or next(iter(inputs)).op == "get_attr":
            return None
        calls.append((region, next(iter(inputs)), outputs[0]))
    return calls


def writes_first_argument(node: fx.Node) -> bool:
    """Whether an aten op writes its first argument in place (its schema says ``Tensor(a!)``)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    arguments = node.target._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


def is_view(node: fx.Node) -> bool:
    """Whether an aten op returns a view of its first argument (``aten.select``, ``aten.view``:
    its schema's result is ``Tensor(a)``), so that writing to its result writes to that argument."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _takes_one_argument(module: nn.Module) -> bool:
    """Whether ``module(x)`` is a whole call: its forward has exactly one required argument. The
    graph does not say how the call passed its values (MultiheadAttention's ``(x, x, x)``)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in positional and p.default is p.empty) == 1


def _collapse(gm: fx.GraphModule, path: str, module: nn.Module) -> bool:
    """Replace the nodes of every call of ``module`` (at ``path``) by one ``call_module`` of
    ``module`` each; ``False`` (and ``gm`` untouched) when a call cannot be one (see `_calls_of`)
    or the module was not called."""
    calls = _calls_of(gm, path)
    if not calls or not _takes_one_argument(module):
        return False
    parent = gm
    for part in path.split(".")[:-1]:  # export keeps only the modules that own a tensor
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    setattr(parent, path.rsplit(".", 1)[-1], module)
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier call's output node -> its call_module
    for _, inp, out in calls:
        with gm.graph.inserting_before(out):
            call = gm.graph.call_module(path, (replaced.get(inp, inp),))
        replaced[out] = call
        stack = list(out.meta["nn_module_stack"].items())
        depth = next(i for i, (_, (p, _)) in enumerate(stack) if p == path)
        call.meta["nn_module_stack"] = dict(stack[: depth + 1])  # the call is inside path's parents only
        out.replace_all_uses_with(call)
    erased = {n for region, _, _ in calls for n in region}
    for n in reversed(gm.graph.nodes):  # later calls read earlier ones' state writes: erase them first
        if n in erased:
            gm.graph.erase_node(n)
    own = f"{path}."
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users and str(n.target).startswith(own)]:
        gm.graph.erase_node(n)
    return True


def _reads_training(module: nn.Module) -> bool:
    """Whether the module's class (torch.nn's included: export traces through BatchNorm and
    Dropout too) reads ``self.training`` anywhere but in ``nn.Module`` itself."""
    return any(
        _code_reads(code, "training")
        for cls in type(module).__mro__
        if cls not in (nn.Module, object)
        for value in vars(cls).values()
        if (code := getattr(value, "__code__", None)) is not None
    )


def _make_leaves(
    gm: fx.GraphModule, own: nn.Module, paths: Iterable[str], required: set[str], tensor_out: set[str]
) -> tuple[str, ...]:
    """Collapse each module of ``paths`` that is not inside an already collapsed one (so the
    outermost wins) and returns one tensor (``tensor_out``, see `_tensor_returning`); the paths
    collapsed. A ``required`` one (a user's leaf module) that is called but cannot be one call is
    an error: silently tracing through it is not what was asked."""
    done: list[str] = []
    for path in sorted(paths, key=lambda p: p.count(".")):
        if any(path.startswith(f"{d}.") for d in done):
            continue
        one_call = _calls_of(gm, path) is not None and _takes_one_argument(own.get_submodule(path))
        if path in required and not (one_call and path in tensor_out):
            raise TraceError(
                f"leaf_modules names {path!r} ({type(own.get_submodule(path)).__name__}), but with capture='export' a "
                "leaf module must take one tensor and return one tensor in each call, and this one does not. "
                "Fix: drop it from leaf_modules, or name a submodule of it that does."
            )
        if path in tensor_out and _collapse(gm, path, own.get_submodule(path)):
            done.append(path)
    return tuple(done)


def is_torch_layer(module_type: object) -> bool:
    """Whether a module class is one of torch.nn's layers (not a container): fx keeps such a
    module as one ``call_module``, export records its aten ops inside it."""
    return (
        isinstance(module_type, type)
        and module_type.__module__.startswith("torch.nn")
        and not issubclass(module_type, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    )


def _name_nodes(gm: fx.GraphModule) -> None:
    """Qualified names and module outputs, as `graphsurgeon.core.trace` records them, so that
    ``trunk=`` takes the same names on both paths: a torch.nn layer's ops and a collapsed module
    are named by the module's path (``layer4.1.relu_1``, ``bn1``), as fx names a module call,
    parameters and buffers by theirs, other ops by the path plus the op (``mean``,
    ``layer1.0.add``), with ``_k`` counting repeats of a name."""
    latest: dict[str, int] = {}
    outputs: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue  # not a node name, as on the fx path (trunk= cannot be the graph's output node)
        stack = _stack(n)
        if n.op in ("call_module", "get_attr"):
            base = str(n.target)
        elif stack and stack[-1][0] and is_torch_layer(stack[-1][1]):
            base = stack[-1][0]
        else:
            op = re.sub(r"_[0-9]+$", "", n.name).rstrip("_")  # add_ is fx's add (of +=)
            base = f"{stack[-1][0]}.{op}" if stack and stack[-1][0] else op
        count = latest.get(base)
        latest[base] = 0 if count is None else count + 1
        n.meta[QUALNAME] = base if count is None else f"{base}_{count + 1}"
        for path, _ in stack:
            if path and any(not _in_module(u, path) or u.op == "output" for u in n.users):
                outputs[path] = n.name  # a module's last value used outside it is what it returns
    gm.meta[MODULE_OUTPUTS] = outputs


def _watch_calls(model: nn.Module, example_input: torch.Tensor) -> tuple[list[tuple[str, nn.Module, Any]], Any]:
    """Every module call of one eval-mode forward of a private copy of ``model`` on the example
    input, as (path, module, output) in the order the calls return, and the model's output: what
    the exported graph does not record (an ``nn.Identity`` call, what a module returns)."""
    own = copy.deepcopy(model).eval()
    calls: list[tuple[str, nn.Module, Any]] = []
    handles = [
        m.register_forward_hook(lambda m, args, out, path=path: calls.append((path, m, out)))
        for path, m in own.named_modules()
        if m is not own
    ]
    try:
        with torch.no_grad():
            output = own(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _ends_in_identity(calls: list[tuple[str, nn.Module, Any]], output: Any) -> bool:
    """Whether the last layer the model calls (see `_watch_calls`) is an ``nn.Identity`` that
    returns the model's output (timm's ``num_classes=0``, ``model.fc = nn.Identity()``). fx sees
    that call (see `graphsurgeon.core.segments.find_trunk`); export records no op for it."""
    layers = [(m, out) for _, m, out in calls if next(m.children(), None) is None]
    return bool(layers) and isinstance(layers[-1][0], nn.Identity) and layers[-1][1] is output


def _tensor_returning(calls: list[tuple[str, nn.Module, Any]]) -> set[str]:
    """The modules every call of which returned one tensor (see `_watch_calls`). The graph cannot
    tell: a module that returns a ``ModelOutput`` or a tuple whose one tensor is used (Hugging
    Face's encoders) looks like one tensor out, and collapsing it would hand the whole object on."""
    returns: dict[str, bool] = {}
    for path, _, out in calls:
        returns[path] = returns.get(path, True) and isinstance(out, torch.Tensor)
    return {path for path, tensor in returns.items() if tensor}


def _output_fields(gm: fx.GraphModule) -> dict[str, fx.Node] | None:
    """``{field: node}`` of a graph whose forward returns a mapping (a Hugging Face
    ``ModelOutput``): export flattens it into a tuple of nodes, and keeps the field names in the
    pytree spec its generated code rebuilds the mapping with."""
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    keys = getattr(spec, "context", None)
    if not isinstance(output, tuple | list) or not isinstance(keys, list | tuple) or len(keys) != len(output):
        return None
    if not all(isinstance(k, str) for k in keys) or not all(c.is_leaf() for c in spec.children_specs):
        return None
    return dict(zip(keys, output))


def _default_trunk(gm: fx.GraphModule, ends_in_identity: bool) -> str | None:
    """What `graphsurgeon.segment`'s default trunk is on fx graphs, where layers are module
    calls: the input of the last op that reads a parameter (``aten.linear`` of the classifier);
    the model's output when its classifier was replaced by an ``nn.Identity``
    (``ends_in_identity``) and no linear layer comes last (timm's heads call an Identity
    ``flatten`` after their Linear ``fc``)."""
    parameters = {name for name, _ in gm.named_parameters()}

    def weighted(n: fx.Node) -> bool:
        if n.op == "call_module":
            return any(True for _ in gm.get_submodule(str(n.target)).parameters())
        return n.op == "call_function" and any(a.op == "get_attr" and a.target in parameters for a in n.all_input_nodes)

    last = next((n for n in reversed(gm.graph.nodes) if weighted(n) and n.all_input_nodes), None)
    if last is None:
        return None
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(output, tuple | list) and len(output) == 1:  # export returns a flat tuple
        output = output[0]
    linear = (last.op == "call_module" and isinstance(gm.get_submodule(str(last.target)), nn.Linear)) or last.target in (
        torch.ops.aten.linear.default,
        torch.ops.aten.addmm.default,
    )
    if ends_in_identity and not linear and isinstance(output, fx.Node) and output.op != "placeholder":
        return output.name
    first = last.all_input_nodes[0]
    return None if first.op in ("placeholder", "get_attr") else first.name


def _module_type(root: nn.Module, path: str) -> type[nn.Module] | None:
    """The class of ``root``'s submodule at ``path``; ``None`` for a path export made up
    (``_empty_nn_module_stack_from_metadata_hook``)."""
    try:
        return type(root.get_submodule(path))
    except AttributeError:
        return None


def _static_shape(ep: torch.export.ExportedProgram) -> list[int]:
    """The input's shape as the program fixes it, ``-1`` for a dimension it keeps dynamic: one
    whose symbol has a range (a symbol the code specialised, by a loop over it, has none)."""
    value = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == ep.graph_signature.user_inputs[0])
    return [
        -1 if isinstance(d, torch.SymInt) and d.node.expr in ep.range_constraints else int(d)
        for d in value.meta["val"].shape
    ]


def _export(own: nn.Module, example_input: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch where that costs no cut points, else with a static one.

    A batch the code loops over is specialised by export itself (``Dim.AUTO``). A batch the graph
    computes with (ViT's ``reshape(n, ...)`` reads ``sym_size``) is a value live across every
    cut point, which would leave one segment: then the whole shape is fixed to the example's.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if example_input.dim():
            batch = ({0: torch.export.Dim.AUTO},)
            ep = torch.export.export(own, (example_input,), dict(kwargs), dynamic_shapes=batch, strict=False)
            if not any(isinstance(n.meta.get("val"), torch.SymInt) for n in ep.graph.nodes):
                return ep
        return torch.export.export(own, (example_input,), dict(kwargs), strict=False)


def _export_once(
    model: nn.Module, training: bool, example_input: torch.Tensor, kwargs: Mapping[str, Any]
) -> tuple[fx.GraphModule, nn.Module]:
    """``torch.export`` (non-strict) of a private copy of ``model`` in one mode, unlifted, with
    `check_input_shape` in place of export's own guards; also the copy, whose modules become
    leaves."""
    own = copy.deepcopy(model).train(training)
    try:
        ep = _export(own, example_input, kwargs)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        mode = "train" if training else "eval"
        raise TraceError(
            f"torch.export cannot capture {type(model).__name__} in {mode} mode: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    gm = ep.module()
    for n in gm.graph.nodes:
        # as fx records it: the root is not on the stack, and the types are classes, not names
        stack = ((key, path, _module_type(own, path)) for key, (path, _) in n.meta.get("nn_module_stack", {}).items())
        n.meta["nn_module_stack"] = {key: (path, kind) for key, path, kind in stack if path and kind is not None}
    for n in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(n)  # export's guards module (torch >= 2.9); the shape check replaces it
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(placeholder):
        check = gm.graph.call_function(check_input_shape, (placeholder, _static_shape(ep)))
    check.meta["nn_module_stack"] = {}
    return gm, own


def export_trace(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export`` in both modes (see the module docstring).

    ``leaf_modules`` (names or classes) are collapsed into one call each, like the fx path's leaf
    modules; ``concrete_args`` are passed to ``forward`` as keyword arguments (export bakes
    non-tensor values into the graph).
    """
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(
            "capture='export' needs example_input=<a batch>: torch.export runs the model on it and "
            "specialises the graph to its shape. Pass example_input=torch.randn(...) of the shape you will use."
        )
    leaves = tuple(leaf_modules)
    _check_leaf_names(model, leaves)
    kwargs = dict(concrete_args or {})
    captured = {mode: _export_once(model, mode, example_input, kwargs) for mode in (model.training, not model.training)}

    leaf_types = tuple(t for t in leaves if isinstance(t, type))

    def user_leaves(own: nn.Module) -> set[str]:
        return {name for name, m in own.named_modules() if name and (name in leaves or isinstance(m, leaf_types))}

    def mode_dependent(own: nn.Module) -> set[str]:
        return {name for name, m in own.named_modules() if name and _reads_training(m)}

    differ = graph_signature(captured[True][0].graph.nodes) != graph_signature(captured[False][0].graph.nodes)
    calls, output = _watch_calls(model, example_input)
    ends_in_identity, tensor_out = _ends_in_identity(calls, output), _tensor_returning(calls)
    graphs = {}
    for mode, (exported, own) in captured.items():
        required = user_leaves(own)
        made = _make_leaves(exported, own, required | (mode_dependent(own) if differ else set()), required, tensor_out)
        # a plain GraphModule of what the graph reads: ep.module()'s class refuses train()/eval()
        gm = fx.GraphModule(exported, exported.graph, type(model).__name__).train(mode)
        _name_nodes(gm)
        gm.meta["graphsurgeon_root_type"] = type(model)
        gm.meta["graphsurgeon_leaf_modules"] = made
        gm.meta[CAPTURE] = "export"
        trunk = _default_trunk(gm, ends_in_identity)
        if trunk is not None:
            gm.meta[DEFAULT_TRUNK] = trunk
        _record_output_fields(gm, _output_fields(gm))  # a ModelOutput's: trunk="pooler_output"
        graphs[mode] = gm
    gm = graphs[model.training]
    gm.meta["graphsurgeon_other_mode"] = graphs[not model.training]
    return gm


def capture_graph(
    model: nn.Module,
    capture: Capture,
    *,
    example_input: torch.Tensor | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """The graph of ``model`` by ``capture``: ``"fx"``, ``"export"``, or ``"auto"`` (fx, and export
    when fx raises `TraceError`, with one ``UserWarning`` that says why, so that a fallback the
    user did not ask for by name is never silent; a `TraceError` naming both failures when
    export fails too)."""
    if capture == "fx":
        return trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if capture == "export":
        return export_trace(model, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if capture != "auto":
        raise OptionError(f"capture={capture!r} is not a capture path; pass 'fx' (default), 'export' or 'auto'.")
    leaves = tuple(leaf_modules)
    try:
        return trace(model, leaf_modules=leaves, concrete_args=concrete_args)
    except TraceError as fx_error:
        reason = str(fx_error).splitlines()[0]
        try:
            gm = export_trace(model, example_input=example_input, leaf_modules=leaves, concrete_args=concrete_args)
        except TraceError as export_error:
            raise TraceError(
                f"neither capture path works for {type(model).__name__}.\n  fx: {fx_error}\n  export: {export_error}"
            ) from export_error
        warnings.warn(
            f"capture='auto': torch.fx cannot trace {type(model).__name__} ({reason}); captured it with "
            "torch.export instead.",
            stacklevel=3,
        )
        return gm
