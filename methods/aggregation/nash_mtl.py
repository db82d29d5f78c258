"""Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022.

The update is the Nash bargaining solution among the tasks: ``d = sum_t a_t g_t`` with
``a > 0`` solving ``(G G^T) a = 1 / a`` elementwise, so that every task's directional
derivative ``g_t . d = 1 / a_t`` is positive and the product of the utilities is maximal.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from graphsurgeon.methods.aggregation.base import Aggregator, gram
from graphsurgeon.methods.aggregation.mgda import min_norm_weights
from graphsurgeon.methods.aggregation.simplex_qp import SolverWarning

__all__ = ["NashMTL", "nash_bargaining_alpha"]

# Squared min-norm point of the hull of the gradients, relative to ||G G^T||_F, below which
# they count as Pareto-stationary. Near it the solution grows like 1 / sqrt(min-norm^2) and
# trust-exact still reaches a residual around 1e-7 at 1e-10.
_PARETO_TOL = 1e-12
# f is self-concordant: damped Newton reaches the quadratic phase in O(f(a0) - f*) steps
_NEWTON_STEPS = 1000


def nash_bargaining_alpha(k: np.ndarray) -> tuple[np.ndarray, float]:
    """Solve ``K a = 1 / a``, ``a > 0``, for a PSD Gram matrix ``K``; return ``(a, residual)``.

    The equation is the stationarity condition of the strictly convex
    ``f(a) = a^T K a / 2 - sum_t log a_t`` on ``a > 0``, so it has at most one solution.
    Instead of the official sequential convex programme (cvxpy, 20 linearisation steps) we
    minimise ``f`` by damped Newton: ``f`` is a quadratic plus a log barrier, hence
    self-concordant, so steps of length ``1 / (1 + λ)`` (λ the Newton decrement) decrease it
    and keep ``a > 0`` from any start, and full steps converge quadratically near the
    solution. A trust-region Newton in ``log a`` stalled near Pareto-stationarity (residual
    28.5 on gradients an issue reported); this reaches ~1e-12. The start ``a_t = 1 / ||g_t||``
    is the exact answer for orthogonal gradients. A `SolverWarning` says when the residual
    stays above 1e-8.

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
    # near Pareto-stationarity a is large and K a small: K a cancels, so the residual and the
    # gradient are formed in extended precision (long double where the platform has it);
    # the Newton direction only needs float64
    kl = k.astype(np.longdouble)
    a = (1.0 / np.sqrt(np.diag(k))).astype(np.longdouble)  # exact for orthogonal gradients
    a *= np.sqrt(len(a) / (a @ kl @ a))  # the best multiple of it: f's minimum along the ray
    for _ in range(_NEWTON_STEPS):
        ka = kl @ a
        if np.max(np.abs(a * ka - 1.0)) <= 1e-13:
            break
        gradient = ka - 1.0 / a
        hessian = (kl + np.diag(1.0 / a**2)).astype(np.float64)
        step = np.linalg.solve(hessian, -gradient.astype(np.float64)).astype(np.longdouble)
        decrement = float(np.sqrt(max(float(-(gradient @ step)), 0.0)))
        # the damped Newton step of a self-concordant function: f decreases and a stays > 0
        length = 1.0 / (1.0 + decrement) if decrement > 0.25 else 1.0
        while np.any(a + length * step <= 0):
            length /= 2
        a = a + length * step
    residual = float(np.max(np.abs(a * (kl @ a) - 1.0)))
    a = a.astype(np.float64)
    if residual > 1e-8:
        warnings.warn(
            f"Nash-MTL's bargaining equation K a = 1/a holds only to {residual:.2e} (relative); "
            "the gradients are close to Pareto-stationary.",
            SolverWarning,
            stacklevel=2,
        )
    return a / np.sqrt(scale), residual


class NashMTL(Aggregator):
    """Nash bargaining weights, solved with scipy (see ``nash_bargaining_alpha``).

    The solution is homogeneous of degree -1 in the gradients (``||sum_t a_t g_t||^2 = T``
    whatever their scale), so the raw direction ignores how large the gradients are. The
    official code divides ``G G^T`` by its norm before solving, but the normalisation cancels
    in its update, so it applies the raw solution ``a``. Here the weights are the solution for
    ``K / ||K||_F``, ``last_weights = sqrt(||K||_F) a``: parallel to the official direction,
    on the gradients' scale (a deviation of magnitude only).
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
