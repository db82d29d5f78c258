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
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from graphsurgeon.core.checkpoint import lay_out, load_weights, read_metadata, save
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.core.surgery import carry_optimizer
from graphsurgeon.training import distributed
from graphsurgeon.training.distributed import ShardedSampler

__all__ = ["TaskLossSpec", "TrainConfig", "Trainer"]


class TaskLossSpec:
    """What the loop needs of a task: ``loss(pred, target)``, ``metrics``, ``higher_is_better``."""

    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    metrics: Mapping[str, Callable[[torch.Tensor, Any], float]]
    higher_is_better: Mapping[str, bool]


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64  # per rank under torchrun: the global batch is world_size times larger
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint_dir: str | None = None
    eval_batch_size: int = 256


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Trainer:
    """Trains ``net`` on ``train_data`` with ``method``; evaluates on ``val_data`` every epoch.

    Datasets yield ``(input, {task: target})``. ``tasks`` gives each task's loss and metrics.
    """

    net: MultiTaskNetwork
    tasks: Mapping[str, TaskLossSpec]
    train_data: Dataset
    val_data: Dataset | None
    config: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None
    history: list[dict] = field(default_factory=list)
    epoch: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        from graphsurgeon.methods.base import Method

        self.method = self.method or Method()
        self.device = torch.device(self.config.device)
        self.net.to(self.device)
        self.optimizer = self.make_optimizer()
        # one data order for every rank: same seed, same draws (rank r takes its share of it)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._stop_requested = False  # a signal reached this rank
        self._stopping = False  # every rank agreed to stop
        self._last_saved: tuple | None = None
        # position inside the current epoch, so that a checkpoint taken mid-epoch resumes exactly
        self._epoch_batches = 0
        self._epoch_sums: dict[str, float] = {}
        self._epoch_generator: torch.Tensor | None = None
        self.ddp: DistributedDataParallel | None = None
        self.structure_changed()

    # ------------------------------------------------------------------ pieces
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the network (group 0) and the method's own parameters (group 1, when it has
        any: UW's log-variances, GradNorm's weights), which take no weight decay — decay would
        pull loss weights towards a fixed point the method never asked for."""
        groups: list[dict[str, Any]] = [{"params": list(self.net.parameters())}]
        own = list(self.method_parameters())
        if own:
            groups.append({"params": own, "weight_decay": 0.0})
        return torch.optim.Adam(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)

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
        return iter(getattr(self.method, "parameters", lambda: [])())

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
        own_gradients = getattr(self.method, "reduces_gradients", False)
        model = self.ddp or self.net
        for batch in bar:
            x, targets = self.to_device(batch)
            self.batch = (x, targets)  # methods that re-evaluate the step (SAM, lookahead) read it
            sync = self.ddp.no_sync() if self.ddp is not None and own_gradients else contextlib.nullcontext()
            with sync:
                outputs = model(x)
                losses = self.method.task_losses(self, outputs, targets)
                extra = self.method.extra_loss(self, x, outputs)
                self.optimizer.zero_grad(set_to_none=True)
                self.method.backward(self, losses, extra)
            if not own_gradients:
                distributed.all_reduce_gradients(list(self.method_parameters()))
            self.optimizer.step()
            self.step += 1
            self._epoch_batches += 1
            for t, v in losses.items():
                sums[t] = sums.get(t, 0.0) + float(v.detach())
            if extra is not None:
                sums["_extra"] = sums.get("_extra", 0.0) + float(extra.detach())
            if hasattr(bar, "set_postfix") and self._epoch_batches % 10 == 0:
                bar.set_postfix(loss=f"{sum(float(v) for v in losses.values()):.3f}")
            if self._check_stop():
                break
        if distributed.is_distributed():
            # every rank leaves with the same buffers (DDP syncs them before each forward, so the
            # last step's BatchNorm update is still per rank) and the same logged losses
            distributed.broadcast_tensors(list(self.net.buffers()))
            keys = sorted(sums)
            mean = distributed.all_reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
            sums.update(zip(keys, mean.tolist()))
        return {t: v / max(self._epoch_batches, 1) for t, v in sums.items()}

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
            outputs = self.net(x)
            b = x.shape[0]
            n += b
            for t, pred in outputs.items():
                spec = self.tasks[t]
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
        """Train until ``epochs`` (default: the config's); resumable, interrupt-safe."""
        total = epochs or self.config.epochs
        previous = self._install_signal_handlers()
        try:
            self.method.on_start(self)
            while self.epoch < total and not self._check_stop():
                start = time.perf_counter()
                train_losses = self.train_epoch()
                if self._stopping:
                    break
                self.epoch += 1
                self._epoch_batches = 0
                events = self.method.after_epoch(self) or {}
                record = {
                    "epoch": self.epoch,
                    "train_loss": train_losses,
                    "seconds": time.perf_counter() - start,
                    "parameters": sum(p.numel() for p in self.net.parameters()),
                    "tree": self.net.tree.partitions(),
                    **events,
                }
                if self.val_data is not None:
                    record["val"] = self.evaluate(self.val_data)
                self.history.append(record)
                self.save_checkpoint()
        finally:
            if self._stopping and self._last_saved != self._position():
                self.save_checkpoint()
            self._restore_signal_handlers(previous)
        if self._stopping:
            # the caller must stop too (the demo would otherwise go on to the next method)
            raise KeyboardInterrupt(
                f"stopped at epoch {self.epoch}; checkpoint in {self.config.checkpoint_dir}: rerun with --resume"
            )
        return self.history

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
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = {}
        if self.config.checkpoint_dir:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, request_stop)
                except ValueError:  # not the main thread
                    pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def save_checkpoint(self) -> Path | None:
        """Weights + tree (safetensors) and optimizer/method/RNG state, each written atomically
        by rank 0 (the others wait for it). A checkpoint taken mid-epoch holds the position in
        the epoch and the data order's generator state at its start, so resuming replays the
        same order and skips the batches already trained on."""
        if not self.config.checkpoint_dir:
            return None
        folder = Path(self.config.checkpoint_dir)
        self._last_saved = self._position()
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            state = {
                "epoch": self.epoch,
                "step": self.step,
                "epoch_batches": self._epoch_batches,
                "epoch_sums": self._epoch_sums if self._epoch_batches else {},
                "history": self.history,
                "method": self.method.state_dict() if hasattr(self.method, "state_dict") else {},
                "config": asdict(self.config),
            }
            save(self.net, folder / "model.safetensors", extra={"trainer": json.dumps(state, default=_jsonable)})
            tmp = folder / ".optimizer.pt.tmp"
            generator = self._epoch_generator if self._epoch_batches else self.generator.get_state()
            torch.save({"optimizer": self.optimizer.state_dict(), "generator": generator, **_rng_states(self.device)}, tmp)
            os.replace(tmp, folder / "optimizer.pt")
        distributed.barrier()
        return folder

    def resume(self) -> bool:
        """Restore the state `save_checkpoint` wrote (every rank reads it); the tree is rebuilt
        from the checkpoint when it differs from the network's (after a structural edit)."""
        folder = Path(self.config.checkpoint_dir or "")
        path = folder / "model.safetensors"
        if not path.is_file():
            return False
        meta = read_metadata(path)
        state = json.loads(meta["extra"]["trainer"])
        if not meta["tree"].same_structure(self.net.tree) or meta["tree"] != self.net.tree:
            lay_out(self.net, meta["tree"], path)
        load_weights(self.net, path)
        self.optimizer = self.make_optimizer()
        opt = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        _set_rng_states(opt, self.device)
        self.generator.set_state(opt["generator"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self._epoch_batches = state.get("epoch_batches", 0)
        self._epoch_sums = dict(state.get("epoch_sums", {}))
        self._epoch_generator = opt["generator"] if self._epoch_batches else None
        if hasattr(self.method, "load_state_dict"):
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
    torch.set_rng_state(states["rng"])
    if isinstance(states.get("numpy"), tuple):  # checkpoints before full states held only the key
        np.random.set_state(states["numpy"])
    if isinstance(states.get("python"), tuple) and len(states["python"]) == 3:
        random.setstate(states["python"])
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
