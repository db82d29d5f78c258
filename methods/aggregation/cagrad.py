"""CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021.

EW follows the mean gradient ``g0``, which can leave some task worse off. CAGrad instead
looks, within a ball of radius ``c ||g0||`` around ``g0``, for the direction that most
improves the worst task: ``max_d min_t g_t . d`` s.t. ``||d - g0|| <= c ||g0||``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from graphsurgeon.errors import OptionError
from graphsurgeon.methods.aggregation.base import Aggregator, gram
from graphsurgeon.methods.aggregation.mgda import min_norm_weights
from graphsurgeon.methods.aggregation.simplex_qp import SolverWarning, simplex_kkt_residual, simplex_qp

__all__ = ["CAGrad", "cagrad_dual_weights"]


class CAGrad(Aggregator):
    """Conflict-averse direction, solved exactly through its dual over the simplex.

    The dual is ``min_{w in simplex} g_w . g0 + c ||g0|| ||g_w||`` with ``g_w = sum_t w_t g_t``
    (only the Gram matrix is needed); the primal solution is
    ``d = g0 + (c ||g0|| / ||g_w||) g_w``. The dual is convex but not a QP; with
    ``sqrt(q) = min_ρ q / (2ρ) + ρ / 2`` it becomes ``min_ρ F(ρ)``, where each ``F(ρ)`` is a
    QP over the simplex (solved exactly by `simplex_qp`) and ``F`` is convex in ``ρ`` (a
    partial minimum of a jointly convex function), so a bounded scalar search finds ``ρ`` and a
    fixed-point polish ``ρ ← ||g_w||`` ends it. A general solver (SLSQP) on the dual stopped
    early on ill-scaled gradients (norm ratio 1e6: a direction that raised a task's loss).
    When the optimal ``g_w`` is zero (Pareto-stationary gradients) the primal optimum is
    ``d = 0`` if the ball allows it (``c >= 1``). A `SolverWarning` says when the dual's
    optimality conditions hold to less than 1e-8 relative.

    The result is divided by ``1 + c`` (``rescale=2`` of the official code; its default
    divides by ``1 + c^2``): then ``||d|| <= ||g0||`` always, one task gives back its own
    gradient for every ``c``, and ``c = 0`` gives exactly the mean gradient, EW with
    ``reduction="mean"``. For ``c < 1`` the direction decreases the mean loss
    (``d . g0 >= (1 - c) ||g0||^2 / (1 + c)``); the paper uses ``c = 0.4`` on NYUv2 and
    Cityscapes.
    """

    def __init__(self, num_tasks: int, c: float = 0.4) -> None:
        super().__init__(num_tasks)
        if not c >= 0:
            raise OptionError(
                f"CAGrad c must be >= 0, got {c!r}; the paper uses c in [0, 1)."
            )
        self.c = float(c)

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        n = self.num_tasks
        mean_weights = np.full(n, 1.0 / n)
        k = gram(grads).cpu().numpy()
        scale = np.trace(k) / n
        if self.c == 0 or scale <= 0:
            return torch.from_numpy(mean_weights).to(grads.device)
        k = k / scale  # the optimal w is invariant to the scale of K
        largest = np.sqrt(np.diag(k).max())
        if self.c >= 1:
            # the ball holds d = 0; when the gradients are Pareto-stationary (MGDA's min-norm
            # point is 0) no direction improves every task and d = 0 is the optimum
            stationary = min_norm_weights(k)
            if np.sqrt(max(stationary @ k @ stationary, 0.0)) <= _STATIONARY * largest:
                return torch.zeros(n, dtype=torch.float64, device=grads.device)
        w = cagrad_dual_weights(k, self.c)
        gw_norm = np.sqrt(max(w @ k @ w, 0.0))
        radius = self.c * np.sqrt(max(mean_weights @ k @ mean_weights, 0.0))
        if gw_norm <= _STATIONARY * largest:
            gw_norm, radius = 1.0, 0.0  # g_w = 0 with c < 1: the ball excludes 0, d = g0
        weights = (mean_weights + (radius / gw_norm) * w) / (1.0 + self.c)
        return torch.from_numpy(weights).to(grads.device)


# ||g_w|| relative to the largest gradient's norm below which g_w counts as zero: above the
# ~1.5e-8 at which sqrt(w.K w) is lost to cancellation in float64
_STATIONARY = 1e-7


def cagrad_dual_weights(k: np.ndarray, c: float) -> np.ndarray:
    """The simplex weights ``w`` minimising CAGrad's dual ``w.K w0 + c ||g0|| sqrt(w.K w)``."""
    n = k.shape[0]
    w0 = np.full(n, 1.0 / n)
    linear = k @ w0
    radius = c * np.sqrt(max(w0 @ k @ w0, 0.0))

    def at(rho: float) -> np.ndarray:
        return simplex_qp((radius / rho) * k, linear)

    def bound(rho: float) -> float:
        w = at(rho)
        return float(w @ linear + radius * (w @ k @ w / (2 * rho) + rho / 2))

    rho_max = float(np.sqrt(np.diag(k).max()))  # ||g_w|| <= max_t ||g_t||
    search = minimize_scalar(bound, bounds=(1e-3 * _STATIONARY * rho_max, rho_max), method="bounded",
                             options={"xatol": 1e-14 * rho_max, "maxiter": 200})
    w = _polish(k, linear, radius, at(float(search.x)))
    residual = _dual_kkt_residual(k, linear, radius, w)
    if residual > 1e-8 and np.sqrt(max(w @ k @ w, 0.0)) > _STATIONARY * rho_max:
        warnings.warn(f"CAGrad's dual weights violate optimality by {residual:.2e} (relative).", SolverWarning, stacklevel=2)
    return w


def _polish(k: np.ndarray, linear: np.ndarray, radius: float, w: np.ndarray) -> np.ndarray:
    """Newton's method on the dual's optimality conditions, on the support the search found.

    The scalar search locates ρ only to about sqrt(ε) (the bound is flat at its minimum), and
    near Pareto-stationarity the direction ``g0 + (r / ||g_w||) g_w`` amplifies an error in
    ``w`` by ``||g|| / ||g_w||``. On the support ``S`` the conditions are smooth:
    ``(K w0)_S + r (K w)_S / ||g_w|| = ν``, ``Σ w_S = 1``; residuals are formed in extended
    precision (they cancel), Newton steps in float64. A step that leaves the simplex or does
    not lower the residual ends the polish."""
    support = np.flatnonzero(w > 0)
    m = len(support)
    kl = k[np.ix_(support, support)].astype(np.longdouble)
    al = linear[support].astype(np.longdouble)
    x = w[support].astype(np.longdouble)

    def conditions(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        kx = kl @ x
        rho = float(np.sqrt(max(float(x @ kx), 1e-300)))
        gradient = al + radius * kx / rho
        nu = x @ gradient
        return np.concatenate([gradient - nu, [x.sum() - 1]]), kx, rho

    residual, kx, rho = conditions(x)
    for _ in range(20):
        jacobian = np.zeros((m + 1, m + 1))
        kx64 = kx.astype(np.float64)
        jacobian[:m, :m] = radius * (k[np.ix_(support, support)] / rho - np.outer(kx64, kx64) / rho**3)
        jacobian[:m, m] = -1.0
        jacobian[m, :m] = 1.0
        unknowns = np.concatenate([x, [x @ (al + radius * kx / rho)]])
        step = np.linalg.lstsq(jacobian, -residual.astype(np.float64), rcond=None)[0].astype(np.longdouble)
        candidate = unknowns[:m] + step[:m]
        if np.any(candidate <= 0):
            break
        new_residual, new_kx, new_rho = conditions(candidate)
        if np.abs(new_residual).max() >= np.abs(residual).max():
            break
        x, residual, kx, rho = candidate, new_residual, new_kx, new_rho
    out = np.zeros_like(w)
    out[support] = (x / x.sum()).astype(np.float64)
    return out


def _dual_kkt_residual(k: np.ndarray, linear: np.ndarray, radius: float, w: np.ndarray) -> float:
    """`simplex_kkt_residual` of the dual at ``w``: its gradient is ``K w0 + r K w / ||g_w||``
    (formed in extended precision: near stationarity ``K w`` cancels)."""
    kw = k.astype(np.longdouble) @ w.astype(np.longdouble)
    norm = np.sqrt(max(w.astype(np.longdouble) @ kw, np.longdouble(1e-300)))
    gradient = (linear + radius * kw / norm).astype(np.float64)
    return simplex_kkt_residual(np.zeros_like(k), gradient, w)
