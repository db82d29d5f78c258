"""The combinatorial searches behind the grouping methods: which tasks go together.

* `set_partitions`: every way to split items into blocks, in a canonical order.
* `mtsl_partition`: MTSL's choice (Multi-Task Structural Learning, ICML 2023) of which sibling
  task nodes to merge, from a similarity matrix (e.g. CKA of their features).
* `tag_groups`: TAG's network selection (Fifty et al., NeurIPS 2021, "Efficiently Identifying
  Task Groupings for Multi-Task Learning") from an inter-task affinity matrix.

They work on task *indices* 0..N-1 and return plain data with a full account of what was
tried, so that the engine can map indices to its nodes and log every decision it takes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from graphsurgeon.errors import GraphSurgeonError

__all__ = [
    "GroupingError",
    "PartitionDecision",
    "PartitionTrial",
    "TaskGrouping",
    "mtsl_partition",
    "set_partitions",
    "tag_groups",
]

T = TypeVar("T")
Partition = tuple[tuple[int, ...], ...]


class GroupingError(GraphSurgeonError):
    """A similarity/affinity matrix or a search option is unusable."""


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise GroupingError(f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {name}={minimum}.")
    return int(value)


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def _partition_masks(n: int, k: int | None) -> Iterator[tuple[int, ...]]:
    """Set partitions of range(n) as block bitmasks, in restricted-growth-string order.

    Item i joins one of the blocks opened so far (in their order) or opens a new one, so the
    blocks come out ordered by their smallest item. With k fixed, a new block is opened only
    while fewer than k exist, and an existing one is joined only if enough items remain to
    open the missing blocks, so no dead branch is explored.
    """
    blocks: list[int] = []

    def place(i: int) -> Iterator[tuple[int, ...]]:
        if i == n:
            if k is None or len(blocks) == k:
                yield tuple(blocks)
            return
        opened = len(blocks)
        if k is None or n - i - 1 >= k - opened:
            for b in range(opened):
                blocks[b] |= 1 << i
                yield from place(i + 1)
                blocks[b] ^= 1 << i
        if k is None or opened < k:
            blocks.append(1 << i)
            yield from place(i + 1)
            blocks.pop()

    return place(0)


def set_partitions(items: Iterable[T], k: int | None = None) -> Iterator[tuple[tuple[T, ...], ...]]:
    """All set partitions of ``items`` (optionally into exactly ``k`` blocks), lazily.

    The order is canonical: partitions follow the lexicographic order of their restricted
    growth strings, blocks are ordered by their first item and keep the items' order. There
    are Bell(n) partitions in all and Stirling2(n, k) with k blocks (one, the empty partition,
    for no items).
    """
    pool = tuple(items)
    if k is not None:
        k = _check_int(k, "k", 0)
    for masks in _partition_masks(len(pool), k):
        yield tuple(tuple(pool[i] for i in _bits(m)) for m in masks)


def _square(matrix: Any, name: str) -> np.ndarray:
    """A finite float64 (N, N) array from a tensor / array-like, or a GroupingError."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GroupingError(f"{name} is not a numeric matrix ({exc}); pass an (N, N) array or tensor.") from exc
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise GroupingError(f"{name} has shape {array.shape}; pass a square (N, N) matrix with N >= 1 tasks.")
    if not np.isfinite(array).all():
        raise GroupingError(f"{name} contains NaN or inf; recompute it (or replace missing entries) before grouping.")
    return array


# --------------------------------------------------------------------------------------------
# MTSL: which sibling task nodes to merge.


@dataclass(frozen=True)
class PartitionTrial:
    """The best partition found with exactly ``k`` blocks."""

    k: int
    partition: Partition
    score: float
    evaluated: int
    """How many partitions were scored to find it (Stirling2(N, k) when exhaustive, 1 otherwise)."""


@dataclass(frozen=True)
class PartitionDecision:
    """MTSL's decision for one set of sibling task nodes, with everything needed to log it."""

    partition: Partition
    """The chosen partition: the first whose score reaches the threshold, else the best-scoring
    partition with at most N-1 blocks (the official fallback; a single node: itself)."""
    block_scores: tuple[float, ...]
    """Mean pairwise similarity inside each block of `partition` (0 for a singleton)."""
    merge_groups: Partition
    """Blocks of ≥ 2 nodes whose mean similarity exceeds the threshold: the merges to perform
    (also from a fallback partition, so a pair can merge while a dissimilar task stays alone)."""
    k: int | None
    """Number of blocks of the partition that reached the threshold, or None when none did."""
    score: float
    """Score of `partition` (the fallback's when `k` is None)."""
    threshold: float
    method: Literal["exhaustive", "agglomerative"]
    trials: tuple[PartitionTrial, ...]
    """Every k tried, in order, up to and including the chosen one."""

    @property
    def evaluated(self) -> int:
        return sum(t.evaluated for t in self.trials)


