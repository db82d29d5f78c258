"""The embedded MNIST subset and the MultiMNIST dataset built from it."""
from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from graphsurgeon.data import (
    MULTIMNIST_TASKS,
    DataError,
    MultiMNIST,
    TaskInfo,
    get_dataset,
    load_mnist_5k,
    source_digit_pools,
)
from graphsurgeon.data.multimnist import INK_THRESHOLD, LEFT_CORNER, RIGHT_CORNER
from graphsurgeon.errors import GraphSurgeonError

SMALL = 300


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def small_train():
    return MultiMNIST("train", size=SMALL, seed=3)


# ------------------------------------------------------------------ embedded digits

def test_embedded_mnist_shapes_and_balance(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0


def test_embedded_mnist_returns_fresh_arrays(mnist):
    images, _ = load_mnist_5k()
    images[:] = 0
    assert load_mnist_5k()[0].max() == 255


def test_provenance_records_the_shipped_file_and_content(mnist):
    data = resources.files("graphsurgeon.data")
    provenance = data.joinpath("PROVENANCE.md").read_text()
    file_hash = hashlib.sha256(data.joinpath("mnist_5k.npz").read_bytes()).hexdigest()
    images, labels = mnist
    content_hash = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert file_hash in provenance
    assert content_hash in provenance


# ------------------------------------------------------------------ splits and pools

def test_pools_are_disjoint_stratified_and_cover_everything(mnist):
    _, labels = mnist
    pools = source_digit_pools(labels)
    assert {k: len(v) for k, v in pools.items()} == {"train": 3500, "val": 500, "test": 1000}
    assert not set(pools["train"]) & set(pools["val"])
    assert not set(pools["train"]) & set(pools["test"])
    assert not set(pools["val"]) & set(pools["test"])
    assert sorted(np.concatenate(list(pools.values()))) == list(range(5000))
    assert np.bincount(labels[pools["val"]]).tolist() == [50] * 10
    # The partition is fixed: it must not depend on anything but the labels.
    again = source_digit_pools(labels)
    assert all(np.array_equal(pools[s], again[s]) for s in pools)


def test_no_digit_image_is_shared_across_splits(mnist):
    images, _ = mnist
    used = {}
    for split in ("train", "val", "test"):
        ds = MultiMNIST(split, size=2000, seed=1)
        used[split] = {images[i].tobytes() for i in ds.source_indices.flatten().tolist()}
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_each_split_draws_only_from_its_pool(mnist):
    _, labels = mnist
    pools = source_digit_pools(labels)
    for split in ("train", "val", "test"):
        ds = MultiMNIST(split, size=500, seed=7)
        assert set(ds.source_indices.flatten().tolist()) <= set(pools[split].tolist())
        assert (ds.source_indices[:, 0] != ds.source_indices[:, 1]).all()


# ------------------------------------------------------------------ samples

def test_item_and_batch_types(small_train):
    image, targets = small_train[0]
    assert image.shape == (1, 36, 36) and image.dtype == torch.float32
    assert set(targets) == set(MULTIMNIST_TASKS)
    for task in ("left", "right", "left_parity", "right_ge5", "sum_mod10"):
        assert targets[task].shape == () and targets[task].dtype == torch.int64
    assert targets["segmentation"].shape == (36, 36) and targets["segmentation"].dtype == torch.int64
    assert targets["reconstruction"].shape == (1, 36, 36)
    assert targets["reconstruction"].dtype == torch.float32

    images, batch = small_train.batch(slice(0, 5))
    assert images.shape == (5, 1, 36, 36)
    assert batch["segmentation"].shape == (5, 36, 36) and batch["left"].shape == (5,)
    assert torch.equal(images[0], image)
    assert all(torch.equal(batch[t][0], targets[t]) for t in targets)


def test_default_collate_matches_batch(small_train):
    images, targets = next(iter(DataLoader(small_train, batch_size=8, shuffle=False)))
    ref_images, ref_targets = small_train.batch(torch.arange(8))
    assert torch.equal(images, ref_images)
    assert all(torch.equal(targets[t], ref_targets[t]) for t in ref_targets)


def test_images_are_in_unit_range_and_hold_two_digits(small_train):
    images, targets = small_train.batch(slice(None))
    assert images.min() >= 0 and images.max() <= 1
    seg = targets["segmentation"]
    assert ((seg == 1).flatten(1).any(1) & (seg == 2).flatten(1).any(1)).all()


def test_classification_targets_follow_the_source_digits(small_train, mnist):
    _, labels = mnist
    _, targets = small_train.batch(slice(None))
    left = torch.from_numpy(labels[small_train.source_indices[:, 0].numpy()].astype(np.int64))
    right = torch.from_numpy(labels[small_train.source_indices[:, 1].numpy()].astype(np.int64))
    assert torch.equal(targets["left"], left)
    assert torch.equal(targets["right"], right)
    assert torch.equal(targets["left_parity"], left % 2)
    assert torch.equal(targets["right_ge5"], (right >= 5).long())
    assert torch.equal(targets["sum_mod10"], (left + right) % 10)


def test_reconstruction_is_the_left_digit_alone(small_train, mnist):
    digits, _ = mnist
    images, targets = small_train.batch(slice(None))
    recon = targets["reconstruction"]
    assert (recon <= images).all()
    ink = digits[small_train.source_indices[:, 0].numpy()].reshape(SMALL, -1).sum(1)
    assert torch.equal((recon * 255).round().flatten(1).sum(1).long(), torch.from_numpy(ink.astype(np.int64)))
    # The left digit's box starts in the top-left corner range.
    last = LEFT_CORNER[1] + 28
    assert recon[..., last:, :].sum() == 0 and recon[..., :, last:].sum() == 0


def test_segmentation_labels_ink_and_brighter_digit(small_train):
    images, targets = small_train.batch(slice(None))
    image, seg, left = images[:, 0], targets["segmentation"], targets["reconstruction"][:, 0]
    assert torch.equal(seg > 0, image > INK_THRESHOLD)
    assert torch.equal(left[seg == 1], image[seg == 1])  # left is the brighter (or tied) one
    assert (left[seg == 2] < image[seg == 2]).all()
    rows = torch.arange(36)
    right_mask = seg == 2
    assert (rows[None, :, None].expand_as(seg)[right_mask] >= RIGHT_CORNER[0]).all()
    assert (rows[None, None, :].expand_as(seg)[right_mask] >= RIGHT_CORNER[0]).all()


def test_generation_is_deterministic_in_the_seed():
    a, b, c = (MultiMNIST("val", size=200, seed=s) for s in (5, 5, 6))
    ia, ta = a.batch(slice(None))
    ib, tb = b.batch(slice(None))
    ic, _ = c.batch(slice(None))
    assert torch.equal(ia, ib) and all(torch.equal(ta[t], tb[t]) for t in ta)
    assert not torch.equal(ia, ic)


def test_default_sizes():
    assert len(MultiMNIST("val")) == 1000
    assert len(MultiMNIST("test", tasks=["left"])) == 2000


def test_task_subset():
    ds = MultiMNIST("test", size=10, tasks=["right", "segmentation"])
    _, targets = ds[3]
    assert set(targets) == {"right", "segmentation"} == set(ds.task_info)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"split": "training"}, "'train', 'val', 'test'"),
    ({"size": 0}, "positive int"),
    ({"tasks": ["left", "colour"]}, "'sum_mod10'"),
    ({"tasks": "left"}, "pass a list"),
    ({"tasks": []}, "distinct tasks"),
])
def test_bad_arguments_raise_data_error(kwargs, fragment):
    with pytest.raises(DataError, match=fragment.replace("(", r"\(")) as info:
        MultiMNIST(**kwargs)
    assert isinstance(info.value, GraphSurgeonError)


