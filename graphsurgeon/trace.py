"""Tracing a backbone into an fx graph, with errors that say which module to fix.

`torch.fx.symbolic_trace` fails on data-dependent control flow with a traceback deep in fx's
proxy machinery. Users need to know *which of their modules* broke and *what to pass* to get
past it (a leaf module, or a concrete argument), so the tracer keeps a stack of the modules it
is inside and turns any tracing failure into a `TraceError` that names the innermost one.
"""
from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from graphsurgeon.errors import TraceError

__all__ = ["trace", "get_graph_node_names"]

LeafSpec = str | type[nn.Module]


class _NamingTracer(fx.Tracer):
    """An fx tracer that honours user leaf modules and remembers where it is."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]) -> None:
        super().__init__()
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


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into an ``fx.GraphModule``.

    Args:
        model: the backbone. It is traced as it is (train or eval mode); modules whose forward
            differs between modes are traced along the path of the current mode.
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
    leaf_modules = tuple(leaf_modules)
    names = {n for n, _ in model.named_modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in names:
            raise TraceError(
                f"leaf_modules names {leaf!r}, which is not a submodule of "
                f"{type(model).__name__}. Use a qualified name from model.named_modules(), "
                f"e.g. {sorted(n for n in names if n)[:5]}."
            )
    tracer = _NamingTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
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
        raise TraceError(
            f"torch.fx cannot trace {where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"  at {location}\n{fix}"
        ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    # block granularity needs to know whether the root is a container (nn.Sequential backbone)
    gm.meta["graphsurgeon_root_type"] = type(model)
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
