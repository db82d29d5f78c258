"""IMTL-G: the gradient half of Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards
Impartial Multi-task Learning", ICLR 2021.

The shared parameters should move impartially: the aggregated gradient ``d`` must have
the same projection onto every task's unit gradient ``u_t = g_t / ||g_t||``, i.e. make the
same angle with every task, whatever the tasks' gradient magnitudes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphsurgeon.methods.aggregation.base import Aggregator, gram

__all__ = ["IMTLG"]


class IMTLG(Aggregator):
    """Closed-form impartial weights: ``d = sum_t a_t g_t`` with ``sum_t a_t = 1`` and
    ``d . u_1 = d . u_t`` for every ``t``.

    The paper eliminates ``a_1`` and writes ``a_{2:T} = g_1 U^T (D U^T)^{-1}`` with rows
    ``U_t = u_1 - u_t`` and ``D_t = g_1 - g_t``. We solve the same ``T`` linear equations
    (``T - 1`` equal-projection constraints plus ``sum_t a_t = 1``) directly, in float64 on
    the Gram matrix (``d . u_t = sum_a a_a K_at / ||g_t||``), by least squares so that
    degenerate inputs (two identical task gradients, ``T > P + 1``) give the minimum-norm
    solution instead of a singular-matrix failure. A task with a zero gradient has no
    direction to be impartial to: it gets weight 0 and no constraint.

    The common projection is positive for two tasks (the weights are then proportional to
    ``1 / ||g_t||`` and ``d`` bisects the two gradients) but the closed form does not
    guarantee it for more tasks, so unlike MGDA, CAGrad and Nash-MTL this is not always a
    descent direction.
    """

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        k = gram(grads).cpu()
        norms = k.diagonal().clamp_min(0).sqrt()
        active = (norms > 0).nonzero().flatten()
        weights = torch.zeros(self.num_tasks, dtype=torch.float64)
        if active.numel() == 0:
            return weights.to(grads.device)
        k, norms = k[active][:, active], norms[active]
        projections = k / norms  # [a, t] = g_a . u_t
        system = torch.empty_like(k)
        system[0] = 1.0
        system[1:] = (projections[:, :1] - projections[:, 1:]).T
        rhs = torch.zeros(len(active), 1, dtype=torch.float64)
        rhs[0] = 1.0
        weights[active] = torch.linalg.lstsq(system, rhs, driver="gelsd").solution.flatten()
        return weights.to(grads.device)
