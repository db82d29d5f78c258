"""Combinatorial searches: set partitions, MTSL's partition choice and TAG's group selection."""
from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.grouping import GroupingError, mtsl_partition, set_partitions, tag_groups

PROPERTY = settings(max_examples=30, deadline=None)


@cache
def stirling2(n: int, k: int) -> int:
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * stirling2(n - 1, k) + stirling2(n - 1, k - 1)


def reference_partitions(items: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """Independent enumeration: the first item's block is it plus any subset of the rest."""
    if not items:
        return [()]
    first, rest = items[0], items[1:]
    out = []
    for size in range(len(rest) + 1):
        for mates in itertools.combinations(rest, size):
            remaining = tuple(i for i in rest if i not in mates)
            out.extend(((first, *mates), *tail) for tail in reference_partitions(remaining))
    return out


def canonical(partition) -> tuple[tuple[int, ...], ...]:
    return tuple(sorted(tuple(sorted(b)) for b in partition))


# --- set partitions --------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(8))
def test_partition_counts_are_bell_and_stirling_numbers(n):
    bell = [1, 1, 2, 5, 15, 52, 203, 877][n]
    everything = list(set_partitions(range(n)))
    assert len(everything) == bell == len(set(everything))
    assert {canonical(p) for p in everything} == {canonical(p) for p in reference_partitions(tuple(range(n)))}
    for k in range(n + 2):
        blocks_k = list(set_partitions(range(n), k))
        assert len(blocks_k) == stirling2(n, k)
        assert all(len(p) == k for p in blocks_k)
        assert blocks_k == [p for p in everything if len(p) == k]  # same canonical order


def test_partitions_come_in_canonical_order():
    assert list(set_partitions("abc")) == [
        (("a", "b", "c"),),
        (("a", "b"), ("c",)),
        (("a", "c"), ("b",)),
        (("a",), ("b", "c")),
        (("a",), ("b",), ("c",)),
    ]
    for p in set_partitions(range(6)):
        assert sorted(i for b in p for i in b) == list(range(6))
        assert [b[0] for b in p] == sorted(b[0] for b in p)
        assert all(list(b) == sorted(b) for b in p)


def test_set_partitions_rejects_bad_k():
    with pytest.raises(GroupingError, match="k must be"):
        list(set_partitions(range(3), -1))


# --- MTSL ------------------------------------------------------------------------------------


def score(s: np.ndarray, partition) -> float:
    """Mean over tasks of their mean similarity to the rest of their block (0 alone)."""
    total = 0.0
    for block in partition:
        for i in block:
            others = [s[i, j] for j in block if j != i]
            total += sum(others) / len(others) if others else 0.0
    return total / len(s)


@st.composite
def symmetric(draw, low=2, high=7):
    n = draw(st.integers(low, high))
    upper = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=n * n, max_size=n * n))
    m = np.array(upper).reshape(n, n)
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


@PROPERTY
@given(symmetric(), st.floats(-0.5, 1.0))
def test_mtsl_exhaustive_equals_brute_force(s, threshold):
    n = len(s)
    everything = reference_partitions(tuple(range(n)))
    best = {k: max(score(s, p) for p in everything if len(p) == k) for k in range(1, n)}
    assume(all(abs(v - threshold) > 1e-9 for v in best.values()))  # no rounding-decided ties
    decision = mtsl_partition(s, threshold)
    assert decision.method == "exhaustive"
    qualifying = [k for k in range(1, n) if best[k] >= threshold]
    assert decision.k == (qualifying[0] if qualifying else None)
    assert [t.k for t in decision.trials] == list(range(1, (decision.k or n - 1) + 1))
    for trial in decision.trials:
        assert len(trial.partition) == trial.k
        assert trial.score == pytest.approx(best[trial.k], abs=1e-12)
        assert score(s, trial.partition) == pytest.approx(trial.score, abs=1e-12)
        assert trial.evaluated == stirling2(n, trial.k)
    if decision.k is None:
        assert decision.partition == tuple((i,) for i in range(n)) and decision.merge_groups == ()
    else:
        assert decision.partition == decision.trials[-1].partition
        block_means = [score(s, [b]) * n / len(b) for b in decision.partition]
        assert decision.block_scores == pytest.approx(block_means, abs=1e-12)
        expected = [b for b, m in zip(decision.partition, block_means) if len(b) >= 2 and m >= threshold]
        assume(all(abs(m - threshold) > 1e-9 for m in block_means))
        assert list(decision.merge_groups) == expected


