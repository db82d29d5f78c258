"""MultiMNIST: two overlapping digits per image, seven tasks with a known structure.

Each 36×36 canvas holds a *left* digit (shifted towards the top-left) and a *right*
digit (shifted towards the bottom-right), combined by pixel-wise maximum so the strokes
overlap. The tasks and what they depend on:

=================  ==================  =======  =====================================
task               kind                outputs  depends on
=================  ==================  =======  =====================================
left               classification      10       left digit
left_parity        classification      2        left digit (1 = odd)
reconstruction     dense_regression    1        left digit (the left digit alone)
right              classification      10       right digit
right_ge5          classification      2        right digit (1 = digit >= 5)
sum_mod10          classification      10       both digits: (left + right) mod 10
segmentation       segmentation        3        both digits: 0 bg, 1 left, 2 right
=================  ==================  =======  =====================================

So the ``left*``/``reconstruction`` tasks form one group and the ``right*`` tasks
another, while ``sum_mod10`` and ``segmentation`` need both: a task-grouping method
that looks at this dataset should recover those two groups (and put the two joint
tasks near the root of a task tree).

Digits never leak between splits: the 5,000 embedded source digits are partitioned
once, class by class, into 70 % / 10 % / 20 % pools for train / val / test (a fixed
seed, independent of the `seed` argument), and a split's canvases draw only from its
own pool. `seed` then only decides which pairs and shifts a split gets.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from graphsurgeon.data.errors import DataError
from graphsurgeon.data.mnist import load_mnist_5k
from graphsurgeon.data.tasks import TaskInfo, classification_task, dense_regression_task, segmentation_task

CANVAS_SIZE = 36
DIGIT_SIZE = 28
# Top-left corner of each digit on the canvas, per axis (inclusive ranges). The ranges
# are disjoint so "left" and "right" stay well defined, and the digits always overlap.
LEFT_CORNER = (0, 3)
RIGHT_CORNER = (5, 8)
# A pixel counts as a digit's ink for segmentation above half intensity; the faint
# anti-aliasing fringe would otherwise make the masks blobby.
INK_THRESHOLD = 0.5

SPLITS: tuple[str, ...] = ("train", "val", "test")
POOL_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
DEFAULT_SIZES = {"train": 10_000, "val": 1_000, "test": 2_000}
# Fixed forever: changing it would move digits between splits of existing results.
POOL_SEED = 20_240_501

MULTIMNIST_TASKS: dict[str, TaskInfo] = {
    "left": classification_task(10),
    "right": classification_task(10),
    "left_parity": classification_task(2),
    "right_ge5": classification_task(2),
    "sum_mod10": classification_task(10),
    "segmentation": segmentation_task(3),
    "reconstruction": dense_regression_task(1, loss="l1"),
}


def source_digit_pools(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Partition digit indices into disjoint train/val/test pools, stratified by class.

    Stratifying keeps every pool at the same class balance, so no split is short of
    some digit (with 5,000 digits, a plain shuffle could leave val with few 7s).
    """
    rng = np.random.default_rng(POOL_SEED)
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_train = round(len(members) * POOL_FRACTIONS["train"])
        n_val = round(len(members) * POOL_FRACTIONS["val"])
        pools["train"].append(members[:n_train])
        pools["val"].append(members[n_train:n_train + n_val])
        pools["test"].append(members[n_train + n_val:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in pools.items()}


def place_digits(digits: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Paste each 28×28 uint8 digit onto its own blank canvas at (row, col), all at once."""
    n = len(digits)
    canvas = np.zeros((n, CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    r = rows[:, None] + np.arange(DIGIT_SIZE)
    c = cols[:, None] + np.arange(DIGIT_SIZE)
    canvas[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]] = digits
    return canvas


def _check_args(split: str, size: int | None, tasks: Iterable[str] | None) -> tuple[int, list[str]]:
    if split not in SPLITS:
        raise DataError(f"MultiMNIST(split={split!r}) is unknown; use one of {list(SPLITS)}.")
    size = DEFAULT_SIZES[split] if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"MultiMNIST(size={size!r}) is invalid; give a positive int or None "
                        f"for the split default ({DEFAULT_SIZES[split]}).")
    if isinstance(tasks, str):
        raise DataError(f"MultiMNIST(tasks={tasks!r}) is a string; pass a list such as [{tasks!r}].")
    names = list(MULTIMNIST_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in MULTIMNIST_TASKS]
    if unknown or not names or len(set(names)) != len(names):
        raise DataError(f"MultiMNIST(tasks={names!r}) must name distinct tasks from "
                        f"{list(MULTIMNIST_TASKS)}; pass None for all of them.")
    return size, names


class MultiMNIST(Dataset):
    """Two-digit canvases generated eagerly and deterministically from `seed`.

    Items are `(image, targets)`: image float32 (1, 36, 36) in [0, 1]; targets maps
    each selected task to an int64 scalar (classification), an int64 (36, 36) map
    (segmentation) or a float32 (1, 36, 36) map in [0, 1] (reconstruction).

    Canvases and masks are kept as uint8 (about 4 KB a sample instead of 21 KB as
    float32/int64) and converted on access. `batch(index)` returns many items at once, stacked along
    dim 0 with the same dtypes, so a CPU training loop can slice batches without a
    DataLoader. `source_indices` (N, 2) records which embedded digits (left, right)
    built each canvas, and `task_info` holds the `TaskInfo` of the selected tasks.
    """

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0,
                 tasks: Iterable[str] | None = None) -> None:
        size, names = _check_args(split, size, tasks)
        digits, labels = load_mnist_5k()
        pool = source_digit_pools(labels)[split]
        rng = np.random.default_rng([seed, SPLITS.index(split)])

        left_pos = rng.integers(0, len(pool), size)
        # A non-zero step guarantees the right digit is a different image than the left.
        right_pos = (left_pos + rng.integers(1, len(pool), size)) % len(pool)
        left_idx, right_idx = pool[left_pos], pool[right_pos]
        corners = [rng.integers(lo, hi + 1, size) for lo, hi in (LEFT_CORNER, LEFT_CORNER,
                                                                 RIGHT_CORNER, RIGHT_CORNER)]
        left_canvas = torch.from_numpy(place_digits(digits[left_idx], corners[0], corners[1]))
        right_canvas = torch.from_numpy(place_digits(digits[right_idx], corners[2], corners[3]))

        self.split = split
        self.seed = seed
        self.source_indices: Tensor = torch.from_numpy(np.stack([left_idx, right_idx], axis=1))
        self.task_info: dict[str, TaskInfo] = {t: MULTIMNIST_TASKS[t] for t in names}
        self._canvas = torch.maximum(left_canvas, right_canvas)
        self._targets = self._make_targets(
            names, torch.from_numpy(labels[left_idx].astype(np.int64)),
            torch.from_numpy(labels[right_idx].astype(np.int64)), left_canvas, right_canvas)

    def _make_targets(self, names: list[str], left: Tensor, right: Tensor,
                      left_canvas: Tensor, right_canvas: Tensor) -> dict[str, Tensor]:
        def segmentation() -> Tensor:
            # Where strokes overlap the brighter digit wins; ties go to the left digit.
            ink = self._canvas > int(INK_THRESHOLD * 255)  # same as canvas / 255 > threshold
            return ink * (2 - (left_canvas >= right_canvas).to(torch.uint8))

        makers = {
            "left": lambda: left,
            "right": lambda: right,
            "left_parity": lambda: left % 2,
            "right_ge5": lambda: (right >= 5).long(),
            "sum_mod10": lambda: (left + right) % 10,
            "segmentation": segmentation,
            "reconstruction": lambda: left_canvas,
        }
        return {name: makers[name]() for name in names}

    def __len__(self) -> int:
        return len(self._canvas)

    def batch(self, index: int | slice | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images and targets at `index` (an int, slice or index tensor), typed as items are."""
        targets = {}
        for task, stored in self._targets.items():
            picked = stored[index]
            if task == "segmentation":
                picked = picked.long()
            elif task == "reconstruction":
                picked = (picked.float() / 255.0).unsqueeze(-3)
            targets[task] = picked
        return (self._canvas[index].float() / 255.0).unsqueeze(-3), targets

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.batch(index)
