"""ImageNet-C's blur family: defocus, glass, motion and zoom blur.

Radii, blur widths and displacements are ImageNet-C's (pixels of a 224×224 image),
scaled to the batch by `pixel_scale`; zoom factors are relative and used as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphsurgeon.data.corruptions._filters import (
    disk_kernel,
    displace,
    filter2d,
    gaussian_blur,
    line_kernels,
    pixel_scale,
    rand,
    zoom,
)

DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias σ
GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # σ, max shift, iterations
MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # line length, σ along it
MOTION_ANGLE = (-45.0, 45.0)
ZOOM = ((0.01, 1.10), (0.01, 1.15), (0.02, 1.20), (0.02, 1.24), (0.03, 1.30))  # step, largest zoom


def defocus_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """An out-of-focus lens: convolution with a disk, then a slight Gaussian (anti-aliasing)."""
    radius, alias = DEFOCUS[severity - 1]
    s = pixel_scale(images)
    out = filter2d(images, disk_kernel(radius * s, images.dtype, images.device))
    return gaussian_blur(out, alias * s)


def glass_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Frosted glass: blur, move every pixel a random distance, repeat, blur again.

    ImageNet-C swaps each pixel with a random neighbour up to `shift` whole pixels away, in
    a sequential loop. Here every pixel samples (bilinearly) a point displaced by a uniform
    draw from [-shift, shift]² at once: batched, and after `pixel_scale` the shifts may be
    fractional, so small images still get a shift that grows with severity (the spread after
    all passes, shift·√iterations, grows at every severity; whole-pixel shifts rounded up to
    1 would not).
    """
    sigma, shift, iterations = GLASS[severity - 1]
    s = pixel_scale(images)
    b, _, h, w = images.shape
    out = gaussian_blur(images, sigma * s)
    for _ in range(iterations):
        offset = shift * s * (2 * rand((b, h, w, 2), images, generator) - 1)
        out = displace(out, offset)
    return gaussian_blur(out, sigma * s)


def motion_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Camera shake: a one-sided line blur at an angle drawn per image from [-45°, 45°]."""
    length, sigma = MOTION[severity - 1]
    s = pixel_scale(images)
    low, high = MOTION_ANGLE
    angles = low + (high - low) * rand((images.shape[0],), images, generator)
    return filter2d(images, line_kernels(length * s, sigma * s, angles))


def zoom_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Zooming during the exposure: the mean of the image and its centre zooms 1, 1+step, ... ."""
    step, largest = ZOOM[severity - 1]
    factors = [1 + step * k for k in range(round((largest - 1) / step) + 1)]
    total = images.clone()
    for factor in factors:
        total += zoom(images, factor)
    return total / (len(factors) + 1)