def _block_mean(similarity: np.ndarray, block: tuple[int, ...]) -> float:
    """Mean off-diagonal similarity within a block = mean of its members' task scores."""
    if len(block) < 2:
        return 0.0
    sub = similarity[np.ix_(block, block)]
    return float((sub.sum() - np.trace(sub)) / (len(block) * (len(block) - 1)))


def _partition_score(similarity: np.ndarray, partition: Partition) -> float:
    """Mean over tasks of the mean similarity to the other members of their block (0 alone)."""
    return sum(_block_mean(similarity, b) * len(b) for b in partition) / similarity.shape[0]


def _block_weights(similarity: np.ndarray) -> list[float]:
    """For every block bitmask: its members' summed task scores, Σ_{i≠j in B} S_ij / (|B| - 1).

    A partition's score is then the sum of its blocks' weights over N, so scoring the
    Bell(N) partitions costs a lookup per block.
    """
    n = similarity.shape[0]
    off_sum = [0.0] * (1 << n)
    weights = [0.0] * (1 << n)
    for mask in range(1, 1 << n):
        low = (mask & -mask).bit_length() - 1
        rest = mask ^ (1 << low)
        off_sum[mask] = off_sum[rest] + 2.0 * sum(similarity[low, j] for j in _bits(rest))
        size = mask.bit_count()
        weights[mask] = off_sum[mask] / (size - 1) if size > 1 else 0.0
    return weights


def _best_exhaustive(similarity: np.ndarray, weights: list[float], k: int) -> PartitionTrial:
    n = similarity.shape[0]
    best_masks: tuple[int, ...] = ()
    best_total = -np.inf
    evaluated = 0
    for masks in _partition_masks(n, k):
        evaluated += 1
        total = sum(weights[m] for m in masks)
        if total > best_total:
            best_total, best_masks = total, masks
    partition = tuple(_bits(m) for m in best_masks)
    return PartitionTrial(k, partition, _partition_score(similarity, partition), evaluated)


def _canonical(labels: np.ndarray) -> Partition:
    blocks: dict[int, list[int]] = {}
    for item, label in enumerate(labels.tolist()):
        blocks.setdefault(label, []).append(item)
    return tuple(sorted((tuple(b) for b in blocks.values()), key=lambda b: b[0]))


