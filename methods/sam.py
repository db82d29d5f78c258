"""Sharpness-aware multi-task learning: Phan, Tran, Nguyen, Tran, Le & Nguyen, "Improving
Multi-task Learning via Seeking Task-based Flat Regions" (FS-MTL), after Foret et al.'s SAM.

Plain SAM on the summed loss would look for a point where the *sum* is flat; FS-MTL asks every
task for its own flat region and lets the gradient method arbitrate between tasks twice. Per task
``i``, following the official code (VietHoang1512/FS-MTL, ``nyuv2/train.py``):

- ``g_i`` is the task's gradient; the perturbation is ``eps = rho * g / ||g||`` taken separately on
  the shared parameters (with ``g_i``'s shared part) and on the task's own parameters;
- ``g_i'`` is the task's gradient at the perturbed point; ``h_i = g_i' - g_i`` is its flatness part
  (the direction in which the task's loss is sharp);
- on the shared parameters the update is ``agg({g_i}) + agg({h_i})``: the loss parts and the
  flatness parts are aggregated separately, each by the same gradient method, and summed;
- a task-specific parameter is reached by one task only and takes ordinary SAM: its task's
  gradient at that task's perturbed point.

BatchNorm running statistics (every buffer) are restored after the perturbed passes, and the
parameters are restored bit for bit from a copy (subtracting ``eps`` again would not). With ``"ew"``
the shared update is ``sum_i g_i'``, i.e. SAM with one perturbation per task.

Differences from the official code's aggregators, where it departs from their own papers:
its MGDA divides every ``g_i`` and ``h_i`` by its norm and multiplies the result by ``T``
(here MGDA keeps its ``normalization`` option, default none: pass ``--grad-option
normalization=l2`` for the same direction, ``1/T`` of its length); its CAGrad rescales by
``1 + c^2`` (the CAGrad code's default) where ours divides by ``1 + c`` (its ``rescale=2``,
see `graphsurgeon.methods.aggregation.cagrad`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from graphsurgeon.errors import MethodError, OptionError
from graphsurgeon.methods.aggregation.base import (
    assign_gradient,
    batched_backward_pays,
    per_task_gradients,
    restoring,
    split_parameters,
)
from graphsurgeon.methods.base import Step
from graphsurgeon.methods.gradient_method import GradientMethod
from graphsurgeon.training import distributed

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["SharpnessAware"]


def _ascent(grad: Tensor, rho: float) -> Tensor:
    """SAM's perturbation ``rho * g / ||g||`` (zero for a zero gradient)."""
    return grad * (rho / (grad.norm() + 1e-12))


@torch.no_grad()
def _add_(params: Sequence[Tensor], vector: Tensor) -> None:
    """``p += vector[slice of p]`` for each parameter, in the layout of `per_task_gradients`."""
    offset = 0
    for p in params:
        n = p.numel()
        p.add_(vector[offset : offset + n].reshape(p.shape).to(p.dtype))
        offset += n


class SharpnessAware(GradientMethod):
    """FS-MTL over any aggregator: ``SharpnessAware("pcgrad", net.tasks, rho=0.05)``.

    Args:
        aggregator, tasks, **options: as for `GradientMethod` (``"ew"`` gives per-task SAM).
        rho: the radius of the perturbation (SAM's rho); ``0`` gives the plain gradient method,
            at the price of the extra passes.

    Each step costs one extra forward and backward per task (on that task's path only). The
    perturbed passes re-evaluate the step's batch (`Step.inputs`, under the loop's autocast). A learnable aggregator (UW, GradNorm) learns from the loss part only:
    its objective looks at the losses, which the flatness part does not change. Under DDP each
    rank perturbs along its own gradients (as SAM does per device) and the loss and flatness parts
    are averaged across ranks before they are aggregated.
    """

    name = "sam"

    def __init__(self, aggregator: str, tasks: Sequence[str], *, rho: float, rep_grad: bool = False, **options: Any) -> None:
        if rep_grad:
            raise MethodError(
                "sharpness-aware training perturbs the shared parameters, so it needs their gradients, "
                "not the representation's; drop rep_grad (--rep-grad) or sam (--sam)."
            )
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise OptionError(f"SAM rho must be a finite number >= 0, got {rho!r}; FS-MTL uses values like 0.05.")
        super().__init__(aggregator, tasks, **options)
        self.rho = float(rho)

    def backward(self, trainer: Trainer, step: Step) -> None:
        net, extra = trainer.net, step.extra
        values = self._ordered(step.losses)
        loss_vec = self._loss_vector(values)
        shared, specific = split_parameters(net)
        params = shared + specific
        num_shared = sum(p.numel() for p in shared)
        rows = per_task_gradients(values + ([extra] if extra is not None else []), params, batched=batched_backward_pays(params[0].device))
        plain = rows[: len(values)]
        perturbed = self._perturbed_gradients(trainer, step, params, plain, num_shared)

        if shared:
            loss_part, flat_part = plain[:, :num_shared], perturbed[:, :num_shared] - plain[:, :num_shared]
            parts = [loss_part, flat_part] + ([rows[len(values):, :num_shared]] if extra is not None else [])
            parts = distributed.all_reduce_mean(torch.cat(parts))
            direction = self._aggregate(parts[: len(values)], loss_vec)
            direction = direction + self._aggregate_flat(parts[len(values) : 2 * len(values)], loss_vec)
            if extra is not None:
                direction = direction + parts[2 * len(values)]
            assign_gradient(shared, direction)
        if specific:
            own = perturbed[:, num_shared:].sum(0)  # each parameter is reached by one task only
            if extra is not None:
                own = own + rows[len(values), num_shared:]
            assign_gradient(specific, distributed.all_reduce_mean(own))
        distributed.all_reduce_gradients(self.parameters())

    # ------------------------------------------------------------------ pieces
    def _perturbed_gradients(
        self, trainer: Trainer, step: Step, params: list[Tensor], plain: Tensor, num_shared: int
    ) -> Tensor:
        """Row ``i``: task ``i``'s gradient at its own perturbed point; everything restored after."""
        net = trainer.net
        rows = []
        with restoring([*params, *net.buffers()]) as restore:  # also on an exception
            for task, grad in zip(self.tasks, plain):
                _add_(params, torch.cat([_ascent(grad[:num_shared], self.rho), _ascent(grad[num_shared:], self.rho)]))
                with trainer.autocast():  # the precision of the step's own forward
                    loss = super().task_losses(trainer, net(step.inputs, tasks=[task]), step.targets)[task]
                rows.append(per_task_gradients([loss], params)[0])
                restore()
        return torch.stack(rows)

    def _aggregate_flat(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Aggregate the flatness parts without a second update of a learnable aggregator's
        weights (their gradient is restored), keeping the loss part's diagnostics for the log
        (every ``last_*`` attribute: the weights, Nash-MTL's alpha, GradNorm's loss)."""
        saved_grads = [None if p.grad is None else p.grad.clone() for p in self.aggregator.parameters()]
        diagnostics = {k: v for k, v in vars(self.aggregator).items() if k.startswith("last_")}
        direction = self._aggregate(grads, losses)
        for p, g in zip(self.aggregator.parameters(), saved_grads):
            p.grad = g
        vars(self.aggregator).update(diagnostics)
        return direction
