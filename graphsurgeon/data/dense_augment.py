"""Random scale-crop and horizontal flip applied consistently to an image and its dense targets.

The preprocessed NYUv2/Cityscapes releases are small (795 and 2,975 training images),
so recent multi-task benchmarks train with these two augmentations; the original MTAN
paper did not, which is why the loaders leave them off by default.

Randomness comes from torch's global generator, so `torch.manual_seed` makes a run
reproducible and DataLoader workers (which reseed torch per worker) draw different crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.data.errors import DataError

SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)


def _crop_resize(x: Tensor, top: int, left: int, h: int, w: int, size: tuple[int, int],
                 mode: str) -> Tensor:
    crop = x[None, ..., top:top + h, left:left + w].float()
    if mode == "nearest":
        return F.interpolate(crop, size=size, mode="nearest")[0]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0]


def scale_crop_flip(image: Tensor, targets: dict[str, Tensor], inverse_depth: bool,
                    scales: tuple[float, ...] = SCALES) -> tuple[Tensor, dict[str, Tensor]]:
    """Zoom into a random crop (by a factor drawn from `scales`), then flip with p = 0.5.

    `image` is (C, H, W); `targets` may hold "segmentation" (H, W) int64, "depth"
    (1, H, W) and "normal" (3, H, W). Labels, depth and normals are resampled with
    nearest neighbour so class ids, invalid-depth zeros and unit normals survive.
    Zooming in by `s` brings the scene `s` times closer, so depth is divided by `s`
    (inverse depth, as in Cityscapes, is multiplied); a flip negates the normals' x.
    """
    height, width = image.shape[-2:]
    scale = scales[int(torch.randint(len(scales), ()))]
    h, w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - h + 1, ()))
    left = int(torch.randint(width - w + 1, ()))
    flip = bool(torch.rand(()) < 0.5)

    def warp(x: Tensor, mode: str) -> Tensor:
        out = _crop_resize(x, top, left, h, w, (height, width), mode)
        return out.flip(-1) if flip else out

    image = warp(image, "bilinear")
    out: dict[str, Tensor] = {}
    for task, target in targets.items():
        if task == "segmentation":
            out[task] = warp(target[None], "nearest")[0].long()
        elif task == "depth":
            depth = warp(target, "nearest")
            out[task] = depth * scale if inverse_depth else depth / scale
        elif task == "normal":
            normal = warp(target, "nearest")
            if flip:
                normal[0] = -normal[0]
            out[task] = normal
        else:
            raise DataError(f"scale_crop_flip got target {task!r}; it can warp only "
                            "'segmentation', 'depth' and 'normal', so derive others afterwards.")
    return image, out
