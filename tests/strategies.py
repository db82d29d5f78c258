"""Hypothesis strategies for task trees and tree edits, shared by the engine's property tests.

* `task_lists`: lists of distinct task names. ``safe=True`` (the default) draws lower-case
  identifiers that are also usable as module names, fx targets and TorchScript attributes;
  ``safe=False`` draws any name the tree itself accepts (ASCII identifiers of any case, with
  underscores and digits), for the tests of the pure-data `TaskTree`.
* `trees`: random task trees, built like `TaskTree.from_partitions` expects them: one partition
  per depth, each block of depth ``l`` split at random into the blocks of depth ``l + 1``
  (so every partition refines the one above), block order shuffled so node ids vary.
* `edits` / `edit_sequences`: random valid edits, drawn against the tree they apply to: a
  merge of a random set of siblings (in random order: the first member matters for
  ``init="copy"``/``"mean"``), a split of a random node into a random partition of its tasks,
  or a replicate from a random depth. An edit is plain data and is applied through the tree
  API (`Edit.apply`), so a test can replay the same edits on a network's tree.

* `networks`: a `MultiTaskNetwork` (as a `NetCase`) on a drawn model (by default
  `model_zoo_gen.random_models`, weights jittered to full float64 precision) with drawn tasks
  and a random tree; `build_case` builds one for a given model and tree.

* `examples`: a property's example count under the active profile (tests/conftest.py).

Every strategy shrinks towards the simplest case: one task, shared trees, short sequences.
"""
from __future__ import annotations

import keyword
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import graphsurgeon as gs
from graphsurgeon import MultiTaskNetwork, TaskTree
from graphsurgeon.core.tree import Origin

__all__ = [
    "GROUP_INITS",
    "Edit",
    "Merge",
    "NetCase",
    "Replicate",
    "Split",
    "apply_edits",
    "build_case",
    "cut",
    "edit_sequences",
    "edits",
    "full_precision",
    "make_heads",
    "networks",
    "partitions_of",
    "sibling_sets",
    "task_lists",
    "task_names",
    "trees",
]


def _usable_as_module_name(name: str) -> bool:
    """Whether a task name can key ``nn.ModuleDict`` and appear in fx / TorchScript code.

    Python keywords break fx's generated code (``self.heads.def``) and names of
    ``nn.ModuleDict`` attributes (``keys``, ``training``...) cannot be module keys; both are
    engine bugs with their own xfail tests, so the strategies for networks leave them out.
    """
    return name.isidentifier() and not keyword.iskeyword(name) and not hasattr(nn.ModuleDict(), name)


def task_names(safe: bool = True) -> st.SearchStrategy[str]:
    """One task name: a short lower-case identifier (``safe``) or any name `TaskTree` accepts."""
    if safe:
        return st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(_usable_as_module_name)
    return st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(_usable_as_module_name)


def task_lists(min_size: int = 1, max_size: int = 5, safe: bool = True) -> st.SearchStrategy[list[str]]:
    """A list of ``min_size..max_size`` distinct task names."""
    return st.lists(task_names(safe), min_size=min_size, max_size=max_size, unique=True)


@st.composite
def partitions_of(draw: st.DrawFn, items: Sequence[str], min_blocks: int = 1) -> list[list[str]]:
    """A random partition of ``items`` into non-empty blocks, blocks in random order.

    Each item draws the label of its block; labels shrink to 0, i.e. to a single block.
    """
    items = list(items)
    if min_blocks > len(items):
        raise ValueError(f"cannot split {len(items)} items into {min_blocks} blocks")
    labels = draw(
        st.lists(st.integers(0, len(items) - 1), min_size=len(items), max_size=len(items)).filter(
            lambda ls: len(set(ls)) >= min_blocks
        )
    )
    blocks: dict[int, list[str]] = {}
    for item, label in zip(items, labels):
        blocks.setdefault(label, []).append(item)
    return draw(st.permutations(list(blocks.values())))