def test_registry_builds_multimnist():
    ds = get_dataset("multimnist", "val", size=12, seed=2)
    assert isinstance(ds, MultiMNIST) and len(ds) == 12


# ------------------------------------------------------------------ task descriptions

def test_task_table_kinds_and_widths():
    kinds = {name: (info.kind, info.num_outputs) for name, info in MULTIMNIST_TASKS.items()}
    assert kinds == {
        "left": ("classification", 10), "right": ("classification", 10),
        "left_parity": ("classification", 2), "right_ge5": ("classification", 2),
        "sum_mod10": ("classification", 10), "segmentation": ("segmentation", 3),
        "reconstruction": ("dense_regression", 1),
    }
    assert all(isinstance(info, TaskInfo) for info in MULTIMNIST_TASKS.values())


def _perfect_prediction(info: TaskInfo, target: torch.Tensor) -> torch.Tensor:
    if info.kind == "dense_regression":
        return target.clone()
    one_hot = torch.nn.functional.one_hot(target, info.num_outputs).float() * 20
    return one_hot if info.kind == "classification" else one_hot.permute(0, 3, 1, 2)


def test_losses_and_metrics_score_perfect_predictions_as_perfect(small_train):
    _, targets = small_train.batch(slice(0, 16))
    for task, info in MULTIMNIST_TASKS.items():
        pred = _perfect_prediction(info, targets[task])
        assert info.loss(pred, targets[task]).item() < 1e-6, task
        for name, metric in info.metrics.items():
            best = 1.0 if info.higher_is_better[name] else 0.0
            assert metric(pred, targets[task]) == pytest.approx(best), (task, name)


def test_losses_backpropagate_from_random_heads(small_train):
    _, targets = small_train.batch(slice(0, 4))
    for task, info in MULTIMNIST_TASKS.items():
        shape = {"classification": (4, info.num_outputs),
                 "segmentation": (4, info.num_outputs, 36, 36),
                 "dense_regression": (4, info.num_outputs, 36, 36)}[info.kind]
        pred = torch.randn(shape, requires_grad=True)
        info.loss(pred, targets[task]).backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0, task
