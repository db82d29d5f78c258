"""Known-answer tests for the gradient-aggregation methods and loss weightings."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import graphsurgeon as gs
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.methods.aggregation.base import (
    Aggregator,
    assign_gradient,
    batched_backward_pays,
    per_task_gradients,
    restoring,
)
from graphsurgeon.methods.aggregation.cagrad import CAGrad
from graphsurgeon.methods.aggregation.imtl import IMTLG
from graphsurgeon.methods.aggregation.mgda import MGDA
from graphsurgeon.methods.aggregation.nash_mtl import NashMTL
from graphsurgeon.methods.aggregation.pcgrad import PCGrad
from graphsurgeon.methods.aggregation.registry import AGGREGATORS, make_aggregator
from graphsurgeon.methods.aggregation.weighting import DWA, EW, UW, GradNorm

F64 = torch.float64


def t(rows, dtype=F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=F64)


def random_quadratic(num_tasks: int, dim: int, seed: int):
    """Per-task gradients and losses of convex quadratics ``(x-c)^T A (x-c) / 2`` at a point."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, generator=gen, dtype=F64)
    mats, centres = [], []
    for _ in range(num_tasks):
        m = torch.randn(dim, dim, generator=gen, dtype=F64)
        mats.append(m @ m.T / dim + 0.1 * torch.eye(dim, dtype=F64))
        centres.append(torch.randn(dim, generator=gen, dtype=F64) * 2)

    def losses_at(point: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.5 * (point - c) @ a @ (point - c) for a, c in zip(mats, centres)])

    grads = torch.stack([a @ (x - c) for a, c in zip(mats, centres)])
    return x, grads, losses_at(x), losses_at


# --------------------------------------------------------------------------- utilities


def _tiny_problem(dtype=torch.float32):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4).to(dtype)
    unused = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    frozen = torch.nn.Parameter(torch.ones(3, dtype=dtype), requires_grad=False)
    heads = [torch.nn.Linear(4, 1).to(dtype) for _ in range(2)]
    x = torch.randn(5, 3, dtype=dtype)
    feats = trunk(x) * frozen.sum()
    losses = [(head(feats) ** 2).mean() for head in heads]
    params = [trunk.weight, unused, frozen, trunk.bias]
    return trunk, unused, frozen, losses, params


def test_per_task_gradients_match_autograd_with_zeros_for_unreached_params():
    trunk, _unused, _frozen, losses, params = _tiny_problem()
    grads = per_task_gradients(losses, params, retain_graph=True)
    assert grads.shape == (2, 12 + 2 + 3 + 4)
    for row, loss in zip(grads, losses):
        w, b = torch.autograd.grad(loss, [trunk.weight, trunk.bias], retain_graph=True)
        expected = torch.cat([w.flatten(), torch.zeros(2), torch.zeros(3), b.flatten()])
        torch.testing.assert_close(row, expected)


def test_per_task_gradients_keep_the_graph_for_the_heads_backward():
    *_, losses, params = _tiny_problem()
    per_task_gradients(losses, params, retain_graph=True)
    sum(losses).backward()  # graph still there


