"""Exact convex quadratic programmes over the probability simplex.

MGDA (min-norm point of the gradients' hull) and CAGrad (its dual, through a sequence of such
programmes) need ``min_w  ½ wᵀ H w + aᵀ w`` over ``w ≥ 0, Σ w = 1`` with a small PSD ``H``
(``T × T``, a Gram matrix). A general-purpose solver (SLSQP) stops on the change of the
objective, which on ill-scaled gradients (norm ratios of 1e4 and more) leaves the optimality
conditions violated by far more than rounding: MGDA's guarantee ``g_t · d ≥ ‖d‖²`` then fails.
This primal active-set method ends on the KKT conditions themselves, so its answer is exact up
to floating-point rounding; `simplex_kkt_residual` measures how well they hold.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["SolverWarning", "simplex_kkt_residual", "simplex_qp"]

# KKT residual (relative, `simplex_kkt_residual`) at which the solution counts as exact
_DONE = 1e-13


class SolverWarning(UserWarning):
    """A task-weighting solver stopped before its optimality conditions held."""


def simplex_kkt_residual(h: np.ndarray, a: np.ndarray, w: np.ndarray) -> float:
    """Largest violation of the KKT conditions at ``w``, relative to the gradient's scale.

    At the optimum the gradient ``Hw + a`` equals one value ``ν`` on the support of ``w`` and
    is at least ``ν`` off it (no vertex direction descends)."""
    grad = h @ w + a
    support = w > 0
    nu = float(w @ grad)  # Σ w = 1, so this is the support's weighted mean of the gradient
    scale = max(float(np.abs(grad).max()), float(np.abs(np.diag(h)).max()), 1e-300)
    on_support = np.abs(grad[support] - nu).max(initial=0.0)
    below = max(0.0, nu - float(grad.min()))
    return float(max(on_support, below) / scale)


def simplex_qp(h: np.ndarray, a: np.ndarray | None = None, *, max_iter: int | None = None) -> np.ndarray:
    """``argmin ½ wᵀ H w + aᵀ w`` over the simplex, for a symmetric PSD ``H`` (float64).

    Primal active set: start at the best vertex; on the current face (the free weights) take
    the Newton step of the equality-constrained problem; when a weight would turn negative,
    stop at it and fix it to zero; at the face's minimum free the weight whose multiplier is
    most negative, or stop when none is (the KKT conditions hold). Each face system is a
    ``(|F|+1) × (|F|+1)`` solve, so a call costs microseconds for the task counts of MTL.
    """
    h = np.asarray(h, dtype=np.float64)
    n = h.shape[0]
    a = np.zeros(n) if a is None else np.asarray(a, dtype=np.float64)
    vertex = int(np.argmin(0.5 * np.diag(h) + a))
    w = np.zeros(n)
    w[vertex] = 1.0
    free = [vertex]
    at_face_minimum = True  # a vertex is the minimum of its own face
    for _ in range(max_iter or 50 * n + 50):
        grad = h @ w + a
        f = np.array(free)
        if simplex_kkt_residual(h, a, w) <= _DONE:
            break  # also ends the add/remove cycles rounding can cause between near-zero weights
        if at_face_minimum:
            fixed = np.setdiff1d(np.arange(n), f)
            multipliers = grad[fixed] - float(grad[f].mean())
            if fixed.size == 0 or multipliers.min() >= -1e-14 * max(float(np.abs(grad).max()), 1e-300):
                break  # the KKT conditions hold
            free.append(int(fixed[int(np.argmin(multipliers))]))
            f = np.array(free)
        # Newton step on the face: H_FF p - ν 1 = -grad_F, Σ p = 0
        m = len(f)
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = h[np.ix_(f, f)]  # singular for duplicate gradients: lstsq takes the least-norm step
        kkt[:m, m] = -1.0
        kkt[m, :m] = 1.0
        step = np.linalg.lstsq(kkt, np.concatenate([-grad[f], [0.0]]), rcond=None)[0][:m]
        shrinking = step < 0
        ratios = np.where(shrinking, w[f] / np.where(shrinking, -step, 1.0), np.inf)
        blocking = int(np.argmin(ratios))
        length = min(1.0, float(ratios[blocking]))
        w[f] = w[f] + length * step
        at_face_minimum = length >= 1.0
        if not at_face_minimum:
            w[f[blocking]] = 0.0
            free.remove(int(f[blocking]))
        w = np.clip(w, 0.0, None)
        w /= w.sum()
    else:
        warnings.warn(
            f"the simplex QP solver did not converge in {max_iter or 50 * n + 50} iterations "
            f"(KKT residual {simplex_kkt_residual(h, a, w):.2e}); the task weights are approximate.",
            SolverWarning,
            stacklevel=2,
        )
    return w
