"""Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022.

The update is the Nash bargaining solution among the tasks: ``d = sum_t a_t g_t`` with
``a > 0`` solving ``(G G^T) a = 1 / a`` elementwise, so that every task's directional
derivative ``g_t . d = 1 / a_t`` is positive and the product of the utilities is maximal.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from graphsurgeon.methods.aggregation.base import Aggregator, gram
from graphsurgeon.methods.aggregation.mgda import min_norm_weights

__all__ = ["NashMTL", "nash_bargaining_alpha"]

# Squared min-norm point of the hull of the gradients, relative to ||G G^T||_F, below which
# they count as Pareto-stationary. Near it the solution grows like 1 / sqrt(min-norm^2) and
# trust-exact still reaches a residual around 1e-7 at 1e-10.
_PARETO_TOL = 1e-12


def nash_bargaining_alpha(k: np.ndarray) -> tuple[np.ndarray, float]:
    """Solve ``K a = 1 / a``, ``a > 0``, for a PSD Gram matrix ``K``; return ``(a, residual)``.

    The equation is the stationarity condition of the strictly convex
    ``f(a) = a^T K a / 2 - sum_t log a_t`` on ``a > 0``, so it has at most one solution.
    Instead of the official sequential convex programme (cvxpy, 20 linearisation steps) we
    minimise ``f`` with scipy's ``trust-exact`` Newton method, with the analytic gradient
    and Hessian, after substituting ``a = exp(b)`` so that positivity needs no constraint.
    The substitution is a diffeomorphism, so its only stationary point is the solution and
    the trust-region method converges to it. The start ``a_t = 1 / ||g_t||`` is the exact
    answer for orthogonal gradients.

    A solution exists unless the gradients are Pareto-stationary: some convex combination
    of them is zero, no direction improves every task, and ``f`` is unbounded below. That
    is the case exactly when MGDA's min-norm point is zero, which we test first (squared
    norm below ``_PARETO_TOL`` times ``||K||_F``); then ``a`` is all zeros (no update) and
    the residual is infinite.

    ``residual = max_t |a_t (K a)_t - 1|``, the relative violation of the optimality
    condition (scale-free, since ``a_t (K a)_t`` is).
    """
    scale = np.linalg.norm(k)
    if scale == 0:
        return np.zeros(len(k)), math.inf
    k = k / scale  # conditions the solver; the solution for K is a / sqrt(scale)
    w = min_norm_weights(k)
    if w @ k @ w <= _PARETO_TOL:
        return np.zeros(len(k)), math.inf

    def objective(b: np.ndarray) -> float:
        a = np.exp(b)
        return float(0.5 * a @ k @ a - b.sum())

    def gradient(b: np.ndarray) -> np.ndarray:
        a = np.exp(b)
        return a * (k @ a) - 1.0

    def hessian(b: np.ndarray) -> np.ndarray:
        a = np.exp(b)
        return np.outer(a, a) * k + np.diag(a * (k @ a))

    result = minimize(
        objective,
        -0.5 * np.log(np.diag(k)),  # no zero diagonal here: that task would be Pareto-stationary
        jac=gradient,
        hess=hessian,
        method="trust-exact",
        options={"gtol": 1e-12, "maxiter": 200},
    )
    a = np.exp(result.x)
    residual = float(np.max(np.abs(a * (k @ a) - 1.0)))
    return a / np.sqrt(scale), residual


class NashMTL(Aggregator):
    """Nash bargaining weights, solved with scipy (see ``nash_bargaining_alpha``).

    The solution is homogeneous of degree -1 in the gradients (``||sum_t a_t g_t||^2 = T``
    whatever their scale), so the raw direction would ignore how large the gradients are.
    Like the official code, the weights are therefore the solution for ``K / ||K||_F``:
    ``last_weights = sqrt(||K||_F) a``, putting the direction on the gradients' scale.
    ``last_alpha`` is ``a`` itself, the solution of the paper's ``(G G^T) a = 1 / a``, and
    ``last_residual`` the optimality residual ``max_t |a_t (G G^T a)_t - 1|`` (infinite
    when the gradients are Pareto-stationary and the direction is zero). The official code
    also clips the shared gradient to norm 1 after every step; that is the training loop's
    choice, not done here.
    """

    last_alpha: Tensor | None
    last_residual: float | None

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.last_alpha = None
        self.last_residual = None

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        k = gram(grads).cpu().numpy()
        alpha, self.last_residual = nash_bargaining_alpha(k)
        self.last_alpha = torch.from_numpy(alpha)
        return (self.last_alpha * math.sqrt(np.linalg.norm(k))).to(grads.device)
