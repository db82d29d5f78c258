"""NYUv2 / Cityscapes / CelebA loaders on tiny fixtures written in the real layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graphsurgeon.data import (
    Camera,
    CelebAAttributes,
    Cityscapes,
    DataError,
    NYUv2,
    depth_from_inverse,
    edges_from_labels,
    get_dataset,
    normals_from_depth,
)
from graphsurgeon.data.cityscapes import CITYSCAPES_CAMERA
from graphsurgeon.data.dense_augment import scale_crop_flip
from graphsurgeon.data.nyuv2 import NYUV2_CAMERA

FIVE_TASKS = ["segmentation", "depth", "normal", "edges", "autoencoding"]

H, W = 6, 8


def _write_npy_split(root: Path, split: str, n: int, label_dirs: dict[str, int], normals: bool,
                     seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    """MTAN layout: root/split/{image,label*,depth,normal}/{i}.npy as float32 HWC arrays."""
    H, W = size
    rng = np.random.default_rng(seed)
    base = root / split
    for i in range(n):
        arrays = {"image": rng.random((H, W, 3), dtype=np.float32),
                  "depth": rng.uniform(0.5, 5.0, (H, W, 1)).astype(np.float32)}
        arrays["depth"][0, 0, 0] = 0.0  # a missing depth measurement
        for folder, classes in label_dirs.items():
            label = rng.integers(0, classes, (H, W)).astype(np.float32)
            label[-1, :] = -1.0  # an unlabelled row
            arrays[folder] = label
        if normals:
            normal = rng.normal(size=(H, W, 3)).astype(np.float32)
            arrays["normal"] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
        for folder, array in arrays.items():
            (base / folder).mkdir(parents=True, exist_ok=True)
            np.save(base / folder / f"{i}.npy", array)


@pytest.fixture
def nyu_root(tmp_path: Path) -> Path:
    _write_npy_split(tmp_path, "train", 3, {"label": 13}, normals=True)
    _write_npy_split(tmp_path, "val", 2, {"label": 13}, normals=True, seed=1)
    return tmp_path


@pytest.fixture
def city_root(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        _write_npy_split(tmp_path, split, n, {"label_7": 7, "label_19": 19}, normals=False)
    return tmp_path


# ---------------------------------------------------------------------------- NYUv2

def test_nyuv2_item_matches_files(nyu_root: Path):
    ds = NYUv2(nyu_root, split="train")
    assert len(ds) == 3 and len(NYUv2(nyu_root, split="val")) == 2
    assert set(ds.task_info) == {"segmentation", "depth", "normal"} and not ds.derived_normals
    image, targets = ds[1]
    files = {f: np.load(nyu_root / "train" / f / "1.npy") for f in ("image", "label", "depth", "normal")}
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(files["image"]).permute(2, 0, 1))
    assert targets["segmentation"].dtype == torch.int64
    assert torch.equal(targets["segmentation"], torch.from_numpy(files["label"]).long())
    assert (targets["segmentation"][-1] == -1).all()
    assert torch.equal(targets["depth"], torch.from_numpy(files["depth"]).permute(2, 0, 1))
    assert torch.equal(targets["normal"], torch.from_numpy(files["normal"]).permute(2, 0, 1))
    assert ds.task_info["segmentation"].num_outputs == 13


def test_nyuv2_derives_normals_when_the_folder_is_missing(nyu_root: Path):
    for f in (nyu_root / "train" / "normal").iterdir():
        f.unlink()
    (nyu_root / "train" / "normal").rmdir()
    ds = NYUv2(nyu_root, split="train")
    assert ds.derived_normals
    _, targets = ds[0]
    normal = targets["normal"]
    assert normal.shape == (3, H, W)
    assert torch.equal(normal, normals_from_depth(targets["depth"], NYUV2_CAMERA.at(H, W)))
    lengths = normal.norm(dim=0)
    assert torch.allclose(lengths[lengths > 0], torch.ones(1))
    assert lengths[0, 0] == 0 and lengths[0, 1] == 0 and lengths[1, 0] == 0  # near missing depth


def test_nyuv2_edges_task(nyu_root: Path):
    ds = NYUv2(nyu_root, split="val", tasks=["edges"])
    _, targets = ds[0]
    assert set(targets) == {"edges"}
    label = torch.from_numpy(np.load(nyu_root / "val" / "label" / "0.npy")).long()
    assert torch.equal(targets["edges"], edges_from_labels(label))


def test_nyuv2_has_the_five_tasks_of_the_paper(nyu_root: Path):
    ds = NYUv2(nyu_root, split="val", tasks=FIVE_TASKS)
    image, targets = ds[1]
    assert list(targets) == FIVE_TASKS and not ds.derived_normals
    assert torch.equal(targets["autoencoding"], image)
    assert ds.task_info["autoencoding"].num_outputs == 3
    assert set(ds.task_info["normal"].metrics) == {"mean_angle", "median_angle", "within_11.25", "within_22.5",
                                                   "within_30"}


def test_nyuv2_augmentation_keeps_shapes_and_is_seeded(nyu_root: Path):
    ds = NYUv2(nyu_root, split="train", tasks=FIVE_TASKS, augment=True)
    torch.manual_seed(0)
    first = ds[2]
    torch.manual_seed(0)
    second = ds[2]
    assert first[0].shape == (3, H, W)
    assert {t: v.shape for t, v in first[1].items()} == {
        "segmentation": (H, W), "depth": (1, H, W), "normal": (3, H, W), "edges": (H, W), "autoencoding": (3, H, W)}
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1]["autoencoding"], first[0])  # the target is the augmented input
    assert all(torch.equal(first[1][t], second[1][t]) for t in first[1])


def _wrong_root(root: Path) -> Path:
    return root / "nowhere"


def _drop_a_label(root: Path) -> Path:
    (root / "train" / "label" / "1.npy").unlink()
    return root


def _leave_a_gap_in_numbering(root: Path) -> Path:
    (root / "train" / "image" / "2.npy").rename(root / "train" / "image" / "7.npy")
    return root


@pytest.mark.parametrize("break_it, fragment", [
    (_wrong_root, "nowhere does not exist"),
    (_drop_a_label, "label/1.npy is missing"),
    (_leave_a_gap_in_numbering, "image/2.npy is missing"),
])
def test_nyuv2_missing_data_names_the_path(nyu_root: Path, break_it, fragment):
    root = break_it(nyu_root)
    with pytest.raises(DataError, match=fragment) as info:
        NYUv2(root, split="train")
    assert "lorenmt/mtan" in str(info.value) or "re-extract" in str(info.value)


def test_nyuv2_argument_errors(nyu_root: Path):
    with pytest.raises(DataError, match="lorenmt/mtan"):
        NYUv2(None)
    with pytest.raises(DataError, match="no test folder"):
        NYUv2(nyu_root, split="test")
    with pytest.raises(DataError, match="'edges'"):
        NYUv2(nyu_root, tasks=["segmentation", "albedo"])


def test_nyuv2_rejects_files_of_the_wrong_shape(nyu_root: Path):
    np.save(nyu_root / "train" / "normal" / "0.npy", np.zeros((H, W, 2), np.float32))
    with pytest.raises(DataError, match=r"normal/0.npy has shape \(6, 8, 2\)"):
        NYUv2(nyu_root)[0]


# ------------------------------------------------------------------------ Cityscapes

@pytest.mark.parametrize("classes", [7, 19])
def test_cityscapes_picks_the_label_folder_for_the_class_count(city_root: Path, classes: int):
    ds = Cityscapes(city_root, split="val", num_classes=classes)
    assert len(ds) == 2 and set(ds.task_info) == {"segmentation", "depth"}
    assert ds.task_info["segmentation"].num_outputs == classes
    _, targets = ds[1]
    expected = np.load(city_root / "val" / f"label_{classes}" / "1.npy")
    assert torch.equal(targets["segmentation"], torch.from_numpy(expected).long())


def test_cityscapes_falls_back_to_a_single_7_class_label_folder(city_root: Path):
    for split in ("train", "val"):
        (city_root / split / "label_7").rename(city_root / split / "label")
    _, targets = Cityscapes(city_root, split="train")[0]
    assert torch.equal(targets["segmentation"],
                       torch.from_numpy(np.load(city_root / "train" / "label" / "0.npy")).long())


def test_cityscapes_has_the_five_tasks_of_the_paper(city_root: Path):
    ds = Cityscapes(city_root, split="train", num_classes=19, tasks=FIVE_TASKS)
    image, targets = ds[2]
    assert list(targets) == FIVE_TASKS and ds.derived_normals
    disparity = torch.from_numpy(np.load(city_root / "train" / "depth" / "2.npy")).permute(2, 0, 1)
    assert torch.equal(targets["depth"], disparity)  # the task stays inverse depth
    expected = normals_from_depth(depth_from_inverse(disparity), CITYSCAPES_CAMERA.at(H, W))
    assert torch.equal(targets["normal"], expected)
    lengths = targets["normal"].norm(dim=0)
    assert torch.allclose(lengths[lengths > 0], torch.ones(1)) and (lengths > 0).sum() > H * W // 2
    assert torch.equal(targets["autoencoding"], image)
    label = torch.from_numpy(np.load(city_root / "train" / "label_19" / "2.npy")).long()
    assert torch.equal(targets["edges"], edges_from_labels(label))
    torch.manual_seed(0)
    _, augmented = Cityscapes(city_root, tasks=FIVE_TASKS, augment=True)[0]
    assert {t: v.shape[-2:] for t, v in augmented.items()} == dict.fromkeys(FIVE_TASKS, (H, W))


def test_cityscapes_errors(city_root: Path):
    with pytest.raises(DataError, match=r"\[7, 19\]"):
        Cityscapes(city_root, num_classes=13)
    with pytest.raises(DataError, match="'depth', 'normal', 'edges', 'autoencoding'"):
        Cityscapes(city_root, tasks=["albedo"])
    (city_root / "train" / "depth" / "0.npy").unlink()
    with pytest.raises(DataError, match="depth/0.npy is missing"):
        Cityscapes(city_root)
    Cityscapes(city_root, tasks=["segmentation"])  # depth not needed: loads fine


def test_cityscapes_augmentation_scales_inverse_depth_up():
    image = torch.rand(3, 8, 8)
    targets = {"depth": torch.full((1, 8, 8), 4.0), "segmentation": torch.zeros(8, 8, dtype=torch.long)}
    _, inverse = scale_crop_flip(image, dict(targets), inverse_depth=True, scales=(2.0,))
    _, metric = scale_crop_flip(image, dict(targets), inverse_depth=False, scales=(2.0,))
    assert torch.all(inverse["depth"] == 8.0) and torch.all(metric["depth"] == 2.0)


def test_flip_mirrors_everything_and_negates_normal_x():
    image = torch.rand(3, 4, 5)
    normal = torch.nn.functional.normalize(torch.randn(3, 4, 5), dim=0)
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out = scale_crop_flip(image, {"normal": normal}, inverse_depth=False, scales=(1.0,))
        if torch.equal(out_image, image):
            assert torch.equal(out["normal"], normal)
            outcomes.add("kept")
        else:
            assert torch.allclose(out_image, image.flip(-1))
            expected = normal.flip(-1).clone()
            expected[0] = -expected[0]
            assert torch.equal(out["normal"], expected)
            outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


# -------------------------------------------------------------------- derived targets

def test_edges_from_labels_by_hand():
    labels = torch.tensor([[0, 0, 1],
                           [0, 0, 1],
                           [-1, -1, 1]])
    assert edges_from_labels(labels).tolist() == [[0, 1, 1],
                                                  [0, 1, 1],
                                                  [-1, -1, 0]]


def test_normals_from_a_plane_match_the_formula():
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    depth = (2.0 + 0.5 * xs - 0.25 * ys)[None]
    normal = normals_from_depth(depth)
    expected = torch.nn.functional.normalize(torch.tensor([0.5, -0.25, -1.0]), dim=0)
    assert torch.allclose(normal, expected[:, None, None].expand(3, 5, 6), atol=1e-6)


def _plane_depth(normal: torch.Tensor, offset: float, camera: Camera) -> torch.Tensor:
    """Depth of the plane n·P = offset seen through `camera`: d = offset / (n·ray)."""
    v, u = torch.meshgrid(torch.arange(float(camera.height)), torch.arange(float(camera.width)), indexing="ij")
    rays = torch.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, torch.ones_like(u)])
    return (offset / (normal[:, None, None] * rays).sum(0))[None]


def test_normals_from_depth_with_a_camera_recover_planes():
    camera = CITYSCAPES_CAMERA.at(8, 16)
    wall = normals_from_depth(torch.full((1, 8, 16), 3.0), camera)
    assert torch.allclose(wall, torch.tensor([0.0, 0.0, -1.0])[:, None, None].expand(3, 8, 16))
    for true in ([0.0, -1.0, -0.5], [0.3, 0.5, -1.0]):  # a road below the camera (-y is up), a slanted wall
        n = torch.nn.functional.normalize(torch.tensor(true), dim=0)
        depth = _plane_depth(n, -2.0, camera)  # n faces the camera, so n·P < 0 on the plane
        assert (depth > 0).all()
        derived = normals_from_depth(depth, camera)
        assert torch.allclose(derived, n[:, None, None].expand(3, 8, 16), atol=1e-4), true
        scaled = normals_from_depth(depth_from_inverse(7.0 / depth), camera)  # from disparity, any factor
        assert torch.allclose(scaled, derived, atol=1e-4)


def test_camera_rescales_with_the_frame():
    half = Camera(fx=100.0, fy=80.0, cx=31.5, cy=23.5, height=48, width=64).at(24, 32)
    assert (half.fx, half.fy, half.cx, half.cy, half.height, half.width) == (50.0, 40.0, 15.5, 11.5, 24, 32)


def test_normals_from_depth_rejects_bad_shapes():
    with pytest.raises(DataError, match=r"\(1, H, W\)"):
        normals_from_depth(torch.ones(5, 5))
    with pytest.raises(DataError, match=r"pass camera.at\(5, 6\)"):
        normals_from_depth(torch.ones(1, 5, 6), CITYSCAPES_CAMERA)


# --------------------------------------------------------------------------- CelebA

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling", "Young"]
# Two images per held-out split: torchvision's CelebA cannot select a split of exactly one
# image (it squeezes the index tensor to 0-d), which real data never hits.
PARTITION = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 0, "000004.jpg": 1, "000005.jpg": 1,
             "000006.jpg": 2, "000007.jpg": 2}


def _write_celeba(root: Path) -> dict[str, list[int]]:
    """torchvision's layout: images + the five text files in their official formats."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    values: dict[str, list[int]] = {}
    for k, name in enumerate(PARTITION):
        pixels = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, quality=95)
        values[name] = [1 if (k + j) % 2 else -1 for j in range(len(ATTRS))]
    n = len(PARTITION)
    (base / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in PARTITION.items()))
    (base / "identity_CelebA.txt").write_text("".join(f"{f} {100 + i}\n" for i, f in enumerate(PARTITION)))
    (base / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(ATTRS) + " \n"
        + "".join(f"{f} " + " ".join(f"{v:2d}" for v in values[f]) + "\n" for f in PARTITION))
    (base / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n"
        + "".join(f"{f}    95  71 226 313\n" for f in PARTITION))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        + "".join(f"{f}    69  109  106  113   77  142   73  152  108  154\n" for f in PARTITION))
    return values


