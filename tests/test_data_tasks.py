"""TaskInfo validation and the shared loss/metric functions, on hand-computed cases."""
from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
import torch

from graphsurgeon.data import TaskInfo, confusion_matrix, iou_from_confusion
from graphsurgeon.data.tasks import (
    accuracy,
    autoencoding_task,
    binary_f1,
    cross_entropy,
    depth_abs_error,
    depth_l1_loss,
    depth_rel_error,
    edge_task,
    mean_iou,
    normal_cosine_loss,
    normal_mean_angle,
    normal_median_angle,
    normal_task,
    normal_within,
    pixel_accuracy,
    segmentation_task,
)
from graphsurgeon.errors import TaskSpecError


def _logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Confident logits predicting `labels` (B, H, W) -> (B, C, H, W)."""
    return torch.nn.functional.one_hot(labels.clamp_min(0), classes).permute(0, 3, 1, 2).float() * 10


def test_task_info_rejects_inconsistent_specs():
    good = dict(kind="classification", num_outputs=2, loss=cross_entropy,
                metrics={"accuracy": accuracy}, higher_is_better={"accuracy": True},
                primary_metric="accuracy")
    TaskInfo(**good)
    for change, fragment in [({"kind": "detection"}, "kind"), ({"num_outputs": 0}, "num_outputs"),
                             ({"metrics": {}, "higher_is_better": {}}, "metrics is empty"),
                             ({"higher_is_better": {}}, "one direction per metric"),
                             ({"primary_metric": "f1"}, "primary_metric")]:
        with pytest.raises(TaskSpecError, match=fragment):
            TaskInfo(**{**good, **change})


def test_task_info_is_frozen_including_its_mappings():
    info = segmentation_task(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_outputs = 4
    with pytest.raises(TypeError):
        info.metrics["new"] = accuracy


def test_task_info_survives_pickling_and_deepcopy():
    info = segmentation_task(3)
    for clone in (pickle.loads(pickle.dumps(info)), copy.deepcopy(info)):
        assert clone.kind == info.kind and clone.primary_metric == "miou"
        assert clone.higher_is_better == dict(info.higher_is_better)
        target = torch.tensor([[[0, 1], [2, 2]]])
        assert clone.metrics["miou"](_logits(target, 3), target) == 1.0


def test_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    pred_labels = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    pred = _logits(pred_labels, 3)
    # Labelled pixels: 6, right: 4 (ignored pixels do not count).
    assert pixel_accuracy(pred, target) == pytest.approx(4 / 6)
    # IoU: class 0 = 1/3 (hit 1, union {0,1,5}), class 1 = 2/3, class 2 = 1/2.
    assert mean_iou(pred, target, num_classes=3) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_confusion_summed_over_batches_gives_dataset_miou():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(-1, 4, (6, 5, 5), generator=g)
    pred = torch.randn(6, 4, 5, 5, generator=g)
    total = sum(confusion_matrix(pred[i:i + 2].argmax(1), target[i:i + 2], 4) for i in range(0, 6, 2))
    assert iou_from_confusion(total) == pytest.approx(mean_iou(pred, target, 4))


def test_all_ignored_pixels_give_zero_loss_with_gradient_and_nan_metrics():
    pred = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), -1)
    loss = cross_entropy(pred, target)
    loss.backward()
    assert loss.item() == 0 and pred.grad is not None
    assert math.isnan(pixel_accuracy(pred, target))


def test_depth_metrics_skip_invalid_pixels():
    target = torch.tensor([[[[2.0, 4.0], [0.0, 1.0]]]])
    pred = torch.tensor([[[[3.0, 4.0], [9.0, 0.5]]]])
    assert depth_abs_error(pred, target) == pytest.approx((1 + 0 + 0.5) / 3)
    assert depth_rel_error(pred, target) == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert depth_l1_loss(pred, target).item() == pytest.approx(0.5)


def test_normal_angles_and_loss():
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2, 0, :2] = 1.0  # two valid pixels facing +z, the third unlabelled (zero)
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 2, 0, 0] = 5.0     # right direction, wrong length: still 0 degrees
    pred[0, 0, 0, 1] = 1.0     # perpendicular: 90 degrees
    pred[0, 1, 0, 2] = 1.0     # unlabelled pixel: ignored
    assert normal_mean_angle(pred, target) == pytest.approx(45.0)
    assert normal_median_angle(pred, target) in (pytest.approx(0.0), pytest.approx(90.0))
    assert normal_cosine_loss(pred, target).item() == pytest.approx(0.5)


def test_normal_threshold_shares_by_hand():
    target = torch.zeros(1, 3, 1, 5)
    target[0, 2] = 1.0
    target[0, 2, 0, 4] = 0.0  # unlabelled
    degrees = torch.tensor([0.0, 15.0, 25.0, 45.0, 5.0])  # pred tilted in the x-z plane
    pred = torch.stack([torch.sin(torch.deg2rad(degrees)), torch.zeros(5), torch.cos(torch.deg2rad(degrees))])[None, :, None]
    info = normal_task()
    assert normal_within(pred, target, 11.25) == pytest.approx(1 / 4)
    assert info.metrics["within_22.5"](pred, target) == pytest.approx(2 / 4)
    assert info.metrics["within_30"](pred, target) == pytest.approx(3 / 4)
    assert info.higher_is_better["within_30"] and not info.higher_is_better["mean_angle"]


def test_autoencoding_task_scores_the_reconstruction():
    info = autoencoding_task(3)
    image = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    off = image + 0.5 * (torch.arange(4.0) % 2).view(1, 1, 1, 4)  # half the pixels off by 0.5
    assert info.num_outputs == 3 and info.primary_metric == "l1_error"
    assert info.loss(off, image).item() == pytest.approx(0.25)
    assert info.metrics["l1_error"](off, image) == pytest.approx(0.25)
    assert info.metrics["mse"](off, image) == pytest.approx(0.125)
    assert info.metrics["mse"](image, image) == 0.0


def test_binary_f1_and_edge_loss_balance():
    target = torch.tensor([[[1, 0, 0, 0, 0, 0, 0, -1]]])
    assert binary_f1(_logits(target, 2), target) == 1.0
    half = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 0]]])  # one hit, one false alarm
    assert binary_f1(_logits(half, 2), target) == pytest.approx(2 / 3)
    # Predicting "no edge" everywhere: the balanced loss is no better than predicting
    # "edge" everywhere, although edges are only 1 of 7 labelled pixels.
    info = edge_task()
    none = _logits(torch.zeros_like(target), 2)
    every = _logits(torch.ones_like(target), 2)
    assert info.loss(none, target).item() == pytest.approx(info.loss(every, target).item(), rel=1e-5)
    assert info.metrics["f1"](none, target) == 0.0
