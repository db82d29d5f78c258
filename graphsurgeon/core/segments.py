"""Cutting a traced backbone into a chain of segments.

A *cut point* is a position in topological order where few input-dependent values are live
(produced before, used after): its *boundary*. Between two cut points lies a segment: an
``fx.GraphModule`` that takes its start boundary and returns its end boundary and owns only its
parameters. Segments are the unit the task tree replicates and the surgery fuses, so a segment
must be runnable on its own and the chain of segments must reproduce the traced model exactly.

Most boundaries carry one value (a ResNet between its blocks): the segment takes and returns
that tensor. Inside an encoder-decoder (U-Net, FPN, DeepLab's low-level skip) or a dense block
no position has one live value, so a boundary may carry up to ``max_boundary_values`` tensors:
the segment then takes and returns their tuple, in the order they were computed. Its last value,
the latest computed, is the boundary's *main value* (the decoder's current feature map, with the
encoder skips before it): what similarity measures compare. A multi-value cut is taken only
between module blocks (see `segment`), never inside one: a residual block keeps its input live
to its final add, and a cut there would give no method a unit worth branching at (and would
change the segments of every single-value backbone).

Values that do not depend on the input (``get_attr`` parameters, constant tensors, shape
arithmetic on them) never count as live: they are re-created inside every segment that uses
them. A parameter used by two segments would be owned twice, so the segments in between are
merged into one.

Side inputs. A backbone may read model inputs besides its main one (a transformer's
``attention_mask``, a metadata vector beside an image). They are never live values either: what
is computed from them alone (BERT's extended attention mask) is re-created inside every segment
that reads it, and each segment takes the inputs it reads as extra arguments after its start
boundary (`Segment.side_inputs`): one mechanism, whether the boundary is one tensor or a tuple. When a backbone has side inputs, the main input's shape (``size``,
``dim``, ``shape``, ``dtype``, ``device``) is read the same way: the mask is expanded to the main
input's sequence length, and the main input itself reaches a later segment only for that read.
"""
from __future__ import annotations

import difflib
import operator
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphsurgeon.core.capture import is_torch_layer, is_view, writes_first_argument
from graphsurgeon.core.inputs import Inputs, split_inputs
from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.trace import (
    DEFAULT_TRUNK,
    LOOPED_CONTAINERS,
    MAIN_INPUT,
    MODULE_OUTPUTS,
    get_graph_node_names,
    graph_signature,
    qualified_name,
    resolve_node,
)
from graphsurgeon.errors import (
    BoundaryError,
    ExampleInputError,
    OptionError,
    TraceError,
    TrunkError,
    UnusedNodesWarning,
)

__all__ = [
    "MAX_BOUNDARY_VALUES",
    "Segment",
    "cut_points",
    "find_trunk",
    "fingerprint",
    "graph_inputs",
    "main_input",
    "segment",
]

MAX_BOUNDARY_VALUES = 8
"""Default bound on the values one segment boundary carries (``max_boundary_values=``): enough
for a five-level U-Net or a ResNet encoder's four skips plus the decoder feature, small enough
that a boundary stays a handful of tensors to hand between tree nodes."""

Granularity = Literal["block", "fine"]
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Segment:
    """One link of the backbone chain.

    Attributes:
        index: position in the chain, 1-based (depth 0 of the task tree is the input).
        module: the runnable segment; one positional input, its start boundary (a tensor, or the
            tuple of the boundary's tensors), and it returns its end boundary the same way.
        input_names: fx names, in the traced graph, of the values that enter the segment, in
            the order they were computed (one name for a single-value boundary).
        output_names: fx names of the values it returns (the next segment's input).
        node_names: the fx names of the traced nodes it computes, in order.
        side_inputs: the model inputs (forward argument names) the module takes after its start
            boundary, in this order: side inputs (``attention_mask``), or the main input for its shape.

    fx names (``layer4_1_relu_1``) are unique within the graph and stable, which is what
    fingerprints and checkpoints need; `graphsurgeon.core.trace.qualified_name` gives a node's
    torchvision-style name (``layer4.1.relu_1``), the one users pass as ``trunk=``.
    """

    index: int
    module: fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    node_names: tuple[str, ...]
    side_inputs: tuple[str, ...] = ()

    @property
    def input_name(self) -> str:
        """The start boundary's main value (the latest computed; see the module docstring)."""
        return self.input_names[-1]

    @property
    def output_name(self) -> str:
        """The end boundary's main value (the trunk, for the last segment)."""
        return self.output_names[-1]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.module)


def fingerprint(module: fx.GraphModule) -> str:
    """The segment's code plus the type and configuration of every module it calls.

    Equal fingerprints mean interchangeable weights: the code alone would not tell a ReLU from
    a GELU, or a stride-1 from a stride-2 convolution.
    """
    calls = [
        f"{n.target}: {type(module.get_submodule(n.target)).__name__}({module.get_submodule(n.target).extra_repr()})"
        for n in module.graph.nodes
        if n.op == "call_module"
    ]
    return "\n".join([module.code, *calls])


def _value_nodes(node: fx.Node) -> list[fx.Node]:
    """First node inside a (possibly nested) output structure."""
    found: list[fx.Node] = []
    fx.node.map_arg(node.args, found.append)
    return found


def _describe_nodes(gm: fx.GraphModule) -> str:
    names = get_graph_node_names(gm)
    return ", ".join(names[-8:])


