"""Common image corruptions at five severities, in torch, for robustness evaluation.

Use them to ask whether a shared trunk (or a task grouping) degrades more gracefully
than separate networks when inputs get noisy, blurry or washed out. Every corruption
takes and returns a float batch (B, C, H, W) in [0, 1] of the same shape and dtype;
random ones draw only from the `torch.Generator` they are given, so a seeded generator
reproduces a corrupted test set exactly. Parameters grow with severity 1..5:

================  ======================================  ==============================
name              what it does                            parameter at severity 1..5
================  ======================================  ==============================
gaussian_noise    add N(0, σ²) per value                  σ = .04 .08 .12 .18 .26
shot_noise        Poisson photon noise: Poisson(λx) / λ   λ = 60 25 12 5 3 (fewer photons)
impulse_noise     salt & pepper: set values to 0 or 1     fraction p = .01 .03 .06 .10 .16
gaussian_blur     separable Gaussian blur                 σ = .5 1 1.5 2 3 pixels
contrast          pull towards the image mean             keep c = .75 .5 .35 .2 .1
brightness        add a constant                          b = .1 .2 .3 .4 .5
pixelate          average over k×k blocks                 block k = 2 3 4 6 8 pixels
jpeg_like         8×8 block DCT, coefficient quantising   step q = .02 .04 .08 .15 .3
================  ======================================  ==============================

`jpeg_like` reproduces JPEG's blocking and ringing without being a JPEG codec: no
YCbCr conversion, no chroma subsampling and no entropy coding. Each channel is cut into
8×8 blocks, transformed by an orthonormal DCT-II, and coefficient (u, v) is rounded to
a multiple of q·(1 + u + v), so high frequencies are quantised harder, as JPEG's tables do.
Results are clamped to [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.data.errors import DataError

Corruption = Callable[[Tensor, int, torch.Generator | None], Tensor]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

GAUSSIAN_SIGMA = (0.04, 0.08, 0.12, 0.18, 0.26)
SHOT_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE_FRACTION = (0.01, 0.03, 0.06, 0.10, 0.16)
BLUR_SIGMA = (0.5, 1.0, 1.5, 2.0, 3.0)
CONTRAST_KEEP = (0.75, 0.5, 0.35, 0.2, 0.1)
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
PIXELATE_BLOCK = (2, 3, 4, 6, 8)
JPEG_STEP = (0.02, 0.04, 0.08, 0.15, 0.3)
JPEG_BLOCK = 8


def _random_device(images: Tensor, generator: torch.Generator | None) -> torch.device:
    """Where to draw random numbers: the generator's device, so a CPU generator (the
    usual seeded one) also works for GPU batches; results are moved back afterwards."""
    return images.device if generator is None else generator.device


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise (sensor read noise)."""
    sigma = GAUSSIAN_SIGMA[severity - 1]
    device = _random_device(images, generator)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=device)
    return (images + sigma * noise.to(images.device)).clamp(0, 1)


def shot_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Poisson noise: each value becomes a photon count at `λ` photons for full white."""
    photons = SHOT_PHOTONS[severity - 1]
    counts = torch.poisson(images.to(_random_device(images, generator)) * photons, generator=generator)
    return (counts.to(images.device) / photons).clamp(0, 1)


def impulse_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Salt & pepper: a fraction `p` of values becomes 0 or 1 (equally likely)."""
    fraction = IMPULSE_FRACTION[severity - 1]
    device = _random_device(images, generator)
    draw = torch.rand(images.shape, generator=generator, dtype=images.dtype, device=device).to(images.device)
    out = images.clone()
    out[draw < fraction / 2] = 0.0
    out[(draw >= fraction / 2) & (draw < fraction)] = 1.0
    return out


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur (an out-of-focus camera); image borders are padded by replication."""
    kernel = _gaussian_kernel(BLUR_SIGMA[severity - 1], images.dtype, images.device)
    b, c, h, w = images.shape
    r = len(kernel) // 2
    x = images.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w).clamp(0, 1)


def contrast(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Reduce contrast: keep a fraction `c` of each pixel's distance to the image mean."""
    keep = CONTRAST_KEEP[severity - 1]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * keep + mean).clamp(0, 1)


def brightness(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Brighten by adding `b`, saturating at white (over-exposure)."""
    return (images + BRIGHTNESS_SHIFT[severity - 1]).clamp(0, 1)


def pixelate(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each k×k block by its mean (low-resolution capture shown at full size).

    Whole-pixel blocks keep the severities nested in effect; a fractional resize
    factor would misalign blocks and can make a milder setting look worse.
    Blocks cut off by the image border average over the pixels they do cover, so on
    images smaller than about twice the block size the severities stop being ordered.
    """
    k = PIXELATE_BLOCK[severity - 1]
    h, w = images.shape[-2:]
    means = F.avg_pool2d(images, kernel_size=k, ceil_mode=True)
    return means.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)[..., :h, :w]


def _dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal DCT-II matrix D, so that D @ block @ D.T is the 2-D transform."""
    k = torch.arange(n, dtype=dtype, device=device)
    basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis


def jpeg_like(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Blockwise DCT quantisation: JPEG-style blocking and ringing (see module docstring)."""
    n = JPEG_BLOCK
    b, c, h, w = images.shape
    pad_h, pad_w = (-h) % n, (-w) % n
    x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
    hh, ww = x.shape[-2:]
    blocks = x.reshape(b, c, hh // n, n, ww // n, n).transpose(3, 4)  # (..., n, n) blocks
    dct = _dct_matrix(n, images.dtype, images.device)
    freq = torch.arange(n, dtype=images.dtype, device=images.device)
    step = JPEG_STEP[severity - 1] * (1 + freq[:, None] + freq[None, :])
    coeffs = torch.round(dct @ blocks @ dct.T / step) * step
    restored = (dct.T @ coeffs @ dct).transpose(3, 4).reshape(b, c, hh, ww)
    return restored[..., :h, :w].clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_like": jpeg_like,
}


def corrupt(images: Tensor, name: str, severity: int,
            generator: torch.Generator | None = None) -> Tensor:
    """Apply corruption `name` at `severity` (1..5) to a (B, C, H, W) batch in [0, 1].

    Computation runs in float32 for half-precision inputs and the result is cast back,
    so the output has the input's shape, dtype and device.
    """
    if name not in CORRUPTIONS:
        raise DataError(f"corruption {name!r} is unknown; use one of {sorted(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise DataError(f"corrupt(severity={severity!r}) is invalid; use an int from 1 to 5.")
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"corrupt(images=...) got {shape}; pass a float tensor (B, C, H, W) in [0, 1].")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError("corrupt(images=...) has values outside [0, 1]; rescale the batch "
                        "(e.g. undo mean/std normalisation) before corrupting it.")
    work = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    return CORRUPTIONS[name](work, severity, generator).to(images.dtype)
