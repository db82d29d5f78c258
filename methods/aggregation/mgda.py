"""MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (after Désidéri's multiple-gradient descent algorithm, 2012).

The minimum-norm point of the convex hull of the task gradients is either zero (the
parameters are Pareto-stationary) or a direction that decreases every task:
``d . g_t >= ||d||^2`` for all ``t``.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from graphsurgeon.errors import GradientError, OptionError
from graphsurgeon.methods.aggregation.base import Aggregator, gram
from graphsurgeon.methods.aggregation.simplex_qp import SolverWarning, simplex_kkt_residual, simplex_qp

__all__ = ["MGDA", "min_norm_weights"]

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")

def min_norm_weights(k: np.ndarray) -> np.ndarray:
    """Convex weights ``w`` minimising ``w^T K w`` for a PSD Gram matrix ``K`` (float64).

    Solved exactly, as the QP it is, by `simplex_qp` (the paper uses Frank-Wolfe iterations;
    an objective-based stop such as SLSQP's leaves ``g_t . d >= ||d||^2`` violated on
    ill-scaled gradients). A `SolverWarning` is raised when the KKT conditions do not hold to
    1e-8 relative.
    """
    n = k.shape[0]
    scale = np.trace(k) / n
    if scale <= 0:
        return np.full(n, 1.0 / n)
    k = k / scale  # the minimiser is invariant to the scale of K
    w = simplex_qp(k)
    residual = simplex_kkt_residual(k, np.zeros(n), w)
    if residual > 1e-8:
        warnings.warn(f"MGDA's min-norm weights violate optimality by {residual:.2e} (relative).", SolverWarning, stacklevel=2)
    return w


class MGDA(Aggregator):
    """Minimum-norm point of the convex hull of the (normalised) task gradients.

    ``normalization`` divides each gradient before the hull is formed (an option of Sener &
    Koltun's official code, not described in the paper): ``"none"``; ``"l2"`` by ``||g_t||``
    (every task counts equally whatever its gradient scale); ``"loss"`` by ``L_t`` (needs positive
    losses); ``"loss+"`` by ``L_t ||g_t||``.

    The direction is the min-norm point of the *normalised* hull, ``sum_t (w_t / n_t) g_t``
    (as LibMTL does), so it is a common descent direction for every task whatever the
    normalisation; Sener & Koltun's code instead reuses ``w`` on the unnormalised losses.
    ``last_weights`` holds ``w_t / n_t``.
    """

    def __init__(self, num_tasks: int, normalization: Normalization = "none") -> None:
        super().__init__(num_tasks)
        if normalization not in _NORMALIZATIONS:
            raise OptionError(
                f"MGDA normalization must be one of {_NORMALIZATIONS}, got {normalization!r}; "
                "pick one of those."
            )
        self.normalization = normalization

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        k = gram(grads).cpu()
        norms = k.diagonal().clamp_min(0).sqrt()
        if self.normalization in ("loss", "loss+") and not (losses > 0).all():
            raise GradientError(
                f"MGDA normalization {self.normalization!r} needs positive losses, got "
                f"{losses.tolist()}; use normalization='l2' or 'none'."
            )
        losses = losses.double().cpu()
        normalizer = {
            "none": torch.ones_like(norms),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        # A zero gradient is its own min-norm point; keep its row zero instead of 0/0.
        normalizer = torch.where(normalizer > 0, normalizer, torch.ones_like(normalizer))
        k = k / torch.outer(normalizer, normalizer)
        w = torch.from_numpy(min_norm_weights(k.numpy()))
        return (w / normalizer).to(grads.device)
