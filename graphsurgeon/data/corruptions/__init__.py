"""The 15 ImageNet-C corruptions at five severities, in torch, for robustness evaluation.

Use them to ask whether a shared trunk (or a task grouping) degrades more gracefully than
separate networks when inputs get noisy, blurry, snowed-on or compressed: the MTSL paper
evaluates its networks on exactly this set (Hendrycks & Dietterich, ICLR 2019). Every
corruption takes a float batch (B, C, H, W) in [0, 1] of any size and channel count and
returns one of the same shape and dtype in [0, 1]. Random ones draw only from the
`torch.Generator` they are given, so a seeded generator reproduces a corrupted test set.

=================  ==========  =============================================================
name               family      how it follows ImageNet-C
=================  ==========  =============================================================
gaussian_noise     noise       its recipe and parameters
shot_noise         noise       its recipe and parameters
impulse_noise      noise       its recipe and parameters
defocus_blur       blur        its recipe; radii scaled to the image (`pixel_scale`)
glass_blur         blur        local shuffle done as one random gather per pass; scaled
motion_blur        blur        one-sided Gaussian-weighted line kernel; scaled
zoom_blur          blur        its recipe and zoom factors
snow               weather     its recipe and parameters; motion streaks scaled
frost              weather     its blend weights, with a synthesised frost texture
fog                weather     octave value noise in place of diamond-square plasma
brightness         weather     its recipe (HSV value + b) and parameters
contrast           digital     its recipe and parameters
elastic_transform  digital     own parameters: one smooth field, growing amplitude
pixelate           digital     its shrink factors (box down, nearest up)
jpeg_compression   digital     a real JPEG round trip (Pillow, as ImageNet-C) at its qualities
=================  ==========  =============================================================

The parameters of each live beside it in `noise`, `blur`, `weather` and `digital`, and
docs/datasets.md says why each deviation was made. "Scaled": ImageNet-C gives lengths in
pixels of 224×224 images; they are multiplied by min(H, W) / 224, so a corruption looks
the same relative to the image at any resolution. The suite is tested to change images
more (mean absolute difference from the clean image) at every higher severity.

`backend="imagecorruptions"` runs the reference NumPy implementation instead (the
`imagecorruptions` package, installed separately; 3-channel uint8 images round trip,
so greyscale batches are repeated to RGB and averaged back, and its global NumPy random
state is seeded from `generator` and restored afterwards). Its last release (1.1.2)
imports `pkg_resources` (setuptools < 81), and its glass_blur and fog fail under NumPy 2 /
scikit-image >= 0.19; such a failure is a `DataError` that says so.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from graphsurgeon.data.corruptions.blur import defocus_blur, glass_blur, motion_blur, zoom_blur
from graphsurgeon.data.corruptions.digital import contrast, elastic_transform, jpeg_compression, pixelate
from graphsurgeon.data.corruptions.noise import gaussian_noise, impulse_noise, shot_noise
from graphsurgeon.data.corruptions.weather import brightness, fog, frost, snow
from graphsurgeon.data.errors import DataError

__all__ = ["BACKENDS", "CORRUPTIONS", "DEFAULT_CORRUPTIONS", "SEVERITIES", "corrupt", "corruption_plan", "resolve_corruptions"]

Corruption = Callable[[Tensor, int, torch.Generator | None], Tensor]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
BACKENDS: tuple[str, ...] = ("torch", "imagecorruptions")

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
"""ImageNet-C's 15 corruptions in its order (noise, blur, weather, digital)."""

DEFAULT_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "defocus_blur", "contrast")
"""What an experiment evaluates unless told otherwise: one cheap corruption of the noise,
blur and digital families, so a default run adds 9 evaluations (at severities 1, 3, 5),
not 75; pass "all" for the full suite."""


