"""The one training loop every method runs on.

A method (`graphsurgeon.methods.base.Method`) is a strategy over this loop: it may add a
loss term, replace the backward pass (gradient methods), and edit the structure between
epochs (MTSL's structural phases). The loop owns batching, evaluation, logging, progress
bars and checkpoints, so no method carries its own copy of them.

Under ``torchrun`` (a process group of W > 1 ranks, see `graphsurgeon.training.distributed.setup`) the
loop trains the network through ``DistributedDataParallel``: ``self.net`` stays the plain
`MultiTaskNetwork` (methods, surgery, evaluation and checkpoints use it), ``self.ddp`` wraps it
for the training forward. ``batch_size`` is per rank: rank r takes every W-th sample of the
single-process order, so W ranks with batch size B/W see the global batches one process sees
with batch size B. Evaluation shards the data and sums the metrics over ranks, so every rank
returns the same numbers. After a structural edit the method calls `Trainer.structure_changed`
(or `Trainer.set_network`), which re-wraps the network. Rank 0 writes checkpoints.

Gradients: by default DDP averages them during ``backward``. A method that computes its own
gradients (``torch.autograd.grad`` per task, which DDP's reducer never sees) sets the class
attribute ``reduces_gradients = True``: the loop then runs its forward and backward under
``ddp.no_sync()`` and the method averages what it computes itself, with
`graphsurgeon.training.distributed.all_reduce_mean` on the per-task gradient matrix *before* aggregating
(the aggregation is nonlinear) and `graphsurgeon.training.distributed.all_reduce_gradients` on the
task-specific and its own parameters. Other methods' own parameters (outside the network) are
averaged by the loop.

The loop hands a method everything it uses of a step in a `graphsurgeon.methods.base.Step`
(batch, outputs, losses); what it may use of a method is declared by
`graphsurgeon.methods.base.Method`. Tasks (loss, metrics, direction of each metric) are the
network's `graphsurgeon.core.network.Task` specs unless ``tasks`` overrides them. Settings are a
`graphsurgeon.training.config.TrainConfig`, checked once when the trainer is made; `fit` is the
one-call entry point.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from graphsurgeon.core.checkpoint import lay_out, load_weights, read_metadata, save
from graphsurgeon.core.network import MultiTaskNetwork, Task
from graphsurgeon.core.surgery import carry_optimizer
from graphsurgeon.errors import CheckpointError, ConfigError, NonFiniteLossError
from graphsurgeon.methods.base import Method, Step
from graphsurgeon.training import distributed, run_folder
from graphsurgeon.training.config import AUTOCAST, TrainConfig
from graphsurgeon.training.distributed import ShardedSampler
from graphsurgeon.training.records import flatten, log_epoch, tensorboard_writer_class, write_csv

__all__ = ["TrainConfig", "Trainer", "fit"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    net: MultiTaskNetwork,
    train: Dataset | DataLoader,
    val: Dataset | DataLoader | None = None,
    *,
    method: Method | None = None,
    tasks: Mapping[str, Task] | None = None,
    resume: bool = False,
    **config: Any,
) -> Trainer:
    """Train ``net`` on ``train`` (and select on ``val``) with ``method``; the trained `Trainer`.

    ``train`` and ``val`` yield ``(input, {task: target})``: a ``Dataset``, or a ``DataLoader``
    whose dataset is used (the trainer batches, shuffles and shards it itself, so that a run can
    be resumed exactly). The tasks' losses and metrics are ``net.task_specs`` (give
    ``gs.Task(head, loss, metrics, higher_is_better)`` to `graphsurgeon.multitask`) unless
    ``tasks`` overrides them. ``**config`` are `TrainConfig` fields, e.g. ``epochs=10,
    optimizer="adamw", schedule="cosine", autocast="bf16"``. ``resume=True`` continues from the
    checkpoint in ``checkpoint_dir`` when there is one.
    """
    unknown = sorted(set(config) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"fit() got unknown setting(s) {unknown}; valid ones are TrainConfig's: {sorted(TrainConfig.__dataclass_fields__)}.")
    if resume and not config.get("checkpoint_dir"):
        raise ConfigError("fit(resume=True) needs checkpoint_dir=<the folder of the run to continue>.")
    settings = TrainConfig(**config)
    trainer = Trainer(net, tasks, _dataset(train), None if val is None else _dataset(val), settings, method or Method())
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer


def _dataset(data: Dataset | DataLoader) -> Dataset:
    return data.dataset if isinstance(data, DataLoader) else data


@dataclass
class Trainer:
    """Trains ``net`` on ``train_data`` with ``method``; evaluates on ``val_data`` every epoch.

    Datasets yield ``(input, {task: target})``. ``tasks`` (default: ``net.task_specs``) gives
    each task's loss, metrics and their directions (`Task`, or any object with those attributes).
    """

    net: MultiTaskNetwork
    tasks: Mapping[str, Task] | None
    train_data: Dataset
    val_data: Dataset | None
    config: TrainConfig = field(default_factory=TrainConfig)
    method: Method = field(default_factory=Method)  # plain training; None is taken for it too
    history: list[dict] = field(default_factory=list)
    epoch: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        self.config.validate()
        if self.method is None:
            self.method = Method()
        self.tasks = self._resolve_tasks(self.tasks)
        self._check_selection()
        self.device = torch.device(self.config.device)
        self._scaler = self._make_scaler()
        self.net.to(self.device)
        self.optimizer = self.make_optimizer()
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._scheduled: torch.optim.Optimizer | None = None  # the optimizer `scheduler` drives
        self._sync_scheduler(fast_forward=False)
        self._best_weights: dict[str, torch.Tensor] | None = None  # without a checkpoint folder
        self._tensorboard = self._make_tensorboard()
        # one data order for every rank: same seed, same draws (rank r takes its share of it)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._stop_requested = False  # a signal reached this rank
        self._stopping = False  # every rank agreed to stop
        self._forced = False  # a second signal stopped the fit mid-step: nothing consistent to save
        self._last_saved: tuple | None = None
        # position inside the current epoch, so that a checkpoint taken mid-epoch resumes exactly
        self._epoch_batches = 0
        self._epoch_sums: dict[str, float] = {}
        self._epoch_generator: torch.Tensor | None = None
        self.ddp: DistributedDataParallel | None = None
        self.structure_changed()

    # ------------------------------------------------------------------ setup
    def _resolve_tasks(self, tasks: Mapping[str, Task] | None) -> dict[str, Task]:
        """``tasks`` or the network's specs; every task of the network needs a loss."""
        resolved = dict(tasks if tasks is not None else self.net.task_specs)
        for t in self.net.tasks:
            if t not in resolved or resolved[t].loss is None:
                raise ConfigError(
                    f"task {t!r} has no loss; give it one where the network is built "
                    f"(graphsurgeon.Task(head, loss=..., metrics=...)) or pass tasks={{{t!r}: Task(...)}} to the trainer."
                )
        return resolved

    def _check_selection(self) -> None:
        """``monitor`` names a task and metric with a known direction; ``restore_best`` has data."""
        monitor = self.config.monitor
        if monitor != "val_loss":
            task, metric = monitor.split("/")
            spec = self.tasks.get(task)
            known = ["loss", *spec.higher_is_better] if spec is not None else []
            if spec is None or metric not in known:
                options = ["val_loss", *(f"{t}/{m}" for t in self.net.tasks for m in ["loss", *self.tasks[t].higher_is_better])]
                raise ConfigError(
                    f"TrainConfig.monitor={monitor!r} is not valid; use one of {options} "
                    "(a metric needs its direction in the task's higher_is_better)."
                )
        if self.config.restore_best and self.val_data is None:
            raise ConfigError("TrainConfig.restore_best=True needs validation data; pass val (val_data) or restore_best=False.")

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 on CUDA needs loss scaling (bf16 and CPU do not). The scaled losses reach the
        method's backward, which only the plain sum of the losses is indifferent to."""
        if self.config.autocast != "fp16" or self.device.type != "cuda":
            return None
        if self.method.reduces_gradients:
            raise ConfigError(
                f"TrainConfig.autocast='fp16' on CUDA scales the losses, which {type(self.method).__name__} "
                "(it computes its own gradients) does not support; use autocast='bf16'."
            )
        return torch.amp.GradScaler(self.device.type)

    def _make_tensorboard(self) -> Any | None:
        if self.config.tensorboard is False or not self.config.checkpoint_dir:
            return None
        writer = tensorboard_writer_class(required=bool(self.config.tensorboard))  # every rank checks
        return writer(log_dir=str(Path(self.config.checkpoint_dir) / "tensorboard")) if writer and distributed.is_main() else None

    # ------------------------------------------------------------------ pieces
    def make_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the network (group 0) and the method's own parameters
        (group 1, when it has any: UW's log-variances, GradNorm's weights), which take no weight
        decay — decay would pull loss weights towards a fixed point the method never asked for."""
        groups: list[dict[str, Any]] = [{"params": list(self.net.parameters())}]
        own = list(self.method_parameters())
        if own:
            groups.append({"params": own, "weight_decay": 0.0})
        return self.config.make_optimizer(groups)

    def _sync_scheduler(self, fast_forward: bool = True) -> None:
        """Point the schedule at the current optimizer. A method that replaced the optimizer
        (`set_network`: DMTG's pruning) gets a new schedule advanced to the current epoch, so the
        learning rate follows one curve over the whole fit."""
        if self._scheduled is self.optimizer:
            return
        self._scheduled = self.optimizer
        if fast_forward:  # replay from the start: a group that was scheduled before restarts from its base
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        self.scheduler = self.config.make_scheduler(self.optimizer)
        if self.scheduler is not None and fast_forward:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.epoch):
                    self.scheduler.step()

    def _load_schedule(self, states: Mapping[str, Any]) -> None:
        """The schedule's and the loss scaler's state from a checkpoint (`resume`)."""
        self._scheduled = None
        self._sync_scheduler(fast_forward="scheduler" not in states)
        if self.scheduler is not None and "scheduler" in states:
            self.scheduler.load_state_dict(states["scheduler"])
        if self._scaler is not None and "scaler" in states:
            self._scaler.load_state_dict(states["scaler"])

    def autocast(self) -> contextlib.AbstractContextManager:
        """The configured mixed precision (``TrainConfig.autocast``) for forward and loss; methods
        that re-evaluate the step (SAM, lookaheads) run their passes under it too."""
        if self.config.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.config.autocast])

    def request_stop(self) -> None:
        """End `fit` after the current step, with a checkpoint to resume from, as SIGINT does
        (`fit` then raises ``KeyboardInterrupt``); e.g. from a `Callback`."""
        self._stop_requested = True

    def set_network(
        self, net: MultiTaskNetwork, *, sources: Mapping[torch.nn.Parameter, Sequence[torch.nn.Parameter]] | None = None
    ) -> None:
        """Train ``net`` from now on (a method that replaces the network, e.g. DMTG's pruning).

        Without ``sources`` the optimizer starts afresh for its parameters. With them (the
        pairing `graphsurgeon.core.surgery.derive` returns), the optimizer is kept and carries
        its state over by parameter identity (`graphsurgeon.core.surgery.carry_optimizer`):
        ``net``'s parameters that were the old network's keep their state, the others take
        their sources'."""
        old = list(self.net.parameters())
        self.net = net.to(self.device)
        if sources is None:
            self.optimizer = self.make_optimizer()
        else:
            carry_optimizer(self.optimizer, old, self.net.parameters(), sources)
        self.structure_changed()

    def structure_changed(self) -> None:
        """Re-wrap the network for DDP after its parameters changed (a fuse, a split, a new
        network); no-op in one process. The optimizer and its state are left as they are
        (surgery carried them over). DDP's constructor broadcasts rank 0's parameters and
        buffers, so every rank continues from the same weights."""
        if not distributed.is_distributed():
            return
        self.ddp = None  # drop the old reducer (and its hooks on surviving parameters) first
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.net, device_ids=device_ids)

    def method_parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(self.method.parameters())

    def loader(self, data: Dataset, shuffle: bool, batch_size: int | None = None, skip: int = 0) -> DataLoader:
        """Batches of ``data``. Shuffled loaders draw their order from the trainer's generator
        (checkpointed) and, under torchrun, give each rank its share of it (same number of
        batches on every rank); ``skip`` leaves out the first batches (a mid-epoch resume)
        without loading them. Unshuffled loaders are not sharded: see `distributed.shard`."""
        size = batch_size or self.config.batch_size
        if not shuffle:
            return DataLoader(data, batch_size=size, shuffle=False)
        sampler: Sampler[int] = RandomSampler(data, generator=self.generator)
        if distributed.is_distributed():
            sampler = ShardedSampler(sampler, len(data))
        batches = BatchSampler(sampler, size, drop_last=len(sampler) > size)
        return DataLoader(data, batch_sampler=_Skip(batches, skip) if skip else batches, generator=self.generator)

    def to_device(self, batch: tuple) -> tuple[torch.Tensor, dict[str, Any]]:
        x, targets = batch
        return x.to(self.device), {t: v.to(self.device) for t, v in targets.items()}

    def task_losses(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {t: self.tasks[t].loss(outputs[t], targets[t]) for t in outputs}

    def progress(self, iterable, **kw):
        if not self.config.progress or not distributed.is_main():
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, leave=False, dynamic_ncols=True, **kw)

    # ------------------------------------------------------------------ loop
    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data (or what is left of it after a mid-epoch resume)."""
        self.net.train()
        if self._epoch_batches == 0:
            self._epoch_generator = self.generator.get_state()
            self._epoch_sums = {}
        sums = self._epoch_sums
        loader = self.loader(self.train_data, shuffle=True, skip=self._epoch_batches)
        bar = self.progress(loader, desc=f"epoch {self.epoch + 1}")
        own_gradients = self.method.reduces_gradients
        model = self.ddp or self.net
        scaler = self._scaler
        log_every = self.config.log_every
        window: list[torch.Tensor] = []  # this interval's losses, still on the device
        names: list[str] = []
        for batch in bar:
            x, targets = self.to_device(batch)
            sync = self.ddp.no_sync() if self.ddp is not None and own_gradients else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    outputs = model(x)
                    losses = self.method.task_losses(self, outputs, targets)
                    extra = self.method.extra_loss(self, x, outputs)
                self.optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    step = Step(x, targets, outputs, losses, extra)
                else:
                    scaled = {t: scaler.scale(v) for t, v in losses.items()}
                    step = Step(x, targets, outputs, scaled, None if extra is None else scaler.scale(extra))
                self.method.backward(self, step)
            if not own_gradients:
                distributed.all_reduce_gradients(list(self.method_parameters()))
            self._optimizer_step()
            step_names = [*losses, *(["_extra"] if extra is not None else [])]
            if step_names != names:  # the tasks of a step changed (rare): close the interval first
                self._flush_losses(window, names, bar)
                names = step_names
            values = [*losses.values(), *([extra] if extra is not None else [])]
            window.append(torch.stack([v.detach().float().reshape(()) for v in values]))
            self.step += 1
            self._epoch_batches += 1
            if self._epoch_batches % log_every == 0:
                self._flush_losses(window, names, bar)
            if self._check_stop():
                break
        self._flush_losses(window, names, bar)
        if distributed.is_distributed():
            # every rank leaves with the same buffers (DDP syncs them before each forward, so the
            # last step's BatchNorm update is still per rank) and the same logged losses
            distributed.broadcast_tensors(list(self.net.buffers()))
            keys = sorted(sums)
            mean = distributed.all_reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
            sums.update(zip(keys, mean.tolist()))
        return {t: v / max(self._epoch_batches, 1) for t, v in sums.items()}

    def _flush_losses(self, window: list[torch.Tensor], names: Sequence[str], bar: Any) -> None:
        """Add the interval's losses (``window``: one row per step, on the device) to the epoch's
        sums, with the one host synchronisation of the interval, and empty ``window``.

        Converting every loss each step would make the host wait for the device every step (and
        ``float`` of a loss that requires grad warns). The sums are formed here in float64, step
        by step, as they always were. A non-finite loss stops the fit here, naming its first step
        (its weights are already lost: the optimizer stepped on its gradient)."""
        if not window:
            return
        rows = torch.stack(window).tolist()
        first = self.step - len(rows) + 1  # the global step of rows[0]
        window.clear()
        for i, row in enumerate(rows):
            bad = [n for n, v in zip(names, row) if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(self._non_finite_message(bad, row, names, first + i))
        sums = self._epoch_sums
        for row in rows:
            for name, v in zip(names, row):
                sums[name] = sums.get(name, 0.0) + v
        if bar is not None and hasattr(bar, "set_postfix"):  # a progress bar
            bar.set_postfix(loss=f"{sum(v for n, v in zip(names, rows[-1]) if n != '_extra'):.3f}")

    def _non_finite_message(self, bad: Sequence[str], row: Sequence[float], names: Sequence[str], step: int) -> str:
        """What `NonFiniteLossError` says: which losses, where, and what to try."""
        values = ", ".join(f"{n}={v}" for n, v in zip(names, row) if n in bad)
        which = ", ".join(repr(n) if n != "_extra" else f"the extra loss of {type(self.method).__name__}" for n in bad)
        batch = self._epoch_batches - (self.step - step)
        saved = (
            f"the last checkpoint (epoch {self._last_saved[0]}, step {self._last_saved[1]}) in {self.config.checkpoint_dir} is unchanged"
            if self._last_saved is not None else "no checkpoint of this run was written"
        )
        return (
            f"the loss of {which} became non-finite ({values}) at epoch {self.epoch + 1}, step {step} "
            f"(batch {batch} of the epoch); the weights are no longer usable and {saved}. Check that batch's "
            "inputs and targets for NaN/inf, lower lr, or set grad_clip."
        )

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip to ``grad_clip`` (the global norm over everything optimized:
        the gradients are already averaged across ranks, so every rank clips alike), step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)
            self._scaler.update()

    @torch.no_grad()
    def evaluate(self, data: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Per-task metrics (sample-weighted means over batches) and losses on ``data``.

        Under torchrun each rank evaluates its share of ``data`` and the sums are added over
        ranks: every rank returns the same numbers (a collective: every rank must call it)."""
        self.net.eval()
        sums: dict[str, dict[str, float]] = {
            t: dict.fromkeys(["loss", *self.tasks[t].metrics], 0.0) for t in self.net.tasks
        }
        n = 0
        if distributed.is_distributed():
            data = Subset(data, distributed.shard(range(len(data))))
        for batch in self.loader(data, shuffle=False, batch_size=self.config.eval_batch_size):
            x, targets = self.to_device(batch)
            if transform is not None:
                x = transform(x)
            with self.autocast():
                outputs = self.net(x)
            b = x.shape[0]
            n += b
            for t, pred in outputs.items():
                spec = self.tasks[t]
                if self.config.autocast is not None:  # metrics in full precision
                    pred = pred.float()
                sums[t]["loss"] = sums[t].get("loss", 0.0) + float(spec.loss(pred, targets[t])) * b
                for name, metric in spec.metrics.items():
                    sums[t][name] = sums[t].get(name, 0.0) + float(metric(pred, targets[t])) * b
        if distributed.is_distributed():
            keys = [(t, k) for t, m in sums.items() for k in m]
            total = torch.tensor([sums[t][k] for t, k in keys] + [n], dtype=torch.float64, device=self.device)
            total = distributed.all_reduce_sum(total).tolist()
            for (t, k), v in zip(keys, total):
                sums[t][k] = v
            n = total[-1]
        return {t: {k: v / max(n, 1) for k, v in m.items()} for t, m in sums.items()}

    def fit(self, epochs: int | None = None) -> list[dict]:
        """Train until ``epochs`` (default: the config's); resumable, interrupt-safe.

        Each epoch: train, step the schedule, the method's structural work, validate (and keep
        the best weights), checkpoint, write the metrics, log, run the callbacks."""
        total = epochs or self.config.epochs
        previous = self._install_signal_handlers()
        try:
            self.method.on_start(self)
            # the stop check first: a signal during the last epoch's validation, checkpoint or
            # callbacks stops the fit (it raises) like one during any other epoch
            while not self._check_stop() and self.epoch < total:
                start = time.perf_counter()
                self._sync_scheduler()
                lr = float(self.optimizer.param_groups[0]["lr"])
                train_losses = self.train_epoch()
                if self._stopping:
                    break
                self.epoch += 1
                self._epoch_batches = 0
                if self.scheduler is not None:
                    self.scheduler.step()
                events = self.method.after_epoch(self) or {}
                record = {
                    "epoch": self.epoch,
                    "train_loss": train_losses,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                    "parameters": sum(p.numel() for p in self.net.parameters()),
                    "tree": self.net.tree.partitions(),
                    **events,
                }
                if self.val_data is not None:
                    val = record["val"] = self.evaluate(self.val_data)
                    record["val_loss"] = sum(m["loss"] for m in val.values()) / max(len(val), 1)
                    record["monitor"] = self._monitored(record)
                self.history.append(record)
                if self.best_record is record:
                    self._save_best()
                self.save_checkpoint()
                self._write_metrics(total, record)
                for callback in self.config.callbacks:
                    callback.on_epoch_end(self, record)
        finally:
            if self._stopping and not self._forced and self._last_saved != self._position():
                self.save_checkpoint()
            self._restore_signal_handlers(previous)
        if self._stopping:
            # the caller must stop too (the demo would otherwise go on to the next method)
            raise KeyboardInterrupt(
                f"stopped at epoch {self.epoch}; checkpoint in {self.config.checkpoint_dir}: "
                "rerun with --resume (or fit(..., resume=True))"
            )
        if self.config.restore_best:
            self.restore_best()
        for callback in self.config.callbacks:
            callback.on_fit_end(self)
        return self.history

    # ------------------------------------------------------------------ selection and records
    def _monitored(self, record: Mapping[str, Any]) -> float:
        if self.config.monitor == "val_loss":
            return record["val_loss"]
        task, metric = self.config.monitor.split("/")
        return record["val"][task][metric]

    def _higher_is_better(self) -> bool:
        if self.config.monitor == "val_loss":
            return False
        task, metric = self.config.monitor.split("/")
        return metric != "loss" and bool(self.tasks[task].higher_is_better[metric])

    @property
    def best_record(self) -> dict[str, Any] | None:
        """The record of the best epoch on ``monitor`` since the network last changed structure
        (earlier weights belong to another network, e.g. DMTG's supernet or MTSL's unmerged
        copies, and could not be restored into this one); ``None`` before any validation."""
        if not self.history:
            return None
        tree = json.dumps(self.history[-1]["tree"])  # tuples now, lists after a resume: compare as JSON
        run = list(itertools.takewhile(lambda r: json.dumps(r["tree"]) == tree, reversed(self.history)))
        scored = [r for r in reversed(run) if isinstance(r.get("monitor"), float) and not math.isnan(r["monitor"])]
        if not scored:
            return None
        pick = max if self._higher_is_better() else min
        return pick(scored, key=lambda r: r["monitor"])  # the first of equal values

    @property
    def best_path(self) -> Path | None:
        """Where the best epoch's weights are written (``best.safetensors`` in ``checkpoint_dir``)."""
        return Path(self.config.checkpoint_dir) / "best.safetensors" if self.config.checkpoint_dir else None

    def _save_best(self) -> None:
        """Keep this epoch's weights as the best: in the checkpoint folder (rank 0; the
        checkpoint's barrier follows), or in memory without one."""
        if self.best_path is None:
            self._best_weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        elif distributed.is_main():
            save(self.net, self.best_path, extra={"epoch": self.epoch, "monitor": self.config.monitor})

    def restore_best(self) -> None:
        """Load the best epoch's weights (`best_record`) into the network."""
        if self.best_record is None:
            raise ConfigError("restore_best: no epoch was validated yet; pass validation data and train first.")
        if self.best_path is None:
            assert self._best_weights is not None  # written when best_record was appended
            self.net.load_state_dict(self._best_weights)
        else:
            load_weights(self.net, self.best_path)

    def _write_metrics(self, total: int, record: Mapping[str, Any]) -> None:
        """``metrics.csv`` and TensorBoard scalars (rank 0, with a checkpoint folder); the log line (every rank)."""
        if self.config.checkpoint_dir and distributed.is_main():
            write_csv(self.history, Path(self.config.checkpoint_dir) / "metrics.csv")
            if self._tensorboard is not None:
                for key, value in flatten(record).items():
                    self._tensorboard.add_scalar(key, value, self.epoch)
                self._tensorboard.flush()
        log_epoch(distributed.rank(), total, record)

    # ------------------------------------------------------------------ checkpoints
    def _check_stop(self) -> bool:
        """Whether to stop now: a signal reached any rank. All ranks agree (a tiny collective
        every step), so they stop at the same step and rank 0's checkpoint is everyone's."""
        self._stopping = self._stopping or distributed.any_rank(self._stop_requested)
        return self._stopping

    def _position(self) -> tuple[int, int, int]:
        return self.epoch, self.step, self._epoch_batches

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):  # finish the step, checkpoint, then stop
            # a second signal forces the exit; not under torchrun, which forwards the signal it
            # got to workers that often got it already (Ctrl-C reaches the whole process group)
            if self._stop_requested and not distributed.is_distributed():
                self._forced = True
                raise KeyboardInterrupt(self._forced_stop_message(signum))
            self._stop_requested = True

        previous = {}
        if self.config.checkpoint_dir:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, request_stop)
                except ValueError:  # not the main thread
                    pass
        return previous

    def _forced_stop_message(self, signum: int) -> str:
        """What a second signal's ``KeyboardInterrupt`` says: the fit stopped inside a step (or
        a validation, or a checkpoint), so no checkpoint is written now; where the last one is."""
        where = f"a second {signal.Signals(signum).name} stopped training at once (in epoch {self.epoch + 1}, after step {self.step}), without a checkpoint of this point"
        if self._last_saved is None:
            return f"{where}; this run wrote no checkpoint yet (whatever {self.config.checkpoint_dir} held before is unchanged)"
        epoch, step, _ = self._last_saved
        return (
            f"{where}; the last checkpoint, in {self.config.checkpoint_dir}, is from epoch {epoch}, step {step}: "
            "rerun with --resume (or fit(..., resume=True)) to continue from there"
        )

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def save_checkpoint(self) -> Path | None:
        """Weights + tree, optimizer/schedule/RNG state and the trainer's position, written by
        rank 0 as one atomic checkpoint (`graphsurgeon.training.run_folder`: no pickle, every
        file hashed, the previous checkpoint kept until this one is complete); the others wait
        for it. A checkpoint taken mid-epoch holds the position in the epoch and the data
        order's generator state at its start, so resuming replays the same order and skips the
        batches already trained on. Returns the checkpoint folder."""
        if not self.config.checkpoint_dir:
            return None
        folder = Path(self.config.checkpoint_dir)
        self._last_saved = self._position()
        self._sync_scheduler()  # the method may have replaced the optimizer after this epoch's step
        if distributed.is_main():
            state = {
                "epoch": self.epoch,
                "step": self.step,
                "epoch_batches": self._epoch_batches,
                "epoch_sums": self._epoch_sums if self._epoch_batches else {},
                "history": self.history,
                "method": self.method.state_dict(),
                "config": self.config.to_dict(),
            }
            generator = self._epoch_generator if self._epoch_batches else self.generator.get_state()
            schedule = {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}
            if self._scaler is not None:
                schedule["scaler"] = self._scaler.state_dict()
            restore = {"optimizer": self.optimizer.state_dict(), "generator": generator, **schedule, **_rng_states(self.device)}
            # through JSON as resume reads it: numpy scalars and tensors in the method state become numbers and lists
            run_folder.save(folder, self.net, json.loads(json.dumps(state, default=_jsonable)), restore)
        distributed.barrier()
        return folder

    def resume(self) -> bool:
        """Restore the state `save_checkpoint` wrote (every rank reads it); the tree is rebuilt
        from the checkpoint when it differs from the network's (after a structural edit).
        ``False`` when the folder holds no checkpoint; a corrupt, incomplete or old-format one
        is a `CheckpointError` naming the file (nothing in it is unpickled or executed)."""
        checkpoint = run_folder.load(self.config.checkpoint_dir) if self.config.checkpoint_dir else None
        if checkpoint is None:
            return False
        state, opt, path = checkpoint.state, checkpoint.restore, checkpoint.model
        kinds = {"epoch": int, "step": int, "epoch_batches": int, "epoch_sums": dict, "history": list, "method": dict}
        wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
        wrong += [k for k in ("optimizer", "generator", "rng") if k not in opt]
        if wrong:
            raise CheckpointError(
                f"checkpoint {str(checkpoint.folder)!r} lacks {wrong} or holds them with the wrong type: it is not a "
                "trainer checkpoint of this graphsurgeon. Start a fresh run."
            )
        meta = read_metadata(path)
        if not meta["tree"].same_structure(self.net.tree) or meta["tree"] != self.net.tree:
            lay_out(self.net, meta["tree"], path)
        load_weights(self.net, path)
        self.optimizer = self.make_optimizer()
        self.optimizer.load_state_dict(opt["optimizer"])
        _set_rng_states(opt, self.device)
        self.generator.set_state(opt["generator"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self._epoch_batches = state["epoch_batches"]
        self._epoch_sums = dict(state["epoch_sums"])
        self._epoch_generator = opt["generator"] if self._epoch_batches else None
        self._load_schedule(opt)
        self.method.load_state_dict(state["method"])
        self.structure_changed()
        return True


class _Skip(Sampler[list[int]]):
    """A batch sampler without its first ``skip`` batches. It still draws the whole order (the
    generator ends where an uninterrupted epoch leaves it), but loads nothing it skips."""

    def __init__(self, batches: Iterable[list[int]], skip: int) -> None:
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


def _rng_states(device: torch.device) -> dict[str, Any]:
    """Every global RNG's state. They are equal on every rank (same seed, same draws), so rank
    0's stand for all; the data order has its own generator (`Trainer.generator`)."""
    states = {"rng": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    """Restore `_rng_states` (decoded from a checkpoint: tuples and arrays as they were saved)."""
    try:
        torch.set_rng_state(states["rng"])
        np.random.set_state(states["numpy"])
        random.setstate(states["python"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's RNG states do not restore ({exc!r}): it is corrupt. Start a fresh run.") from exc
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
