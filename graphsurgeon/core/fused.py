"""Horizontal fusion: the copies of one segment held by the nodes of one depth run as one call.

A task-specific or branched tree runs, at every depth, several copies of the SAME segment (each
tree node holds its own ``fx.GraphModule`` copy). `FusedExecutor` runs a depth's copies together:

* the per-node ``nn.Parameter`` s are stacked on every call with a differentiable ``torch.stack``
  and the first copy is called with them through ``torch.func.functional_call`` under
  ``torch.func.vmap``. The parameters stay each node's own (names ``seg3.n7....``, optimizer,
  surgery, checkpoints and export are untouched) and gradients reach each of them through the
  stack. vmap turns the T convolutions into one grouped convolution and the T GEMMs into one
  batched GEMM;
* buffers (BatchNorm running statistics, ``num_batches_tracked``) are stacked too; in training
  mode vmap updates the stacked copy and it is written back to every node, so the statistics
  equal the per-node loop's;
* inputs: nodes with one common parent read its output unbatched (``in_dims=None``: no copy);
  when the previous depth ran as one fused call in the same node order its stacked output is
  passed on as is; otherwise the parents' outputs are stacked. A segment at a multi-value
  boundary takes and returns a tuple of tensors: each is stacked and unstacked alike; side
  inputs (an ``attention_mask``) are the same for every copy and are passed unbatched;
* random ops run with ``randomness="different"``: every copy draws its own dropout mask, as in
  the loop, but not the loop's numbers (compare fused and loop with dropout off or in eval mode);
* nodes are grouped by `structure_key` (copies of one segment share it; a group node built by a
  custom ``init`` callable may not), and a group that vmap cannot run (an op without a batching
  rule, a data-dependent ``.item()``, BatchNorm with ``momentum=None``...) runs in the loop: the
  first time it is warned once, naming the depth and the error, and the structure is remembered
  as loop-only (in train and eval mode alike). Results are never silently wrong: vmap either
  computes the loop's function or raises, and a raise sends the group to the loop.

Heads (`FusedExecutor.run_heads`): when every head is an ``nn.Linear`` on the same features,
tasks that read the same leaf run through `graphsurgeon.kernels.heads` (one GEMM where the
dispatcher finds it faster), with the heads' own ``weight`` / ``bias`` parameters.
"""
from __future__ import annotations

import copy
import itertools
import logging
import threading
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from graphsurgeon.errors import InvariantError
from graphsurgeon.kernels.heads import batched_heads

__all__ = ["FusedExecutor", "LevelOutputs", "structure_key"]

_log = logging.getLogger(__name__)

# (node name, node id, parent id) of one node the forward pass runs
NodeRun = tuple[str, int, int]
# what a segment takes and returns: a tensor, or the tuple of a multi-value boundary's tensors
Boundary = Tensor | tuple[Tensor, ...]


class LevelOutputs(dict):
    """Outputs of one depth's nodes by node id (a plain dict to callers).

    ``stacked`` is ``(node ids, tensor)`` when one fused call produced every output, so that the
    next depth (or the heads) can read them as one (G, ...) tensor without stacking them again
    (a tuple of such tensors at a multi-value boundary).
    """

    stacked: tuple[tuple[int, ...], Tensor | tuple[Tensor, ...]] | None = None


_STATIC_KEYS: weakref.WeakKeyDictionary[nn.Module, Hashable] = weakref.WeakKeyDictionary()


def structure_key(module: nn.Module) -> Hashable:
    """What must agree for copies to run as one vmapped call of the first of them.

    The class (for a GraphModule: its generated code), the module tree's repr (hyper-parameters
    such as strides), the parameter and buffer names and shapes (cached per module: they do not
    change in place), and the training flags of every submodule (read each call: ``net.train()``
    flips them).
    """
    static = _STATIC_KEYS.get(module)
    if static is None:
        static = (
            # fx gives every GraphModule its own class; its forward is its code
            module.code if isinstance(module, fx.GraphModule) else type(module),
            repr(module),
            tuple((n, tuple(p.shape)) for n, p in module.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in module.named_buffers()),
        )
        _STATIC_KEYS[module] = static
    return static, tuple(m.training for m in module.modules())