@st.composite
def trees(
    draw: st.DrawFn,
    tasks: Sequence[str] | None = None,
    depth: int | None = None,
    min_tasks: int = 1,
    max_tasks: int = 5,
    min_depth: int = 1,
    max_depth: int = 4,
    safe: bool = True,
) -> TaskTree:
    """A random `TaskTree`; ``tasks`` and ``depth`` are drawn unless given."""
    if tasks is None:
        tasks = draw(task_lists(min_tasks, max_tasks, safe=safe))
    if depth is None:
        depth = draw(st.integers(min_depth, max_depth))
    partitions: list[list[list[str]]] = []
    above: list[list[str]] = [list(tasks)]
    for _ in range(depth):
        level = [part for block in above for part in draw(partitions_of(block))]
        level = draw(st.permutations(level))
        partitions.append(level)
        above = level
    return TaskTree.from_partitions(list(tasks), partitions)


# ---------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Merge:
    depth: int
    node_ids: tuple[int, ...]

    def apply(self, tree: TaskTree) -> tuple[TaskTree, Origin]:
        return tree.merge(self.depth, self.node_ids)


@dataclass(frozen=True)
class Split:
    node_id: int
    groups: tuple[tuple[str, ...], ...]

    def apply(self, tree: TaskTree) -> tuple[TaskTree, Origin]:
        return tree.split(self.node_id, self.groups)


@dataclass(frozen=True)
class Replicate:
    depth: int

    def apply(self, tree: TaskTree) -> tuple[TaskTree, Origin]:
        return tree.replicate(self.depth)


Edit = Merge | Split | Replicate


def sibling_sets(tree: TaskTree) -> list[tuple[int, tuple[int, ...]]]:
    """``(depth, child ids)`` of every node at depth 0..L-1 with two or more children."""
    out = []
    for parent in tree.nodes:
        kids = tree.children(parent.id)
        if len(kids) >= 2:
            out.append((parent.depth + 1, tuple(k.id for k in kids)))
    return out


@st.composite
def edits(draw: st.DrawFn, tree: TaskTree) -> Edit:
    """One edit that is valid on ``tree`` (which must have depth >= 1)."""
    if tree.depth < 1:
        raise ValueError("a depth-0 tree has no segment to edit")
    kinds = ["replicate"]
    siblings = sibling_sets(tree)
    if siblings:
        kinds.append("merge")
    if any(n.depth >= 1 for n in tree.nodes):
        kinds.append("split")
    kind = draw(st.sampled_from(sorted(kinds)))  # merge < replicate < split: shrinks to merges
    if kind == "merge":
        depth, kids = draw(st.sampled_from(siblings))
        members = draw(st.lists(st.sampled_from(kids), min_size=2, max_size=len(kids), unique=True))
        return Merge(depth, tuple(members))
    if kind == "split":
        node = draw(st.sampled_from([n for n in tree.nodes if n.depth >= 1]))
        groups = draw(partitions_of(node.tasks))
        return Split(node.id, tuple(tuple(g) for g in groups))
    return Replicate(draw(st.integers(1, tree.depth)))


@st.composite
def edit_sequences(draw: st.DrawFn, tree: TaskTree, min_size: int = 1, max_size: int = 4) -> list[Edit]:
    """``min_size..max_size`` edits, each valid on the tree the ones before it produce."""
    out: list[Edit] = []
    n = draw(st.integers(min_size, max_size))
    for _ in range(n):
        edit = draw(edits(tree))
        out.append(edit)
        tree, _ = edit.apply(tree)
    return out


def apply_edits(tree: TaskTree, sequence: Sequence[Edit]) -> list[tuple[Edit, TaskTree, Origin]]:
    """Replay ``sequence`` on ``tree``: ``(edit, tree after it, origin)`` per edit."""
    steps = []
    for edit in sequence:
        tree, origin = edit.apply(tree)
        steps.append((edit, tree, origin))
    return steps


# ---------------------------------------------------------------------------------- networks
# Helpers that turn drawn models and trees into `MultiTaskNetwork`s. Everything random about a
# network (heads, "fresh" group inits) is seeded from the drawn data, so a failing example
# rebuilds the same network.

