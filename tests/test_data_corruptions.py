"""The corruption suite: ordered severities, preserved shape/dtype/range, determinism."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon.data import CORRUPTIONS, DataError, MultiMNIST, corrupt
from graphsurgeon.data.corruptions import JPEG_STEP, SEVERITIES

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise"}


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    """A natural-ish colour batch and a MultiMNIST batch (mostly black, sparse ink)."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 8, 8, generator=g), size=(32, 32),
                                             mode="bilinear", align_corners=False)
    noisy = (0.7 * smooth + 0.3 * torch.rand(6, 3, 32, 32, generator=g)).clamp(0, 1)
    digits, _ = MultiMNIST("test", size=16, tasks=["left"]).batch(slice(None))
    return {"colour": noisy, "digits": digits}


def _distance(name: str, images: torch.Tensor, severity: int) -> float:
    out = corrupt(images, name, severity, torch.Generator().manual_seed(1))
    return (out - images).abs().mean().item()


def test_the_suite_has_the_documented_corruptions():
    assert set(CORRUPTIONS) == {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                                "contrast", "brightness", "pixelate", "jpeg_like"}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("kind", ["colour", "digits"])
def test_distance_from_clean_grows_with_severity(batches, name: str, kind: str):
    distances = [_distance(name, batches[kind], s) for s in SEVERITIES]
    assert distances[0] > 0
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_and_range_are_preserved(batches, name: str, dtype: torch.dtype):
    images = batches["colour"][:, :, :30, :27].to(dtype)  # sizes not divisible by 8
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, torch.Generator().manual_seed(2))
        assert out.shape == images.shape and out.dtype == dtype
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_same_generator_seed_gives_the_same_result(batches, name: str):
    images = batches["colour"]
    first = corrupt(images, name, 3, torch.Generator().manual_seed(5))
    again = corrupt(images, name, 3, torch.Generator().manual_seed(5))
    other = corrupt(images, name, 3, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert torch.equal(first, other) == (name not in RANDOM)


def test_corruption_does_not_touch_the_input(batches):
    images = batches["colour"].clone()
    for name in CORRUPTIONS:
        corrupt(images, name, 5, torch.Generator().manual_seed(0))
    assert torch.equal(images, batches["colour"])


def test_targeted_behaviour_of_simple_corruptions():
    grey = torch.full((1, 1, 16, 16), 0.5)
    assert torch.equal(corrupt(grey, "contrast", 5), grey)          # nothing to flatten
    assert torch.allclose(corrupt(grey, "brightness", 2), torch.full_like(grey, 0.7))
    assert torch.allclose(corrupt(grey, "gaussian_blur", 5), grey)  # blur of flat is flat
    flat = corrupt(grey, "jpeg_like", 5)  # only the DC term is non-zero, rounded to a step
    assert torch.allclose(flat, flat.flatten()[0].expand_as(flat))
    assert (flat - grey).abs().max() <= JPEG_STEP[-1] / 16  # DC = 8·mean, rounded by ≤ step/2
    salt = corrupt(grey, "impulse_noise", 5, torch.Generator().manual_seed(0))
    assert set(salt.unique().tolist()) <= {0.0, 0.5, 1.0}
    blocks = corrupt(torch.rand(1, 1, 8, 8), "pixelate", 1)        # 2×2 blocks
    assert torch.equal(blocks[..., 0::2, 0::2], blocks[..., 1::2, 1::2])


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(DataError) as info:
        corrupt(torch.rand(1, 1, 4, 4), "fog", 1)
    assert all(name in str(info.value) for name in CORRUPTIONS)


@pytest.mark.parametrize("images, severity, fragment", [
    (torch.rand(1, 1, 4, 4), 0, "from 1 to 5"),
    (torch.rand(1, 1, 4, 4), 6, "from 1 to 5"),
    (torch.rand(1, 4, 4), 1, r"\(B, C, H, W\)"),
    (torch.randint(0, 255, (1, 1, 4, 4)), 1, "float tensor"),
    (torch.rand(1, 1, 4, 4) * 255, 1, "outside \\[0, 1\\]"),
])
def test_bad_inputs_raise_data_error(images, severity, fragment):
    with pytest.raises(DataError, match=fragment):
        corrupt(images, "gaussian_noise", severity)
