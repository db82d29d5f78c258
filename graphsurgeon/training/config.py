"""`TrainConfig`: every setting of the training loop, checked once, with the factories it names.

A setting is a plain value (``optimizer="adamw"``, ``schedule="cosine"``) or, where a name cannot
say enough, a callable: ``optimizer=factory(param_groups, lr, weight_decay) -> Optimizer`` and
``schedule=factory(optimizer) -> LRScheduler``. `TrainConfig.validate` runs when a `Trainer` is
made, so a typo fails before the first batch with a `ConfigError` naming the field and a valid
value, not an epoch later inside torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from graphsurgeon.errors import ConfigError

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["AUTOCAST", "OPTIMIZERS", "SCHEDULES", "Callback", "TrainConfig"]

OptimizerFactory = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "multistep", "cosine")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Callback:
    """Code run by `Trainer.fit` at the end of each epoch and of the fit; override either.

    ``record`` is the epoch's entry of ``trainer.history`` (losses, validation metrics, the
    monitored value); a callback may call ``trainer.request_stop()`` to end the fit after this
    epoch, with a checkpoint to resume from, as a signal would.
    """

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After the epoch's validation and checkpoint."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch (and after the best weights were restored, if asked)."""


@dataclass
class TrainConfig:
    """How `Trainer` trains. ``batch_size`` is per rank under torchrun (the global batch is
    ``world_size`` times larger).

    ``monitor`` picks the best epoch on the validation data: ``"val_loss"`` (the mean of the task
    losses, lower is better) or ``"task/metric"`` (direction from the task's ``higher_is_better``;
    ``"task/loss"`` is that task's loss). The best epoch's weights are written as
    ``best.safetensors`` in ``checkpoint_dir`` and, with ``restore_best``, loaded at the end of
    the fit. ``tensorboard``: ``None`` writes TensorBoard scalars when the package is installed,
    ``True`` insists on it, ``False`` never writes them.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    log_every: int = 10  # steps per host synchronisation of the training losses (progress bar, NaN check)
    checkpoint_dir: str | None = None
    eval_batch_size: int = 256
    optimizer: str | OptimizerFactory = "adam"
    momentum: float = 0.9  # SGD only
    schedule: str | SchedulerFactory = "none"  # stepped once per epoch
    step_size: int | None = None  # schedule="step": epochs between decays
    milestones: Sequence[int] = ()  # schedule="multistep": the epochs after which to decay
    gamma: float = 0.1  # the decay factor of "step" and "multistep"
    autocast: str | None = None  # "bf16" or "fp16": mixed precision for forward and loss
    grad_clip: float | None = None  # the largest global gradient norm; None: no clipping
    monitor: str = "val_loss"
    restore_best: bool = False
    callbacks: Sequence[Callback] = field(default_factory=tuple)
    tensorboard: bool | None = None

    def validate(self) -> None:
        """Raise `ConfigError` on the first field with an invalid value (checked once, by `Trainer`)."""
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            _positive_int(name, getattr(self, name), example=10)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            _fail("seed", self.seed, "an int in [0, 2**32), e.g. seed=0 (numpy's generators take no more)")
        _check_device(self.device)
        _number("lr", self.lr, minimum=0.0, strict=True, example="1e-3")
        _number("weight_decay", self.weight_decay, minimum=0.0, example="1e-4")
        if not callable(self.optimizer) and self.optimizer not in OPTIMIZERS:
            _fail("optimizer", self.optimizer, f"one of {list(OPTIMIZERS)} or a callable(param_groups, lr, weight_decay) -> Optimizer")
        _number("momentum", self.momentum, minimum=0.0, example="0.9")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            _fail("schedule", self.schedule, f"one of {list(SCHEDULES)} or a callable(optimizer) -> LRScheduler")
        if self.schedule == "step":
            _positive_int("step_size", self.step_size, example=10, why=" (schedule='step' decays every step_size epochs)")
        if self.schedule == "multistep":
            milestones = list(self.milestones) if isinstance(self.milestones, (list, tuple)) else None
            if not milestones or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or milestones != sorted(set(milestones)):
                _fail("milestones", self.milestones, "increasing positive epochs, e.g. milestones=(30, 60), for schedule='multistep'")
        _number("gamma", self.gamma, minimum=0.0, strict=True, example="0.1")
        if self.autocast is not None and self.autocast not in AUTOCAST:
            _fail("autocast", self.autocast, f"None or one of {list(AUTOCAST)}")
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, minimum=0.0, strict=True, example="1.0 (or None: no clipping)")
        if not isinstance(self.monitor, str) or not (self.monitor == "val_loss" or self.monitor.count("/") == 1):
            _fail("monitor", self.monitor, "'val_loss' or 'task/metric', e.g. 'left/accuracy'")
        if not isinstance(self.restore_best, bool):
            _fail("restore_best", self.restore_best, "True or False")
        if isinstance(self.callbacks, Callback) or not isinstance(self.callbacks, (list, tuple)):
            _fail("callbacks", self.callbacks, "a list of graphsurgeon.training.Callback instances, e.g. callbacks=[MyCallback()]")
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                _fail("callbacks", callback, "instances of graphsurgeon.training.Callback (subclass it and override on_epoch_end/on_fit_end)")
        if self.tensorboard not in (None, True, False):
            _fail("tensorboard", self.tensorboard, "None (when installed), True or False")
        if self.tensorboard and not self.checkpoint_dir:
            _fail("tensorboard", self.tensorboard, "False, or set checkpoint_dir: the scalars are written under it")

    def to_dict(self) -> dict[str, Any]:
        """The fields as they are (no deep copy: callbacks and factories are not copyable data)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ factories
    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer the config names, over ``groups``."""
        if callable(self.optimizer):
            return self.optimizer(groups, self.lr, self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        kind = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return kind(groups, lr=self.lr, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The per-epoch learning-rate schedule the config names (``None`` for ``"none"``)."""
        if callable(self.schedule):
            return self.schedule(optimizer)
        if self.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        if self.schedule == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.milestones), gamma=self.gamma)
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return None


def _check_device(device: Any) -> None:
    """A device torch knows, and one this machine has (a CUDA device without a GPU fails on the
    first tensor moved, after the data and the network were built)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        _fail("device", device, "'cpu', 'cuda' or 'cuda:N' (a torch.device string)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        _fail("device", device, "'cpu': torch finds no CUDA device on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        _fail("device", device, f"a CUDA device index below {torch.cuda.device_count()}")


def _fail(name: str, value: Any, valid: str) -> None:
    raise ConfigError(f"TrainConfig.{name}={value!r} is not valid; use {valid}.")


def _positive_int(name: str, value: Any, example: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, value, f"a positive int, e.g. {name}={example}{why}")


def _number(name: str, value: Any, minimum: float, example: str, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        _fail(name, value, f"a finite number {bound} {minimum:g}, e.g. {name}={example}")
