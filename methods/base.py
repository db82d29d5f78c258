"""The strategy interface every training method implements over `graphsurgeon.training.trainer.Trainer`.

The defaults are plain multi-task training with equal weights: sum the task losses, one
backward, no structural change. A method overrides only what it changes.

Under torchrun (see `graphsurgeon.training.trainer`): by default DDP averages the gradients that
``backward`` produces. A method that computes gradients itself (``torch.autograd.grad``, several
backward passes) sets the class attribute ``reduces_gradients = True``; the loop then runs it
under ``ddp.no_sync()`` and the method averages everything it computes with
`graphsurgeon.training.distributed` (the per-task gradient matrix *before* a nonlinear aggregation,
``all_reduce_gradients`` for task-specific and its own parameters). A method that edits the
network calls ``trainer.structure_changed()`` (or ``trainer.set_network``) afterwards, and makes
its decisions on rank 0 (``broadcast_object``) from statistics summed over ranks.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["Method", "Step"]


@dataclass
class Step:
    """One training step, as the loop hands it to `Method.backward`.

    Methods that re-evaluate the step (SAM's perturbed passes, TAG's and IT-MTL's lookaheads)
    read the batch here rather than from the trainer, so what a method may use is declared.
    ``losses`` are the task losses (`Method.task_losses`) and ``extra`` the added loss term
    (`Method.extra_loss`), both computed on ``inputs``.
    """

    inputs: torch.Tensor
    targets: Mapping[str, Any]
    outputs: Mapping[str, Any]
    losses: Mapping[str, torch.Tensor]
    extra: torch.Tensor | None = None


class Method:
    """Plain multi-task training (equal weights); the base of every method.

    Everything the loop uses of a method is declared here, so the loop never probes for it:
    the hooks, `parameters`, `reduces_gradients`, `decisions` and the checkpointed state.
    """

    name = "plain"
    # True when `backward` averages its gradients across ranks itself (see the module docstring)
    reduces_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        # the structural decisions taken so far (MTSL's merges, DMTG's pruning), for the results
        self.decisions: list[dict[str, Any]] = []

    def parameters(self) -> Iterable[nn.Parameter]:
        """The method's own learnable parameters (UW's log-variances); the loop's optimizer
        trains them without weight decay, and averages their gradients across ranks unless
        `reduces_gradients` says the method does."""
        return ()

    def on_start(self, trainer: Trainer) -> None:
        """Called once before the first epoch (and again after a resume)."""

    def task_losses(self, trainer: Trainer, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One loss per task from the network's outputs; a method whose outputs are not one
        prediction per task (DMTG's K branches x N heads) computes its own here."""
        return trainer.task_losses(outputs, targets)

    def extra_loss(self, trainer: Trainer, x: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A loss term added to the task losses (MTSL's alignment), or ``None``."""
        return None

    def backward(self, trainer: Trainer, step: Step) -> None:
        """Fill ``.grad``: the default backpropagates the sum of the losses."""
        total = sum(step.losses.values())
        if step.extra is not None:
            total = total + step.extra
        total.backward()

    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        """Structural work between epochs; returns what to log for this epoch."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for the trainer's checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
