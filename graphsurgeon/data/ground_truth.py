"""Digit tasks whose sharing structure is known by construction: the test a task-grouping method must pass.

MultiMNIST's tasks are related by construction too, but its only joint task (``sum_mod10``)
is at chance for every method, so a ranking on it says little. Here every task is learnable and
the right answer is fixed by where each task's information lives:

``twins`` (1 × 36 × 36: MultiMNIST's two overlapping digits over a faint sinusoidal grating)

=================  =======  ============================================================
task               classes  target
=================  =======  ============================================================
left               10       the left digit
left_relabel       10       ``RELABEL[left]``: the same information under other names
left_parity        2        left digit odd: a coarsening of ``left`` (the control)
right              10       the right digit
right_relabel      10       ``RELABEL[right]``
texture            8        the grating's orientation (4) × spatial frequency (2)
=================  =======  ============================================================

A twin pair carries the same information, so at the deepest segment a network needs the
same features for both; the texture is independent of both digits. The ground truth is the
last depth's partition {left, left_relabel} {right, right_relabel} {texture}: early layers
(strokes, edges) may be shared by anything. ``left_parity`` is the control that separates
representation similarity from gradient transfer: learning ``left`` helps it (gradients
agree), but it needs only one bit of the left digit, so its features can differ; it is
reported (with whom it was grouped), not scored.

``branching`` (2 × 36 × 36: one digit in each channel, drawn independently)

=================  =======  =====================================
first, first_relabel    10  the digit of channel 0 (and relabelled)
second, second_relabel  10  the digit of channel 1 (and relabelled)
=================  =======  =====================================

The two families read different pixels from the first layer on, and their inputs are
independent, so the right tree branches at the root: {first, first_relabel}
{second, second_relabel} at *every* depth.

Digits never leak between splits (MultiMNIST's train/val/test digit pools), and ``seed`` only
decides which digits, shifts and gratings a split gets.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from graphsurgeon.data.errors import DataError
from graphsurgeon.data.mnist import load_mnist_5k
from graphsurgeon.data.multimnist import (
    CANVAS_SIZE,
    DEFAULT_SIZES,
    SPLITS,
    MultiMNIST,
    place_digits,
    source_digit_pools,
)
from graphsurgeon.data.tasks import TaskInfo, classification_task

__all__ = [
    "GROUND_TRUTH",
    "GROUND_TRUTH_TASKS",
    "RELABEL",
    "GroundTruth",
    "GroundTruthDigits",
    "adjusted_rand_index",
    "learnable_tasks",
    "score_partitions",
]

# A fixed derangement of 0..9: no digit keeps its label, so a twin is never the task itself
RELABEL = (3, 7, 0, 9, 5, 1, 8, 2, 6, 4)
TEXTURE_ORIENTATIONS_DEG = (0.0, 45.0, 90.0, 135.0)
TEXTURE_CYCLES = (3.0, 6.0)  # periods across the canvas
# The grating peaks at this intensity under the digits' ink (which reaches 1), so digits stay legible
TEXTURE_AMPLITUDE = 0.35
# a task whose single-task accuracy is within this of chance (1 / classes) is not learnt: it is
# reported but left out of aggregates such as Δm, where its noise would swamp the others
CHANCE_MARGIN = 0.05
# branching: each channel's digit sits anywhere within this corner range (both axes)
BRANCHING_CORNER = (0, CANVAS_SIZE - 28)

Variant = Literal["twins", "branching"]


@dataclass(frozen=True)
class GroundTruth:
    """The sharing structure a variant's tasks have by construction.

    ``groups`` partitions the scored tasks; ``depths`` says where it must hold: ``"last"``, the
    deepest segment only (shallower ones may share more), or ``"all"``, every depth. ``controls``
    are tasks reported but not scored, each with the task whose information it coarsens.
    """

    groups: tuple[tuple[str, ...], ...]
    depths: Literal["last", "all"]
    controls: Mapping[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for g in self.groups for t in g)


GROUND_TRUTH: dict[str, GroundTruth] = {
    "twins": GroundTruth((("left", "left_relabel"), ("right", "right_relabel"), ("texture",)), "last", {"left_parity": "left"}),
    "branching": GroundTruth((("first", "first_relabel"), ("second", "second_relabel")), "all"),
}

GROUND_TRUTH_TASKS: dict[str, dict[str, TaskInfo]] = {
    "twins": {
        "left": classification_task(10),
        "left_relabel": classification_task(10),
        "left_parity": classification_task(2),
        "right": classification_task(10),
        "right_relabel": classification_task(10),
        "texture": classification_task(len(TEXTURE_ORIENTATIONS_DEG) * len(TEXTURE_CYCLES)),
    },
    "branching": {t: classification_task(10) for t in ("first", "first_relabel", "second", "second_relabel")},
}


def _gratings(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` uint8 sinusoidal gratings (random phase) and their class (orientation × frequency)."""
    orientation = rng.integers(0, len(TEXTURE_ORIENTATIONS_DEG), size)
    cycles = rng.integers(0, len(TEXTURE_CYCLES), size)
    phase = rng.uniform(0, 2 * math.pi, size)
    theta = np.deg2rad(np.asarray(TEXTURE_ORIENTATIONS_DEG))[orientation]
    freq = np.asarray(TEXTURE_CYCLES)[cycles] * 2 * math.pi / CANVAS_SIZE
    y, x = np.mgrid[0:CANVAS_SIZE, 0:CANVAS_SIZE].astype(np.float64)
    arg = (x[None] * np.cos(theta)[:, None, None] + y[None] * np.sin(theta)[:, None, None]) * freq[:, None, None]
    wave = 0.5 + 0.5 * np.sin(arg + phase[:, None, None])
    grating = np.round(255 * TEXTURE_AMPLITUDE * wave).astype(np.uint8)
    return grating, orientation * len(TEXTURE_CYCLES) + cycles