def _traced_through_modules(gm: fx.GraphModule) -> set[str]:
    """Module paths the graph's nodes were traced inside (fx's ``nn_module_stack``)."""
    return {path for n in gm.graph.nodes for path, _ in n.meta.get("nn_module_stack", {}).values()}


SPATIAL = "spatial"
"""``trunk="spatial"``: the backbone's last feature map, for dense tasks (see `find_trunk`)."""


def _spatial_trunk(gm: fx.GraphModule) -> fx.Node:
    """The last value on the way to the default trunk that is still a feature map (N, C, H, W
    with H·W > 1): where a classifier backbone still has its spatial layout, which dense heads
    (segmentation, depth) need. Needs the shapes of shape propagation (``example_input``)."""
    default = find_trunk(gm, None)
    ancestors = _ancestors([default], set())
    maps = []
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if n in ancestors and n.op != "placeholder" and isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata):
            if len(meta.shape) == 4 and meta.shape[2] * meta.shape[3] > 1:
                maps.append(n)
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise TrunkError(
            'trunk="spatial" needs the shapes of the backbone\'s values: pass example_input=<a batch> as well.'
        )
    if not maps:
        raise TrunkError(
            f'trunk="spatial": {type(gm).__name__} has no feature map (N, C, H, W with H*W > 1) before its '
            "classifier; pass trunk=<node name> (see graphsurgeon.get_graph_node_names(model))."
        )
    return maps[-1]


def _reads_parameter(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a function or method call takes a parameter read by ``get_attr`` as an input."""
    if node.op not in ("call_function", "call_method"):
        return False
    return any(a.op == "get_attr" and _params_of(a, gm) for a in node.all_input_nodes)


def find_trunk(gm: fx.GraphModule, trunk: str | None) -> fx.Node:
    """The node whose value the task heads consume.

    ``trunk`` is a qualified node name (``"layer4.1.relu_1"``, see
    `graphsurgeon.get_graph_node_names`), a module path (``"layer4"``: that module's output), or
    an fx node name (``"layer4_1_relu_1"``, as older code and checkpoints name nodes).

    ``"spatial"`` picks the last feature map before the classifier (dense tasks; needs shapes,
    i.e. ``example_input``).

    ``None`` picks, for a Hugging Face model, its ``pooler_output`` (else its
    ``last_hidden_state``: see `graphsurgeon.core.trace._record_output_fields`); for any other
    model, the input of the final classifier: the last parametrised module on the way to the
    output (``fc`` in ResNet, ``heads.head`` in ViT), so that the default trunk is what
    the backbone's own classifier saw. A model whose final module call is an ``nn.Identity``
    and whose last parametrised module is not an ``nn.Linear`` has had its classifier removed
    (timm's ``num_classes=0``, ``model.fc = nn.Identity()``): its own output is already the
    pooled features, and is the default trunk. (A timm model *with* a classifier also ends in
    an Identity, its head's ``flatten``, but after the Linear ``fc``.)
    """
    if trunk == SPATIAL:
        return _spatial_trunk(gm)
    if trunk is None and DEFAULT_TRUNK in gm.meta:
        # the capture chose it: torch.export graphs have no module calls to look for, and a
        # Hugging Face model's default is its pooled (or per-token) output
        trunk = gm.meta[DEFAULT_TRUNK]
    if trunk is not None:
        node = resolve_node(gm, trunk)
        if node is None or node.op == "output":
            names = get_graph_node_names(gm)
            modules = sorted(gm.meta.get(MODULE_OUTPUTS, {}))
            close = difflib.get_close_matches(trunk, list(dict.fromkeys(names + modules)), n=5, cutoff=0.5)
            hint = f" Close matches: {close}." if close else f" Last nodes: {_describe_nodes(gm)}."
            if trunk in _traced_through_modules(gm):
                raise TrunkError(
                    f"trunk={trunk!r} is a module of {type(gm).__name__} that returns several values (or none), "
                    f"so it has no one output to end the trunk at. Name one node inside it instead: "
                    f"{[n for n in names if n.startswith(trunk + '.')][-3:]} (see graphsurgeon.get_graph_node_names(model))."
                )
            raise TrunkError(
                f"trunk={trunk!r} is neither a node nor a module of the traced {type(gm).__name__} graph.{hint} "
                "Use graphsurgeon.get_graph_node_names(model) to list the valid names."
            )
        if node.op == "placeholder":
            raise TrunkError(
                f"trunk={trunk!r} is the model input, which leaves no backbone to share. "
                "Name a node after the first layer (see graphsurgeon.get_graph_node_names(model))."
            )
        return node
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = _value_nodes(output)
    if not leaves:
        raise TrunkError(f"{type(gm).__name__} returns no tensor; pass trunk=<node name> explicitly.")
    ancestors = _ancestors([leaves[0]], set())
    calls = [n for n in gm.graph.nodes if n in ancestors and n.op == "call_module"]
    parametrised = [n for n in calls if any(True for _ in gm.get_submodule(n.target).parameters())]
    # the last op that uses parameters, modules or functional ops on get_attr weights (timm's
    # LayerNorm subclass is traced through into F.layer_norm)
    weighted = [n for n in gm.graph.nodes if n in ancestors and (n in parametrised or _reads_parameter(n, gm))]
    last_is_linear = bool(weighted) and (
        (weighted[-1].op == "call_module" and isinstance(gm.get_submodule(weighted[-1].target), nn.Linear))
        or (weighted[-1].op == "call_function" and weighted[-1].target is torch.nn.functional.linear)
    )
    if (
        calls
        and isinstance(gm.get_submodule(calls[-1].target), nn.Identity)
        and not last_is_linear
        and leaves[0].op != "placeholder"
    ):
        # the classifier was replaced by an Identity: no Linear follows the features any more
        # (timm's heads call an Identity ``flatten`` after their Linear ``fc``, hence that check)
        return leaves[0]
    for node in reversed(parametrised):
        if node.all_input_nodes:
            trunk_node = node.all_input_nodes[0]
            if trunk_node.op == "placeholder":
                break
            return trunk_node
    raise TrunkError(
        f"cannot find a final classifier in {type(gm).__name__} to end the trunk at. "
        "Pass trunk=<node name> (see graphsurgeon.get_graph_node_names(model))."
    )


_INPLACE_OPERATORS = frozenset(
    {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv}
)
# ops whose result shares memory with their first argument: writing to it writes to that argument
_VIEW_METHODS = frozenset(
    {"view", "view_as", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze", "expand",
     "expand_as", "narrow", "select", "unflatten", "detach", "contiguous", "t", "chunk", "split", "unbind"}
)


def written_value(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The value ``node`` writes in place (``x.div_(p)``, ``x[i] = y``, ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)(x)``), followed back through views to the value that owns the
    memory; ``None`` for a node that writes nothing.

    An in-place op whose result is not used again is a side effect that a graph walk over data
    edges would drop (timm's ``DropPath`` scales with ``div_`` and uses the tensor it scaled).
    """
    writes = False
    if node.op == "call_method" and isinstance(node.target, str):
        writes = node.target.endswith("_") and not node.target.startswith("_")
    elif isinstance(node.target, torch._ops.OpOverload):  # an aten op (torch.export): its schema says
        writes = writes_first_argument(node)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        writes = (
            node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.startswith("_"))
            or node.kwargs.get("inplace") is True
        )
    elif node.op == "call_module":
        writes = getattr(gm.get_submodule(node.target), "inplace", False) is True
    if not writes or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return _memory_owner(node.args[0])


def _memory_owner(value: fx.Node) -> fx.Node:
    while (
        (value.op == "call_method" and value.target in _VIEW_METHODS)
        or (value.op == "call_function" and value.target in (operator.getitem, torch.flatten, torch.reshape))
        or is_view(value)
    ) and value.args and isinstance(value.args[0], fx.Node):
        value = value.args[0]
    return value


def graph_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders a call of ``gm`` must be given: not those of ``concrete_args`` (fx keeps
    one, with the value as its default, for an assert)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]


def main_input(gm: fx.GraphModule) -> fx.Node:
    """The placeholder the segment chain carries (see `graphsurgeon.core.trace`); the first one
    of a graph that does not say (torch.export's)."""
    placeholders = graph_inputs(gm)
    return next((p for p in placeholders if p.name == gm.meta.get(MAIN_INPUT)), placeholders[0])


_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})


