"""The corruption suite: ImageNet-C's 15 corruptions, ordered severities, preserved
shape/dtype/range, determinism, the optional reference backend."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon.data import CORRUPTIONS, DataError, MultiMNIST, corrupt
from graphsurgeon.data.corruptions import DEFAULT_CORRUPTIONS, SEVERITIES, corruption_plan, resolve_corruptions
from graphsurgeon.errors import MissingDependencyError
from graphsurgeon.optional import available

IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    """A natural-ish colour batch and a MultiMNIST batch (1-channel 36×36, mostly black)."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=(32, 32),
                                             mode="bilinear", align_corners=False)
    noisy = (0.7 * smooth + 0.3 * torch.rand(4, 3, 32, 32, generator=g)).clamp(0, 1)
    digits, _ = MultiMNIST("test", size=8, tasks=["left"]).batch(slice(None))
    return {"colour": noisy, "digits": digits}


def test_the_suite_is_imagenet_c_in_its_order():
    assert tuple(CORRUPTIONS) == IMAGENET_C
    assert set(DEFAULT_CORRUPTIONS) <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", IMAGENET_C)
def test_distance_from_clean_grows_with_severity(batches, name: str):
    for kind, images in batches.items():
        distances = [(corrupt(images, name, s, torch.Generator().manual_seed(1)) - images).abs().mean().item()
                     for s in SEVERITIES]
        assert distances[0] > 0, (kind, distances)
        assert all(a <= b for a, b in zip(distances, distances[1:])), (kind, distances)
        assert distances[-1] > distances[0], (kind, distances)


@pytest.mark.parametrize("name", IMAGENET_C)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_and_range_are_preserved(batches, name: str, dtype: torch.dtype):
    for images in (batches["colour"][:2, :, :30, :27], batches["digits"][:2]):  # odd sizes, 1 channel
        images = images.to(dtype)
        for severity in SEVERITIES:
            out = corrupt(images, name, severity, torch.Generator().manual_seed(2))
            assert out.shape == images.shape and out.dtype == dtype
            assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 3, 5), (1, 4, 7, 9)])
def test_tiny_images_and_any_channel_count_work(shape):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for name in IMAGENET_C:
        out = corrupt(images, name, 5, torch.Generator().manual_seed(0))
        assert out.shape == images.shape and not out.isnan().any() and 0 <= out.min() and out.max() <= 1, name


@pytest.mark.parametrize("name", IMAGENET_C)
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
    for name in ("contrast", "defocus_blur", "zoom_blur", "pixelate", "elastic_transform"):
        assert torch.allclose(corrupt(grey, name, 5, torch.Generator().manual_seed(0)), grey), name
    assert (corrupt(grey, "jpeg_compression", 5) - grey).abs().max() <= 1 / 255  # a flat image codes exactly
    assert torch.allclose(corrupt(grey, "brightness", 2), torch.full_like(grey, 0.7))
    colour = torch.tensor([0.2, 0.4, 0.1]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    brighter = corrupt(colour, "brightness", 1)  # HSV value 0.4 → 0.5, hue and saturation kept
    assert torch.allclose(brighter, colour * 0.5 / 0.4)
    salt = corrupt(grey, "impulse_noise", 5, torch.Generator().manual_seed(0))
    assert set(salt.unique().tolist()) == {0.0, 0.5, 1.0}
    image = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    assert (corrupt(image, "frost", 3, torch.Generator().manual_seed(0)) >= image).all()  # frost only brightens
    blocks = corrupt(torch.rand(1, 1, 10, 10), "pixelate", 2)  # factor 0.5: 2×2 blocks
    assert torch.equal(blocks[..., 0::2, 0::2], blocks[..., 1::2, 1::2])


def test_resolve_corruptions():
    assert resolve_corruptions("all") == IMAGENET_C
    assert resolve_corruptions("none") == () == resolve_corruptions("")
    assert resolve_corruptions("fog, snow") == ("fog", "snow") == resolve_corruptions(["fog", "snow"])
    with pytest.raises(DataError, match=r"\['gaussian_blur'\] are unknown.*'all'"):
        resolve_corruptions(["fog", "gaussian_blur"])


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(DataError) as info:
        corrupt(torch.rand(1, 1, 4, 4), "jpeg_like", 1)
    assert all(name in str(info.value) for name in CORRUPTIONS)


@pytest.mark.parametrize("images, severity, backend, fragment", [
    (torch.rand(1, 1, 4, 4), 0, "torch", "from 1 to 5"),
    (torch.rand(1, 1, 4, 4), 6, "torch", "from 1 to 5"),
    (torch.rand(1, 4, 4), 1, "torch", r"\(B, C, H, W\)"),
    (torch.randint(0, 255, (1, 1, 4, 4)), 1, "torch", "float tensor"),
    (torch.rand(1, 1, 4, 4) * 255, 1, "torch", "outside \\[0, 1\\]"),
    (torch.rand(1, 1, 4, 4), 1, "numpy", r"\['torch', 'imagecorruptions'\]"),
])
def test_bad_inputs_raise_data_error(images, severity, backend, fragment):
    with pytest.raises(DataError, match=fragment):
        corrupt(images, "gaussian_noise", severity, backend=backend)


@pytest.mark.skipif(available("imagecorruptions"), reason="imagecorruptions is installed")
def test_the_reference_backend_says_how_to_install_it():
    with pytest.raises(MissingDependencyError, match="'imagecorruptions'.*pip install imagecorruptions"):
        corrupt(torch.rand(1, 3, 8, 8), "fog", 1, backend="imagecorruptions")


@pytest.mark.skipif(not available("imagecorruptions"), reason="needs the optional imagecorruptions package")
def test_the_reference_backend_is_seeded_and_keeps_the_format(batches):
    for images in (batches["colour"][:1], batches["digits"][:1]):
        first = corrupt(images, "shot_noise", 3, torch.Generator().manual_seed(0), backend="imagecorruptions")
        again = corrupt(images, "shot_noise", 3, torch.Generator().manual_seed(0), backend="imagecorruptions")
        assert first.shape == images.shape and torch.equal(first, again)
        assert 0 <= first.min() and first.max() <= 1


def test_corruption_plan_checks_everything_up_front():
    assert corruption_plan("all", (1, 5)) == [(n, s) for n in IMAGENET_C for s in (1, 5)]
    with pytest.raises(DataError, match=r"severities \[0, 7\] are invalid"):
        corruption_plan("fog", (0, 3, 7))
    with pytest.raises(DataError, match=r"backend 'numpy' is unknown"):
        corruption_plan("fog", (1,), backend="numpy")