class FusedExecutor:
    """Runs a depth's segment copies as fused calls; see the module docstring."""

    def __init__(self) -> None:
        self._loop_only: set[Hashable] = set()

    # the loop-only memo is a cache: copies and pickles of a network start without it
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> FusedExecutor:
        return FusedExecutor()

    # ------------------------------------------------------------------ segments
    def run_level(
        self,
        depth: int,
        level: Mapping[str, nn.Module],
        nodes: Sequence[NodeRun],
        values: Mapping[int, Boundary],
        side: Sequence[Tensor] = (),
    ) -> LevelOutputs:
        """Outputs of ``nodes`` (all at ``depth``) from their parents' outputs ``values`` and the
        model inputs ``side`` every one of them takes after it."""
        groups: dict[Hashable, list[NodeRun]] = {}
        for node in nodes:
            groups.setdefault(structure_key(level[node[0]]), []).append(node)
        results: dict[int, Boundary] = {}
        stacked = None
        for key, members in groups.items():
            if len(members) > 1 and key[0] not in self._loop_only:
                modules = [level[name] for name, _, _ in members]
                try:
                    x, in_dim = gather_inputs(values, [parent for _, _, parent in members])
                    fused = fused_call(modules, x, in_dim, side)
                except Exception as exc:
                    # An op vmap cannot run: the loop succeeds, so remember the structure as
                    # loop-only and warn once. An error in the user's input: the loop raises it.
                    results.update(_loop(level, members, values, side))
                    self._fall_back(depth, key, len(members), exc)
                    continue
                ids = tuple(node_id for _, node_id, _ in members)
                results.update(zip(ids, _unstack(fused)))
                if len(groups) == 1:
                    stacked = (ids, fused)
                continue
            results.update(_loop(level, members, values, side))
        out = LevelOutputs((node_id, results[node_id]) for _, node_id, _ in nodes)
        out.stacked = stacked
        return out

    def _fall_back(self, depth: int, key: Hashable, copies: int, exc: Exception) -> None:
        self._loop_only.add(key[0])  # train or eval: the same ops
        lines = str(exc).strip().splitlines()
        _log.warning(
            "horizontal fusion: the %d copies of segment %d run in a loop, not fused, because vmap "
            "cannot run them: %s: %s",
            copies, depth, type(exc).__name__, lines[0] if lines else "",
        )

    # ------------------------------------------------------------------ heads
    def run_heads(
        self,
        heads: Mapping[str, nn.Module],
        tasks: Sequence[str],
        leaf_of: Mapping[str, int],
        leaves: Mapping[int, Tensor],
    ) -> dict[str, Tensor] | None:
        """``{task: head output}`` through batched heads, or None when the heads are not all
        ``nn.Linear`` on the same 2-D features (then the caller's per-task loop runs, and reports
        mismatches).
        """
        linears = [heads[t] for t in tasks]
        if len(linears) < 2 or any(type(h) is not nn.Linear for h in linears):
            return None
        width, has_bias = linears[0].in_features, linears[0].bias is not None
        if any(h.in_features != width or (h.bias is not None) != has_bias for h in linears):
            return None
        by_leaf: dict[int, list[str]] = {}
        for t in tasks:
            by_leaf.setdefault(leaf_of[t], []).append(t)
        if any(leaves[leaf].dim() != 2 or leaves[leaf].shape[1] != width for leaf in by_leaf):
            return None
        stacked = getattr(leaves, "stacked", None)
        if len(by_leaf) == len(tasks) and stacked is not None and stacked[0] == tuple(by_leaf):
            # every task on its own leaf, all produced by one fused call in task order: no copy
            return dict(zip(tasks, _linear_heads(stacked[1], linears)))
        out: dict[str, Tensor] = {}
        for leaf, group in by_leaf.items():
            z = leaves[leaf]
            if len(group) == 1:
                out[group[0]] = heads[group[0]](z)
            else:
                out.update(zip(group, _linear_heads(z, [heads[t] for t in group])))
        return {t: out[t] for t in tasks}


def _loop(
    level: Mapping[str, nn.Module], members: Sequence[NodeRun], values: Mapping[int, Boundary], side: Sequence[Tensor]
) -> Iterator[tuple[int, Boundary]]:
    """The reference: each node's own copy on its parent's output."""
    return ((node_id, level[name](values[parent], *side)) for name, node_id, parent in members)


