"""Shared reader for the per-sample .npy releases of NYUv2 and Cityscapes (MTAN / LibMTL).

The layout, as the MTAN and LibMTL loaders read it::

    root/{train,val}/image/{i}.npy    float (H, W, 3), values in [0, 1]
    root/{train,val}/label/{i}.npy    float (H, W), class ids, -1 = unlabelled
    root/{train,val}/depth/{i}.npy    float (H, W, 1), <= 0 = no measurement
    root/{train,val}/normal/{i}.npy   float (H, W, 3), unit vectors (NYUv2 only)

with i = 0 .. N-1. Targets the release lacks are derived per item: "edges" from the
labels, "normal" from depth and the dataset's camera (when there is no normal/ folder),
"autoencoding" is the image itself. There is no test folder: papers using these releases report on `val`.
Every file a split needs is checked when the dataset is built, so a half-extracted
download fails at once with the missing path rather than mid-epoch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from graphsurgeon.data.dense_augment import scale_crop_flip
from graphsurgeon.data.dense_targets import Camera, depth_from_inverse, edges_from_labels, normals_from_depth
from graphsurgeon.data.errors import DataError, SampleIndexError
from graphsurgeon.data.tasks import TaskInfo

SPLITS: tuple[str, ...] = ("train", "val")


def _count_samples(folder: Path, dataset: str) -> int:
    names = sorted(p.stem for p in folder.glob("*.npy"))
    if not names or not all(n.isdigit() for n in names):
        raise DataError(f"{dataset}: {folder} holds no files named 0.npy, 1.npy, ...; point root "
                        "at the unzipped release (the folder that contains train/ and val/).")
    indices = sorted(int(n) for n in names)
    missing = sorted(set(range(len(indices))) - set(indices))
    if missing:
        raise DataError(f"{dataset}: {folder / f'{missing[0]}.npy'} is missing (files must be "
                        "numbered 0..N-1); re-extract the release.")
    return len(indices)


class DenseNpyDataset(Dataset):
    """Base of `NYUv2` and `Cityscapes`: validates the layout and builds targets per item.

    Items are `(image, targets)`: image float32 (3, H, W); "segmentation" and "edges"
    int64 (H, W) with -1 = unlabelled; "depth" float32 (1, H, W); "normal" float32
    (3, H, W); "autoencoding" float32 (3, H, W), a copy of the image (after augmentation,
    so the target is always the network's input). Subclasses say which tasks exist, which
    folder each stored target is in, and the camera the frames were taken with.
    `derived_normals` is True when "normal" was requested but the release has no
    normal/ folder, so normals are computed from depth and `camera` (see
    `normals_from_depth`); inverse depth is inverted first.
    """

    def __init__(self, *, dataset: str, hint: str, root: str | Path | None, split: str,
                 tasks: Iterable[str] | None, default_tasks: Iterable[str],
                 task_info: Mapping[str, TaskInfo], folders: Mapping[str, str],
                 augment: bool, inverse_depth: bool, camera: Camera) -> None:
        if root is None:
            raise DataError(f"{dataset} needs root= the folder of its preprocessed release; {hint}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{dataset}: root {self.root} does not exist; {hint}")
        if split not in SPLITS:
            raise DataError(f"{dataset}(split={split!r}) is unknown; use 'train' or 'val' "
                            "(the release has no test folder; papers report on 'val').")
        names = list(default_tasks) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
        if not names or any(t not in task_info for t in names) or len(set(names)) != len(names):
            raise DataError(f"{dataset}(tasks={names!r}) must name distinct tasks from "
                            f"{list(task_info)}; pass None for {list(default_tasks)}.")
        self.dataset = dataset
        self.split = split
        self.augment = augment
        self.inverse_depth = inverse_depth
        self.camera = camera
        self.task_info: dict[str, TaskInfo] = {t: task_info[t] for t in names}
        self._folders = self._resolve_folders(names, folders)
        self.derived_normals = "normal" in names and "normal" not in self._folders
        self._split_dir = self.root / split
        self._length = self._check_files(hint)

    def _resolve_folders(self, names: list[str], folders: Mapping[str, str]) -> dict[str, str]:
        """Map each *stored* target this item needs ("segmentation", ...) to its folder."""
        stored = {"image"}  # also the auto-encoding target
        for task in names:
            if task == "edges":
                stored.add("segmentation")
            elif task == "normal" and ("normal" not in folders or not (self.root / self.split / folders["normal"]).is_dir()):
                stored.add("depth")  # no released normals: derive them from depth
            elif task != "autoencoding":
                stored.add(task)
        return {s: folders[s] for s in sorted(stored)}

    def _check_files(self, hint: str) -> int:
        image_dir = self._split_dir / self._folders["image"]
        if not image_dir.is_dir():
            raise DataError(f"{self.dataset}: {image_dir} does not exist; {hint}")
        n = _count_samples(image_dir, self.dataset)
        for folder in self._folders.values():
            directory = self._split_dir / folder
            if not directory.is_dir():
                raise DataError(f"{self.dataset}: {directory} does not exist but the requested "
                                f"tasks need it; drop those tasks or {hint}")
            for i in range(n):
                if not (directory / f"{i}.npy").is_file():
                    raise DataError(f"{self.dataset}: {directory / f'{i}.npy'} is missing while "
                                    f"{image_dir / f'{i}.npy'} exists; re-extract the release.")
        return n

    def __len__(self) -> int:
        return self._length

    def _load(self, stored: str, index: int) -> np.ndarray:
        return np.load(self._split_dir / self._folders[stored] / f"{index}.npy")

    def _load_channels_first(self, stored: str, index: int, channels: int) -> Tensor:
        array = self._load(stored, index)
        if array.ndim == 2 and channels == 1:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] != channels:
            path = self._split_dir / self._folders[stored] / f"{index}.npy"
            raise DataError(f"{self.dataset}: {path} has shape {array.shape}, expected "
                            f"(H, W, {channels}); the file is not from the expected release.")
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))

    def _derive_normals(self, depth: Tensor) -> Tensor:
        """Normals of the unaugmented frame: the crop and zoom that augmentation applies
        afterwards change the camera's intrinsics, not the surfaces' directions."""
        metric = depth_from_inverse(depth) if self.inverse_depth else depth
        return normals_from_depth(metric, self.camera.at(*depth.shape[-2:]))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self._length:
            raise SampleIndexError(f"{self.dataset} index {index} out of range for {self._length} samples; "
                                   f"pass 0 <= index < len(dataset) = {self._length}.")
        image = self._load_channels_first("image", index, 3)
        stored: dict[str, Tensor] = {}
        if "segmentation" in self._folders:
            stored["segmentation"] = torch.from_numpy(self._load("segmentation", index)).long()
        if "depth" in self._folders:
            stored["depth"] = self._load_channels_first("depth", index, 1)
        if "normal" in self.task_info:
            stored["normal"] = (self._load_channels_first("normal", index, 3) if "normal" in self._folders
                                else self._derive_normals(stored["depth"]))
        if self.augment:
            image, stored = scale_crop_flip(image, stored, inverse_depth=self.inverse_depth)
        if "edges" in self.task_info:
            stored["edges"] = edges_from_labels(stored["segmentation"])
        if "autoencoding" in self.task_info:
            stored["autoencoding"] = image.clone()
        return image, {task: stored[task] for task in self.task_info}
