"""Tracing a backbone into an fx graph, with errors that say which module to fix.

`torch.fx.symbolic_trace` fails on data-dependent control flow with a traceback deep in fx's
proxy machinery. Users need to know *which of their modules* broke and *what to pass* to get
past it (a leaf module, or a concrete argument), so the tracer keeps a stack of the modules it
is inside and turns any tracing failure into a `TraceError` that names the innermost one.
"""
from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from graphsurgeon.errors import TraceError

__all__ = ["get_graph_node_names", "graph_signature", "trace"]

LeafSpec = str | type[nn.Module]


class _NamingTracer(fx.Tracer):
    """An fx tracer that honours user leaf modules and remembers where it is."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]) -> None:
        # buffers read in forward become graph nodes: an update written to one (a call counter,
        # a running mean) would otherwise run once at trace time and never again
        super().__init__()
        self.proxy_buffer_attributes = True
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.module_path: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.module_path.append((self.path_of_module(m), m))
        out = super().call_module(m, forward, args, kwargs)
        self.module_path.pop()
        return out


def _user_frame(exc: BaseException, module: nn.Module | None) -> str:
    """The deepest traceback frame inside the failing module's own source file."""
    frames = traceback.extract_tb(exc.__traceback__)
    wanted = None
    if module is not None:
        try:
            import inspect

            wanted = inspect.getsourcefile(type(module))
        except (TypeError, OSError):
            wanted = None
    fx_dir = fx.__file__.rsplit("/", 1)[0]
    candidates = [f for f in frames if not f.filename.startswith(fx_dir) and "/torch/" not in f.filename]
    if wanted is not None:
        own = [f for f in frames if f.filename == wanted]
        candidates = own or candidates
    if not candidates:
        return "<unknown location>"
    f = candidates[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _check_leaf_names(model: nn.Module, leaf_modules: tuple[LeafSpec, ...]) -> None:
    names = {n for n, _ in model.named_modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in names:
            raise TraceError(
                f"leaf_modules names {leaf!r}, which is not a submodule of "
                f"{type(model).__name__}. Use a qualified name from model.named_modules(), "
                f"e.g. {sorted(n for n in names if n)[:5]}."
            )


def _trace_once(
    model: nn.Module, training: bool, leaf_modules: tuple[LeafSpec, ...], concrete_args: Mapping[str, Any] | None
) -> fx.GraphModule:
    """Trace a private copy of ``model`` in one mode.

    The copy keeps the user's model bit-for-bit as it was: fx writes ``_tensor_constantN``
    attributes onto the module it traces, and some forwards cache what they compute (LeViT's
    attention biases would keep an fx ``Proxy``, so a second trace fails).
    """
    own = copy.deepcopy(model).train(training)
    tracer = _NamingTracer(leaf_modules)
    try:
        graph = tracer.trace(own, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        path, module = tracer.module_path[-1] if tracer.module_path else ("", model)
        where = f"module {path!r} ({type(module).__name__})" if path else f"the top-level {type(model).__name__}.forward"
        location = _user_frame(exc, module)
        fix = (
            f"Fix: pass leaf_modules=[{path!r}] (or the class {type(module).__name__}) so it runs as one "
            "opaque call, or concrete_args={...} to fix the input that decides the branch."
            if path
            else "Fix: move the data-dependent part into a submodule and pass it in leaf_modules, "
            "or pass concrete_args={...} to fix the input that decides the branch."
        )
        mode = "train" if training else "eval"
        raise TraceError(
            f"torch.fx cannot trace {where} in {mode} mode: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n  at {location}\n{fix}"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # block granularity needs to know whether the root is a container (nn.Sequential backbone)
    gm.meta["graphsurgeon_root_type"] = type(model)
    return gm


def _reads_training(module: nn.Module) -> bool:
    """Whether the module's own code (not torch.nn's) reads ``self.training``.

    Such a module takes a different path in train and eval mode (timm's ``BatchNormAct2d``,
    ``DropPath``, torchvision's ``StochasticDepth``, ``F.dropout(x, training=self.training)``);
    traced through, the path of the tracing mode would be frozen into the graph.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            continue
        for value in vars(cls).values():
            code = getattr(value, "__code__", None)
            if code is not None and _code_reads(code, "training"):
                return True
    return False


def _code_reads(code: Any, name: str) -> bool:
    if name in code.co_names:
        return True
    return any(_code_reads(c, name) for c in code.co_consts if hasattr(c, "co_names"))


def graph_signature(nodes: Iterable[fx.Node]) -> list[tuple]:
    """What a sequence of nodes computes, independent of node names: two graphs with equal
    signatures run the same operations on the same values in the same order."""
    index: dict[fx.Node, int] = {}
    signature = []
    for i, n in enumerate(nodes):
        index[n] = i

        def ref(a: fx.Node) -> Any:
            return ("node", index[a]) if a in index else ("outside", a.op, str(a.target))

        args = fx.node.map_arg(n.args, ref)
        kwargs = fx.node.map_arg(n.kwargs, ref)
        signature.append((n.op, str(n.target), repr(args), repr(sorted(kwargs.items()))))
    return signature


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into an ``fx.GraphModule`` that is right in both modes.

    A graph records one path through Python control flow, so a module that branches on
    ``self.training`` would run the tracing mode's path forever (batch statistics in eval, or
    no dropout in training). The model is therefore traced in train *and* eval mode (as
    torchvision's ``create_feature_extractor`` does); when the graphs differ, every submodule
    whose own code reads ``self.training`` becomes a leaf module (one call that follows the
    module's mode at run time) and the model is traced again. Differences that remain (in the
    root's own ``forward``, e.g. an auxiliary classifier) are checked against the trunk by
    `graphsurgeon.segment`, which refuses a trunk whose computation depends on the mode.
    The user's model is never modified: a copy is traced.

    Args:
        model: the backbone, in either mode; the graph module keeps its mode.
        leaf_modules: module qualified names (``"layer2.0"``) or module classes that are kept as
            one opaque call instead of being traced through. Use this for modules with
            data-dependent control flow.
        concrete_args: values to specialise ``forward``'s arguments to (as in ``fx.symbolic_trace``).

    Raises:
        TraceError: naming the innermost module being traced, the offending source line, and
            the ``leaf_modules`` / ``concrete_args`` setting that would fix it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"trace() needs an nn.Module, got {type(model).__name__}. "
            "Pass the backbone module itself (e.g. torchvision.models.resnet18())."
        )
    leaves = tuple(leaf_modules)
    _check_leaf_names(model, leaves)
    graphs = {mode: _trace_once(model, mode, leaves, concrete_args) for mode in (model.training, not model.training)}
    if graph_signature(graphs[True].graph.nodes) != graph_signature(graphs[False].graph.nodes):
        mode_dependent = tuple(name for name, m in model.named_modules() if name and _reads_training(m))
        if mode_dependent:
            leaves = leaves + mode_dependent
            graphs = {mode: _trace_once(model, mode, leaves, concrete_args) for mode in graphs}
    gm = graphs[model.training]
    gm.meta["graphsurgeon_other_mode"] = graphs[not model.training]
    gm.meta["graphsurgeon_leaf_modules"] = leaves
    return gm


def get_graph_node_names(model: nn.Module | fx.GraphModule, **trace_kwargs: Any) -> list[str]:
    """Names of the nodes of the traced graph, in execution order: the valid ``trunk`` values."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model, **trace_kwargs)
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _check_torch() -> None:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 11):  # pragma: no cover - environment guard
        raise ImportError(f"graphsurgeon needs torch >= 2.11, found {torch.__version__}")


_check_torch()