def mtsl_partition(similarity: Any, threshold: float = 0.8, *, exhaustive_limit: int = 10) -> PartitionDecision:
    """Decide which of N sibling task nodes to merge, MTSL-style.

    A task's score within a partition is its mean similarity to the other members of its
    block (0 when alone); a partition's score is the mean task score. For k = 1 … N-1 the best
    partition with exactly k blocks is found — exhaustively over all Stirling2(N, k) partitions
    when N <= ``exhaustive_limit``, otherwise by average-linkage agglomerative clustering on the
    distance 1 - S cut to k clusters — and the smallest k whose best score reaches ``threshold``
    is chosen (fewest blocks = most sharing that is still similar enough). When no k qualifies,
    the best-scoring partition with at most N-1 blocks is kept. Of the chosen partition's blocks,
    those with ≥ 2 members whose mean score is *above* the threshold are merged. This is the
    official rule (NeurAI-Lab/MTSL, ``GroupTasks.create_selection`` and the merge test in
    ``train_stubs.py: fusion_phase``): since a singleton scores 0, a partition that leaves one
    dissimilar task alone rarely reaches the threshold for N ≤ 4, and without the fallback a
    similar pair beside an unrelated task could never merge. The search stops at the chosen k;
    `PartitionDecision.trials` holds every k tried. Ties between partitions go to the first in
    `set_partitions` order (and, for the fallback, to the fewest blocks).

    Args:
        similarity: symmetric (N, N) matrix; the diagonal is ignored.
        threshold: minimum score for a partition (and a merged block) to be accepted.
        exhaustive_limit: largest N searched exhaustively (Bell(10) = 115975 partitions).
    """
    s = _square(similarity, "similarity")
    if not np.allclose(s, s.T, rtol=0.0, atol=1e-8):
        raise GroupingError("similarity is not symmetric; pass a symmetric matrix, e.g. (S + S.T) / 2.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not np.isfinite(threshold):
        raise GroupingError(f"threshold must be a finite number, got {threshold!r}; pass e.g. threshold=0.8.")
    limit = _check_int(exhaustive_limit, "exhaustive_limit", 1)
    n = s.shape[0]
    exhaustive = n <= limit
    if exhaustive:
        weights = _block_weights(s)
    else:
        distance = 1.0 - s
        np.fill_diagonal(distance, 0.0)
        tree = linkage(squareform(distance, checks=False), method="average")

    trials: list[PartitionTrial] = []
    chosen: PartitionTrial | None = None
    for k in range(1, n):
        if exhaustive:
            trial = _best_exhaustive(s, weights, k)
        else:
            partition = _canonical(cut_tree(tree, n_clusters=k).ravel())
            trial = PartitionTrial(k, partition, _partition_score(s, partition), 1)
        trials.append(trial)
        if trial.score >= threshold:
            chosen = trial
            break

    kept = chosen
    if kept is None and trials:  # ties (within rounding) go to the fewest blocks: the most sharing
        top = max(t.score for t in trials)
        kept = next(t for t in trials if t.score >= top - 1e-12)
    partition = kept.partition if kept else tuple((i,) for i in range(n))
    block_scores = tuple(_block_mean(s, b) for b in partition)
    merges = tuple(b for b, score in zip(partition, block_scores) if len(b) >= 2 and score > threshold)
    return PartitionDecision(
        partition=partition,
        block_scores=block_scores,
        merge_groups=merges,
        k=chosen.k if chosen else None,
        score=kept.score if kept else 0.0,
        threshold=float(threshold),
        method="exhaustive" if exhaustive else "agglomerative",
        trials=tuple(trials),
    )


# --------------------------------------------------------------------------------------------
# TAG: network selection from inter-task affinities.


@dataclass(frozen=True)
class TaskGrouping:
    """TAG's selected groups: disjoint blocks covering every task, one branch each."""

    groups: Partition
    """The groups (each sorted, in canonical order); every task is in exactly one."""
    total_affinity: float
    """Σ over tasks of the affinity onto it from the rest of its group (TAG's notebook prints this / N)."""
    assignment: tuple[int, ...]
    """assignment[j]: index into `groups` of task j's group."""
    method: Literal["exact", "beam"]


def _members(masks: np.ndarray, n: int) -> np.ndarray:
    """(C,) bitmasks -> (C, n) boolean membership."""
    return (np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(n)) & 1 == 1


def _group_values(affinity: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """For each task subset G (bitmask): Σ_{j∈G} mean_{i∈G, i≠j} A[i, j], the affinity its
    members send each other; 0 for a task alone (it receives none, and loses none)."""
    inside = _members(subsets, affinity.shape[0]).astype(np.float64)
    size = inside.sum(axis=1)
    within = np.einsum("ci,ij,cj->c", inside, affinity, inside) - inside @ np.diag(affinity)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(size > 1, within / (size - 1), 0.0)


def _splits(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (mask, first block) pair: the block is a submask holding mask's lowest task.

    Enumerated as ternary strings (task absent / in mask only / in the block), sorted by mask;
    returns masks, blocks and where each mask 1..2^n-1 starts.
    """
    code = np.arange(3**n, dtype=np.int64)
    mask = np.zeros_like(code)
    block = np.zeros_like(code)
    for j in range(n):
        digit = code % 3
        code //= 3
        mask |= (digit > 0).astype(np.int64) << j
        block |= (digit == 2).astype(np.int64) << j
    keep = (block & mask & -mask) != 0
    order = np.argsort(mask[keep], kind="stable")
    mask, block = mask[keep][order], block[keep][order]
    return mask, block, np.searchsorted(mask, np.arange(1, 1 << n))


def _exact(affinity: np.ndarray, num_groups: int) -> list[int]:
    """The optimal partition, as group bitmasks, by dynamic programming over task subsets:
    F_r(mask) = max(F_{r-1}(mask), max_G value(G) + F_{r-1}(mask \\ G)) over the groups G that
    hold mask's lowest task, in O(num_groups · 3^N) — every partition into at most
    ``num_groups`` blocks is covered without enumerating them."""
    n = affinity.shape[0]
    value = _group_values(affinity, np.arange(1 << n, dtype=np.int64))
    mask, block, starts = _splits(n)
    ends = np.append(starts[1:], len(mask))
    layers = [np.full(1 << n, -np.inf)]
    layers[0][0] = 0.0
    for _ in range(min(num_groups, n)):
        previous = layers[-1]
        grown = previous.copy()
        grown[1:] = np.maximum(previous[1:], np.maximum.reduceat(value[block] + previous[mask ^ block], starts))
        layers.append(grown)

    chosen, left, r = [], (1 << n) - 1, len(layers) - 1
    while left:
        while layers[r - 1][left] == layers[r][left]:
            r -= 1
        blocks = block[starts[left - 1] : ends[left - 1]]
        group = int(blocks[np.argmax(value[blocks] + layers[r - 1][left ^ blocks])])
        chosen.append(group)
        left, r = left ^ group, r - 1
    return chosen


def _beam(affinity: np.ndarray, num_groups: int, width: int) -> list[int]:
    """A good partition, as group bitmasks, by beam search: tasks are placed one at a time
    into one of at most ``num_groups`` groups (or a new one), and the ``width`` partial
    partitions with the largest total value survive each step."""
    n = affinity.shape[0]
    beam: list[tuple[int, ...]] = [()]
    for task in range(n):
        bit = 1 << task
        grown = [
            (*state[:k], state[k] | bit, *state[k + 1 :])
            for state in beam
            for k in range(len(state))
        ] + [(*state, bit) for state in beam if len(state) < num_groups]
        sets = np.array([m for state in grown for m in state], dtype=np.int64)
        totals = np.add.reduceat(_group_values(affinity, sets), np.cumsum([0] + [len(state) for state in grown[:-1]]))
        beam = [grown[i] for i in np.argsort(-totals, kind="stable")[:width]]
    return list(beam[0])


def tag_groups(
    affinity: Any, num_groups: int, *, exact_limit: int = 12, beam_width: int = 64
) -> TaskGrouping:
    """Split the tasks into at most ``num_groups`` groups maximising TAG's total affinity.

    ``affinity[i, j]`` is the affinity of task i onto task j: how much a step on task i's
    gradient lowers task j's loss (TAG's Z_{i→j}); the diagonal is unused. As in TAG's
    network-selection code, the affinity onto task j from its group G is
    ``mean_{i ∈ G, i ≠ j} affinity[i, j]``, and the total is its sum over tasks.

    Two differences from TAG's notebook, both because a task tree gives each task one path:
    TAG may select *overlapping* groups (a task trained in several networks, scored in its
    best one); here the groups are disjoint, so every affinity counted is one the built tree
    trains together (projecting an overlapping selection onto a tree would credit transfer
    from tasks that end up in another branch). And a task alone scores 0 where TAG's sentinel
    is -1e6, which with disjoint groups would forbid isolating an adversarial task.

    For N <= ``exact_limit`` (at most 14) the optimum is found exactly by dynamic programming
    over task subsets in O(num_groups · 3^N); beyond, a beam search of width ``beam_width``
    gives a good but unproven partition (N <= 62, as groups are 64-bit masks). Fewer groups
    than ``num_groups`` are returned when that scores at least as high.
    """
    a = _square(affinity, "affinity")
    g = _check_int(num_groups, "num_groups", 1)
    limit = _check_int(exact_limit, "exact_limit", 1)
    width = _check_int(beam_width, "beam_width", 1)
    if limit > 14:
        raise GroupingError(
            f"exact_limit={limit} would enumerate 3^{limit} subset splits; pass exact_limit <= 14 "
            "(larger N uses the beam)."
        )
    n = a.shape[0]
    if n > 62:
        raise GroupingError(f"affinity has {n} tasks; TAG selection handles at most 62 — group a subset of the tasks.")
    if n == 1:
        return TaskGrouping(groups=((0,),), total_affinity=0.0, assignment=(0,), method="exact")

    exact = n <= limit
    masks = sorted(_exact(a, g) if exact else _beam(a, g, width), key=_bits)
    groups = tuple(_bits(m) for m in masks)
    return TaskGrouping(
        groups=groups,
        total_affinity=float(_group_values(a, np.array(masks, dtype=np.int64)).sum()),
        assignment=tuple(next(k for k, grp in enumerate(groups) if j in grp) for j in range(n)),
        method="exact" if exact else "beam",
    )