def test_celeba_attributes_through_torchvision(tmp_path: Path):
    values = _write_celeba(tmp_path)
    train = CelebAAttributes(tmp_path, split="train", attributes=["Smiling", "Young"])
    assert len(train) == 3
    assert len(CelebAAttributes(tmp_path, split="val")) == 2
    assert len(CelebAAttributes(tmp_path, split="test")) == 2
    image, targets = train[1]
    assert image.shape == (3, 20, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert set(targets) == {"Smiling", "Young"} == set(train.task_info)
    raw = values["000002.jpg"]
    assert targets["Smiling"].item() == (raw[2] + 1) // 2
    assert targets["Young"].item() == (raw[3] + 1) // 2
    assert targets["Smiling"].dtype == torch.int64
    assert train.task_info["Smiling"].num_outputs == 2


def test_celeba_defaults_to_all_attributes_and_resizes(tmp_path: Path):
    _write_celeba(tmp_path)
    ds = get_dataset("celeba", "train", str(tmp_path), image_size=(8, 6))
    image, targets = ds[0]
    assert list(targets) == ATTRS and image.shape == (3, 8, 6)


@pytest.mark.parametrize("missing", ["list_bbox_celeba.txt", "img_align_celeba"])
def test_celeba_missing_files_are_named(tmp_path: Path, missing: str):
    _write_celeba(tmp_path)
    target = tmp_path / "celeba" / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DataError, match=f"{missing} does not exist.*mmlab"):
        CelebAAttributes(tmp_path)


