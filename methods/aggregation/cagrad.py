"""CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021.

EW follows the mean gradient ``g0``, which can leave some task worse off. CAGrad instead
looks, within a ball of radius ``c ||g0||`` around ``g0``, for the direction that most
improves the worst task: ``max_d min_t g_t . d`` s.t. ``||d - g0|| <= c ||g0||``.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from graphsurgeon.errors import OptionError
from graphsurgeon.methods.aggregation.base import Aggregator, gram
from graphsurgeon.methods.aggregation.mgda import SIMPLEX

__all__ = ["CAGrad"]


class CAGrad(Aggregator):
    """Conflict-averse direction, solved through its dual over the simplex.

    The dual is ``min_{w in simplex} g_w . g0 + c ||g0|| ||g_w||`` with ``g_w = sum_t w_t g_t``
    (only the Gram matrix is needed); it is solved with SLSQP. The primal solution is
    ``d = g0 + (c ||g0|| / ||g_w||) g_w``.

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
        k = k / scale  # the optimal w is invariant to the scale of K; this conditions SLSQP
        g0_norm = np.sqrt(max(mean_weights @ k @ mean_weights, 0.0))
        radius = self.c * g0_norm
        k_g0 = k @ mean_weights

        def dual(w: np.ndarray) -> float:
            return float(w @ k_g0 + radius * np.sqrt(max(w @ k @ w, 1e-30)))

        def dual_grad(w: np.ndarray) -> np.ndarray:
            return k_g0 + radius * (k @ w) / np.sqrt(max(w @ k @ w, 1e-30))

        result = minimize(
            dual,
            mean_weights,
            jac=dual_grad,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n,
            constraints=SIMPLEX,
            options={"ftol": 1e-12, "maxiter": 200},
        )
        w = np.clip(result.x, 0.0, None)
        w /= w.sum()
        gw_norm = np.sqrt(max(w @ k @ w, 0.0))
        lam = radius / gw_norm if gw_norm > 1e-12 else 0.0
        weights = (mean_weights + lam * w) / (1.0 + self.c)
        return torch.from_numpy(weights).to(grads.device)
