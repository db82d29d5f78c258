"""Representation similarity: CKA variants, RSA, the streaming accumulator and the minibatch loss."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.methods.structure.similarity import (
    CKAAccumulator,
    SimilarityError,
    debiased_linear_cka,
    global_avg_pool,
    linear_cka,
    minibatch_debiased_cka,
    rbf_cka,
    rsa,
)

F64 = torch.float64
PROPERTY = settings(max_examples=examples(25), deadline=None)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def related(seed: int, n: int, dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair of features sharing a linear signal plus independent noise."""
    x = randn(seed, n, dx)
    return x, x @ randn(seed + 1, dx, dy) + randn(seed + 2, n, dy)


sizes = st.tuples(st.integers(0, 10_000), st.integers(6, 30), st.integers(1, 8), st.integers(1, 8))


# --- global_avg_pool -------------------------------------------------------------------------


def test_global_avg_pool_reduces_maps_tokens_and_keeps_vectors():
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(global_avg_pool(fmap), fmap.mean(dim=(2, 3)))
    tokens = torch.randn(2, 7, 3)
    assert torch.allclose(global_avg_pool(tokens), tokens.mean(dim=1))
    vec = torch.randn(2, 3)
    assert global_avg_pool(vec) is vec


def test_global_avg_pool_rejects_other_ranks():
    with pytest.raises(SimilarityError, match="reshape"):
        global_avg_pool(torch.randn(2, 3, 4, 5, 6))


# --- reference values ------------------------------------------------------------------------


def test_linear_cka_of_scalar_features_is_squared_correlation():
    x, y = randn(0, 30, 1), randn(1, 30, 1) + 0.5 * randn(0, 30, 1)
    r = torch.corrcoef(torch.cat([x, y], dim=1).T)[0, 1]
    assert linear_cka(x, y) == pytest.approx(float(r**2), abs=1e-12)


def test_debiased_cka_matches_the_u_statistic_definition():
    """HSIC_u is the U-statistic of E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq] over distinct indices."""
    n = 7
    x, y = related(3, n, 3, 2)

    def u_hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        k, l = a @ a.T, b @ b.T
        total = sum(
            k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
            for i, j, q, r in itertools.permutations(range(n), 4)
        )
        return float(total) / (n * (n - 1) * (n - 2) * (n - 3))

    expected = u_hsic(x, y) / (u_hsic(x, x) * u_hsic(y, y)) ** 0.5
    assert debiased_linear_cka(x, y) == pytest.approx(expected, abs=1e-12)


# --- properties ------------------------------------------------------------------------------


@PROPERTY
@given(sizes)
def test_self_similarity_is_one(args):
    seed, n, d, _ = args
    x = randn(seed, n, d + 1)  # rsa needs >= 2 features
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert debiased_linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rsa(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rsa(x, x, method="pearson") == pytest.approx(1.0, abs=1e-12)


@PROPERTY
@given(sizes, st.floats(0.01, 100.0))
def test_linear_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(args, scale):
    seed, n, dx, dy = args
    x, y = related(seed, n, dx, dy)
    q, _ = torch.linalg.qr(randn(seed + 3, dx, dx))
    moved = scale * x @ q
    assert linear_cka(moved, y) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert debiased_linear_cka(moved, y) == pytest.approx(debiased_linear_cka(x, y), abs=1e-10)


@PROPERTY
@given(sizes)
def test_measures_are_symmetric_and_plain_cka_is_in_unit_interval(args):
    seed, n, dx, dy = args
    x, y = related(seed, n, dx + 1, dy + 1)
    for measure in (linear_cka, debiased_linear_cka, rbf_cka, rsa):
        assert measure(x, y) == pytest.approx(measure(y, x), abs=1e-12)
    for plain in (linear_cka, rbf_cka):
        assert -1e-12 <= plain(x, y) <= 1 + 1e-12
        assert -1e-12 <= plain(x, randn(seed + 7, n, dy)) <= 1 + 1e-12


def test_rbf_cka_with_median_bandwidth_is_scale_invariant():
    x, y = related(5, 25, 4, 3)
    assert rbf_cka(7.0 * x, y) == pytest.approx(rbf_cka(x, y), abs=1e-12)
    assert rbf_cka(x, y, sigma=0.3) != pytest.approx(rbf_cka(x, y), abs=1e-3)


def test_debiased_matches_plain_when_n_is_much_larger_than_d():
    x, y = related(11, 1500, 3, 2)
    assert debiased_linear_cka(x, y) == pytest.approx(linear_cka(x, y), abs=0.005)


def test_debiased_is_unbiased_for_independent_features_while_plain_is_inflated():
    # n >> d: the debiased estimate of independent features is ~0.
    assert abs(debiased_linear_cka(randn(0, 2000, 4), randn(1, 2000, 4))) < 0.01
    # d comparable to n: plain CKA of independent features sits near d / (n + d) = 0.5.
    plain = [linear_cka(randn(s, 40, 40), randn(s + 100, 40, 40)) for s in range(5)]
    debiased = [debiased_linear_cka(randn(s, 40, 40), randn(s + 100, 40, 40)) for s in range(5)]
    assert min(plain) > 0.35
    assert abs(sum(debiased) / len(debiased)) < 0.05
    assert max(abs(v) for v in debiased) < 0.2


def test_rsa_spearman_ignores_monotone_distortion_of_dissimilarities():
    x = randn(2, 12, 5)
    y = randn(3, 12, 5)
    assert -1.0 <= rsa(x, y) <= 1.0
    # Rescaling and shifting each sample leaves its correlation with others, hence the RDM, unchanged.
    assert rsa(3.0 * x + 1.0, x) == pytest.approx(1.0, abs=1e-12)


# --- input errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: linear_cka(torch.randn(5, 2), torch.randn(6, 2)), "same inputs"),
        (lambda: debiased_linear_cka(torch.randn(3, 2), torch.randn(3, 2)), "at least 4"),
        (lambda: linear_cka(torch.full((5, 2), float("nan")), torch.randn(5, 2)), "NaN"),
        (lambda: linear_cka(torch.ones(5, 2), torch.randn(5, 2)), "no \\(estimated\\) variance"),
        (lambda: linear_cka([[1.0]], torch.randn(1, 1)), "Tensor"),
        (lambda: rbf_cka(torch.randn(5, 2), torch.randn(5, 2), sigma=0.0), "sigma"),
        (lambda: rsa(torch.randn(5, 1), torch.randn(5, 3)), "at least 2 dimensions"),
        (lambda: rsa(torch.randn(5, 3), torch.randn(5, 3), method="kendall"), "spearman"),
    ],
)
def test_bad_inputs_raise_library_errors_with_a_fix(call, match):
    with pytest.raises(GraphSurgeonError, match=match):
        call()


