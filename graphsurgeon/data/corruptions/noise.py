"""ImageNet-C's noise family: sensor read noise, photon noise, salt & pepper.

These act per value and have no length scale, so ImageNet-C's parameters are used as
they are, whatever the image size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphsurgeon.data.corruptions._filters import poisson, rand, randn

GAUSSIAN_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE_FRACTION = (0.03, 0.06, 0.09, 0.17, 0.27)


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Add N(0, σ²) to every value (sensor read noise)."""
    return images + GAUSSIAN_SIGMA[severity - 1] * randn(tuple(images.shape), images, generator)


def shot_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Poisson(λx) / λ: photon counting at λ photons for full white (fewer = noisier)."""
    photons = SHOT_PHOTONS[severity - 1]
    return poisson(images * photons, generator) / photons


def impulse_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Salt & pepper: a fraction p of the values becomes 0 or 1, equally likely."""
    fraction = IMPULSE_FRACTION[severity - 1]
    draw = rand(tuple(images.shape), images, generator)
    out = images.clone()
    out[draw < fraction / 2] = 0.0
    out[(draw >= fraction / 2) & (draw < fraction)] = 1.0
    return out