def test_celeba_missing_image_and_bad_attribute(tmp_path: Path):
    _write_celeba(tmp_path)
    with pytest.raises(DataError, match="'Smiling'"):
        CelebAAttributes(tmp_path, attributes=["Smiles"])
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg is listed"):
        CelebAAttributes(tmp_path)[0]


# ------------------------------------------------------------------------- registry

def test_registry_names_and_errors(nyu_root: Path, city_root: Path):
    assert isinstance(get_dataset("nyuv2", "val", nyu_root), NYUv2)
    assert isinstance(get_dataset("cityscapes", "val", city_root, num_classes=19), Cityscapes)
    with pytest.raises(DataError, match=r"\['celeba', 'cityscapes', 'multimnist', 'nyuv2'\]"):
        get_dataset("imagenet", "train")
    with pytest.raises(DataError, match="needs root="):
        get_dataset("cityscapes", "train")


@pytest.mark.parametrize("data, labels, normals, tasks", [("nyuv2", {"label": 13}, True, []),
                                                         ("cityscapes", {"label_7": 7}, False, ["--tasks", ",".join(FIVE_TASKS)])])
def test_dense_datasets_train_from_the_command_line(tmp_path: Path, data, labels, normals, tasks):
    """Dense tasks get a spatial trunk by default (the backbone's last feature map): the default
    trunk, the classifier's input, is a flat vector no dense head can use. NYUv2 runs its
    default tasks, Cityscapes all five (normals and auto-encoding derived)."""
    from graphsurgeon.__main__ import main

    for split, n in (("train", 4), ("val", 4)):
        _write_npy_split(tmp_path / "data", split, n, labels, normals=normals, size=(32, 32))
    out = tmp_path / "run"
    args = ["train", "--data", data, "--data-root", str(tmp_path / "data"), "--method", "hps", "--epochs", "1",
            "--batch-size", "2", "--corruptions", "none", "--no-progress", "--out", str(out), *tasks]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) >= set(tasks[1].split(",") if tasks else ["segmentation", "depth", "normal"])