# --- streaming accumulator -------------------------------------------------------------------


def batch_matrix(features: list[torch.Tensor], measure) -> torch.Tensor:
    return torch.tensor([[measure(a, b) for b in features] for a in features], dtype=F64)


@settings(max_examples=examples(20), deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 9), min_size=2, max_size=6), st.floats(-50.0, 50.0))
def test_accumulator_equals_batch_computation_on_concatenated_data(seed, batch_sizes, offset):
    n = sum(batch_sizes)
    x, y = related(seed, n, 4, 3)
    fmap = randn(seed + 5, n, 2, 2, 2) + y[:, :1, None, None]
    features = [x + offset, y, fmap]  # a large shared mean stresses the raw moments
    acc = CKAAccumulator()
    start = 0
    for b in batch_sizes:
        acc.update({"x": features[0][start : start + b], "y": features[1][start : start + b], "f": fmap[start : start + b]})
        start += b
    if n >= 4:
        assert torch.allclose(acc.matrix(), batch_matrix(features, debiased_linear_cka), atol=1e-10, rtol=0)
    assert torch.allclose(acc.matrix(debiased=False), batch_matrix(features, linear_cka), atol=1e-10, rtol=0)
    assert acc.nodes == ("x", "y", "f") and acc.num_samples == n


def test_accumulator_state_does_not_grow_with_batches():
    acc = CKAAccumulator(debiased=False)
    acc.update([randn(0, 8, 5), randn(1, 8, 3)])
    state = {k: v.shape for k, v in vars(acc).items() if isinstance(v, torch.Tensor)}
    for seed in range(2, 30):
        acc.update([randn(seed, 8, 5), randn(seed + 50, 8, 3)])
    assert {k: v.shape for k, v in vars(acc).items() if isinstance(v, torch.Tensor)} == state
    assert max(s.numel() for s in state.values()) <= 8 * 8  # (d_x + d_y)², independent of n
    assert acc.nodes == (0, 1) and acc.num_samples == 8 * 29


def test_accumulator_rejects_inconsistent_batches():
    acc = CKAAccumulator()
    acc.update({"a": torch.randn(3, 2), "b": torch.randn(3, 4)})
    with pytest.raises(SimilarityError, match="same nodes"):
        acc.update({"b": torch.randn(3, 4), "a": torch.randn(3, 2)})
    with pytest.raises(SimilarityError, match="widths"):
        acc.update({"a": torch.randn(3, 2), "b": torch.randn(3, 5)})
    with pytest.raises(SimilarityError, match="different sizes"):
        acc.update({"a": torch.randn(3, 2), "b": torch.randn(2, 4)})
    with pytest.raises(SimilarityError, match="at least 4"):
        acc.matrix()


# --- minibatch loss --------------------------------------------------------------------------


def test_minibatch_cka_matches_pairwise_debiased_cka():
    x, y = related(7, 16, 5, 4)
    features = [x, y, randn(9, 16, 2, 3)]
    expected = batch_matrix(features, debiased_linear_cka)
    assert torch.allclose(minibatch_debiased_cka(features), expected, atol=1e-12)
    in_float32 = minibatch_debiased_cka([f.float() + 3.0 for f in features])
    assert in_float32.dtype == torch.float32
    assert torch.allclose(in_float32.double(), expected, atol=1e-4)
    assert minibatch_debiased_cka([f.float() for f in features], dtype=F64).dtype == F64


def test_minibatch_cka_is_differentiable():
    x, y = related(1, 8, 3, 2)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: minibatch_debiased_cka([a, b])[0, 1], (x, y))
    a = torch.randn(32, 6, requires_grad=True)
    b = torch.randn(32, 4, requires_grad=True)
    loss = -minibatch_debiased_cka([a, b])[0, 1]
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_minibatch_cka_dead_node_gives_zero_not_nan():
    alive = torch.randn(8, 3, requires_grad=True)
    dead = torch.zeros(8, 3, requires_grad=True)
    out = minibatch_debiased_cka([alive, dead])
    values = out.detach()
    assert float(values[0, 0]) == pytest.approx(1.0) and values[0, 1] == 0 and values[1, 1] == 0
    out.sum().backward()
    assert torch.isfinite(alive.grad).all() and torch.isfinite(dead.grad).all()


def test_minibatch_cka_rejects_bad_batches():
    with pytest.raises(SimilarityError, match="at least 4"):
        minibatch_debiased_cka([torch.randn(3, 2), torch.randn(3, 2)])
    with pytest.raises(SimilarityError, match="batch sizes"):
        minibatch_debiased_cka([torch.randn(5, 2), torch.randn(6, 2)])
    with pytest.raises(SimilarityError, match="list"):
        minibatch_debiased_cka(torch.randn(5, 2))
