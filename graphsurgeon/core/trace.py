"""Tracing a backbone into an fx graph, with errors that say which module to fix.

`torch.fx.symbolic_trace` fails on data-dependent control flow with a traceback deep in fx's
proxy machinery. Users need to know *which of their modules* broke and *what to pass* to get
past it (a leaf module, or a concrete argument), so the tracer keeps a stack of the modules it
is inside and turns any tracing failure into a `TraceError` that names the innermost one.
"""
from __future__ import annotations

import copy
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import fx, nn

from graphsurgeon.core.mode_args import follow_mode
from graphsurgeon.errors import MissingDependencyError, SideInputError, TraceError

__all__ = ["bound_arguments", "get_graph_node_names", "graph_signature", "qualified_name", "resolve_node", "trace"]

LeafSpec = str | type[nn.Module]


QUALNAME = "graphsurgeon_qualname"  # node.meta key of a node's torchvision-style qualified name
MODULE_OUTPUTS = "graphsurgeon_module_outputs"  # gm.meta key: module path -> fx name of its output
OUTPUT_FIELDS = "graphsurgeon_output_fields"  # gm.meta key: field of a dict output -> fx name of its value
DEFAULT_TRUNK = "graphsurgeon_default_trunk"  # gm.meta key: fx name of the trunk when trunk=None
LOOPED_CONTAINERS = "graphsurgeon_looped_containers"  # gm.meta key: paths of ModuleLists / ModuleDicts
CAPTURE = "graphsurgeon_capture"  # gm.meta key: "export" for a graph captured by torch.export
MAIN_INPUT = "graphsurgeon_main_input"  # gm.meta key: fx name of the placeholder the segment chain carries


class _NamingTracer(fx.Tracer):
    """An fx tracer that honours user leaf modules, remembers where it is, and names nodes.

    Every node it creates through ``create_proxy`` gets a qualified name in
    ``node.meta[QUALNAME]``, exactly as torchvision's ``NodePathTracer`` names it (the module
    path, plus the op's name outside leaf modules, with ``_k`` suffixes counting repeats), so
    that ``trunk=`` accepts the names a torchvision user already knows (``layer4.1.relu_1``)
    rather than fx's globally mangled ones (``layer4_1_relu_1``). The output node of every
    module call is recorded too, so that ``trunk="layer4"`` can mean "what layer4 returns".
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec], autowrap_functions: Iterable[Callable] = ()) -> None:
        # buffers read in forward become graph nodes: an update written to one (a call counter,
        # a running mean) would otherwise run once at trace time and never again
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.proxy_buffer_attributes = True
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.module_path: list[tuple[str, nn.Module]] = []
        self.failure: tuple[BaseException, str, nn.Module] | None = None
        self.module_outputs: dict[str, fx.Node] = {}
        # the latest qualified name recorded under each key (the name, and the name less its _k)
        self._latest: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self.module_path.append((path, m))
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # the innermost module a failure came from (outer frames see the same exception):
            # the path is popped below, since HFTracer catches some failures and goes on
            if self.failure is None or self.failure[0] is not exc:
                self.failure = (exc, path, m)
            raise
        finally:
            self.module_path.pop()
        if isinstance(out, fx.Proxy) and path:
            self.module_outputs[path] = out.node  # a module called twice: its last call counts
        return out

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        proxy.node.meta[QUALNAME] = self._qualname(proxy.node)
        return proxy

    def _qualname(self, node: fx.Node) -> str:
        """torchvision's ``NodePathTracer._get_node_qualname``, with a dictionary instead of a
        backwards scan over every earlier name (quadratic on a ViT-sized graph)."""
        name = self.module_path[-1][0] if self.module_path else ""
        if node.op != "call_module":
            name = f"{name}.{node.name}" if name else node.name
        if re.match(r".+_[0-9]+$", name) is not None:
            name = name.rsplit("_", 1)[0]  # undo fx's global _k: repeats are counted per name
        previous = self._latest.get(name)
        if previous is not None:
            postfix = previous[len(name):]
            name += f"_{int(postfix[1:]) + 1}" if postfix else "_1"
        self._latest[name] = name
        if re.match(r".+_[0-9]+$", name) is not None:
            self._latest[name.rsplit("_", 1)[0]] = name
        return name


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


def _timm_registry(model: nn.Module) -> tuple[tuple[type[nn.Module], ...], tuple[Callable, ...]]:
    """timm's own "do not trace" registry, for a model that comes from timm.

    timm marks the modules and functions torch.fx cannot trace (data-dependent shapes in
    MobileViT's unfolding, EfficientFormer's attention-bias cache, ...) with
    ``register_notrace_module`` / ``register_notrace_function``, and its own
    ``create_feature_extractor`` passes them to the tracer as leaf modules and
    ``autowrap_functions``; so do we. This is the one place that imports timm, and only when the
    model's class lives in timm: timm stays an optional dependency.
    """
    if not type(model).__module__.startswith("timm."):
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - a timm model without timm.layers (very old timm)
        return (), ()
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    # the registry may also hold names (strings); fx's autowrap_functions takes functions only
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


def _tensor_input(model: nn.Module) -> str | None:
    """The forward argument that carries the tensor: the first positional one without a
    default (the first positional one if all have defaults); ``None`` if forward's signature
    cannot be read."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    chosen = required or positional
    return chosen[0].name if chosen else None


