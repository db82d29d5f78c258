"""Lookahead: the task losses one would get after a step along a candidate direction.

TAG's inter-task affinity and IT-MTL's choice of combined gradient both ask the same question
of the current batch: *if the shared parameters took an SGD step along d, what would each
task's loss become?* This module answers it once for both:

    after = lookahead_losses(net, shared, directions, lr, evaluate)   # Tensor[K, T]

For each candidate direction ``d_k`` the shared parameters are moved to ``theta - lr * d_k``,
``evaluate()`` recomputes the task losses on the step's batch without autograd, and the
parameters are put back *exactly* (from a copy, not by adding ``lr * d_k`` back, which would
drift by rounding). The forward passes run in the network's current mode, so in training the
lookahead sees BatchNorm's batch statistics exactly as the training step's own forward did;
the running statistics (and every other buffer) are restored after each pass, so a
lookahead leaves no trace in the model. They also run under a forked RNG, so a network with
dropout does not shift the training run's random stream (its masks do differ from the
training forward's: the "before" losses then carry that noise too).

Call it only after the step's backward passes: the parameter updates are in-place, and
autograd refuses to back-propagate through a graph whose saved parameters were modified.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.methods.aggregation.base import restoring
from graphsurgeon.methods.base import Method, Step

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["LookaheadError", "LookaheadMethod", "affinity", "lookahead_losses", "optimizer_displacements"]


class LookaheadError(GraphSurgeonError):
    """A lookahead was asked for with unusable directions or step size."""


@torch.no_grad()
def lookahead_losses(
    net: nn.Module,
    params: Sequence[Tensor],
    directions: Tensor,
    lr: float,
    evaluate: Callable[[], Tensor],
) -> Tensor:
    """Task losses after one SGD step along each direction, parameters and buffers restored.

    Args:
        net: the module whose buffers must survive the lookahead passes (BatchNorm statistics).
        params: the parameters the step moves (the shared ones), in the flattened layout of
            ``directions`` (that of `per_task_gradients`).
        directions: ``Tensor[K, P]``, one candidate direction per row (a task's gradient for
            TAG, a combined gradient for IT-MTL). The step is ``theta - lr * d``.
        lr: the step size (TAG and IT-MTL default to the optimizer's learning rate).
        evaluate: recomputes the task losses on the step's batch; returns ``Tensor[T]``.

    Returns:
        ``Tensor[K, T]``: row k holds the task losses after the step along ``directions[k]``.
    """
    params = list(params)
    total = sum(p.numel() for p in params)
    if directions.dim() != 2 or directions.shape[1] != total:
        raise LookaheadError(
            f"lookahead needs directions of shape [K, {total}] for these parameters, got "
            f"{tuple(directions.shape)}; pass per_task_gradients(...) rows for the same parameters."
        )
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise LookaheadError(f"lookahead lr must be a positive number, got {lr!r}; pass the training lr.")
    sizes = [p.numel() for p in params]
    devices = sorted({str(p.device) for p in params if p.device.type == "cuda"})
    rows = []
    # restored after each pass and on an exception inside evaluate()
    with restoring([*params, *net.buffers()]) as restore:
        for d in directions:
            steps = [s.view_as(p).to(p) for s, p in zip(torch.split(d, sizes), params)]
            torch._foreach_add_(params, steps, alpha=-float(lr))
            with torch.random.fork_rng(devices=devices):
                rows.append(evaluate().detach().reshape(-1))
            restore()
    return torch.stack(rows)


@torch.no_grad()
def optimizer_displacements(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Tensor) -> Tensor:
    """``theta - theta'`` for one step of ``optimizer`` on ``params`` along each row of ``grads``.

    The official TAG code (CelebA) looks ahead with the optimizer's own update rather than a
    plain SGD step: with Adam the step is lr·m̂/(√v̂ + eps) from the current moments, of the
    size training actually takes. Each row runs ``optimizer.step()`` from the optimizer's
    current state with only ``params`` holding a gradient (the row); afterwards the parameters
    (from a copy), every parameter's ``.grad`` and the state of ``params`` are put back, so the
    training step that follows is untouched. The rows feed `lookahead_losses` with ``lr=1``.
    """
    params = list(params)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) not in held for p in params):
        raise LookaheadError(
            "the optimizer does not hold every shared parameter, so its update cannot be the lookahead; "
            "use lookahead='sgd' or build the optimizer over the network's parameters."
        )
    if grads.dim() != 2 or grads.shape[1] != sum(p.numel() for p in params):
        raise LookaheadError(f"optimizer_displacements needs rows of {sum(p.numel() for p in params)} gradients, got {tuple(grads.shape)}.")
    everything = [p for group in optimizer.param_groups for p in group["params"]]
    saved_grads = [p.grad for p in everything]
    saved_state = {p: copy.deepcopy(optimizer.state[p]) for p in params if p in optimizer.state}

    def restore_state() -> None:
        for p in params:
            if p in saved_state:
                optimizer.state[p] = copy.deepcopy(saved_state[p])
            else:
                optimizer.state.pop(p, None)

    sizes = [p.numel() for p in params]
    rows = []
    try:
        with restoring(params) as restore:
            before = torch.cat([p.detach().reshape(-1) for p in params])
            for row in grads:
                for p in everything:
                    p.grad = None
                for p, g in zip(params, torch.split(row, sizes)):
                    p.grad = g.view_as(p).to(p).clone()
                optimizer.step()
                rows.append(before - torch.cat([p.detach().reshape(-1) for p in params]))
                restore()
                restore_state()
    finally:
        for p, g in zip(everything, saved_grads):
            p.grad = g
        restore_state()
    return torch.stack(rows)


def affinity(before: Tensor, after: Tensor) -> Tensor:
    """TAG's lookahead affinity ``Z[k, j] = 1 - after[k, j] / before[j]``.

    Positive when the step along direction k lowered task j's loss. Written as
    ``(before - after) / |before|`` so that the sign keeps that meaning for a loss that can be
    negative (a log-likelihood); a task whose loss is exactly zero gets affinity 0.
    """
    before = before.reshape(1, -1).to(after.dtype)
    scale = before.abs()
    return torch.where(scale > 0, (before - after) / torch.where(scale > 0, scale, 1.0), 0.0)


class LookaheadMethod(Method):
    """A method that re-evaluates the step's batch after hypothetical steps (TAG, IT-MTL).

    The step's batch is the `Step` the loop hands to ``backward``.
    """

    def batch_losses(self, trainer: Trainer, step: Step, order: Sequence[str]) -> Callable[[], Tensor]:
        """``evaluate`` for `lookahead_losses`: the task losses, in ``order``, on the step's batch
        (under the loop's autocast, the precision of the step's own forward)."""

        def evaluate() -> Tensor:
            with trainer.autocast():
                losses = trainer.task_losses(trainer.net(step.inputs), step.targets)
            return torch.stack([losses[t].detach().reshape(()) for t in order])

        return evaluate

    @staticmethod
    def step_size(trainer: Trainer, lr: float | None) -> float:
        """The lookahead step: ``lr`` if given, else the optimizer's current learning rate."""
        return float(lr) if lr is not None else float(trainer.optimizer.param_groups[0]["lr"])
