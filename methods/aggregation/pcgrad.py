"""PCGrad: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020.

When two task gradients conflict (negative dot product), each is projected onto the
normal plane of the other before they are summed, so that no task's update directly
undoes another's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphsurgeon.methods.aggregation.base import Aggregator, gram

__all__ = ["PCGrad"]


class PCGrad(Aggregator):
    """Project conflicting gradients, then sum them (as the paper and LibMTL do).

    For each task ``i``, for every other task ``j`` in a random order (a fresh order per
    ``i``, Algorithm 1 of the paper): if ``g_i^PC . g_j < 0`` then
    ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``, always projecting onto the *original*
    ``g_j``. The direction is ``sum_i g_i^PC``; on non-conflicting gradients that is the sum
    of the gradients, i.e. EW with ``reduction="sum"``.

    Every projected gradient stays a linear combination of the original ones, so the
    algorithm runs on the ``T x T`` Gram matrix, tracking the coefficients ``C`` with
    ``g_i^PC = sum_k C_ik g_k``; the task weights are the column sums of ``C``. This is the
    same arithmetic as projecting the ``P``-dimensional vectors, at ``O(T^2)`` per step.

    The task orders come from a ``torch.Generator`` seeded with ``seed`` so runs repeat; its
    state is part of ``state_dict`` (extra state), so a run resumed from a checkpoint draws
    the orders the uninterrupted run would have. A task with a zero gradient is never
    projected onto.
    """

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        super().__init__(num_tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(torch.as_tensor(state, dtype=torch.uint8).cpu())

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        k = gram(grads).cpu()
        n = self.num_tasks
        coeffs = torch.eye(n, dtype=torch.float64)
        for i in range(n):
            for j in torch.randperm(n, generator=self.generator).tolist():
                if j == i or k[j, j] <= 0:
                    continue
                dot = coeffs[i] @ k[:, j]
                if dot < 0:
                    coeffs[i, j] -= dot / k[j, j]
        return coeffs.sum(dim=0).to(grads.device)