class GroundTruthDigits(Dataset):
    """The ``twins`` or ``branching`` task family (module docstring), generated from ``seed``.

    Items are ``(image, targets)``: image float32 (C, 36, 36) in [0, 1], targets maps each
    selected task to an int64 scalar. ``task_info`` holds the selected tasks' `TaskInfo` and
    ``ground_truth`` the variant's `GroundTruth`; ``source_indices`` (N, 2) which embedded
    digits each image holds (left and right, or first and second): images that share a digit
    are not independent samples (`graphsurgeon.MergeBudget.groups`).
    """

    def __init__(self, variant: Variant = "twins", split: str = "train", size: int | None = None, seed: int = 0,
                 tasks: Iterable[str] | None = None) -> None:
        if variant not in GROUND_TRUTH:
            raise DataError(f"GroundTruthDigits(variant={variant!r}) is unknown; use one of {list(GROUND_TRUTH)}.")
        if split not in SPLITS:
            raise DataError(f"GroundTruthDigits(split={split!r}) is unknown; use one of {list(SPLITS)}.")
        if isinstance(tasks, str):
            raise DataError(f"GroundTruthDigits(tasks={tasks!r}) is a string; pass a list such as [{tasks!r}].")
        known = GROUND_TRUTH_TASKS[variant]
        names = list(known) if tasks is None else list(tasks)
        if not names or len(set(names)) != len(names) or any(t not in known for t in names):
            raise DataError(f"GroundTruthDigits(variant={variant!r}, tasks={names!r}) must name distinct tasks "
                            f"from {list(known)}; pass None for all of them.")
        size = DEFAULT_SIZES[split] if size is None else size
        self.variant, self.split, self.seed = variant, split, seed
        self.ground_truth = GROUND_TRUTH[variant]
        self.task_info: dict[str, TaskInfo] = {t: known[t] for t in names}
        image, digits, self.source_indices = self._twins(split, size, seed) if variant == "twins" else self._branching(split, size, seed)
        self._image = image
        self._targets = {t: self._target(t, digits) for t in names}

    @staticmethod
    def _twins(split: str, size: int, seed: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        # MultiMNIST's canvases for the same (split, size, seed), with a grating underneath
        pair = MultiMNIST(split, size, seed, tasks=["left", "right"])
        image, labels = pair.batch(slice(None))
        grating, texture = _gratings(np.random.default_rng([seed, SPLITS.index(split), 1]), size)
        canvas = torch.maximum(torch.round(image[:, 0] * 255).to(torch.uint8), torch.from_numpy(grating))
        return canvas[:, None], {**labels, "texture": torch.from_numpy(texture.astype(np.int64))}, pair.source_indices

    @staticmethod
    def _branching(split: str, size: int, seed: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        images, labels = load_mnist_5k()
        pool = source_digit_pools(labels)[split]
        rng = np.random.default_rng([seed, SPLITS.index(split), 2])
        channels, digits, sources = [], {}, []
        for name in ("first", "second"):
            idx = pool[rng.integers(0, len(pool), size)]
            sources.append(idx)
            rows, cols = (rng.integers(BRANCHING_CORNER[0], BRANCHING_CORNER[1] + 1, size) for _ in range(2))
            channels.append(torch.from_numpy(place_digits(images[idx], rows, cols)))
            digits[name] = torch.from_numpy(labels[idx].astype(np.int64))
        return torch.stack(channels, 1), digits, torch.from_numpy(np.stack(sources, axis=1))

    @staticmethod
    def _target(task: str, digits: Mapping[str, Tensor]) -> Tensor:
        base = task.removesuffix("_relabel").removesuffix("_parity")
        if task.endswith("_relabel"):
            return torch.tensor(RELABEL)[digits[base]]
        if task.endswith("_parity"):
            return digits[base] % 2
        return digits[task]

    def __len__(self) -> int:
        return len(self._image)

    def batch(self, index: int | slice | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images and targets at ``index`` (an int, slice or index tensor), typed as items are."""
        return self._image[index].float() / 255.0, {t: v[index] for t, v in self._targets.items()}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.batch(index)


# ------------------------------------------------------------------------------ scoring

def learnable_tasks(single_accuracy: Mapping[str, float], task_info: Mapping[str, TaskInfo]) -> list[str]:
    """The tasks whose single-task accuracy beats chance (1 / classes) by more than CHANCE_MARGIN."""
    return [t for t, acc in single_accuracy.items() if acc > 1.0 / task_info[t].num_outputs + CHANCE_MARGIN]


Partition = Sequence[Sequence[str]]


def adjusted_rand_index(a: Partition, b: Partition) -> float:
    """Hubert and Arabie's adjusted Rand index of two partitions of the same items.

    1 for identical partitions, about 0 for unrelated ones. Where the index is undefined
    (both partitions trivial in the same way, e.g. all singletons), identical partitions
    score 1 and others 0.
    """
    label_a = {t: i for i, g in enumerate(a) for t in g}
    label_b = {t: i for i, g in enumerate(b) for t in g}
    if set(label_a) != set(label_b):
        raise DataError(f"adjusted_rand_index: the partitions hold different items ({sorted(label_a)} vs {sorted(label_b)}).")
    items = sorted(label_a)
    n = len(items)
    contingency: dict[tuple[int, int], int] = {}
    for t in items:
        key = (label_a[t], label_b[t])
        contingency[key] = contingency.get(key, 0) + 1
    pairs = sum(math.comb(c, 2) for c in contingency.values())
    pairs_a = sum(math.comb(len(g), 2) for g in a)
    pairs_b = sum(math.comb(len(g), 2) for g in b)
    total = math.comb(n, 2)
    expected = pairs_a * pairs_b / total if total else 0.0
    best = (pairs_a + pairs_b) / 2
    if best == expected:
        return 1.0 if _canonical(a) == _canonical(b) else 0.0
    return (pairs - expected) / (best - expected)


def _canonical(p: Partition) -> tuple[tuple[str, ...], ...]:
    return tuple(sorted(tuple(sorted(g)) for g in p if g))


def score_partitions(partitions: Sequence[Partition], variant: str) -> dict:
    """How a learned tree (its partition per depth, shallow first: `TaskTree.partitions`)
    matches ``variant``'s ground truth.

    Each partition is restricted to the scored tasks (controls dropped) and compared where the
    ground truth holds (the last depth, or every depth). Returns ``exact`` (every compared
    depth equals the truth), ``ari`` (mean adjusted Rand index over them), ``per_depth`` (each
    depth's restricted partition, exact and ARI) and ``controls`` (for each control task, the
    scored tasks that share its last-depth node).
    """
    truth = GROUND_TRUTH[variant]
    scored = set(truth.tasks)
    per_depth = []
    for depth, partition in enumerate(partitions, start=1):
        restricted = _canonical([[t for t in g if t in scored] for g in partition])
        per_depth.append({"depth": depth, "partition": restricted, "exact": restricted == _canonical(truth.groups),
                          "ari": adjusted_rand_index(restricted, truth.groups)})
    compared = per_depth[-1:] if truth.depths == "last" else per_depth
    controls = {}
    for control in truth.controls:
        node = next((g for g in partitions[-1] if control in g), ())
        controls[control] = sorted(t for t in node if t != control)
    return {"exact": all(d["exact"] for d in compared), "ari": sum(d["ari"] for d in compared) / len(compared),
            "per_depth": per_depth, "controls": controls}