GROUP_INITS = ("copy", "mean", "fresh")


@dataclass
class NetCase:
    """A drawn network with what a test needs to rebuild or check it."""

    net: MultiTaskNetwork
    model: nn.Module
    x: torch.Tensor  # the example input (float64)
    granularity: str
    segment_params: tuple[int, ...]  # parameters of one copy of each segment, from an independent cut
    width: int  # features the trunk hands to the heads
    seed: int

    def heads(self, seed: int | None = None, tasks: Sequence[str] | None = None) -> dict[str, nn.Module]:
        return make_heads(tasks or self.net.tasks, self.width, self.seed if seed is None else seed)


def full_precision(model: nn.Module, seed: int) -> nn.Module:
    """Jitter every float64 parameter by ~1e-3 so it uses all 53 mantissa bits.

    Weights initialised in float32 and cast with ``.double()`` have 29 zero mantissa bits, so
    sums of a few equal copies are exact and rounding bugs (e.g. in averaging) stay hidden.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.dtype == torch.float64:
                p.mul_(1 + 1e-3 * torch.randn_like(p))
    return model


def make_heads(tasks: Sequence[str], width: int, seed: int) -> dict[str, nn.Module]:
    """One float64 linear head per task, of different output sizes, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {t: nn.Linear(width, 2 + i % 3).double() for i, t in enumerate(tasks)}


def cut(model: nn.Module, x, granularity: str):
    """The backbone's segments (an independent cut, for expectations) and the trunk width."""
    segments = gs.segment(gs.trace(model), None, granularity, example_input=x)
    with torch.no_grad():
        h = x
        for s in segments:
            h = s.module(h)
    return segments, h.shape[1]


def build_case(model: nn.Module, x, tree_or_tasks, seed: int, granularity: str = "fine", segments=None) -> NetCase:
    """A network over ``model`` laid out as ``tree_or_tasks`` (a TaskTree, or task names: separate).

    ``segments`` is `cut`'s ``(segments, width)`` when the caller already has it.
    """
    if segments is None:
        segments, width = cut(model, x, granularity)
    else:
        segments, width = segments
    if isinstance(tree_or_tasks, TaskTree):
        tasks, sharing = tree_or_tasks.tasks, tree_or_tasks
    else:
        tasks, sharing = tuple(tree_or_tasks), "separate"
    net = gs.multitask(model, make_heads(tasks, width, seed), sharing=sharing, granularity=granularity, example_input=x)
    net.eval()
    params = tuple(sum(p.numel() for p in s.module.parameters()) for s in segments)
    return NetCase(net, model, x, granularity, params, width, seed)


@st.composite
def networks(
    draw: st.DrawFn,
    models: st.SearchStrategy | None = None,
    min_tasks: int = 1,
    max_tasks: int = 3,
    layout: str = "random",
    granularity: str = "fine",
) -> NetCase:
    """A network on a drawn ``(model, x)`` with drawn tasks, laid out as a random tree.

    ``layout="separate"`` gives every task its own copy of every segment instead.
    ``models`` defaults to `model_zoo_gen.random_models` (small random DAGs). The model's
    weights are jittered to full float64 precision (`full_precision`).
    """
    if models is None:
        from model_zoo_gen import random_models

        models = random_models(max_ops=5, max_channels=8)
    model, x = draw(models)
    tasks = draw(task_lists(min_tasks, max_tasks))
    seed = draw(st.integers(0, 2**16))
    full_precision(model, seed)
    segments = cut(model, x, granularity)
    if layout == "separate":
        return build_case(model, x, tasks, seed, granularity, segments)
    tree = draw(trees(tasks=tasks, depth=len(segments[0])))
    return build_case(model, x, tree, seed, granularity, segments)


def examples(n: int) -> int:
    """``n`` examples, or the active profile's count when it asks for more (``thorough``: 500).

    A property's own ``settings(max_examples=n)`` beats any profile, so each property asks
    through this function instead of hard-coding its count."""
    return max(n, settings().max_examples) if settings.get_current_profile_name() == "thorough" else n
