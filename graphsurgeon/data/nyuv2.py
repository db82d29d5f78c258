"""NYUv2 (13-class segmentation, depth, surface normals) from the MTAN preprocessed release.

Download: the NYUv2 link in the README of https://github.com/lorenmt/mtan (the same
files LibMTL's NYUv2 example uses): 795 train / 654 val images of 288×384, with
13-class labels (-1 = unlabelled), depth in metres (0 = missing) and unit normals.
Semantic edges and auto-encoding, the MTSL paper's other two tasks, are derived.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from graphsurgeon.data.dense_targets import Camera
from graphsurgeon.data.npy_layout import DenseNpyDataset
from graphsurgeon.data.tasks import TaskInfo, autoencoding_task, depth_task, edge_task, normal_task, segmentation_task

NYUV2_CLASSES = 13
NYUV2_TASKS: dict[str, TaskInfo] = {
    "segmentation": segmentation_task(NYUV2_CLASSES),
    "depth": depth_task(),
    "normal": normal_task(),
    "edges": edge_task(),
    "autoencoding": autoencoding_task(3),
}
NYUV2_CAMERA = Camera(fx=518.858, fy=519.470, cx=325.582, cy=253.736, height=480, width=640)
"""The Kinect's colour camera (NYU Depth V2 toolbox calibration) at its 640×480 frames: the
labelled depth maps are registered to it. Used only to derive normals from depth when a
copy has no normal/ folder (the MTSL code uses the depth camera's, fx ≈ 582.6, instead)."""
NYUV2_DEFAULT_TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
NYUV2_HINT = ("download the preprocessed NYUv2 zip linked from the README of "
              "https://github.com/lorenmt/mtan and unzip it so that root/train/image/0.npy exists.")
_FOLDERS = {"image": "image", "segmentation": "label", "depth": "depth", "normal": "normal"}


class NYUv2(DenseNpyDataset):
    """NYUv2 in the MTAN per-sample .npy layout (see `graphsurgeon.data.npy_layout`).

    Tasks: "segmentation" (13 classes), "depth", "normal" and, on request, "edges"
    (derived from the labels) and "autoencoding" (the image). If a copy lacks the
    normal/ folder, normals are derived from depth and `NYUV2_CAMERA` instead
    (`derived_normals` is then True). `augment=True` turns on
    random scale-crop and flip; it is off by default, as in the MTAN paper.
    """

    def __init__(self, root: str | Path | None, split: str = "train",
                 tasks: Iterable[str] | None = None, augment: bool = False) -> None:
        super().__init__(dataset="NYUv2", hint=NYUV2_HINT, root=root, split=split, tasks=tasks,
                         default_tasks=NYUV2_DEFAULT_TASKS, task_info=NYUV2_TASKS,
                         folders=_FOLDERS, augment=augment, inverse_depth=False, camera=NYUV2_CAMERA)
