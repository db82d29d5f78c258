"""ImageNet-C's weather family: snow, frost, fog and brightness.

Snow and fog follow ImageNet-C's recipes with its parameters (snow's motion blur scaled
by `pixel_scale`). Frost blends in photographs of frost in ImageNet-C; those images are
not shipped here, so a frost-like texture is synthesised instead (see `frost_texture`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphsurgeon.data.corruptions._filters import (
    filter2d,
    fractal_noise,
    grey,
    line_kernels,
    pixel_scale,
    rand,
    randn,
    zoom,
)

# mean, std of the flake noise, zoom, threshold, motion length, motion σ, image kept
SNOW = ((0.1, 0.3, 3.0, 0.5, 10, 4, 0.8), (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4.0, 0.85, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
SNOW_ANGLE = (-135.0, -45.0)
FROST_OPACITY = (0.45, 0.6, 0.7, 0.8, 0.9)
FROST_TINT = (0.86, 0.93, 1.0)  # RGB: frost is a little blue
FOG_STRENGTH = (1.5, 2.0, 2.5, 2.75, 3.0)
FOG_DECAY = 1.7  # octave amplitude ratio of the fog cloud
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)


def snow(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Falling snow: thresholded, zoomed noise as flakes, streaked by a motion blur at an
    angle from [-135°, -45°], added twice (once upside down) over a whitened image.

    ImageNet-C's parameters, but for severity 3's flake threshold: 0.85, not 0.9. At 0.9
    its zoomed flakes cover less of the image than severity 2's, and it changes images less.
    """
    mean, std, factor, threshold, length, sigma, keep = SNOW[severity - 1]
    b, _, h, w = images.shape
    flakes = zoom(mean + std * randn((b, 1, h, w), images, generator), factor)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    low, high = SNOW_ANGLE
    angles = low + (high - low) * rand((b,), images, generator)
    s = pixel_scale(images)
    flakes = filter2d(flakes, line_kernels(length * s, sigma * s, angles))
    whitened = keep * images + (1 - keep) * torch.maximum(images, grey(images) * 1.5 + 0.5)
    return whitened + flakes + flakes.flip(-1, -2)


def frost_texture(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """A frost-like layer (B, C, H, W) in [0, 1], drawn from `generator`.

    Ridged fractal noise: where multi-octave noise crosses its middle value the layer is
    bright, which gives thin branching veins like ice crystals on a window, over a milky
    haze (0.35 to 0.65) made of the plain noise. RGB layers are tinted
    slightly blue. It imitates the look of ImageNet-C's frost photographs (bright, fine
    structure over the whole image), not their statistics: scores under this frost are
    comparable between models here, not with published ImageNet-C numbers.
    """
    b, c, h, w = images.shape
    noise = fractal_noise((b, h, w), images, generator, decay=1.6, coarsest=3)
    veins = (1 - (2 * noise - 1).abs()) ** 6
    layer = (0.35 + 0.3 * noise + 0.6 * veins).clamp(0, 1)
    if c == 3:
        return layer * torch.tensor(FROST_TINT, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return layer.expand(b, c, h, w)


def frost(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Frost on the lens: screen-blend a frost layer f over the image with opacity a,
    x + a·f·(1 - x).

    ImageNet-C adds the frost photograph to a dimmed image, k·x + a·f, with k falling and
    a rising over the severities; for bright images that changes them *less* at some higher
    severities (the dimming cancels the added frost). The screen blend brightens like
    frost, changes every pixel by a·f·(1 - x), and so changes it more at every higher
    opacity. At the highest severity a dark pixel under bright frost keeps 1 - 0.9·f of
    itself, near ImageNet-C's 0.6.
    """
    opacity = FROST_OPACITY[severity - 1]
    return images + opacity * frost_texture(images, generator) * (1 - images)


def fog(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Fog: add a cloudy fractal layer c, then rescale so the brightest value M stays in place.

    A pixel moves by s·(c·M - x) / (M + s), further at every larger fog strength s as long
    as the cloud is the same. ImageNet-C also makes the cloud patchier at higher severities
    (its "wibble decay" falls from 2 to 1.4, and severity 4 repeats severity 3's strength),
    which can make a higher severity change an image less; here the cloud's decay is fixed
    at 1.7 and the strength grows, 2.75 at severity 4.
    """
    strength = FOG_STRENGTH[severity - 1]
    b, _, h, w = images.shape
    brightest = images.amax(dim=(1, 2, 3), keepdim=True)
    cloud = fractal_noise((b, h, w), images, generator, decay=FOG_DECAY)
    return (images + strength * cloud) * brightest / (brightest + strength)


def brightness(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Over-exposure: add b to the HSV value (the channel maximum), keeping hue and saturation.

    With hue and saturation fixed, a pixel's channels are proportional to its value, so
    they are all scaled by new/old value; black pixels (no hue) become grey b.
    """
    shift = BRIGHTNESS_SHIFT[severity - 1]
    value = images.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(max=1)
    ratio = brighter / value.clamp_min(1e-12)
    return torch.where(value > 0, images * ratio, brighter.expand_as(images))