def resolve_corruptions(names: str | Sequence[str]) -> tuple[str, ...]:
    """Corruption names from a selection: "all" (the 15), "none" / "" (clean only), a
    comma-separated string or a sequence of names; unknown names are an error here, before
    any training, rather than at evaluation time."""
    if isinstance(names, str):
        if names.strip().lower() == "all":
            return tuple(CORRUPTIONS)
        names = [n for n in names.split(",") if n.strip().lower() not in ("", "none")]
    chosen = tuple(n.strip() for n in names)
    unknown = [n for n in chosen if n not in CORRUPTIONS]
    if unknown:
        raise DataError(f"corruption(s) {unknown} are unknown; use any of {list(CORRUPTIONS)}, 'all' or 'none'.")
    return chosen


def corruption_plan(names: str | Sequence[str], severities: Sequence[int], backend: str = "torch") -> list[tuple[str, int]]:
    """Every (corruption, severity) pair an evaluation will run, checked up front.

    An experiment calls this before it trains, so a misspelt name, a severity outside 1..5
    or a backend that is not installed fails in seconds, not after the training run.
    """
    chosen = resolve_corruptions(names)
    bad = [s for s in severities if isinstance(s, bool) or s not in SEVERITIES]
    if bad:
        raise DataError(f"severities {bad} are invalid; use ints from 1 to 5 (e.g. (1, 3, 5), or 1..5 for the full suite).")
    if backend not in BACKENDS:
        raise DataError(f"corruption backend {backend!r} is unknown; use one of {list(BACKENDS)}.")
    if backend == "imagecorruptions" and chosen:
        from graphsurgeon.optional import require

        require("imagecorruptions", "the corruption backend 'imagecorruptions'")
    return [(name, severity) for name in chosen for severity in severities]


def _imagecorruptions(images: Tensor, name: str, severity: int, generator: torch.Generator | None) -> Tensor:
    """The reference NumPy implementation on each image (see the module docstring)."""
    import numpy as np

    from graphsurgeon.optional import require

    library = require("imagecorruptions", f"corrupt(backend='imagecorruptions') for {name!r}")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise DataError(f"corrupt(backend='imagecorruptions') got {channels}-channel images; that backend "
                        "takes RGB or greyscale only, so use backend='torch' for other channel counts.")
    rgb = images.expand(-1, 3, -1, -1) if channels == 1 else images
    pixels = (rgb.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = [np.asarray(library.corrupt(p, corruption_name=name, severity=severity), dtype=np.float32) for p in pixels]
    except (TypeError, AttributeError, ValueError) as exc:  # its code against newer NumPy / scikit-image
        raise DataError(f"imagecorruptions failed on {name!r} ({type(exc).__name__}: {exc}); its last release predates "
                        "NumPy 2 and scikit-image 0.19 (glass_blur and fog fail there), so pin numpy<2 and "
                        "scikit-image<0.19 for it, or use backend='torch'.") from exc
    finally:
        np.random.set_state(state)
    result = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255
    if channels == 1:
        result = result.mean(dim=1, keepdim=True)
    return result.to(device=images.device, dtype=images.dtype)


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None,
            backend: str = "torch") -> Tensor:
    """Apply corruption `name` at `severity` (1..5) to a (B, C, H, W) batch in [0, 1].

    The result is clamped to [0, 1] and has the input's shape, dtype and device;
    half-precision batches are computed in float32. `backend` is "torch" (this package,
    no extra dependency) or "imagecorruptions" (the reference implementation, if installed).
    """
    if backend not in BACKENDS:
        raise DataError(f"corrupt(backend={backend!r}) is unknown; use one of {list(BACKENDS)}.")
    if name not in CORRUPTIONS:
        raise DataError(f"corruption {name!r} is unknown; use one of {list(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise DataError(f"corrupt(severity={severity!r}) is invalid; use an int from 1 to 5.")
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"corrupt(images=...) got {shape}; pass a float tensor (B, C, H, W) in [0, 1].")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError("corrupt(images=...) has values outside [0, 1]; rescale the batch "
                        "(e.g. undo mean/std normalisation) before corrupting it.")
    if backend == "imagecorruptions":
        return _imagecorruptions(images, name, severity, generator).clamp(0, 1)
    work = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    return CORRUPTIONS[name](work, severity, generator).clamp(0, 1).to(images.dtype)