def _reads_shape(node: fx.Node) -> bool:
    """Whether ``node`` reads only the metadata of its first argument (``x.size(1)``, ``x.shape``)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and (
        node.target is len or (node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES)
    )


def _is_view_call(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in (operator.getitem, torch.flatten, torch.reshape)
    )


def _input_dependent(gm: fx.GraphModule, side: bool = False) -> tuple[dict[fx.Node, bool], frozenset[fx.Node]]:
    """Which values must flow through the segment chain (computed once, in order) rather than be
    re-created inside every segment that reads them: everything computed from the main input,
    every in-place write (a side effect that must happen exactly once) and every computed value
    that is written in place (each re-created copy would miss the write). Side inputs and, when
    the trunk reads some (``side``), the main input's shape are read where needed (see the
    module docstring): also the shape of a view of it (GPT-2 reads its batch size from
    ``input_ids.view(-1, n)``), so the main input and its views are also returned, as values
    that a segment may re-create for such a read."""
    written = {written_value(n, gm) for n in gm.graph.nodes} - {None}
    main = main_input(gm)
    dep: dict[fx.Node, bool] = {}
    views: set[fx.Node] = {main} if side else set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            dep[n] = n is main
        elif side and _reads_shape(n) and n.args and n.args[0] in views:
            dep[n] = False
        elif n.op == "get_attr":
            dep[n] = False
        else:
            dep[n] = (
                any(dep[a] for a in n.all_input_nodes)
                or (n.op == "call_module" and not n.all_input_nodes)
                or n in written
                or written_value(n, gm) is not None
            )
            if side and _is_view_call(n) and n.args[0] in views and all(a in views or not dep[a] for a in n.all_input_nodes):
                views.add(n)
    return dep, frozenset(views)


def _ancestors(nodes: Iterable[fx.Node], into: set[fx.Node]) -> set[fx.Node]:
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in into:
            into.add(n)
            stack.extend(n.all_input_nodes)
    return into


def _prune_to(
    gm: fx.GraphModule, trunk: fx.Node
) -> tuple[list[fx.Node], dict[fx.Node, bool], frozenset[fx.Node]]:
    """The input-dependent nodes the trunk needs, in order, with the side effects among them;
    also `_input_dependent`'s answers.

    Side effects are asserts that check needed values and in-place writes before the trunk to
    a value the trunk computes or to a buffer (their result is often unused: the written tensor
    is what is read again); a write pulls in what it reads, which may be written to in turn.
    """
    needed = _ancestors([trunk], set())
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    writes = [(n, written_value(n, gm)) for n in gm.graph.nodes if position[n] < position[trunk]]
    writes = [(n, owner) for n, owner in writes if owner is not None]
    grown = True
    while grown:
        grown = False
        for n, owner in writes:
            if n not in needed and (owner.op == "get_attr" or owner in needed):
                _ancestors([n], needed)
                grown = True
    main = main_input(gm)
    dep, views = _input_dependent(gm, side=any(n.op == "placeholder" and n is not main for n in needed))
    order: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "output" or not dep.get(n, False):
            continue
        # keep asserts (no users) that only check values the trunk needs
        if n in needed or (not n.users and n.op == "call_function" and set(n.all_input_nodes) <= needed):
            order.append(n)
            needed.add(n)
    return order, dep, views


def _check_same_in_both_modes(
    gm: fx.GraphModule, order: Sequence[fx.Node], other: fx.GraphModule, trunk: str | None, trunk_node: fx.Node
) -> tuple[fx.Node, list[fx.Node], dict[fx.Node, bool]]:
    """Refuse a trunk whose graph differs between train and eval mode (see `graphsurgeon.core.trace`):
    the segments would run the traced mode's path in both modes. Returns the other mode's trunk
    node, pruned order and input dependence (`_prune_to`), for `_left_outside`."""
    if trunk == SPATIAL:  # resolved on gm's shapes; the other mode's graph has none
        trunk = trunk_node.name
    if trunk is not None and resolve_node(other, trunk) is None:
        raise TraceError(
            f"trunk={trunk!r} exists only when the model is traced in "
            f"{'train' if gm.training else 'eval'} mode: the backbone computes differently in the two modes. "
            "Pass the module that branches on self.training in leaf_modules=[...], or pick a trunk node "
            "that both modes compute."
        )
    other_trunk = find_trunk(other, trunk)
    other_order, other_dep, _ = _prune_to(other, other_trunk)
    mine, theirs = graph_signature(order), graph_signature(other_order)
    if mine == theirs:
        return other_trunk, other_order, other_dep
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    node = order[min(first, len(order) - 1)]
    stack = list(node.meta.get("nn_module_stack", {}).values())
    where = f"module {stack[-1][0]!r}" if stack else f"the top-level {type(gm).__name__}.forward"
    fix = (
        f"pass leaf_modules=[{stack[-1][0]!r}] so it follows the mode at run time"
        if stack
        else "move the mode-dependent code into a submodule"
    )
    before = order.index(node) - 1 if node in order else -1
    if before >= 0:
        fix += f", or end the trunk before it (trunk={qualified_name(order[before])!r})"
    raise TraceError(
        f"{type(gm).__name__} computes its trunk differently in train and eval mode, from node {qualified_name(node)!r} "
        f"in {where} on (it branches on self.training, or calls a function with training=self.training); "
        f"a traced graph would keep one mode's path in both modes. Fix: {fix}."
    )


def _left_outside(gm: fx.GraphModule, trunk: fx.Node, order: Sequence[fx.Node], dep: dict[fx.Node, bool]) -> list[fx.Node]:
    """The nodes of the model's computation that the segments drop: computed from the input and
    reaching the model's output (or writing in place), but neither in ``order`` (the trunk's
    ancestors, see `_prune_to`) nor after the trunk. What comes after the trunk is the classifier
    the task heads replace; constants, parameters, shape reads (LRASPP's head upsamples to
    ``x.shape[-2:]``) and dead code (an unpacked ``x.shape`` entry nobody reads) are no
    computation of the model's."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    computed = _ancestors([output, *(n for n in gm.graph.nodes if written_value(n, gm) is not None)], set())
    after: set[fx.Node] = set()
    stack = [trunk]
    while stack:
        n = stack.pop()
        if n not in after:
            after.add(n)
            stack.extend(n.users)
    dropped = computed - set(order) - after
    return [
        n
        for n in gm.graph.nodes
        if n in dropped and dep.get(n, False) and n.op not in ("placeholder", "output") and not _is_shape_value(n)
    ]


