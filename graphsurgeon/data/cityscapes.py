"""Cityscapes (7- or 19-class segmentation, inverse depth) from the MTAN preprocessed release.

Download: the Cityscapes links in the README of https://github.com/lorenmt/mtan:
2,975 train / 500 val images (256×512, or 128×256 in the smaller zip). The larger
release stores labels per class count in label_2/, label_7/ and label_19/; the smaller
one, as LibMTL uses it, has a single label/ folder with the 7-class labels. Either way
-1 marks unlabelled pixels. "depth" is the dataset's disparity, i.e. *inverse* depth
(0 = no measurement), which is what MTAN and LibMTL train and report on.

The release has no normals: "normal" is derived from the inverted disparity and a
typical Cityscapes camera (`CITYSCAPES_CAMERA`), as the MTSL code derives normals from
depth and each image's camera file; "edges" come from the labels and "autoencoding" is
the image. See docs/datasets.md for what these derivations can and cannot give.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from graphsurgeon.data.dense_targets import Camera
from graphsurgeon.data.errors import DataError
from graphsurgeon.data.npy_layout import DenseNpyDataset
from graphsurgeon.data.tasks import TaskInfo, autoencoding_task, depth_task, edge_task, normal_task, segmentation_task

CITYSCAPES_CLASS_COUNTS: tuple[int, ...] = (7, 19)
CITYSCAPES_DEFAULT_TASKS: tuple[str, ...] = ("segmentation", "depth")
CITYSCAPES_CAMERA = Camera(fx=2262.52, fy=2265.30, cx=1096.98, cy=513.137, height=1024, width=2048)
"""The left camera of a Cityscapes car at the full 2048×1024 frames (the values of its
camera files; cities differ by under 1%). The preprocessed release drops the per-image
files and resizes whole frames, so this camera, rescaled, stands for all of them."""
CITYSCAPES_HINT = ("download a preprocessed Cityscapes zip linked from the README of "
                   "https://github.com/lorenmt/mtan and unzip it so that root/train/image/0.npy exists.")


def cityscapes_tasks(num_classes: int = 7) -> dict[str, TaskInfo]:
    """TaskInfo of every Cityscapes task for the given segmentation granularity."""
    if num_classes not in CITYSCAPES_CLASS_COUNTS:
        raise DataError(f"Cityscapes(num_classes={num_classes!r}) is not available; "
                        f"use one of {list(CITYSCAPES_CLASS_COUNTS)}.")
    return {"segmentation": segmentation_task(num_classes), "depth": depth_task(), "normal": normal_task(),
            "edges": edge_task(), "autoencoding": autoencoding_task(3)}


def _label_folder(root: Path, split: str, num_classes: int) -> str:
    """`label_{n}` when the release has per-count folders, else the 7-class `label`."""
    if (root / split / f"label_{num_classes}").is_dir() or num_classes != 7:
        return f"label_{num_classes}"
    return "label"


class Cityscapes(DenseNpyDataset):
    """Cityscapes in the MTAN per-sample .npy layout (see `graphsurgeon.data.npy_layout`).

    Tasks: "segmentation" (`num_classes` 7 or 19), "depth" (inverse depth) and, on
    request, the derived "normal" (from depth and `CITYSCAPES_CAMERA`; `derived_normals`
    is True), "edges" (from the labels) and "autoencoding" (the image). `augment=True`
    turns on random scale-crop and flip (off by default).
    """

    def __init__(self, root: str | Path | None, split: str = "train", num_classes: int = 7,
                 tasks: Iterable[str] | None = None, augment: bool = False) -> None:
        task_info = cityscapes_tasks(num_classes)
        label = _label_folder(Path(root).expanduser(), split, num_classes) if root is not None else "label"
        self.num_classes = num_classes
        super().__init__(dataset="Cityscapes", hint=CITYSCAPES_HINT, root=root, split=split,
                         tasks=tasks, default_tasks=CITYSCAPES_DEFAULT_TASKS, task_info=task_info,
                         folders={"image": "image", "segmentation": label, "depth": "depth"},
                         augment=augment, inverse_depth=True, camera=CITYSCAPES_CAMERA)