# defaults fx specialises to with an equality assert (None gets an `is None` assert)
_BINDABLE = (bool, int, float, str)


def bound_arguments(
    model: nn.Module, concrete_args: Mapping[str, Any] | None, side_inputs: Iterable[str] = ()
) -> dict[str, Any]:
    """``concrete_args`` completed with the default value of every other forward argument.

    A forward such as timm ViT's ``forward(x, attn_mask=None, is_causal=False)`` would otherwise
    be traced with three proxy inputs, and the trunk would depend on all three. Arguments with a
    default are the model's options, not its input: they are fixed to their defaults unless
    the user's ``concrete_args`` says otherwise. Only the tensor input (see `_tensor_input`),
    the ``side_inputs`` asked for, arguments without a default, and defaults fx cannot
    specialise to (a tensor, a dict: fx generates invalid code for them) stay inputs of the graph.
    """
    bound = dict(concrete_args or {})
    side = set(side_inputs)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return bound
    tensor = _tensor_input(model)
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == tensor or p.name in bound or p.name in side:
            continue
        if p.default is None or isinstance(p.default, _BINDABLE):
            bound[p.name] = p.default
    return bound


def _unbindable_defaults(model: nn.Module) -> list[str]:
    """Forward arguments with a default that `bound_arguments` leaves unbound (a tensor, a dict)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is not p.empty and not (p.default is None or isinstance(p.default, _BINDABLE))]


def _trace_once(
    model: nn.Module,
    training: bool,
    leaf_modules: tuple[LeafSpec, ...],
    concrete_args: Mapping[str, Any] | None,
    autowrap_functions: tuple[Callable, ...] = (),
    side_inputs: tuple[str, ...] = (),
) -> fx.GraphModule:
    """Trace a private copy of ``model`` in one mode.

    The copy keeps the user's model bit-for-bit as it was: fx writes ``_tensor_constantN``
    attributes onto the module it traces, and some forwards cache what they compute (LeViT's
    attention biases would keep an fx ``Proxy``, so a second trace fails).
    """
    own = copy.deepcopy(model).train(training)
    hf = _transformers_tracer(own, leaf_modules, autowrap_functions, concrete_args, side_inputs)
    tracer, concrete_args = hf if hf is not None else (_NamingTracer(leaf_modules, autowrap_functions), concrete_args)
    try:
        graph = tracer.trace(own, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        if tracer.failure is not None and tracer.failure[0] is exc:
            path, module = tracer.failure[1], tracer.failure[2]
        else:
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
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n  at {location}\n{fix}\n"
            "Or capture it with torch.export, which runs such code on example shapes: pass "
            "capture='export' (or capture='auto': fx, else export) and example_input=<a batch>."
        ) from exc
    try:
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx's generated code does not compile (NameError, SyntaxError)
        raise TraceError(
            f"torch.fx traced {type(model).__name__} but cannot compile its graph: {type(exc).__name__}: {exc}. "
            f"Forward arguments whose default fx cannot write into code ({_unbindable_defaults(model)}) cannot "
            "be graph inputs. Fix: wrap the model in a module whose forward(x) calls it with those arguments."
        ) from exc
    # block granularity needs to know whether the root is a container (nn.Sequential backbone)
    gm.meta["graphsurgeon_root_type"] = type(model)
    # ... and which modules are lists that forward loops over (never called: not in nn_module_stack)
    gm.meta[LOOPED_CONTAINERS] = frozenset(p for p, m in model.named_modules() if isinstance(m, nn.ModuleList | nn.ModuleDict))
    gm.meta[MODULE_OUTPUTS] = {path: node.name for path, node in tracer.module_outputs.items()}
    _record_inputs(gm, model)
    if hf is not None:
        _record_output_fields(gm)
    return gm


def _transformers_tracer(
    own: nn.Module,
    leaf_modules: tuple[LeafSpec, ...],
    autowrap_functions: tuple[Callable, ...],
    concrete_args: Mapping[str, Any] | None,
    side_inputs: tuple[str, ...] = (),
) -> tuple[fx.Tracer, dict[str, Any]] | None:
    """The tracer and concrete arguments for a Hugging Face ``PreTrainedModel``; ``None`` for others.

    Plain torch.fx cannot trace a transformers model: its forward reads input shapes as Python
    ints (``input_ids.size()``), checks dtypes and builds ``ModelOutput`` objects. transformers'
    own ``HFTracer`` runs every op on meta-device dummy inputs alongside the proxies, so those
    reads see concrete values; it is combined here with `_NamingTracer` so that nodes get the
    same qualified names, leaf modules and error reports as any other backbone.

    HFTracer generates a dummy input for every forward argument not in ``concrete_args``, so
    every argument except the one tensor input (``input_ids``, ``pixel_values``: see
    `_tensor_input`) and the ``side_inputs`` asked for (``attention_mask``) is bound to its default, as
    ``transformers.utils.fx.symbolic_trace(model, input_names=[...])`` does. ``use_cache`` is
    switched off on the private copy ``own``, as symbolic_trace does: a key/value cache would
    be a second output that no task consumes. transformers is looked up, never imported, to
    recognise a model: a ``PreTrainedModel`` exists only once its user has imported
    transformers, so it stays an optional dependency.
    """
    transformers = sys.modules.get("transformers")  # a PreTrainedModel exists only once it is imported
    if transformers is None or not isinstance(own, transformers.PreTrainedModel):
        return None
    name = type(own).__name__
    try:
        from transformers.utils import fx as hf_fx
    except ImportError as exc:  # transformers 5 dropped its torch.fx tracer
        raise MissingDependencyError(
            f"{name} is a transformers model, and tracing it needs transformers' torch.fx tracer "
            f"(transformers.utils.fx), which transformers {transformers.__version__} no longer has. "
            "Fix: pip install 'graphsurgeon[transformers]' (transformers>=4.45,<4.48)."
        ) from exc
    if not hf_fx.is_model_supported(own):
        raise TraceError(
            f"transformers' torch.fx tracer does not support {name}, so graphsurgeon cannot trace it. "
            "Fix: use an architecture it lists (transformers.utils.fx._SUPPORTED_MODELS: BertModel, "
            "GPT2Model, ViTModel, ...), or wrap the model in a plain nn.Module whose forward(x) is traceable."
        )
    tensor = _tensor_input(own)
    params = inspect.signature(own.forward).parameters.values()
    bound = {p.name: p.default for p in params if p.name not in (tensor, *side_inputs) and p.default is not p.empty}
    bound.update(concrete_args or {})
    if getattr(own.config, "use_cache", False):
        own.config.use_cache = False

    class _HFNamingTracer(_NamingTracer, hf_fx.HFTracer):
        """`_NamingTracer`'s names and leaves on top of HFTracer's meta-tensor shape tracking."""

        def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
            # HFTracer runs a leaf module's forward on meta tensors to learn its output's shape;
            # the submodules called then are not part of the graph and must not enter the path
            if getattr(self, "_disable_call_module", False):
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

    return _HFNamingTracer(leaf_modules, autowrap_functions), bound


def _record_inputs(gm: fx.GraphModule, model: nn.Module) -> None:
    """Which placeholder is the main input: the tensor input (see `_tensor_input`), else the
    first; the others are side inputs (`graphsurgeon.segment`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]  # not concrete_args
    tensor = _tensor_input(model)
    main = next((p for p in placeholders if p.target == tensor), placeholders[0] if placeholders else None)
    if main is not None:
        gm.meta[MAIN_INPUT] = main.name