def _callers_level() -> int:
    """The ``stacklevel`` of the innermost caller outside graphsurgeon, for a warning of the
    function calling this: the warning then points at the user's ``multitask(...)`` line."""
    package = str(Path(__file__).resolve().parents[1]) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _left_outside_message(gm: fx.GraphModule, trunk: fx.Node, left_out: dict[bool, list[fx.Node]]) -> str:
    """`UnusedNodesWarning`'s text: the dropped nodes grouped by the module they belong to (the
    deepest module path shared by a top-level module's dropped nodes: ``aux1``,
    ``classifier.low_classifier``), with the mode they are dropped in when only one mode computes
    them (GoogLeNet runs ``aux1`` in train mode only)."""
    root = gm.meta.get("graphsurgeon_root_type", type(gm)).__name__
    groups: dict[str, dict[bool, list[fx.Node]]] = {}
    for training, nodes in left_out.items():
        for n in nodes:
            stack = [path for path, _ in n.meta.get("nn_module_stack", {}).values()]
            groups.setdefault(stack[0] if stack else "", {}).setdefault(training, []).append(n)
    parts = []
    for top, by_mode in groups.items():
        nodes = by_mode.get(gm.training) or next(iter(by_mode.values()))
        paths = [[path for path, _ in n.meta.get("nn_module_stack", {}).values()] for n in nodes]
        common = [p for p in paths[0] if all(p in ps for ps in paths)]
        where = common[-1] if common else (top or f"the top-level {root}.forward")
        names = [qualified_name(n) for n in nodes]
        shown = "" if names == [where] else ": " + (names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}")
        count = f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}"
        mode = "" if len(by_mode) > 1 or len(left_out) == 1 else f" in {'train' if next(iter(by_mode)) else 'eval'} mode"
        parts.append(f"{where} ({count}{mode}{shown})")
    return (
        f"{root} computes values that the multi-task network will not run: {'; '.join(parts)}. They are neither on "
        f"the way to the trunk {qualified_name(trunk)!r} nor after it (an auxiliary classifier, a skip connection "
        "into the classifier), so the tasks never see them. If the tasks need them, pick a trunk that consumes them "
        "(see graphsurgeon.get_graph_node_names(model)); if not, silence this with "
        "warnings.filterwarnings('ignore', category=graphsurgeon.UnusedNodesWarning)."
    )