def test_mtsl_two_clear_clusters_are_found_exactly():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    s = np.where(labels[:, None] == labels[None, :], 0.9, 0.2) + rng.uniform(-0.05, 0.05, (7, 7))
    s = (s + s.T) / 2
    decision = mtsl_partition(s)
    assert decision.k == 2
    assert decision.merge_groups == ((0, 2, 5), (1, 3, 4, 6))
    assert all(score >= 0.8 for score in decision.block_scores)


def test_mtsl_falls_back_to_agglomerative_clustering_above_the_limit():
    labels = np.arange(12) % 3
    s = np.where(labels[:, None] == labels[None, :], 0.95, 0.1)
    decision = mtsl_partition(s, exhaustive_limit=10)
    assert decision.method == "agglomerative"
    assert all(t.evaluated == 1 for t in decision.trials)
    for trial in decision.trials:
        assert sorted(i for b in trial.partition for i in b) == list(range(12))
        assert len(trial.partition) == trial.k
    assert decision.merge_groups == ((0, 3, 6, 9), (1, 4, 7, 10), (2, 5, 8, 11))
    random = np.random.default_rng(1).uniform(size=(13, 13))
    fallback = mtsl_partition((random + random.T) / 2, threshold=0.99)
    assert fallback.method == "agglomerative" and fallback.k is None and len(fallback.trials) == 12


def test_mtsl_threshold_above_every_similarity_merges_nothing():
    s = np.full((5, 5), 0.7)
    decision = mtsl_partition(s, threshold=0.71)
    assert decision.k is None and decision.merge_groups == ()
    assert decision.partition == ((0,), (1,), (2,), (3,), (4,))
    assert [t.k for t in decision.trials] == [1, 2, 3, 4]
    assert decision.evaluated == sum(stirling2(5, k) for k in range(1, 5))


