"""Combinatorial searches: set partitions, MTSL's partition choice and TAG's group selection."""
from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import examples

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.methods.structure.partition import GroupingError, mtsl_partition, set_partitions, tag_groups

PROPERTY = settings(max_examples=examples(30), deadline=None)


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
    if decision.k is None:  # the official fallback: the best partition with at most N-1 blocks
        top = max(best.values())
        assume(sum(abs(v - top) < 1e-9 for v in best.values()) == 1)  # no tie between k
        assert score(s, decision.partition) == pytest.approx(top, abs=1e-12)
        assert decision.score == pytest.approx(top, abs=1e-12)
    else:
        assert decision.partition == decision.trials[-1].partition
    block_means = [score(s, [b]) * n / len(b) for b in decision.partition]
    assert decision.block_scores == pytest.approx(block_means, abs=1e-12)
    assume(all(abs(m - threshold) > 1e-9 for m in block_means))
    expected = [b for b, m in zip(decision.partition, block_means) if len(b) >= 2 and m > threshold]
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
    assert decision.partition == ((0, 1, 2, 3, 4),)  # the fallback: best with <= N-1 blocks
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


def group_value(a: np.ndarray, group: tuple[int, ...]) -> float:
    """Σ_{j∈G} mean_{i∈G, i≠j} a[i, j], written out; 0 for a task alone."""
    if len(group) == 1:
        return 0.0
    return sum(np.mean([a[i, j] for i in group if i != j]) for j in group)


def tag_brute_force(a: np.ndarray, g: int) -> float:
    """Every partition of the tasks into at most g groups, scored from scratch."""
    n = len(a)
    return max(
        sum(group_value(a, b) for b in p) for k in range(1, min(g, n) + 1) for p in set_partitions(range(n), k)
    )


def check_grouping(a: np.ndarray, g: int, result) -> None:
    """The result is a partition into at most g groups whose reported numbers follow from it."""
    n = len(a)
    assert 1 <= len(result.groups) <= g
    assert sorted(j for block in result.groups for j in block) == list(range(n))
    assert all(block and list(block) == sorted(block) for block in result.groups)
    for j, index in enumerate(result.assignment):
        assert j in result.groups[index]
    assert result.total_affinity == pytest.approx(sum(group_value(a, b) for b in result.groups), abs=1e-9)


@PROPERTY
@given(st.integers(2, 8).flatmap(lambda n: st.lists(st.floats(-10, 10), min_size=n * n, max_size=n * n)), st.integers(1, 4))
def test_tag_exact_equals_brute_force(entries, g):
    n = math.isqrt(len(entries))
    a = np.array(entries).reshape(n, n)
    result = tag_groups(a, g)
    assert result.method == "exact"
    check_grouping(a, g, result)
    assert result.total_affinity == pytest.approx(tag_brute_force(a, g), abs=1e-9)


def test_tag_groups_are_realisable_unlike_an_overlapping_selection():
    # TAG's overlapping selection would pick {0, 2} and {1, 2}, crediting task 2's help to both 0
    # and 1; a tree can put task 2 in one branch only, and the disjoint optimum is scored as built
    a = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    result = tag_groups(a, 2)
    check_grouping(a, 2, result)
    assert result.total_affinity == pytest.approx(1.0)
    assert result.groups in (((0, 2), (1,)), ((0,), (1, 2)))


def test_tag_with_more_groups_than_tasks_is_limited_by_the_tasks():
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
    assert result.groups == ((0, 1), (2,))
    assert tag_groups(a, 1).groups == ((0, 1, 2),)


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


def test_mtsl_merges_a_similar_pair_beside_an_unrelated_task():
    """Official fallback (GroupTasks.create_selection): no k reaches 0.8 (a singleton scores 0,
    so {0,1}|{2} scores 0.6), the best partition with <= N-1 blocks is kept, and its pair merges."""
    s = np.array([[1, 0.9, 0.3], [0.9, 1, 0.3], [0.3, 0.3, 1]])
    decision = mtsl_partition(s, threshold=0.8)
    assert decision.k is None
    assert decision.partition == ((0, 1), (2,))
    assert decision.merge_groups == ((0, 1),)


def test_mtsl_merges_two_similar_pairs_beside_an_unrelated_task():
    s = np.full((5, 5), 0.1)
    s[0, 1] = s[1, 0] = s[2, 3] = s[3, 2] = 0.95
    np.fill_diagonal(s, 1.0)
    decision = mtsl_partition(s, threshold=0.8)
    assert decision.k is None
    assert decision.merge_groups == ((0, 1), (2, 3))


def test_mtsl_merges_only_above_the_threshold():
    s = np.array([[1.0, 0.8], [0.8, 1.0]])
    assert mtsl_partition(s, threshold=0.8).merge_groups == ()  # the official test is strict: >
    assert mtsl_partition(s, threshold=0.79).merge_groups == ((0, 1),)
