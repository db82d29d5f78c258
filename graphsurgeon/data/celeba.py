"""CelebA face attributes as binary classification tasks, read by torchvision's loader.

The data stays in torchvision's folder layout (what `CelebA(root, download=True)`
produces), so a copy torchvision already fetched works as is::

    root/celeba/img_align_celeba/000001.jpg ...
    root/celeba/list_attr_celeba.txt
    root/celeba/list_eval_partition.txt
    root/celeba/identity_CelebA.txt
    root/celeba/list_bbox_celeba.txt
    root/celeba/list_landmarks_align_celeba.txt

torchvision parses all five text files (even for attribute targets), so all five are
required. Its own integrity check compares each file's MD5 with the official release
and fails with a bare "Dataset not found or corrupted". We replace only that check
(`_check_integrity`) with a presence check that names the missing path; the parsing,
split selection and image loading remain torchvision's code. The price: a corrupted
text file is no longer caught by checksum, but it still fails to parse.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CelebA
from torchvision.transforms.functional import pil_to_tensor, resize

from graphsurgeon.data.errors import DataError
from graphsurgeon.data.tasks import TaskInfo, classification_task

CELEBA_FILES: tuple[str, ...] = ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt",
                                 "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_HINT = ("get CelebA (aligned & cropped JPEGs plus the Anno/ and Eval/ text files) from "
               "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into root/celeba/, or let "
               "torchvision.datasets.CelebA(root, download=True) fetch it once.")
_SPLITS = {"train": "train", "val": "valid", "test": "test"}


class _PresenceCheckedCelebA(CelebA):
    """torchvision's CelebA with the MD5 check replaced by `check_celeba_layout`."""

    def _check_integrity(self) -> bool:
        check_celeba_layout(Path(self.root))
        return True


def check_celeba_layout(root: Path) -> None:
    """Raise a DataError naming the first missing file or folder of the layout."""
    base = root / CelebA.base_folder
    for path in [base, base / CELEBA_IMAGE_DIR, *(base / name for name in CELEBA_FILES)]:
        if not path.exists():
            raise DataError(f"CelebA: {path} does not exist; {CELEBA_HINT}")


def _to_image_tensor(image: Image.Image, size: tuple[int, int] | None) -> Tensor:
    tensor = pil_to_tensor(image.convert("RGB")).float() / 255.0
    return tensor if size is None else resize(tensor, list(size), antialias=True).clamp(0, 1)


class CelebAAttributes(Dataset):
    """CelebA images with a chosen set of the 40 attributes, one binary task each.

    Items are `(image, targets)`: image float32 (3, H, W) in [0, 1] (178×218 as
    released, or `image_size` (h, w) if given); targets maps each attribute name as
    written in list_attr_celeba.txt (e.g. "Smiling") to an int64 0/1 scalar.
    `attributes=None` selects all 40. Splits are the official partition; "val" is
    CelebA's "valid".
    """

    def __init__(self, root: str | Path | None, split: str = "train",
                 attributes: Iterable[str] | None = None,
                 image_size: tuple[int, int] | None = None) -> None:
        if root is None:
            raise DataError(f"CelebA needs root= the folder that contains celeba/; {CELEBA_HINT}")
        if split not in _SPLITS:
            raise DataError(f"CelebA(split={split!r}) is unknown; use one of {list(_SPLITS)}.")
        root = Path(root).expanduser()
        check_celeba_layout(root)
        self._data = _PresenceCheckedCelebA(str(root), split=_SPLITS[split], target_type="attr",
                                            download=False)
        names = [name for name in self._data.attr_names if name]  # header may end in a space
        chosen = names if attributes is None else (
            [attributes] if isinstance(attributes, str) else list(attributes))
        unknown = [a for a in chosen if a not in names]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise DataError(f"CelebA(attributes={chosen!r}) must name distinct attributes of "
                            f"{root / CelebA.base_folder / CELEBA_FILES[0]}: {names}.")
        self.split = split
        self.image_size = image_size
        self.attributes = chosen
        self._columns = torch.tensor([names.index(a) for a in chosen])
        self.task_info: dict[str, TaskInfo] = {a: classification_task(2) for a in chosen}

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        try:
            image, attrs = self._data[index]
        except FileNotFoundError as err:
            raise DataError(f"CelebA: {err.filename} is listed in list_eval_partition.txt but "
                            f"missing; {CELEBA_HINT}") from err
        picked = attrs[self._columns].long()
        return (_to_image_tensor(image, self.image_size),
                {a: picked[i] for i, a in enumerate(self.attributes)})
