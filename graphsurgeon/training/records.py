"""Where the epoch records of `Trainer.history` go besides the checkpoint: a CSV file, TensorBoard
scalars and one log line per epoch.

A record nests (``{"val": {"left": {"accuracy": 0.9}}}``); `flatten` turns it into the
``"val/left/accuracy"`` columns every one of them uses, keeping numbers only (trees and method
events stay in the checkpoint's history).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from graphsurgeon.core.checkpoint import remove_temporaries
from graphsurgeon.errors import ConfigError

__all__ = ["flatten", "log_epoch", "tensorboard_writer_class", "write_csv"]

logger = logging.getLogger("graphsurgeon")


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """The numeric leaves of ``record``, keyed by their ``/``-joined path."""
    out: dict[str, int | float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def write_csv(history: Iterable[Mapping[str, Any]], path: Path) -> None:
    """``path`` as one row per epoch, rewritten whole (atomically) so that columns that appear
    later (a method's events) and a resumed history stay in one consistent table."""
    rows = [flatten(record) for record in history]
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    # a fresh mkstemp name, not a fixed one a planted symlink could redirect
    remove_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensorboard_writer_class(required: bool) -> type | None:
    """TensorBoard's ``SummaryWriter`` class, or ``None`` when the package is missing and was not
    asked for (the one place the optional dependency is imported)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if required:
            raise ConfigError(
                f"TrainConfig.tensorboard=True needs the tensorboard package ({error}); "
                "pip install tensorboard, or use tensorboard=None (write when installed)."
            ) from error
        return None
    return SummaryWriter


def log_epoch(rank: int, total: int, record: Mapping[str, Any]) -> None:
    """One line per epoch and rank: the mean training and validation losses, the monitored
    value, the learning rate and the time."""
    parts = [f"rank {rank} epoch {record['epoch']}/{total}"]
    train = record.get("train_loss", {})
    if train:
        parts.append(f"train_loss={_mean(v for k, v in train.items() if not k.startswith('_')):.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss={record['val_loss']:.4f}")
    if "monitor" in record:
        parts.append(f"monitor={record['monitor']:.4f}")
    if "lr" in record:
        parts.append(f"lr={record['lr']:.3g}")
    parts.append(f"{record.get('seconds', 0.0):.1f}s")
    logger.info(" ".join(parts))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