def _linear_heads(x: Tensor, linears: Sequence[nn.Linear]) -> list[Tensor]:
    biases = None if linears[0].bias is None else [h.bias for h in linears]
    return batched_heads(x, [h.weight for h in linears], biases)


def _unstack(fused: Boundary) -> list[Boundary]:
    """The per-copy outputs of a fused call: its (G, ...) tensor, or each tensor of its tuple,
    split along the copies."""
    if isinstance(fused, Tensor):
        return list(fused.unbind(0))
    return list(zip(*(t.unbind(0) for t in fused)))


def gather_inputs(values: Mapping[int, Boundary], parents: Sequence[int]) -> tuple[Boundary, int | None]:
    """The group's inputs as one tensor (or tuple of tensors) and its vmap ``in_dims``: the
    common parent's output unbatched (None), the previous fused call's stacked output when it
    matches, or a stack."""
    if all(p == parents[0] for p in parents):
        return values[parents[0]], None
    stacked = getattr(values, "stacked", None)
    if stacked is not None and stacked[0] == tuple(parents):
        return stacked[1], 0
    return pytree.tree_map(lambda *xs: torch.stack(xs), *(values[p] for p in parents)), 0


_THREAD = threading.local()


def _skeleton(module: nn.Module) -> nn.Module:
    """This thread's weightless copy of ``module`` (parameters and buffers on the meta device).

    ``functional_call`` swaps the tensors of the module it calls for the ones it is given and
    swaps them back afterwards: two threads calling one shared module would see each other's
    swaps (vmapped tensors escaping into the other thread's call). Each thread therefore calls
    its own copy; every tensor is supplied by the call, so the copy needs none of its own. The
    training flags are copied from ``module`` on every call (``net.train()`` flips them)."""
    cache = getattr(_THREAD, "skeletons", None)
    if cache is None:
        cache = _THREAD.skeletons = weakref.WeakKeyDictionary()
    skeleton = cache.get(module)
    if skeleton is None:
        memo: dict[int, object] = {}
        for t in itertools.chain(module.parameters(), module.buffers()):
            meta = t.detach().to("meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        skeleton = cache[module] = copy.deepcopy(module, memo)
    for own, original in zip(skeleton.modules(), module.modules()):
        own.training = original.training
    return skeleton


def fused_call(
    modules: Sequence[nn.Module], x: Boundary, in_dim: int | None, side: Sequence[Tensor] = ()
) -> Boundary:
    """``torch.stack([m(x_i, *side) for m, x_i in zip(modules, x)])`` (leaf by leaf, for a
    boundary's tuple) as one vmapped call of
    ``modules[0]``'s structure with the stacked parameters and buffers of all of them
    (thread-safe: each thread calls its own weightless copy, see `_skeleton`)."""
    template = _skeleton(modules[0])
    params = [dict(m.named_parameters()) for m in modules]
    buffers = [dict(m.named_buffers()) for m in modules]
    stacked_params = {n: torch.stack([p[n] for p in params]) for n in params[0]}
    stacked_buffers = {n: torch.stack([b[n] for b in buffers]) for n in buffers[0]}

    def call(p: dict[str, Tensor], b: dict[str, Tensor], xi: Boundary, *rest: Tensor) -> Boundary:
        return functional_call(template, (p, b), (xi, *rest))

    in_dims = (0, 0, in_dim, *(None for _ in side))
    y = vmap(call, in_dims=in_dims, randomness="different")(stacked_params, stacked_buffers, x, *side)
    if not (isinstance(y, Tensor) or (isinstance(y, tuple) and y and all(isinstance(t, Tensor) for t in y))):
        raise InvariantError(
            f"a {type(template).__name__} segment returns {type(y).__name__}, not a tensor or a tuple of tensors, so "
            "its copies cannot run as one batched call. Build the network with example_input=<a batch> so that "
            "segments are only cut where tensors are live."
        )
    if any(m.training for m in template.modules()):  # running statistics moved: hand them back
        with torch.no_grad():
            for n, s in stacked_buffers.items():
                for b, new in zip(buffers, s.unbind(0)):
                    b[n].copy_(new)
    return y