class _NoVmap(torch.autograd.Function):
    """A custom op whose backward reads a value on the host (``.item()``), which vmap cannot
    batch: the batched backward cannot run through it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * (2.0 if grad.abs().max().item() >= 0 else 0.0)


def _conv_problem(custom_op: bool):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()
    heads = [torch.nn.Linear(4, 2).double() for _ in range(3)]
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    feats = trunk(x)
    if custom_op:
        feats = _NoVmap.apply(feats)
    feats = feats.mean((2, 3))
    losses = [(h(feats) ** 2).mean() for h in heads]
    return losses, list(trunk.parameters())


@pytest.mark.parametrize("custom_op", [False, True])
def test_per_task_gradients_batched_and_fallback_rows_equal_one_backward_per_task(custom_op, caplog):
    losses, params = _conv_problem(custom_op)
    expected = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    )
    with caplog.at_level(logging.DEBUG, logger="graphsurgeon"):
        got = per_task_gradients(losses, params)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)
    fell_back = any("one backward per task" in r.getMessage() for r in caplog.records)
    assert fell_back == custom_op  # the batched backward runs unless an op has no batching rule


def test_per_task_gradients_constant_loss_gives_zeros_and_dtype_follows_params():
    trunk, *_ = _tiny_problem(F64)
    loss = (trunk(torch.ones(1, 3, dtype=F64)) ** 2).sum()
    grads = per_task_gradients([loss, torch.tensor(0.0)], list(trunk.parameters()))
    assert grads.dtype == F64
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[0]) > 0


@pytest.mark.parametrize(
    "losses, params, match",
    [
        ([], [torch.nn.Parameter(torch.ones(1))], "no losses"),
        ([torch.ones(2, requires_grad=True)], [torch.nn.Parameter(torch.ones(1))], "not a scalar"),
        ([torch.ones((), requires_grad=True)], [], "no parameters"),
    ],
)
def test_per_task_gradients_rejects_bad_input(losses, params, match):
    with pytest.raises(gs.GradientError, match=match):
        per_task_gradients(losses, params)


def test_assign_gradient_round_trips_and_skips_frozen_params():
    trunk, unused, frozen, _, params = _tiny_problem()
    vector = torch.arange(21, dtype=F64)
    assign_gradient(params, vector)
    torch.testing.assert_close(trunk.weight.grad, torch.arange(12.0).reshape(4, 3))
    torch.testing.assert_close(unused.grad, torch.tensor([12.0, 13.0]))
    assert frozen.grad is None
    torch.testing.assert_close(trunk.bias.grad, torch.tensor([17.0, 18.0, 19.0, 20.0]))
    assert trunk.weight.grad.dtype == torch.float32
    with pytest.raises(gs.GradientError, match="same parameters"):
        assign_gradient(params, torch.zeros(20))


def test_restoring_puts_parameters_and_buffers_back_bit_for_bit_also_on_an_exception():
    bn = torch.nn.BatchNorm1d(3)
    tensors = [*bn.parameters(), *bn.buffers()]
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(RuntimeError, match="boom"), restoring(tensors) as restore:
        with torch.no_grad():
            bn.weight.add_(0.1)
        restore()
        assert torch.equal(bn.weight, before[0])
        bn.train()(torch.randn(5, 3))  # moves the running statistics
        with torch.no_grad():
            bn.bias.mul_(3.0).add_(1e-3)
        raise RuntimeError("boom")
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    assert bn.weight.requires_grad and bn.weight.grad is None

def test_training_step_with_mgda_lowers_every_task_loss():
    torch.manual_seed(1)
    shared = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    targets = [t([1.0, 0.0]), t([0.0, 1.0])]
    losses = [((shared - c) ** 2).sum() for c in targets]
    before = torch.stack(losses).detach()
    grads = per_task_gradients(losses, [shared])
    assign_gradient([shared], MGDA(2).aggregate(grads, before))
    torch.optim.SGD([shared], lr=0.1).step()
    after = torch.stack([((shared - c) ** 2).sum() for c in targets]).detach()
    assert (after < before).all()


# --------------------------------------------------------------------------- base class, registry


def test_aggregate_validates_its_input():
    agg = EW(2)
    with pytest.raises(gs.GradientError, match="built for 2 tasks"):
        agg.aggregate(torch.zeros(3, 4), torch.ones(3))
    with pytest.raises(gs.GradientError, match=r"\[tasks, params\]"):
        agg.aggregate(torch.zeros(4), torch.ones(2))
    with pytest.raises(gs.GradientError, match="float32 or float64"):
        agg.aggregate(torch.zeros(2, 4, dtype=torch.int64), torch.ones(2))
    with pytest.raises(gs.GradientError, match="one loss value per task"):
        agg.aggregate(torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(gs.GradientError, match="non-finite"):
        agg.aggregate(t([[1.0, math.nan], [0.0, 1.0]]), ones(2))
    with pytest.raises(gs.OptionError, match="num_tasks"):
        EW(0)


def test_make_aggregator_builds_every_method_and_explains_mistakes():
    for name, cls in AGGREGATORS.items():
        agg = make_aggregator(name, 3)
        assert isinstance(agg, cls) and isinstance(agg, Aggregator) and agg.num_tasks == 3
    assert isinstance(make_aggregator("MGDA", 2, normalization="l2"), MGDA)
    valid = "cagrad, dwa, ew, gradnorm, imtl_g, mgda, nash_mtl, pcgrad, uw"
    with pytest.raises(gs.OptionError, match=valid):
        make_aggregator("sgd", 2)
    with pytest.raises(gs.OptionError, match="valid options: c"):
        make_aggregator("cagrad", 2, alpha=0.5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MGDA(2, normalization="max"), "normalization"),
        (lambda: CAGrad(2, c=-0.1), "c must be"),
        (lambda: DWA(2, temperature=0.0), "temperature"),
        (lambda: EW(2, reduction="max"), "reduction"),
        (lambda: GradNorm(2, alpha=-1.0), "alpha"),
        (lambda: GradNorm(2, norm_numel=0), "norm_numel"),
    ],
)
def test_bad_options_raise(build, match):
    with pytest.raises(GraphSurgeonError, match=match):
        build()


# Every registered method, with the options worth exercising separately.
CASES = [
    ("ew", {}),
    ("ew", {"reduction": "mean"}),
    ("uw", {}),
    ("dwa", {}),
    ("gradnorm", {}),
    ("pcgrad", {}),
    ("cagrad", {}),
    ("mgda", {"normalization": "none"}),
    ("mgda", {"normalization": "l2"}),
    ("mgda", {"normalization": "loss"}),
    ("mgda", {"normalization": "loss+"}),
    ("imtl_g", {}),
    ("nash_mtl", {}),
]
CASE_IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in CASES]


def test_cases_cover_the_registry():
    assert {name for name, _ in CASES} == set(AGGREGATORS)


@pytest.mark.parametrize("name, kwargs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_tasks", [2, 4])
def test_shape_dtype_finiteness_and_precision(name, kwargs, num_tasks):
    _, grads, losses, _ = random_quadratic(num_tasks, 6, seed=num_tasks)
    d64 = make_aggregator(name, num_tasks, **kwargs).aggregate(grads, losses)
    agg32 = make_aggregator(name, num_tasks, **kwargs)
    d32 = agg32.aggregate(grads.float(), losses.float())
    assert d64.shape == (6,) and d64.dtype == F64 and d32.dtype == torch.float32
    assert torch.isfinite(d64).all() and torch.isfinite(d32).all()
    assert agg32.last_weights.shape == (num_tasks,)
    torch.testing.assert_close(agg32.last_weights @ grads.float(), d32)
    torch.testing.assert_close(d32.double(), d64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name, kwargs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_single_task_returns_the_gradient_itself(name, kwargs, dtype):
    grad = t([[3.0, -4.0, 0.5]], dtype)
    agg = make_aggregator(name, 1, **kwargs)
    out = agg.aggregate(grad, t([2.0], dtype))
    assert torch.equal(out, grad[0])
    assert agg.last_weights.tolist() == [1.0]


# Methods whose direction provably decreases the plain sum of the losses (d . sum_t g_t > 0
# unless the gradients are Pareto-stationary), with the task counts for which that holds:
# EW trivially; MGDA because d . g_t >= ||d||^2 for every task; CAGrad with c < 1 because
# d . g0 >= (1 - c) ||g0||^2 / (1 + c); Nash-MTL because g_t . d = 1 / a_t > 0; PCGrad for two
# tasks only (the paper's theorem; with more tasks the projections can overshoot).
# Excluded: UW, DWA and GradNorm descend their own weighted sum sum_t w_t L_t, not the plain
# sum, once their weights move away from 1; IMTL-G can even ascend every task (see
# test_imtl_g_can_return_an_ascent_direction).
DESCENT_CASES = [
    (name, kw, num_tasks)
    for name, kw in CASES
    if name in ("ew", "mgda", "cagrad", "nash_mtl", "pcgrad")
    for num_tasks in ((2,) if name == "pcgrad" else (2, 3, 5))
]


DESCENT_IDS = [f"{n}{''.join('-' + v for v in kw.values())}-T{k}" for n, kw, k in DESCENT_CASES]


@pytest.mark.parametrize("name, kwargs, num_tasks", DESCENT_CASES, ids=DESCENT_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_decreases_sum_of_convex_quadratics(name, kwargs, num_tasks, seed):
    x, grads, losses, losses_at = random_quadratic(num_tasks, 8, seed=100 * seed + num_tasks)
    d = make_aggregator(name, num_tasks, **kwargs).aggregate(grads, losses)
    assert d @ grads.sum(0) > 0
    step = 1e-3 / d.norm()
    assert losses_at(x - step * d).sum() < losses.sum()


# --------------------------------------------------------------------------- MGDA


def test_mgda_orthogonal_unit_gradients_give_their_mean():
    agg = MGDA(2)
    torch.testing.assert_close(agg.aggregate(t([[1.0, 0.0], [0.0, 1.0]]), ones(2)), t([0.5, 0.5]))
    torch.testing.assert_close(agg.last_weights, t([0.5, 0.5]))
    third = torch.full((3,), 1 / 3, dtype=F64)
    torch.testing.assert_close(MGDA(3).aggregate(torch.eye(3, dtype=F64), ones(3)), third)


def test_mgda_min_norm_point_inside_the_segment():
    # min over g of ||g (2,0) + (1-g)(0,1)||^2 = 4g^2 + (1-g)^2  ->  g = 1/5, point (0.4, 0.8)
    agg = MGDA(2)
    torch.testing.assert_close(agg.aggregate(t([[2.0, 0.0], [0.0, 1.0]]), ones(2)), t([0.4, 0.8]))
    torch.testing.assert_close(agg.last_weights, t([0.2, 0.8]))


def test_mgda_min_norm_point_at_a_vertex():
    # (1,0) . ((2,1) - (1,0)) >= 0, so the closest point of the segment is (1,0) itself.
    agg = MGDA(2)
    torch.testing.assert_close(agg.aggregate(t([[1.0, 0.0], [2.0, 1.0]]), ones(2)), t([1.0, 0.0]))
    torch.testing.assert_close(agg.last_weights, t([1.0, 0.0]), atol=1e-9, rtol=0)


def test_mgda_opposite_gradients_are_pareto_stationary():
    d = MGDA(2).aggregate(t([[1.0, 2.0], [-1.0, -2.0]]), ones(2))
    torch.testing.assert_close(d, t([0.0, 0.0]))


@pytest.mark.parametrize(
    "normalization, losses, weights",
    [
        ("l2", [1.0, 1.0], [0.25, 0.5]),  # hull of e1, e2: min-norm (0.5, 0.5)
        ("loss", [2.0, 1.0], [0.25, 0.5]),  # (2,0)/2 and (0,1)/1 again give e1, e2
        # (2,0)/(2*2) = (0.5,0) and (0,1)/(3*1): min-norm weights (4/13, 9/13), divided by (4, 3)
        ("loss+", [2.0, 3.0], [1 / 13, 3 / 13]),
    ],
)
def test_mgda_normalisations(normalization, losses, weights):
    agg = MGDA(2, normalization=normalization)
    d = agg.aggregate(t([[2.0, 0.0], [0.0, 1.0]]), t(losses))
    torch.testing.assert_close(agg.last_weights, t(weights))
    torch.testing.assert_close(d, t([2 * weights[0], weights[1]]))


def test_mgda_loss_normalisation_needs_positive_losses():
    with pytest.raises(gs.GradientError, match="positive losses"):
        MGDA(2, normalization="loss").aggregate(t([[1.0, 0.0], [0.0, 1.0]]), t([0.0, 1.0]))


@pytest.mark.parametrize("seed", range(4))
def test_mgda_satisfies_min_norm_optimality(seed):
    # KKT of min ||sum w_t g_t||^2 on the simplex: g_t . d >= ||d||^2, with equality where w_t > 0.
    # SLSQP stops on the objective, so the KKT conditions hold to ~1e-8 relative, not 1e-15.
    _, grads, losses, _ = random_quadratic(5, 6, seed=seed)
    agg = MGDA(5)
    d = agg.aggregate(grads, losses)
    dots, sq_norm = grads @ d, d @ d
    assert (dots >= sq_norm * (1 - 1e-6)).all()
    active = agg.last_weights > 1e-6
    torch.testing.assert_close(dots[active], sq_norm.expand(int(active.sum())), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- PCGrad


def test_pcgrad_hand_example():
    # g1 = (1,0), g2 = (-1,1), g1 . g2 = -1:
    # g1_pc = g1 + g2 / 2 = (0.5, 0.5); g2_pc = g2 + g1 = (0, 1); sum = (0.5, 1.5).
    agg = PCGrad(2)
    torch.testing.assert_close(agg.aggregate(t([[1.0, 0.0], [-1.0, 1.0]]), ones(2)), t([0.5, 1.5]))
    torch.testing.assert_close(agg.last_weights, t([2.0, 1.5]))


def test_pcgrad_non_conflicting_gradients_are_summed():
    grads = t([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(PCGrad(3).aggregate(grads, ones(3)), grads.sum(0))


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_conflicting_tasks_keep_both_improving(seed):
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(6, generator=gen, dtype=F64)
    g2 = -0.7 * g1 + 0.5 * torch.randn(6, generator=gen, dtype=F64)
    assert g1 @ g2 < 0
    d = PCGrad(2).aggregate(torch.stack([g1, g2]), ones(2))
    assert d @ g1 >= -1e-12 and d @ g2 >= -1e-12


def test_pcgrad_matches_projecting_the_vectors_in_the_same_random_order():
    _, grads, losses, _ = random_quadratic(4, 5, seed=3)
    grads[1] = -grads[0] + 0.1 * grads[1]  # make sure there are conflicts
    order = torch.Generator().manual_seed(7)
    expected = []
    for i in range(4):
        g = grads[i].clone()
        for j in torch.randperm(4, generator=order).tolist():
            if j != i and g @ grads[j] < 0:
                g -= (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        expected.append(g)
    first = PCGrad(4, seed=7).aggregate(grads, losses)
    torch.testing.assert_close(first, torch.stack(expected).sum(0))
    assert torch.equal(first, PCGrad(4, seed=7).aggregate(grads, losses))  # same seed, same answer


# --------------------------------------------------------------------------- CAGrad


@pytest.mark.parametrize("seed", range(3))
def test_cagrad_with_c_zero_is_the_mean_gradient(seed):
    _, grads, losses, _ = random_quadratic(4, 6, seed=seed)
    d = CAGrad(4, c=0.0).aggregate(grads, losses)
    torch.testing.assert_close(d, EW(4, reduction="mean").aggregate(grads, losses))
    torch.testing.assert_close(d, grads.mean(0))


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_solves_its_primal_problem(c):
    # max_d min_t g_t . d  s.t. ||d - g0|| <= c ||g0||; the returned direction is d / (1 + c).
    _, grads, losses, _ = random_quadratic(3, 5, seed=11)
    grads[2] = -0.8 * grads[0] + 0.3 * grads[2]
    d = CAGrad(3, c=c).aggregate(grads, losses) * (1 + c)
    g0 = grads.mean(0)
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius * (1 + 1e-6)
    best = (grads @ d).min()
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randn(2000, 5, generator=gen, dtype=F64)
    candidates = g0 + radius * candidates / candidates.norm(dim=1, keepdim=True)
    assert best >= (candidates @ grads.T).min(dim=1).values.max() - 1e-9
    assert best > (grads @ g0).min()  # strictly better for the worst task than EW


# --------------------------------------------------------------------------- IMTL-G


def test_imtl_g_hand_example():
    # Two tasks: weights proportional to 1 / ||g_t||, direction bisects the gradients.
    agg = IMTLG(2)
    d = agg.aggregate(t([[1.0, 0.0], [0.0, 2.0]]), ones(2))
    torch.testing.assert_close(agg.last_weights, t([2 / 3, 1 / 3]))
    torch.testing.assert_close(d, t([2 / 3, 2 / 3]))


@pytest.mark.parametrize("seed", range(4))
def test_imtl_g_equal_projections_and_paper_closed_form(seed):
    _, grads, losses, _ = random_quadratic(4, 10, seed=seed)
    agg = IMTLG(4)
    d = agg.aggregate(grads, losses)
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(projections, projections[0].expand(4))
    assert math.isclose(float(agg.last_weights.sum()), 1.0, rel_tol=1e-9)
    # The paper's form: a_{2:T} = g_1 U^T (D U^T)^{-1}, U_t = u_1 - u_t, D_t = g_1 - g_t.
    u_rows, d_rows = units[:1] - units[1:], grads[:1] - grads[1:]
    rest = grads[0] @ u_rows.T @ torch.linalg.inv(d_rows @ u_rows.T)
    torch.testing.assert_close(agg.last_weights, torch.cat([1 - rest.sum().reshape(1), rest]))


def test_imtl_g_can_return_an_ascent_direction():
    # Why IMTL-G is not in the descent test: with sum_t a_t = 1 the common projection can be
    # negative, and then the update increases every task's loss.
    grads = t([[0.0, 0.0, 1.0], [1.0, 1.0, 3.0], [-2.0, 0.0, 0.0]])
    d = IMTLG(3).aggregate(grads, ones(3))
    units = grads / grads.norm(dim=1, keepdim=True)
    torch.testing.assert_close(units @ d, (units @ d)[0].expand(3))
    assert (grads @ d < 0).all()


def test_imtl_g_zero_gradient_task_gets_no_weight():
    agg = IMTLG(3)
    d = agg.aggregate(t([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]), ones(3))
    torch.testing.assert_close(agg.last_weights, t([2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(d, t([2 / 3, 2 / 3]))


# --------------------------------------------------------------------------- Nash-MTL


def test_nash_mtl_orthogonal_gradients_have_alpha_one_over_norm():
    agg = NashMTL(2)
    grads = t([[3.0, 0.0], [0.0, 0.5]])
    d = agg.aggregate(grads, ones(2))
    torch.testing.assert_close(agg.last_alpha, t([1 / 3, 2.0]))
    # Reported weights are alpha * sqrt(||GG^T||_F), as in the official implementation.
    scale = math.sqrt(math.hypot(9.0, 0.25))
    torch.testing.assert_close(agg.last_weights, t([scale / 3, 2 * scale]))
    torch.testing.assert_close(d, agg.last_weights @ grads)


@pytest.mark.parametrize("num_tasks, dim, seed", [(2, 5, 0), (3, 8, 1), (5, 12, 2), (4, 4, 3)])
def test_nash_mtl_alpha_solves_the_bargaining_equation(num_tasks, dim, seed):
    _, grads, losses, _ = random_quadratic(num_tasks, dim, seed=seed)
    grads = grads * torch.logspace(-2, 2, num_tasks, dtype=F64)[:, None]  # very different scales
    agg = NashMTL(num_tasks)
    agg.aggregate(grads, losses)
    alpha, k = agg.last_alpha, grads @ grads.T
    assert (alpha > 0).all()
    assert agg.last_residual < 1e-7
    torch.testing.assert_close(k @ alpha, 1 / alpha, rtol=1e-6, atol=0)


def test_nash_mtl_pareto_stationary_gradients_give_no_update():
    agg = NashMTL(3)
    d = agg.aggregate(t([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), ones(3))
    torch.testing.assert_close(d, t([0.0, 0.0]))
    assert agg.last_residual == math.inf


# --------------------------------------------------------------------------- loss weightings


def test_uw_weights_and_log_variance_gradient():
    agg = UW(2)
    with torch.no_grad():
        agg.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    grads = t([[1.0, 0.0], [0.0, 1.0]])
    d = agg.aggregate(grads, t([3.0, 4.0]))
    torch.testing.assert_close(agg.last_weights, t([1.0, 0.5]))  # exp(-s)
    torch.testing.assert_close(d, t([1.0, 0.5]))
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L = (1 - 3, 1 - 4/2)
    torch.testing.assert_close(agg.log_vars.grad, torch.tensor([-2.0, -1.0]))
    agg.aggregate(grads, t([3.0, 4.0]))  # accumulates like backward()
    torch.testing.assert_close(agg.log_vars.grad, torch.tensor([-4.0, -2.0]))
    assert [p is agg.log_vars for p in agg.parameters()] == [True]


def test_uw_log_variance_converges_to_log_loss():
    agg = UW(2)
    opt = torch.optim.SGD(agg.parameters(), lr=0.1)
    losses = t([0.5, 4.0])
    for _ in range(500):
        opt.zero_grad()
        agg.aggregate(torch.eye(2, dtype=F64), losses)
        opt.step()
    torch.testing.assert_close(agg.log_vars.detach().double(), losses.log(), rtol=1e-4, atol=1e-4)


def test_dwa_weights_follow_the_loss_ratio_softmax():
    agg = DWA(2)
    grads = t([[1.0, 0.0], [0.0, 1.0]])
    agg.aggregate(grads, ones(2))
    torch.testing.assert_close(agg.last_weights, ones(2))  # no history yet
    agg.epoch_end([1.0, 2.0])
    agg.aggregate(grads, ones(2))
    torch.testing.assert_close(agg.last_weights, ones(2))  # one epoch is not a ratio
    agg.epoch_end([0.5, 2.0])  # ratios (0.5, 1.0), temperature 2
    d = agg.aggregate(grads, ones(2))
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = t([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    torch.testing.assert_close(agg.last_weights, expected)
    torch.testing.assert_close(d, expected)
    with pytest.raises(gs.GradientError, match="finite positive"):
        agg.epoch_end([1.0, -1.0])


def test_gradnorm_weight_gradient_and_renormalisation():
    # Leading entries are not in the last shared layer (norm_numel=2): its norms are (3, 1).
    grads = t([[100.0, 3.0, 0.0], [-50.0, 0.0, 1.0]])
    agg = GradNorm(2, alpha=1.0, norm_numel=2)
    agg.aggregate(grads, t([1.0, 1.0]))  # records L(0); r = (1, 1), target = mean(3, 1) = 2
    torch.testing.assert_close(agg.weights.grad, torch.tensor([3.0, -1.0]))  # sign(G - 2) * norm
    assert agg.last_gradnorm_loss == pytest.approx(2.0)

    with torch.no_grad():
        agg.weights.copy_(torch.tensor([1.0, 3.0]))  # an optimizer step; renormalised to (0.5, 1.5)
    agg.weights.grad = None
    d = agg.aggregate(grads, t([1.0, 0.5]))
    torch.testing.assert_close(agg.last_weights, t([0.5, 1.5]))
    torch.testing.assert_close(d, 0.5 * grads[0] + 1.5 * grads[1])
    # G = (1.5, 1.5); inverse rates r = (1, 0.5) / 0.75; target = 1.5 * r = (2, 1)
    torch.testing.assert_close(agg.weights.grad, torch.tensor([-3.0, 1.0]))
    assert agg.last_gradnorm_loss == pytest.approx(1.0)
    torch.optim.SGD(agg.parameters(), lr=0.1).step()
    torch.testing.assert_close(agg.weights.detach(), torch.tensor([0.8, 1.4]))
    torch.testing.assert_close(agg.last_weights, t([0.5, 1.5]))  # the log is not rewritten


def test_gradnorm_alpha_and_initial_loss_checks():
    agg = GradNorm(2, alpha=2.0)
    grads = t([[2.0, 0.0], [0.0, 2.0]])
    agg.aggregate(grads, t([1.0, 2.0]))
    agg.weights.grad = None
    agg.aggregate(grads, t([0.25, 2.0]))  # ratios (0.25, 1) -> r = (0.4, 1.6); r^2 = (0.16, 2.56)
    # G = (2, 2), target = 2 r^2 = (0.32, 5.12) -> gradient (+2, -2)
    torch.testing.assert_close(agg.weights.grad, torch.tensor([2.0, -2.0]))
    with pytest.raises(gs.GradientError, match="positive initial losses"):
        GradNorm(2).aggregate(grads, t([0.0, 1.0]))
    with pytest.raises(gs.GradientError, match="norm_numel"):
        GradNorm(2, norm_numel=5).aggregate(grads, t([1.0, 1.0]))


def test_last_weights_is_a_snapshot_of_learnable_weights():
    agg = GradNorm(2)
    agg.aggregate(torch.diag(torch.tensor([2.0, 1.0])), torch.ones(2))  # float32, like the weights
    logged = agg.last_weights.clone()
    torch.optim.SGD(agg.parameters(), lr=0.1).step()
    assert not torch.equal(agg.weights.detach(), logged)
    assert torch.equal(agg.last_weights, logged)


def test_pcgrad_task_orders_survive_a_checkpoint_round_trip():
    from graphsurgeon.methods.gradient_method import GradientMethod

    grads = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads[1] = -grads[0] + 0.1  # conflicts, so the order matters
    grads[2] = -grads[3] + 0.2
    losses = torch.ones(4, dtype=F64)
    method = GradientMethod("pcgrad", tuple("abcd"))
    for _ in range(3):
        method.aggregator.aggregate(grads, losses)
    state = json.loads(json.dumps(method.state_dict()))  # checkpoints hold JSON
    expected = [method.aggregator.aggregate(grads, losses) for _ in range(5)]
    resumed = GradientMethod("pcgrad", tuple("abcd"))
    resumed.load_state_dict(state)
    got = [resumed.aggregator.aggregate(grads, losses) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    fresh = GradientMethod("pcgrad", tuple("abcd"))
    assert not all(torch.equal(a, fresh.aggregator.aggregate(grads, losses)) for a in expected)


def test_loss_weights_are_what_aggregate_uses_and_only_for_loss_weightings():
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    grads = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    for name in ("ew", "uw", "dwa"):
        by_losses, by_grads = make_aggregator(name, 3), make_aggregator(name, 3)
        assert not by_losses.uses_gradients
        weights = by_losses.loss_weights(losses)
        by_grads.aggregate(grads, losses)
        torch.testing.assert_close(weights, by_grads.last_weights)
        assert weights is by_losses.last_weights
    with pytest.raises(gs.GradientError, match="by their gradients"):
        PCGrad(3).loss_weights(losses)


@pytest.mark.parametrize("custom_op", [False, True])
def test_per_task_gradients_one_backward_per_task_equals_the_batched_rows(custom_op, caplog):
    """``batched=False`` (what the methods use on a CPU) changes the cost, not the rows."""
    losses, params = _conv_problem(custom_op)
    batched = per_task_gradients(losses, params, retain_graph=True)
    with caplog.at_level(logging.DEBUG, logger="graphsurgeon"):
        looped = per_task_gradients(losses, params, batched=False)
    torch.testing.assert_close(looped, batched, rtol=1e-6, atol=1e-10)
    assert not any("one backward per task" in r.getMessage() for r in caplog.records)  # vmap was not tried


def test_batched_backward_is_used_off_the_cpu_only():
    assert not batched_backward_pays(torch.device("cpu")) and not batched_backward_pays("cpu")
    assert batched_backward_pays(torch.device("cuda"))
