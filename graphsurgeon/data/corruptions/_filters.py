"""Building blocks the corruptions share: seeded draws, blurs, kernels, zooms.

Everything works on float batches (B, C, H, W) of any size, also smaller than a kernel,
because borders are padded by replication (reflection needs the pad to be smaller than
the image). Random draws come only from the `torch.Generator` passed in, on that
generator's device, so a seeded CPU generator reproduces a GPU batch's corruption too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_SIZE = 224
"""The image side ImageNet-C's parameters were chosen for; lengths in pixels are scaled
from it to the batch's shorter side (see `pixel_scale`)."""


def pixel_scale(images: Tensor) -> float:
    """How many of this batch's pixels one ImageNet-C pixel is: min(H, W) / 224.

    Blur radii and displacements are given in pixels of 224×224 images; scaling them keeps
    a corruption the same *relative to the image*, so a 36×36 digit is not wiped out by a
    20-pixel motion blur and a 288×384 NYUv2 frame is not barely touched by it.
    """
    return min(images.shape[-2:]) / REFERENCE_SIZE


def _draw_device(images: Tensor, generator: torch.Generator | None) -> torch.device:
    return images.device if generator is None else generator.device


def rand(shape: tuple[int, ...], images: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) draws of `shape`, on `images`' device and dtype."""
    out = torch.rand(shape, generator=generator, dtype=images.dtype, device=_draw_device(images, generator))
    return out.to(images.device)


def randn(shape: tuple[int, ...], images: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, 1) draws of `shape`, on `images`' device and dtype."""
    out = torch.randn(shape, generator=generator, dtype=images.dtype, device=_draw_device(images, generator))
    return out.to(images.device)


def poisson(rates: Tensor, generator: torch.Generator | None) -> Tensor:
    """Poisson draws with the given rates, on the rates' device."""
    return torch.poisson(rates.to(_draw_device(rates, generator)), generator=generator).to(rates.device)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with standard deviation `sigma` pixels (identity for sigma <= 0)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    b, c, h, w = x.shape
    flat = x.reshape(b * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(b, c, h, w)


def filter2d(x: Tensor, kernels: Tensor) -> Tensor:
    """Convolve each image of `x` (B, C, H, W) with its own odd-sized kernel (B, k, k).

    One kernel per image (e.g. a motion blur at a random angle), applied to all its
    channels, as a grouped convolution; a (1, k, k) kernel is shared by the whole batch.
    """
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    r = k // 2
    # a grouped convolution, also for one shared kernel: on CPU it beats a batch of 1-channel images
    weight = kernels.expand(b, k, k).repeat_interleave(c, dim=0)[:, None].to(x.dtype)
    padded = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def disk_kernel(radius: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A normalised disk of `radius` pixels (1, k, k) with a one-pixel soft rim.

    The rim (weight falling linearly from 1 at `radius` to 0 at `radius + 1`) makes the
    blur grow continuously with the radius, so fractional radii (after `pixel_scale`)
    still differ and severity 1 on a small image is not the identity.
    """
    r = max(1, math.ceil(radius + 1))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    distance = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    disk = (radius + 1 - distance).clamp(0, 1)
    return (disk / disk.sum())[None]


def line_kernels(length: float, sigma: float, angles_deg: Tensor) -> Tensor:
    """Motion-blur kernels (B, k, k): a one-sided line of `length` pixels from the centre
    at each angle, weighted by a Gaussian of `sigma` pixels along it (the camera moved
    during the exposure, mostly at its start). Points along the line are splatted
    bilinearly, so fractional lengths and any angle give smooth kernels."""
    r = max(1, math.ceil(length) + 1)
    device, dtype = angles_deg.device, angles_deg.dtype
    t = torch.linspace(0, length, max(2, math.ceil(4 * length) + 1), dtype=dtype, device=device)
    weights = torch.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    theta = torch.deg2rad(angles_deg)[:, None]
    px, py = t * torch.cos(theta), -t * torch.sin(theta)  # image y points down
    grid = torch.arange(-r, r + 1, dtype=dtype, device=device)
    tent_x = (1 - (grid[None, None, :] - px[..., None]).abs()).clamp_min(0)  # (B, n, k)
    tent_y = (1 - (grid[None, None, :] - py[..., None]).abs()).clamp_min(0)
    kernels = torch.einsum("n,bny,bnx->byx", weights, tent_y, tent_x)
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the image centre by `factor` >= 1, keeping the size (bilinear)."""
    if factor == 1:
        return x
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x: Tensor) -> Tensor:
    """Luminance (B, 1, H, W): ITU-R 601 weights for RGB, the channel mean otherwise."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def fractal_noise(shape: tuple[int, int, int], images: Tensor, generator: torch.Generator | None,
                  decay: float, coarsest: int = 2) -> Tensor:
    """Multi-octave value noise (B, 1, H, W) rescaled to [0, 1] per image.

    Octave k is uniform noise on a grid of `coarsest`·2^k cells, bilinearly upsampled,
    with amplitude decay^-k; octaves stop at the pixel grid. A larger `decay` keeps less
    fine detail (smoother clouds), as the "wibble decay" of a diamond-square plasma does.
    """
    b, h, w = shape
    out = torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device)
    cells, amplitude = coarsest, 1.0
    while True:
        gh, gw = min(cells, h), min(cells, w)
        noise = rand((b, 1, gh, gw), images, generator) - 0.5
        out = out + amplitude * F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
        if gh == h and gw == w:
            break
        cells, amplitude = cells * 2, amplitude / decay
    low = out.amin(dim=(2, 3), keepdim=True)
    high = out.amax(dim=(2, 3), keepdim=True)
    return (out - low) / (high - low).clamp_min(1e-12)


def displace(x: Tensor, offset: Tensor) -> Tensor:
    """Sample every pixel of `x` (B, C, H, W) from itself plus `offset` (B, H, W, 2) pixels
    (x, y order), bilinearly; samples beyond the border take the border's value."""
    h, w = x.shape[-2:]
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, dtype=x.dtype, device=x.device)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)], dim=-1)
    scale = torch.tensor([2 / w, 2 / h], dtype=x.dtype, device=x.device)
    return F.grid_sample(x, grid + offset * scale, mode="bilinear", padding_mode="border", align_corners=False)