@pytest.mark.parametrize(
    ("matrix", "kwargs", "match"),
    [
        (np.array([[1.0, 0.2], [0.5, 1.0]]), {}, "symmetric"),
        (np.ones((2, 3)), {}, "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, "NaN"),
        (np.eye(3), {"threshold": float("nan")}, "threshold"),
        (np.eye(3), {"exhaustive_limit": 0}, "exhaustive_limit"),
        ("not a matrix", {}, "numeric"),
    ],
)
def test_mtsl_rejects_bad_input(matrix, kwargs, match):
    with pytest.raises(GraphSurgeonError, match=match):
        mtsl_partition(matrix, **kwargs)


# --- TAG -------------------------------------------------------------------------------------


def tag_brute_force(a: np.ndarray, g: int) -> float:
    """TAG's notebook search: every selection of <= g distinct non-empty groups that covers all
    tasks; onto j from G is the mean of a[i, j] over the other members, -1e6 for a singleton."""
    n = len(a)
    groups = [m for m in range(1, 1 << n)]
    value = np.full((len(groups), n), -np.inf)
    for row, mask in enumerate(groups):
        members = [i for i in range(n) if mask >> i & 1]
        for j in members:
            others = [a[i, j] for i in members if i != j]
            value[row, j] = sum(others) / len(others) if others else -1e6
    best = -np.inf
    for r in range(1, g + 1):
        combos = np.array(list(itertools.combinations(range(len(groups)), r)))
        best = max(best, value[combos].max(axis=1).sum(axis=1).max())
    return best


def check_grouping(a: np.ndarray, g: int, result) -> None:
    """The result is a valid selection whose reported numbers follow from its groups."""
    n = len(a)
    assert 1 <= len(result.groups) <= g
    assert len(set(result.groups)) == len(result.groups)
    total = 0.0
    for j, index in enumerate(result.assignment):
        group = result.groups[index]
        assert j in group
        onto = [np.mean([a[i, j] for i in G if i != j]) for G in result.groups if j in G]
        assert np.mean([a[i, j] for i in group if i != j]) == pytest.approx(max(onto), abs=1e-12)
        total += max(onto)
    assert result.total_affinity == pytest.approx(total, abs=1e-9)
    assert sorted(j for block in result.partition for j in block) == list(range(n))
    assert all(block for block in result.partition)


@PROPERTY
@given(st.integers(2, 6).flatmap(lambda n: st.lists(st.floats(-10, 10), min_size=n * n, max_size=n * n)), st.integers(1, 3))
def test_tag_exact_equals_brute_force(entries, g):
    n = math.isqrt(len(entries))
    a = np.array(entries).reshape(n, n)
    result = tag_groups(a, g)
    assert result.method == "exact"
    check_grouping(a, g, result)
    assert result.total_affinity == pytest.approx(tag_brute_force(a, g), abs=1e-9)


def tag_brute_force_up_to_three(a: np.ndarray, g: int) -> float:
    """The same search for N up to 8 without listing the C(255, 3) selections: tuples of g groups
    with repetition (a repeated group is a smaller selection), the maximum over the last group
    taken row by row against all pairs."""
    n = len(a)
    value = np.full((2**n - 1, n), -np.inf)
    for row, mask in enumerate(range(1, 1 << n)):
        members = [i for i in range(n) if mask >> i & 1]
        for j in members:
            others = [a[i, j] for i in members if i != j]
            value[row, j] = sum(others) / len(others) if others else -1e6
    if g == 1:
        return value.sum(axis=1).max()
    pairs = np.maximum(value[:, None, :], value[None, :, :])
    if g == 2:
        return pairs.sum(axis=2).max()
    return max(np.maximum(pairs, last).sum(axis=2).max() for last in value)


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("g", [1, 2, 3])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_tag_exact_equals_brute_force_for_seven_and_eight_tasks(n, g, data):
    a = np.array(data.draw(st.lists(st.floats(-10, 10), min_size=n * n, max_size=n * n))).reshape(n, n)
    result = tag_groups(a, g)
    assert result.method == "exact"
    check_grouping(a, g, result)
    assert result.total_affinity == pytest.approx(tag_brute_force_up_to_three(a, g), abs=1e-9)


def test_tag_with_more_groups_than_tasks_serves_each_task_its_best_group():
    a = np.random.default_rng(4).normal(size=(4, 4))
    result = tag_groups(a, 6)
    check_grouping(a, 6, result)
    assert result.total_affinity == pytest.approx(tag_brute_force(a, 4), abs=1e-9)


def test_tag_separates_an_adversarial_task_from_two_identical_ones():
    a = np.array(
        [
            [1.0, 0.9, -0.8],
            [0.9, 1.0, -0.7],
            [-0.9, -0.6, 1.0],
        ]
    )
    result = tag_groups(a, 2)
    check_grouping(a, 2, result)
    assert result.partition == ((0, 1), (2,))
    assert (0, 1) in result.groups
    together = tag_groups(a, 1)
    assert together.groups == ((0, 1, 2),) and together.partition == ((0, 1, 2),)


def test_tag_beam_beyond_the_exact_limit_is_valid_and_near_optimal():
    rng = np.random.default_rng(2)
    for n, g in [(7, 2), (9, 3), (10, 4)]:
        a = rng.normal(size=(n, n))
        beam = tag_groups(a, g, exact_limit=4)
        assert beam.method == "beam"
        check_grouping(a, g, beam)
        assert beam.total_affinity <= tag_groups(a, g).total_affinity + 1e-9
    labels = np.arange(16) % 4
    planted = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    result = tag_groups(planted, 4)
    assert result.method == "beam"
    assert result.groups == tuple(tuple(range(c, 16, 4)) for c in range(4))
    assert result.total_affinity == pytest.approx(16.0)


def test_tag_single_task_is_its_own_group():
    result = tag_groups(np.array([[3.0]]), 2)
    assert result.groups == ((0,),) and result.assignment == (0,) and result.total_affinity == 0.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.eye(3), 0), {}, "num_groups"),
        ((np.eye(3), 2), {"exact_limit": 15}, "exact_limit"),
        ((np.eye(3), 2), {"beam_width": 0}, "beam_width"),
        ((np.ones((2, 3)), 2), {}, "square"),
        ((np.array([[0.0, np.inf], [0.0, 0.0]]), 1), {}, "inf"),
    ],
)
def test_tag_rejects_bad_input(args, kwargs, match):
    with pytest.raises(GraphSurgeonError, match=match):
        tag_groups(*args, **kwargs)
