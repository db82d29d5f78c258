"""Loss weightings: the direction is ``sum_t w_t g_t`` for task weights that do not look at
the geometry of the gradients (except GradNorm, which looks at their norms).

- ``EW``: equal weights, the plain sum (or mean) of the task losses.
- ``UW``: uncertainty weighting, Kendall, Gal & Cipolla, "Multi-Task Learning Using
  Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018.
- ``DWA``: dynamic weight average, Liu, Johns & Davison, "End-to-End Multi-Task Learning
  with Attention" (MTAN), CVPR 2019.
- ``GradNorm``: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient
  Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from graphsurgeon.errors import GradientError, OptionError
from graphsurgeon.methods.aggregation.base import Aggregator

__all__ = ["DWA", "EW", "UW", "GradNorm"]


def _accumulate_grad(param: nn.Parameter, grad: Tensor) -> None:
    """Add ``grad`` to ``param.grad`` as ``backward()`` would, so optimizers see it."""
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad += grad.detach()


class EW(Aggregator):
    """Equal weighting, the baseline every method is compared against.

    ``reduction="sum"`` (weights 1, the gradient of ``sum_t L_t``, LibMTL's EW) or
    ``"mean"`` (weights 1/T, the mean gradient CAGrad starts from).
    """

    uses_gradients = False

    def __init__(self, num_tasks: int, reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__(num_tasks)
        if reduction not in ("sum", "mean"):
            raise OptionError(
                f"EW reduction must be 'sum' or 'mean', got {reduction!r}; pick one of those."
            )
        self.reduction = reduction

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        value = 1.0 if self.reduction == "sum" else 1.0 / self.num_tasks
        return torch.full((self.num_tasks,), value, dtype=grads.dtype, device=grads.device)


class UW(Aggregator):
    """Uncertainty weighting with one learnable log-variance ``s_t`` per task.

    Kendall et al. derive ``L_t / (2 sigma_t^2) + log sigma_t`` for regression (and
    ``L_t / sigma_t^2 + log sigma_t`` for classification). We use the common variant
    ``exp(-s_t) L_t + s_t`` with ``s_t = log sigma_t^2`` for every task: it is the
    regression form times 2, which changes neither the weights' ratios nor the optimum
    ``s_t = log L_t``, and learning the log-variance instead of ``sigma`` keeps the weight
    positive and the objective numerically stable (the paper's own advice).

    The shared-parameter direction uses ``w_t = exp(-s_t)``. Each ``aggregate`` call adds
    the gradient of ``sum_t exp(-s_t) L_t + s_t`` with respect to ``s`` to
    ``log_vars.grad``; put ``parameters()`` in the optimizer.
    """

    uses_gradients = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        with torch.enable_grad():
            s = self.log_vars
            objective = (torch.exp(-s) * losses.to(s) + s).sum()
            (grad,) = torch.autograd.grad(objective, s)
        _accumulate_grad(self.log_vars, grad)
        return torch.exp(-self.log_vars.detach()).to(grads.device)


class DWA(Aggregator):
    """Dynamic weight average: a task whose loss falls slowly gets more weight.

    ``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)`` the ratio
    of the task's mean training loss over the last two epochs. Until two epochs have been
    reported through ``epoch_end`` the weights are 1, as in the paper. The paper uses
    ``temperature = 2``.
    """

    uses_gradients = False

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        if not temperature > 0:
            raise OptionError(
                f"DWA temperature must be > 0, got {temperature!r}; the paper uses 2."
            )
        self.temperature = float(temperature)
        # Mean losses of the last and second-to-last epoch; NaN until reported.
        unset = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        self.register_buffer("last_epoch_losses", unset.clone())
        self.register_buffer("previous_epoch_losses", unset.clone())

    def epoch_end(self, mean_losses: Tensor | list[float]) -> None:
        """Report the mean training loss of each task over the epoch that just ended."""
        mean = torch.as_tensor(mean_losses, dtype=torch.float64).detach().reshape(-1).cpu()
        if mean.numel() != self.num_tasks or not (torch.isfinite(mean).all() and (mean > 0).all()):
            raise GradientError(
                f"DWA.epoch_end needs {self.num_tasks} finite positive mean losses, got "
                f"{mean.tolist()}; pass each task's mean training loss over the epoch."
            )
        self.previous_epoch_losses.copy_(self.last_epoch_losses)
        self.last_epoch_losses.copy_(mean.to(self.last_epoch_losses.device))

    def current_weights(self) -> Tensor:
        """The weights the next ``aggregate`` call will use (float64, on the buffers' device)."""
        if torch.isnan(self.previous_epoch_losses).any():
            return torch.ones_like(self.last_epoch_losses)
        ratios = self.last_epoch_losses / self.previous_epoch_losses
        return self.num_tasks * torch.softmax(ratios / self.temperature, dim=0)

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        return self.current_weights().to(grads.device)


class GradNorm(Aggregator):
    """GradNorm: learn weights that equalise the tasks' training rates.

    With ``G_t = ||grad_W w_t L_t|| = w_t ||g_t^W||`` the weighted gradient norm on the last
    shared layer ``W``, ``r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0))`` the relative inverse
    training rate, the weights minimise ``sum_t |G_t - mean_k(G_k) r_t^alpha|`` with the
    target treated as a constant (as in the paper). ``L_t(0)`` are the losses of the first
    ``aggregate`` call.

    ``norm_numel`` says how many trailing entries of a gradient row belong to ``W``: pass
    the last shared layer's parameters last to ``per_task_gradients`` and their element
    count here. ``None`` uses the whole row (all shared parameters): the paper restricts
    itself to the last layer to save backward passes, which ``per_task_gradients`` has
    already paid for.

    Each ``aggregate`` call first renormalises the weights to sum to ``T`` (the paper does it
    after every optimizer step; doing it before the weights are used is the same thing, and
    keeps the optimizer outside this class), then adds the gradient of the GradNorm loss to
    ``weights.grad``. As in the paper the weights are not clipped, so a learning rate large
    enough to push one below zero is the caller's to avoid. ``alpha`` is the paper's
    asymmetry hyperparameter (1.5 on NYUv2).
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5, norm_numel: int | None = None) -> None:
        super().__init__(num_tasks)
        if not alpha >= 0:
            raise OptionError(
                f"GradNorm alpha must be >= 0, got {alpha!r}; the paper uses 1.5 on NYUv2."
            )
        is_int = isinstance(norm_numel, int) and not isinstance(norm_numel, bool)
        valid_numel = is_int and norm_numel >= 1
        if norm_numel is not None and not valid_numel:
            raise OptionError(
                f"GradNorm norm_numel must be a positive int or None, got {norm_numel!r}; "
                "pass the element count of the last shared layer."
            )
        self.alpha = float(alpha)
        self.norm_numel = norm_numel
        self.weights = nn.Parameter(torch.ones(num_tasks))
        # L_t(0), NaN until the first aggregate call.
        unset = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        self.register_buffer("initial_losses", unset)
        self.last_gradnorm_loss: float | None = None

    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        if self.norm_numel is not None and self.norm_numel > grads.shape[1]:
            raise GradientError(
                f"GradNorm norm_numel={self.norm_numel} exceeds the {grads.shape[1]} gradient "
                "entries; pass the element count of the last shared layer only."
            )
        if torch.isnan(self.initial_losses).any():
            if not (losses > 0).all():
                raise GradientError(
                    f"GradNorm needs positive initial losses, got {losses.tolist()}; "
                    "it divides by them to measure each task's training rate."
                )
            self.initial_losses.copy_(losses.to(self.initial_losses))
        with torch.no_grad():
            self.weights.mul_(self.num_tasks / self.weights.sum())

        layer = grads if self.norm_numel is None else grads[:, -self.norm_numel :]
        w = self.weights
        norms = layer.norm(dim=1).to(w)
        ratio = losses.to(self.initial_losses) / self.initial_losses
        inverse_rate = (ratio / ratio.mean()).to(w)
        with torch.enable_grad():
            weighted_norms = w * norms
            target = (weighted_norms.mean() * inverse_rate**self.alpha).detach()
            loss = (weighted_norms - target).abs().sum()
            (grad,) = torch.autograd.grad(loss, w)
        _accumulate_grad(self.weights, grad)
        self.last_gradnorm_loss = loss.detach().item()
        return w.detach().to(grads.device)


class EpochLossMean:
    """Each task's mean training loss over the epoch, for the aggregators that weight by it.

    DWA compares the last two epochs' mean losses; any method that owns such aggregators
    (GradientMethod, IT-MTL's candidates) adds each step's loss vector here and closes the
    epoch, so that none of them silently degrades to equal weights. The sums travel in
    checkpoints: a run resumed mid-epoch closes the epoch with the exact mean.
    """

    def __init__(self, num_tasks: int) -> None:
        self.sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.batches = 0

    def add(self, losses: Tensor) -> None:
        """One step's per-task losses (already averaged across ranks, so every rank agrees).

        Summed where the losses live: a copy to the host every step would synchronise a GPU.
        """
        losses = losses.detach().double()
        if self.sum.device != losses.device:
            self.sum = self.sum.to(losses.device)
        self.sum += losses
        self.batches += 1

    def close(self, aggregators: Iterable[Aggregator]) -> None:
        """Hand the epoch's mean to every aggregator's ``epoch_end`` (DWA uses it) and start anew."""
        if self.batches:
            mean = self.sum.cpu() / self.batches
            for aggregator in aggregators:
                aggregator.epoch_end(mean)
        self.sum.zero_()
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.sum.tolist(), "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "loss_sum" in state:
            self.sum = torch.tensor(state["loss_sum"], dtype=torch.float64)
            self.batches = int(state["batches"])