def _check_side_inputs(model: nn.Module, side_inputs: tuple[str, ...], concrete_args: Mapping[str, Any] | None) -> None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    tensor = _tensor_input(model)
    for name in side_inputs:
        if name not in params or name == tensor or name in (concrete_args or {}):
            why = (
                "is its main input" if name == tensor
                else "is fixed by concrete_args" if name in (concrete_args or {})
                else "is not one of its arguments"
            )
            raise TraceError(
                f"side_inputs names {name!r}, which {why} of {type(model).__name__}.forward{inspect.signature(model.forward)}. "
                f"Fix: name forward arguments other than the main input {tensor!r}, e.g. side_inputs=['attention_mask']."
            )


def _record_output_fields(gm: fx.GraphModule, fields: Mapping[str, Any] | None = None) -> None:
    """Name the fields of a dict output (HFTracer turns a ``ModelOutput`` into a dict; a graph
    captured by torch.export passes ``fields``, read from its output's pytree spec), and pick the
    default trunk among them.

    ``trunk="pooler_output"`` / ``trunk="last_hidden_state"`` then mean what the model's own
    output calls them. The default is the pooled output when there is one (BERT's and ViT's
    pooler: one vector per example, what a classification head expects), else the per-token
    ``last_hidden_state`` (GPT-2): the classifier-based default of `find_trunk` would pick
    a node inside the last block, since these models have no classifier.
    """
    value = next(n for n in gm.graph.nodes if n.op == "output").args[0] if fields is None else fields
    if not isinstance(value, Mapping):
        return
    names = {key: node.name for key, node in value.items() if isinstance(key, str) and isinstance(node, fx.Node)}
    gm.meta[OUTPUT_FIELDS] = names
    default = names.get("pooler_output", names.get("last_hidden_state"))
    if default is not None:
        gm.meta[DEFAULT_TRUNK] = default


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
    capture: Literal["fx", "export", "auto"] = "fx",
    example_input: torch.Tensor | None = None,
    side_inputs: Iterable[str] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model`` into an ``fx.GraphModule`` that is right in both modes.

    A graph records one path through Python control flow, so a module that branches on
    ``self.training`` would run the tracing mode's path forever (batch statistics in eval, or
    no dropout in training). The model is therefore traced in train *and* eval mode (as
    torchvision's ``create_feature_extractor`` does); when the graphs differ, the innermost
    submodules whose own code reads ``self.training`` become leaf modules (one call that follows
    the module's mode at run time) and the model is traced again; if the graphs still differ,
    every such submodule becomes a leaf. A call in the root's own ``forward`` that passes the
    mode as an argument (``F.dropout(x, p, training=self.training)``) reads the graph module's
    mode at run time instead (see `graphsurgeon.core.mode_args`). Differences that remain (a
    branch in the root's own ``forward``, e.g. an auxiliary classifier) are checked against the trunk by
    `graphsurgeon.segment`, which refuses a trunk whose computation depends on the mode.
    The user's model is never modified: a copy is traced.

    Forward arguments with a default value are fixed to it (``attn_mask=None``,
    ``is_causal=False``: see `bound_arguments`); ``concrete_args`` overrides them. A model
    from timm is traced with timm's own leaf modules and wrapped functions (see `_timm_registry`),
    as timm's ``create_feature_extractor`` does.

    Args:
        model: the backbone, in either mode; the graph module keeps its mode.
        leaf_modules: module qualified names (``"layer2.0"``) or module classes that are kept as
            one opaque call instead of being traced through. Use this for modules with
            data-dependent control flow.
        concrete_args: values to specialise ``forward``'s arguments to (as in ``fx.symbolic_trace``);
            arguments with a default that are not named here are specialised to their default.
        capture: ``"fx"`` (``symbolic_trace``, the default), ``"export"`` (``torch.export``, for
            models fx cannot trace: see `graphsurgeon.core.capture`) or ``"auto"`` (fx, falling
            back to export with a warning).
        example_input: one input batch; needed by ``capture="export"`` (export specialises on it).
        side_inputs: forward arguments with a default that stay inputs of the graph besides the
            main one (``["attention_mask"]``); arguments without a default always do. Every
            segment that reads one takes it as an extra argument (see `graphsurgeon.segment`).

    Raises:
        TraceError: naming the innermost module being traced, the offending source line, and
            the ``leaf_modules`` / ``concrete_args`` setting that would fix it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"trace() needs an nn.Module, got {type(model).__name__}. "
            "Pass the backbone module itself (e.g. torchvision.models.resnet18())."
        )
    side_inputs = tuple(side_inputs)
    if capture != "fx":  # --- the torch.export capture path; imported here: capture.py imports this module
        from graphsurgeon.core.capture import capture_graph

        if side_inputs:
            raise SideInputError(
                f"side_inputs={list(side_inputs)} needs capture='fx': the torch.export path captures one input. "
                "Fix: pass capture='fx', or fix the argument with concrete_args={...}."
            )
        return capture_graph(
            model, capture, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args
        )
    leaves = tuple(leaf_modules)
    _check_leaf_names(model, leaves)
    _check_side_inputs(model, side_inputs, concrete_args)
    timm_leaves, autowrap = _timm_registry(model)
    leaves = leaves + timm_leaves
    args = bound_arguments(model, concrete_args, side_inputs)

    def trace_both(leaves: tuple[LeafSpec, ...]) -> dict[bool, fx.GraphModule]:
        graphs = {
            mode: _trace_once(model, mode, leaves, args, autowrap, side_inputs)
            for mode in (model.training, not model.training)
        }
        follow_mode(graphs)  # the root's own F.dropout(..., training=self.training)
        return graphs

    def differ(graphs: dict[bool, fx.GraphModule]) -> bool:
        return graph_signature(graphs[True].graph.nodes) != graph_signature(graphs[False].graph.nodes)

    graphs = trace_both(leaves)
    if differ(graphs):
        mode_dependent = tuple(name for name, m in model.named_modules() if name and _reads_training(m))
        # the innermost readers first: an outer one often reads the mode for a branch that
        # leaves the graph alone (BertEncoder's gradient checkpointing), and keeping it whole
        # would hide every layer inside it from segmentation
        innermost = tuple(n for n in mode_dependent if not any(o.startswith(n + ".") for o in mode_dependent))
        for extra in dict.fromkeys((innermost, mode_dependent)):
            if extra:
                graphs = trace_both(leaves + extra)
                if not differ(graphs):
                    break
        leaves = leaves + extra
    gm = graphs[model.training]
    gm.meta["graphsurgeon_other_mode"] = graphs[not model.training]
    gm.meta["graphsurgeon_leaf_modules"] = leaves
    return gm


def qualified_name(node: fx.Node) -> str:
    """The node's torchvision-style qualified name (``layer4.1.relu_1``); its fx name for the
    few nodes fx creates without a module context (constants, the output)."""
    return node.meta.get(QUALNAME, node.name)


def get_graph_node_names(model: nn.Module | fx.GraphModule, **trace_kwargs: Any) -> list[str]:
    """Qualified names of the traced graph's nodes, in execution order: the valid ``trunk`` values.

    The names are torchvision's (``torchvision.models.feature_extraction.get_graph_node_names``):
    the module path, then the op for nodes inside a module that is traced through, with a
    ``_k`` suffix counting the repeats of a name (``layer4.1.relu_1``, ``flatten``, ``fc``).
    The names are those of the model's current mode; for a model in eval mode that both trace
    the same way, the list equals torchvision's eval-mode list (its second list). It
    differs where the tracers differ: graphsurgeon reads buffers as graph nodes (they appear
    here by their module path, e.g. ``bn.num_batches_tracked``), traces through torchvision.ops
    modules instead of keeping them whole, makes modules that branch on ``self.training``
    leaves, and binds forward arguments with defaults (see `trace`).

    ``trunk=`` also accepts a module path (``"layer4"``: what that module returns) and, for
    code written before qualified names, fx's node names (``layer4_1_relu_1``).

    Args:
        model: the backbone, or a graph module from `trace`.
        trace_kwargs: ``leaf_modules`` / ``concrete_args``, as for `trace`.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model, **trace_kwargs)
    return [node.meta[QUALNAME] for node in gm.graph.nodes if QUALNAME in node.meta]


def resolve_node(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The node ``name`` means in ``gm``: a qualified node name (see `get_graph_node_names`),
    else a module path (the module's output), else a field of a dict output (a Hugging Face
    model's ``pooler_output``), else an fx node name; ``None`` when none matches.

    Qualified names come first because they are the documented ones: a top-level
    ``flatten`` is torchvision's ``flatten`` even when fx calls an earlier, nested flatten
    ``flatten`` and this one ``flatten_1``.
    """
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.meta.get(QUALNAME) == name:
            return node
    by_name = {node.name: node for node in nodes}
    output = gm.meta.get(MODULE_OUTPUTS, {}).get(name)
    if output is not None and output in by_name:
        return by_name[output]
    field = gm.meta.get(OUTPUT_FIELDS, {}).get(name)
    if field is not None and field in by_name:
        return by_name[field]
    return by_name.get(name)


def _check_torch() -> None:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 11):  # pragma: no cover - environment guard
        raise ImportError(f"graphsurgeon needs torch >= 2.11, found {torch.__version__}")


_check_torch()
