"""The one training loop every method runs on.

A method (`graphsurgeon.methods.base.Method`) is a strategy over this loop: it may add a
loss term, replace the backward pass (gradient methods), and edit the structure between
epochs (MTSL's structural phases). The loop owns batching, evaluation, logging, progress
bars and checkpoints, so no method carries its own copy of them.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from graphsurgeon.checkpoint import read_metadata, save
from graphsurgeon.network import MultiTaskNetwork

__all__ = ["TrainConfig", "Trainer", "TaskLossSpec"]


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
    batch_size: int = 64
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
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._stop_requested = False

    # ------------------------------------------------------------------ pieces
    def make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.net.parameters()) + list(self.method_parameters())
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def set_network(self, net: MultiTaskNetwork) -> None:
        """Train ``net`` from now on (a method that replaces the network, e.g. DMTG's pruning);
        the optimizer starts afresh for its parameters."""
        self.net = net.to(self.device)
        self.optimizer = self.make_optimizer()

    def method_parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(getattr(self.method, "parameters", lambda: [])())

    def loader(self, data: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size or self.config.batch_size,
            shuffle=shuffle,
            generator=self.generator if shuffle else None,
            drop_last=shuffle and len(data) > (batch_size or self.config.batch_size),
        )

    def to_device(self, batch: tuple) -> tuple[torch.Tensor, dict[str, Any]]:
        x, targets = batch
        return x.to(self.device), {t: v.to(self.device) for t, v in targets.items()}

    def task_losses(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {t: self.tasks[t].loss(outputs[t], targets[t]) for t in outputs}

    def progress(self, iterable, **kw):
        if not self.config.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, leave=False, dynamic_ncols=True, **kw)

    # ------------------------------------------------------------------ loop
    def train_epoch(self) -> dict[str, float]:
        self.net.train()
        sums: dict[str, float] = {}
        batches = 0
        bar = self.progress(self.loader(self.train_data, shuffle=True), desc=f"epoch {self.epoch + 1}")
        for batch in bar:
            x, targets = self.to_device(batch)
            outputs = self.net(x)
            losses = self.method.task_losses(self, outputs, targets)
            extra = self.method.extra_loss(self, x, outputs)
            self.optimizer.zero_grad(set_to_none=True)
            self.method.backward(self, losses, extra)
            self.optimizer.step()
            self.step += 1
            batches += 1
            for t, v in losses.items():
                sums[t] = sums.get(t, 0.0) + float(v.detach())
            if extra is not None:
                sums["_extra"] = sums.get("_extra", 0.0) + float(extra.detach())
            if hasattr(bar, "set_postfix") and batches % 10 == 0:
                bar.set_postfix(loss=f"{sum(float(v) for v in losses.values()):.3f}")
            if self._stop_requested:
                break
        return {t: v / max(batches, 1) for t, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, data: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Per-task metrics (sample-weighted means over batches) and losses on ``data``."""
        self.net.eval()
        sums: dict[str, dict[str, float]] = {t: {} for t in self.net.tasks}
        n = 0
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
        return {t: {k: v / max(n, 1) for k, v in m.items()} for t, m in sums.items()}

    def fit(self, epochs: int | None = None) -> list[dict]:
        """Train until ``epochs`` (default: the config's); resumable, interrupt-safe."""
        total = epochs or self.config.epochs
        previous = self._install_signal_handlers()
        try:
            self.method.on_start(self)
            while self.epoch < total and not self._stop_requested:
                start = time.perf_counter()
                train_losses = self.train_epoch()
                if self._stop_requested:
                    break
                self.epoch += 1
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
            if self._stop_requested:
                self.save_checkpoint()
            self._restore_signal_handlers(previous)
        if self._stop_requested:
            # the caller must stop too (the demo would otherwise go on to the next method)
            raise KeyboardInterrupt(
                f"stopped at epoch {self.epoch}; checkpoint in {self.config.checkpoint_dir}: rerun with --resume"
            )
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):  # finish the step, checkpoint, then stop
            if self._stop_requested:
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
        """Weights + tree (safetensors) and optimizer/method/RNG state, each written atomically."""
        if not self.config.checkpoint_dir:
            return None
        folder = Path(self.config.checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "method": self.method.state_dict() if hasattr(self.method, "state_dict") else {},
            "config": asdict(self.config),
        }
        save(self.net, folder / "model.safetensors", extra={"trainer": json.dumps(state, default=_jsonable)})
        tmp = folder / ".optimizer.pt.tmp"
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "generator": self.generator.get_state(),
                "numpy": np.random.get_state()[1],
                "python": random.getstate()[1],
            },
            tmp,
        )
        os.replace(tmp, folder / "optimizer.pt")
        return folder

    def resume(self) -> bool:
        """Restore the state `save_checkpoint` wrote; the network must already have its tree."""
        folder = Path(self.config.checkpoint_dir or "")
        path = folder / "model.safetensors"
        if not path.is_file():
            return False
        from graphsurgeon.checkpoint import load_weights

        meta = read_metadata(path)
        state = json.loads(meta["extra"]["trainer"])
        if not meta["tree"].same_structure(self.net.tree) or meta["tree"] != self.net.tree:
            first = {d: self.net.tree.at_depth(d)[0].id for d in range(1, self.net.depth + 1)}
            saved = meta["tree"]
            self.net.rebuild(saved, {n.id: (first[n.depth],) if n.depth else (n.id,) for n in saved.nodes})
            self.net.to(self.device)
        load_weights(self.net, path)
        self.optimizer = self.make_optimizer()
        opt = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        torch.set_rng_state(opt["rng"])
        self.generator.set_state(opt["generator"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        if hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(state["method"])
        return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
