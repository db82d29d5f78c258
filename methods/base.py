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

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["Method"]


class Method:
    """Plain multi-task training (equal weights); the base of every method."""

    name = "plain"

    def on_start(self, trainer: Trainer) -> None:
        """Called once before the first epoch (and again after a resume)."""

    def task_losses(self, trainer: Trainer, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One loss per task from the network's outputs; a method whose outputs are not one
        prediction per task (DMTG's K branches x N heads) computes its own here."""
        return trainer.task_losses(outputs, targets)

    def extra_loss(self, trainer: Trainer, x: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A loss term added to the task losses (MTSL's alignment), or ``None``."""
        return None

    def backward(self, trainer: Trainer, losses: Mapping[str, torch.Tensor], extra: torch.Tensor | None) -> None:
        """Fill ``.grad``: the default backpropagates the sum of the losses."""
        total = sum(losses.values())
        if extra is not None:
            total = total + extra
        total.backward()

    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        """Structural work between epochs; returns what to log for this epoch."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
