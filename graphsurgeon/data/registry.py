"""Build any of the package's datasets by name, so configs and CLIs can name them as strings."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from graphsurgeon.data.celeba import CelebAAttributes
from graphsurgeon.data.cityscapes import Cityscapes
from graphsurgeon.data.errors import DataError
from graphsurgeon.data.ground_truth import GroundTruthDigits
from graphsurgeon.data.multimnist import MultiMNIST
from graphsurgeon.data.nyuv2 import NYUv2


def _multimnist(split: str, root: str | Path | None, **kw: Any) -> Dataset:
    return MultiMNIST(split=split, **kw)  # embedded data: root is not used


DATASETS: dict[str, Callable[..., Dataset]] = {
    "multimnist": _multimnist,
    # embedded task families with a known sharing structure (graphsurgeon.data.ground_truth)
    "gt_twins": lambda split, root, **kw: GroundTruthDigits("twins", split=split, **kw),
    "gt_branching": lambda split, root, **kw: GroundTruthDigits("branching", split=split, **kw),
    "nyuv2": lambda split, root, **kw: NYUv2(root, split=split, **kw),
    "cityscapes": lambda split, root, **kw: Cityscapes(root, split=split, **kw),
    "celeba": lambda split, root, **kw: CelebAAttributes(root, split=split, **kw),
}


def get_dataset(name: str, split: str, root: str | Path | None = None, **kw: Any) -> Dataset:
    """Dataset `name` ("multimnist", "gt_twins", "gt_branching", "nyuv2", "cityscapes" or "celeba") for `split`.

    `root` is where the user put a downloaded dataset; the embedded ones (MultiMNIST and
    the ground-truth families) ignore it. Extra keyword arguments go to the dataset class (e.g. `tasks=`,
    `size=`, `num_classes=`, `attributes=`). Every returned dataset yields
    `(image, {task: target})` items and has a `task_info` dict of `TaskInfo`.
    """
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is unknown; use one of {sorted(DATASETS)}.")
    return DATASETS[name](split, root, **kw)
