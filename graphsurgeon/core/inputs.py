"""A backbone's inputs: the main one, which the segment chain carries, and its side inputs.

A side input is a model input other than the main one (a transformer's ``attention_mask``, a
metadata vector beside an image) that any segment may read (see `graphsurgeon.segment`). A batch
is given as the main input alone, or, when the backbone has side inputs, as a mapping of forward
argument names to values, the main input included (``{"input_ids": ids, "attention_mask": mask}``,
what ``model(**batch)`` takes). This module is the one place that splits and checks such batches.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from graphsurgeon.errors import SideInputError

__all__ = ["Inputs", "check_side_inputs", "split_inputs"]

Inputs = torch.Tensor | Mapping[str, Any]


def split_inputs(batch: Inputs, main: str, side: Sequence[str], where: str) -> tuple[Any, dict[str, Any]]:
    """``batch`` as (the main input, ``{side input: value}`` for every name of ``side``).

    Raises:
        SideInputError: ``batch`` lacks the main input or one of ``side``, or names another input.
    """
    if not isinstance(batch, Mapping):
        check_side_inputs({}, side, where)
        return batch, {}
    if main not in batch:
        raise SideInputError(
            f"{where}: the batch {sorted(batch)} has no main input {main!r}. Pass it by its forward argument "
            f"name, e.g. {{{main!r}: x, ...}}."
        )
    values = {k: v for k, v in batch.items() if k != main}
    check_side_inputs(values, side, where)
    return batch[main], values


def check_side_inputs(given: Mapping[str, Any], side: Sequence[str], where: str) -> None:
    """Refuse side inputs that ``side`` does not name, and missing ones."""
    unknown = sorted(set(given) - set(side))
    missing = [s for s in side if s not in given]
    if unknown or missing:
        wanted = f"takes the side inputs {list(side)}" if side else "takes no side input"
        problem = f"missing {missing}" if missing else f"unknown {unknown}"
        raise SideInputError(
            f"{where} {wanted}; {problem}. Fix: pass exactly those, by name "
            f"({', '.join(f'{s}=...' for s in side) or 'none'})."
        )