def _is_tensor_like(node: fx.Node) -> bool:
    """Whether a live value can be passed between segments as a tensor.

    Shape propagation gives the answer when it ran; without it (`graphsurgeon.load` cuts
    without an example input, and must find the same cuts), shapes and the arithmetic on them
    are rejected (`_is_shape_value`), and so are values only consumed by ``getitem`` (tuples).
    """
    meta = node.meta.get("tensor_meta")
    if meta is not None:
        return isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata)
    if isinstance(node.meta.get("type"), type):  # shape propagation ran and found no tensor (a torch.Size)
        return issubclass(node.meta["type"], torch.Tensor)
    if "example_value" in node.meta:
        return isinstance(node.meta["example_value"], torch.Tensor)
    if _is_shape_value(node):
        return False
    users = list(node.users)
    return not users or not all(u.op == "call_function" and u.target is operator.getitem for u in users)


def _is_shape_value(node: fx.Node) -> bool:
    """A shape query (``x.size()``, ``x.shape``, ``len(x)``) or Python arithmetic on shapes only
    (GPT-2's ``input_shape + (hidden,)``, a ``torch.Size``): not a tensor, without running it."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target in (getattr, len):
        return True
    return (
        node.op == "call_function"
        and getattr(node.target, "__module__", None) == "_operator"
        and bool(node.all_input_nodes)
        and all(_is_shape_value(a) for a in node.all_input_nodes)
    )


def _live_sets(order: Sequence[fx.Node], trunk: fx.Node) -> Iterator[tuple[int, dict[fx.Node, None]]]:
    """For each position ``i`` of ``order``, the values live after it (produced at or before
    ``i``, used after it; the trunk is used by the heads), as an insertion-ordered dict: the
    order they were computed in. The dict is updated in place between positions: copy it."""
    index = {n: i for i, n in enumerate(order)}
    last_use = {}
    for n in order:
        uses = [index[u] for u in n.users if u in index]
        last_use[n] = max(uses, default=index[n])
    last_use[trunk] = len(order)  # consumed by the heads
    ending: dict[int, list[fx.Node]] = {}
    for n in order:
        if last_use[n] > index[n]:
            ending.setdefault(last_use[n], []).append(n)
    live: dict[fx.Node, None] = {}
    for i, n in enumerate(order):
        for done in ending.get(i, ()):
            del live[done]
        if last_use[n] > i:
            live[n] = None
        yield i, live


def cut_points(order: Sequence[fx.Node], trunk: fx.Node, max_values: int = 1) -> dict[int, tuple[fx.Node, ...]]:
    """Positions ``i`` in ``order`` after which 1..``max_values`` tensors are live, with those
    values in the order they were computed (the last is the main value).

    The main value is not always ``order[i]``: a node without users (an assert) may come last.
    """
    end = order.index(trunk)
    cuts = {}
    for i, live in _live_sets(order, trunk):
        if i > end:
            break
        if 1 <= len(live) <= max_values and all(_is_tensor_like(v) for v in live):
            cuts[i] = tuple(live)
    return cuts


def _outer_block_of(node: fx.Node, gm: fx.GraphModule) -> str:
    """The block a multi-value cut may not enter: a composite top-level module that is not a
    container (GoogLeNet's ``inception3a``, a U-Net's ``down1``) as a whole, else `_block_of`.
    (`_block_of` finds the first container on the way down, which inside ``inception3a`` is its
    ``branch2`` Sequential: cutting between the branches of an inception block at four live
    values would split it into pieces no method branches at.) The layers of a ModuleList that
    forward loops over stay blocks (BERT's ``encoder.layer.0``, which read the attention mask:
    two live values between them)."""
    block = _block_of(node, gm)
    if "." in block and block.rsplit(".", 1)[0] in gm.meta.get(LOOPED_CONTAINERS, frozenset()):
        return block
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if stack and not (len(stack) == 1 and _is_layer_call(node, stack[0][0], stack[0][1])):
        kind = stack[0][1]
        if not (isinstance(kind, type) and issubclass(kind, _CONTAINERS)):
            return stack[0][0]
    return block


def _inner_block_of(node: fx.Node, gm: fx.GraphModule) -> str:
    """`_outer_block_of`, descended through containers to the first composite module that is not
    one: the dense layers of DenseNet's ``denseblock1`` (a ModuleDict inside ``features``), the
    blocks of a stage that is an ``nn.Sequential``. Where fine granularity may cut at several
    values: between these, never inside them (a residual block's own layers)."""
    block = _outer_block_of(node, gm)
    stack = list(node.meta.get("nn_module_stack", {}).values())
    paths = [path for path, _ in stack]
    if block not in paths:
        return block
    i = paths.index(block)
    while i + 1 < len(stack):
        kind = stack[i][1]
        if not (isinstance(kind, type) and issubclass(kind, _CONTAINERS)):
            break
        if i + 1 == len(stack) - 1 and _is_layer_call(node, stack[i + 1][0], stack[i + 1][1]):
            break  # a container of primitive layers (a stem) stays one block
        i += 1
    return stack[i][0]


def _boundaries(
    gm: fx.GraphModule, order: Sequence[fx.Node], trunk: fx.Node, granularity: Granularity, max_values: int
) -> dict[int, tuple[fx.Node, ...]]:
    """The positions to cut after, with the values each boundary carries.

    One value: between module blocks (`_block_of`) at ``"block"``, anywhere at ``"fine"`` (the
    cuts of single-value backbones, unchanged). Several: between the outer blocks
    (`_outer_block_of`) at ``"block"``, between the inner ones (`_inner_block_of`) at
    ``"fine"``. A block boundary of tensors wider than ``max_values`` is refused with the node
    and the setting that would allow it (a fine boundary of that width is skipped: fine cuts
    wherever it can, not where a user expects a cut).
    """
    end = order.index(trunk)
    memo: dict[tuple[str, fx.Node], str] = {}
    blocks = {"single": _block_of, "multi": _inner_block_of if granularity == "fine" else _outer_block_of}

    def between(i: int, kind: str) -> bool:
        if i in (0, end):
            return True
        if kind == "single" and granularity == "fine":
            return True
        a, b = (memo.setdefault((kind, n), blocks[kind](n, gm)) for n in (order[i], order[i + 1]))
        return a != b

    cuts: dict[int, tuple[fx.Node, ...]] = {}
    for i, live in _live_sets(order, trunk):
        if i > end:
            break
        if not live or not between(i, "single" if len(live) == 1 else "multi"):
            continue
        if i == end and len(live) > 1:
            _dangling_trunk(order, trunk, live)
        values = tuple(live)
        if not all(_is_tensor_like(v) for v in values):
            continue
        if len(values) > max_values:
            if granularity == "block":
                _too_wide(order[i], order[i + 1], values, max_values)
            continue
        cuts[i] = values
    return cuts


def _dangling_trunk(order: Sequence[fx.Node], trunk: fx.Node, live: Iterable[fx.Node]) -> None:
    """Refuse a trunk after which the backbone still reads other values: the segments end at the
    trunk, so whatever reads them would silently be dropped."""
    after = order[order.index(trunk) + 1 :]
    others = [v for v in live if v is not trunk]
    readers = [u for u in after if any(v in u.all_input_nodes for v in others)]
    raise TrunkError(
        f"trunk={qualified_name(trunk)!r} leaves {[qualified_name(v) for v in others]} dangling: the backbone still "
        f"reads them after the trunk (in {[qualified_name(u) for u in readers]}), and the segments end at the trunk. "
        f"Pick a trunk node after {qualified_name(readers[-1]) if readers else 'them'!r} that consumes them "
        "(see graphsurgeon.get_graph_node_names(model))."
    )


def _too_wide(last: fx.Node, first: fx.Node, values: Sequence[fx.Node], max_values: int) -> None:
    names = [qualified_name(v) for v in values]
    shown = names if len(names) <= 10 else [*names[:5], "...", *names[-4:]]
    raise BoundaryError(
        f"the block boundary after node {qualified_name(last)!r} (before {qualified_name(first)!r}) carries "
        f"{len(values)} live tensors {shown}, more than max_boundary_values={max_values}. Pass "
        f"max_boundary_values={len(values)} to cut there, or granularity='fine' to skip boundaries that wide."
    )


def _block_of(node: fx.Node, gm: fx.GraphModule) -> str:
    """The module block a node belongs to: the outermost module whose parent is a container.

    ResNet's BasicBlocks are children of a ``Sequential``, a Hugging Face model's layers elements
    of a ``ModuleList`` its forward loops over; a composite module directly under
    the root (GoogLeNet's inception blocks) is a block too; primitive layers and glue code at
    the top level (ResNet's stem conv/bn/relu, pooling, flatten) belong to the block ``""``. Only the original module *types* are
    consulted (from ``nn_module_stack``): the GraphModule's own submodules are plain copies.
    """
    stack = list(node.meta.get("nn_module_stack", {}).values())
    root_type = gm.meta.get("graphsurgeon_root_type", nn.Module)
    looped = gm.meta.get(LOOPED_CONTAINERS, frozenset())
    for i, (qualname, _) in enumerate(stack):
        # the stack holds the original module types; gm's own submodules are plain copies
        parent_type = stack[i - 1][1] if i > 0 else root_type
        # a ModuleList that forward loops over (BertEncoder.layer) is never called, so it is not
        # on the stack: its elements are recognised by their path
        in_looped = "." in qualname and qualname.rsplit(".", 1)[0] in looped
        if in_looped or (isinstance(parent_type, type) and issubclass(parent_type, _CONTAINERS)):
            primitive = i == len(stack) - 1 and _is_layer_call(node, qualname, stack[i][1])
            # a container of primitive layers (regnet's stem: conv, bn, relu) is one block,
            # unless it is the backbone itself (a user's plain nn.Sequential)
            return stack[i - 1][0] if primitive and i > 0 else qualname
    # no container above: a composite top-level child (GoogLeNet's inception3a) is a block;
    # a primitive top-level layer (ResNet's conv1, bn1) is glue that joins its neighbours
    if stack and not (len(stack) == 1 and _is_layer_call(node, stack[0][0], stack[0][1])):
        return stack[0][0]
    return ""


def _is_layer_call(node: fx.Node, qualname: str, module_type: object) -> bool:
    """Whether ``node`` is the call of a primitive layer at ``qualname``: fx keeps it as one
    ``call_module``; torch.export records its aten ops inside a torch.nn module type."""
    if node.op == "call_module":
        return node.target == qualname
    return is_torch_layer(module_type)


def _params_of(node: fx.Node, gm: fx.GraphModule) -> list[str]:
    """Qualified names of the parameters a node touches directly."""
    if node.op == "call_module":
        prefix = node.target
        return [f"{prefix}.{p}" for p, _ in gm.get_submodule(prefix).named_parameters()]
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return [node.target] if isinstance(obj, nn.Parameter) else []
    return []


def _constant_closure(node: fx.Node, dep: dict[fx.Node, bool], views: frozenset[fx.Node] = frozenset()) -> list[fx.Node]:
    """The input-independent nodes a node reads, transitively, and the ``views`` of the main
    input they read the shape of (see `_input_dependent`): what a segment re-creates."""
    found, stack = [], [a for a in node.all_input_nodes if not dep[a]]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        found.append(n)
        stack.extend(a for a in n.all_input_nodes if not dep[a] or a in views)
    return found


def _segment_params(
    nodes: Sequence[fx.Node],
    gm: fx.GraphModule,
    dep: dict[fx.Node, bool],
    views: frozenset[fx.Node],
    written_buffers: set[str],
) -> set[str]:
    """The state a range of nodes owns: parameters, and the buffers written in place that it
    reads (a segment copy owns its buffers, so the reader of a write must be its segment)."""
    params: set[str] = set()
    for n in nodes:
        params.update(_params_of(n, gm))
        closure = _constant_closure(n, dep, views)
        for c in closure:
            params.update(_params_of(c, gm))
        params.update(str(c.target) for c in (n, *closure) if c.target in written_buffers)
    return params


def _build(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    inputs: tuple[fx.Node, ...],
    outputs: tuple[fx.Node, ...],
    dep: dict[fx.Node, bool],
    views: frozenset[fx.Node],
    index: int,
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """The segment computing ``nodes``: it takes ``inputs`` (a tensor, or their tuple) and the
    model inputs it reads besides them, and returns ``outputs`` the way it takes ``inputs``;
    also the names of those model inputs, in the order it takes them."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    boundary = graph.placeholder(inputs[0].name if len(inputs) == 1 else "boundary")
    closure = (c for n in nodes for c in (n, *_constant_closure(n, dep, views)))
    read = {a for c in closure for a in c.all_input_nodes if a.op == "placeholder"}
    extra = [p for p in gm.graph.nodes if p.op == "placeholder" and p in read and p not in inputs]
    env.update((p, graph.placeholder(p.name)) for p in extra)
    if len(inputs) == 1:
        env[inputs[0]] = boundary
    else:
        for k, value in enumerate(inputs):
            env[value] = graph.create_node("call_function", operator.getitem, (boundary, k), name=value.name)
    for value in inputs:
        if any(written_value(n, gm) is value for n in nodes):
            # the input is the parent node's output, which sibling branches read too: write to a copy
            env[value] = graph.call_method("clone", (env[value],))

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if dep[a] and a not in views:
                raise AssertionError(f"segment {index} reads {a.name}, which is live across its start")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[v] for v in outputs))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"Segment{index}"), tuple(str(p.target) for p in extra)


class _NodeTrackingShapeProp(ShapeProp):
    """Shape propagation that remembers the node it is running, to name it when it fails."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> object:
        self.current = n
        return super().run_node(n)


def _example_input_error(
    gm: fx.GraphModule, example_input: object, failed: fx.Node | None, exc: BaseException
) -> ExampleInputError:
    """Name the node and module the example input failed in, with the backbone's own message
    (ShapeProp wraps it in one about fx internals)."""
    cause = exc.__cause__ or exc
    where = "the backbone"
    if failed is not None:
        stack = list(failed.meta.get("nn_module_stack", {}).values())
        module = f" in module {stack[-1][0]!r}" if stack and failed.op != "call_module" else ""
        where = f"node {qualified_name(failed)!r}{module}"
    shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
    message = str(cause).splitlines()[0] if str(cause) else ""
    return ExampleInputError(
        f"example_input of shape {shape} does not run through {type(gm).__name__}: {where} raised "
        f"{type(cause).__name__}: {message}. Pass an example input the model takes (the input size it was "
        "built for, e.g. timm's img_size=, on the model's device and dtype)."
    )


def segment(
    gm: fx.GraphModule,
    trunk: str | None = None,
    granularity: Granularity = "block",
    example_input: Inputs | None = None,
    max_boundary_values: int = MAX_BOUNDARY_VALUES,
) -> list[Segment]:
    """Cut a traced backbone into a chain of segments ending at ``trunk``.

    Args:
        gm: the traced backbone (see `graphsurgeon.core.trace`).
        trunk: where the shared backbone ends: a qualified node name, a module path or an fx node
            name (see `find_trunk`); ``None``: the final classifier's input.
        granularity: ``"block"`` cuts only between module blocks (children of a container:
            ResNet's BasicBlocks, ViT's encoder layers, a stage of EfficientNet; composite
            top-level modules: a U-Net's ``down1`` ... ``up4``); ``"fine"`` at every position
            where one value is live, and between the blocks inside blocks (DenseNet's dense
            layers) where several are. Either way, adjacent cuts are merged so that every
            segment has parameters.
        example_input: when given, shapes are propagated so that only tensors are cut at; for a
            backbone with side inputs, a mapping of every graph input by its forward argument name
            (see `graphsurgeon.core.inputs`).
        max_boundary_values: the most tensors one boundary may carry (1: single-value cuts
            only, as before multi-value boundaries); a block boundary wider than this raises
            `BoundaryError` naming it.

    Returns:
        Segments 1..L; chaining them reproduces ``gm`` up to the trunk, bit for bit.

    Warns:
        UnusedNodesWarning: naming, by module, what the model computes from its input in either
            mode that is neither on the way to the trunk nor after it (see `_left_outside`): the
            segments never run it, so a skip connection or an auxiliary head is not lost unsaid.
    """
    if granularity not in ("block", "fine"):
        raise OptionError(
            f"granularity={granularity!r} is not a granularity; pass granularity='block' (cut between module "
            "blocks) or granularity='fine' (cut at every point where one tensor is live)."
        )
    if example_input is not None:
        # eval mode and no grad: shape propagation must not move the user's BatchNorm statistics
        prop = _NodeTrackingShapeProp(gm)
        placeholders = graph_inputs(gm)
        main = main_input(gm)
        x, side = split_inputs(example_input, str(main.target), [str(p.target) for p in placeholders if p is not main], "example_input")
        try:
            with eval_mode(gm), torch.no_grad():
                prop.propagate(*(x if p is main else side[str(p.target)] for p in placeholders))
        except Exception as exc:  # whatever the backbone's own code raises on an input it does not take
            raise _example_input_error(gm, x, prop.current, exc) from exc
    trunk_node = find_trunk(gm, trunk)
    order, dep, views = _prune_to(gm, trunk_node)
    left_out = {gm.training: _left_outside(gm, trunk_node, order, dep)}
    other_mode = gm.meta.get("graphsurgeon_other_mode")
    if other_mode is not None:
        other_trunk, other_order, other_dep = _check_same_in_both_modes(gm, order, other_mode, trunk, trunk_node)
        left_out[other_mode.training] = _left_outside(other_mode, other_trunk, other_order, other_dep)
    if trunk_node not in order:
        raise TrunkError(
            f"trunk={qualified_name(trunk_node)!r} does not depend on the model input. "
            "Choose a node computed from the input (see graphsurgeon.get_graph_node_names(model))."
        )
    if isinstance(max_boundary_values, bool) or not isinstance(max_boundary_values, int) or max_boundary_values < 1:
        raise OptionError(
            f"max_boundary_values={max_boundary_values!r} is not a bound; pass a positive int (default "
            f"{MAX_BOUNDARY_VALUES}; 1 cuts only where one tensor is live)."
        )
    live = _boundaries(gm, order, trunk_node, granularity, max_boundary_values)
    end = order.index(trunk_node)
    live[end] = (trunk_node,)
    cuts = sorted(live)
    ranges = [order[a + 1 : b + 1] for a, b in zip(cuts, cuts[1:])]
    written_buffers = {str(w.target) for n in order if (w := written_value(n, gm)) is not None and w.op == "get_attr"}
    params = [_segment_params(r, gm, dep, views, written_buffers) for r in ranges]
    # merge parameter-free ranges into a neighbour, and ranges that share a parameter
    bounds = list(zip(cuts, cuts[1:]))
    merged: list[tuple[int, int, set[str]]] = []
    for (a, b), p in zip(bounds, params):
        if merged and (not p or not merged[-1][2]):
            pa, _, pp = merged.pop()
            merged.append((pa, b, pp | p))
        else:
            merged.append((a, b, p))
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                if merged[i][2] & merged[j][2]:
                    a, _, _ = merged[i]
                    _, b, _ = merged[j]
                    union = set().union(*(m[2] for m in merged[i : j + 1]))
                    merged[i : j + 1] = [(a, b, union)]
                    changed = True
                    break
            if changed:
                break
    segments = []
    for k, (a, b, _) in enumerate(merged, start=1):
        nodes = order[a + 1 : b + 1]
        module, side_inputs = _build(gm, nodes, live[a], live[b], dep, views, k)
        names = (tuple(v.name for v in live[a]), tuple(v.name for v in live[b]))
        segments.append(Segment(k, module, *names, tuple(n.name for n in nodes), side_inputs))
    if any(left_out.values()):
        warnings.warn(_left_outside_message(gm, trunk_node, left_out), UnusedNodesWarning, stacklevel=_callers_level())
    return segments
