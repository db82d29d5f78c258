"""ImageNet-C's digital family: contrast, elastic transform, pixelate, JPEG compression.

Contrast, pixelate and JPEG use ImageNet-C's parameters (they are relative to the image).
The elastic transform is re-parameterised so that it grows with severity (see there).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from graphsurgeon.data.corruptions._filters import displace, gaussian_blur, rand

CONTRAST_KEEP = (0.4, 0.3, 0.2, 0.1, 0.05)
ELASTIC_SHIFT = (0.01, 0.02, 0.035, 0.05, 0.07)  # largest displacement, share of the shorter side
ELASTIC_SMOOTHNESS = 0.08  # σ of the displacement field, share of the shorter side
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)


def contrast(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Keep a fraction c of each value's distance to its channel's mean over the image."""
    keep = CONTRAST_KEEP[severity - 1]
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (images - mean) * keep + mean


def elastic_transform(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Warp by a smooth random displacement field (a rubber-sheet distortion).

    The field is uniform noise blurred with σ = 8% of the shorter side and scaled so its
    largest displacement is the severity's share of that side. ImageNet-C also applies a
    random affine map and its settings make severities 1-2 distort more than 3
    (its field is smoother there); here one field shape serves all severities and only
    its amplitude grows, so a higher severity always distorts more.
    """
    b, _, h, w = images.shape
    side = min(h, w)
    field = gaussian_blur(2 * rand((b, 2, h, w), images, generator) - 1, ELASTIC_SMOOTHNESS * side)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    shift = ELASTIC_SHIFT[severity - 1] * side * field  # pixels; channel 0 = x, 1 = y
    return displace(images, shift.permute(0, 2, 3, 1))


def _cell_means(n: int, cells: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, n) matrix that replaces each of n samples by the mean of its cell, when the n
    samples are cut into `cells` consecutive cells (sample i is in cell i·cells // n)."""
    cell = torch.arange(n, device=device) * cells // n
    same = (cell[:, None] == cell[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def pixelate(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Shrink by factor f and enlarge back: every pixel becomes the mean of its block.

    The image is cut into round(f·H) × round(f·W) blocks, and the blocks are exactly the
    pixels that enlarge back from one small pixel. (A box-filter resize followed by a
    nearest-neighbour one pairs pixels with overlapping boxes for fractional f, which
    adds a shift that can make a milder setting look worse.)
    """
    factor = PIXELATE_FACTOR[severity - 1]
    h, w = images.shape[-2:]
    rows = _cell_means(h, max(1, round(h * factor)), images.dtype, images.device)
    cols = _cell_means(w, max(1, round(w * factor)), images.dtype, images.device)
    return rows @ images @ cols.T


def _jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encode one uint8 image (H, W) or (H, W, 3) as a JPEG at `quality` and decode it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded)


def jpeg_compression(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """A real JPEG round trip at quality q (Pillow's libjpeg, as ImageNet-C), on 8-bit values.

    Images with 3 channels are coded as colour JPEGs (with JPEG's YCbCr conversion and
    chroma subsampling), others channel by channel as greyscale JPEGs.
    """
    quality = JPEG_QUALITY[severity - 1]
    b, c, h, w = images.shape
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    if c == 3:
        coded = [_jpeg_round_trip(p.permute(1, 2, 0).numpy(), quality) for p in pixels]
        out = torch.from_numpy(np.stack(coded)).permute(0, 3, 1, 2)
    else:
        coded = [_jpeg_round_trip(p.numpy(), quality) for p in pixels.reshape(b * c, h, w)]
        out = torch.from_numpy(np.stack(coded)).reshape(b, c, h, w)
    return out.to(device=images.device, dtype=images.dtype) / 255
