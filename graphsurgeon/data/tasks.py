"""What a task *is* to the trainer: its kind, output width, loss and metrics.

Every dataset in this package describes its targets with `TaskInfo`, so trainers,
task-grouping methods and benchmark tables can treat MultiMNIST digits, NYUv2 depth and
CelebA attributes alike. The loss and metric functions below are shared by all loaders
(one mIoU, one depth error, ...), so numbers from different datasets are comparable.

Conventions shared by the functions:

* `pred` is the raw network output: logits (B, C) or (B, C, H, W) for classification
  and segmentation; values (B, C, H, W) for dense regression.
* segmentation targets are int64 (B, H, W) with `ignore_index` (default -1) marking
  unlabelled pixels, as in the preprocessed NYUv2/Cityscapes releases;
* depth targets mark invalid pixels with a value <= 0, and normal targets with a zero
  vector, again following those releases;
* metrics return plain floats (NaN when a batch has no valid pixel) and never track
  gradients; losses return a scalar tensor that always supports `backward()`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphsurgeon.core.network import Task
from graphsurgeon.errors import TaskSpecError

TaskKind = Literal["classification", "segmentation", "dense_regression"]
LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]
TASK_KINDS: tuple[str, ...] = ("classification", "segmentation", "dense_regression")
IGNORE_INDEX = -1


@dataclass(frozen=True)
class TaskInfo:
    """How to train and score one task.

    `num_outputs` is the number of classes (classification, segmentation) or of output
    channels (dense regression): the width a task head must produce. `higher_is_better`
    has one entry per metric so that relative-improvement scores (e.g. Δm) know which
    way each metric points; `primary_metric` is the one model selection should use.
    """

    kind: TaskKind
    num_outputs: int
    loss: LossFn
    metrics: Mapping[str, MetricFn]
    higher_is_better: Mapping[str, bool]
    primary_metric: str

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise TaskSpecError(f"TaskInfo.kind is {self.kind!r}; use one of {list(TASK_KINDS)}.")
        if not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise TaskSpecError(f"TaskInfo.num_outputs is {self.num_outputs!r}; "
                                "give a positive int (classes or output channels).")
        if not self.metrics:
            raise TaskSpecError("TaskInfo.metrics is empty; give at least one metric.")
        if set(self.metrics) != set(self.higher_is_better):
            raise TaskSpecError(f"TaskInfo.higher_is_better has keys {sorted(self.higher_is_better)} "
                                f"but metrics has {sorted(self.metrics)}; give one direction per metric.")
        if self.primary_metric not in self.metrics:
            raise TaskSpecError(f"TaskInfo.primary_metric {self.primary_metric!r} is not a metric; "
                                f"pick one of {sorted(self.metrics)}.")
        # Freeze the mappings too, so a shared TaskInfo cannot be edited by one user.
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "higher_is_better", MappingProxyType(dict(self.higher_is_better)))

    def task(self, head: nn.Module | Callable[[tuple[int, ...]], nn.Module]) -> Task:
        """This task with ``head``, as `graphsurgeon.multitask` and the `Trainer` take it: the one
        place a dataset's description becomes the library's `Task`."""
        return Task(head=head, loss=self.loss, metrics=dict(self.metrics), higher_is_better=dict(self.higher_is_better))

    def __reduce__(self) -> tuple:
        # Read-only mapping proxies cannot be pickled; rebuild from plain dicts, so that
        # datasets holding TaskInfo can go to DataLoader worker processes.
        return (TaskInfo, (self.kind, self.num_outputs, self.loss, dict(self.metrics),
                           dict(self.higher_is_better), self.primary_metric))


# ----------------------------------------------------------------------------- losses

def cross_entropy(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over labelled samples/pixels (classification and segmentation)."""
    if (target != ignore_index).any():
        return F.cross_entropy(pred, target.long(), ignore_index=ignore_index)
    return (pred * 0).sum()  # all pixels ignored: zero, but still differentiable


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error; robust to the outliers that dense targets often have."""
    return F.l1_loss(pred, target)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error."""
    return F.mse_loss(pred, target)


def depth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over pixels with valid depth (target > 0); missing sensor depth is not penalised."""
    valid = target > 0
    if not valid.any():
        return (pred * 0).sum()
    return (pred - target).abs()[valid].mean()


def normal_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity between predicted and true normals, over valid pixels.

    The prediction is normalised first, so the head only has to get the direction right.
    """
    valid = target.norm(dim=1) > 0
    if not valid.any():
        return (pred * 0).sum()
    cos = (F.normalize(pred, dim=1) * target).sum(dim=1)
    return 1 - cos[valid].mean()


def balanced_edge_loss(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy with classes weighted by the other class's frequency in the batch.

    Edge pixels are a few percent of an image; unweighted, a head that predicts "no
    edge" everywhere already has a low loss. Weighting each class by the frequency of
    the other (as HED-style edge losses do) makes both classes count equally.
    """
    labelled = target[target != ignore_index]
    if labelled.numel() == 0:
        return (pred * 0).sum()
    edge_fraction = labelled.float().mean()
    weight = torch.stack([edge_fraction, 1 - edge_fraction]).clamp_min(1e-3).to(pred.dtype)
    return F.cross_entropy(pred, target.long(), weight=weight, ignore_index=ignore_index)


# ---------------------------------------------------------------------------- metrics

@torch.no_grad()
def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of samples whose arg-max logit is the target class."""
    return (pred.argmax(dim=1) == target).float().mean().item()


@torch.no_grad()
def pixel_accuracy(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of labelled pixels whose arg-max class is right."""
    labelled = target != ignore_index
    if not labelled.any():
        return math.nan
    return (pred.argmax(dim=1) == target)[labelled].float().mean().item()


@torch.no_grad()
def confusion_matrix(pred_labels: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted.

    Summing these over batches and calling `iou_from_confusion` once gives the
    dataset-level mIoU; averaging per-batch `mean_iou` values only approximates it.
    """
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    flat = target[keep].long() * num_classes + pred_labels[keep].long()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> float:
    """Mean IoU over the classes that occur in prediction or target (others are skipped)."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    if not present.any():
        return math.nan
    return (hits[present] / union[present]).mean().item()


@torch.no_grad()
def mean_iou(pred: Tensor, target: Tensor, num_classes: int,
             ignore_index: int = IGNORE_INDEX) -> float:
    """Mean intersection-over-union of the arg-max segmentation on this batch."""
    return iou_from_confusion(confusion_matrix(pred.argmax(dim=1), target, num_classes, ignore_index))


@torch.no_grad()
def l1_error(pred: Tensor, target: Tensor) -> float:
    """Mean absolute error over all pixels and channels."""
    return (pred - target).abs().mean().item()


@torch.no_grad()
def depth_abs_error(pred: Tensor, target: Tensor) -> float:
    """Mean |pred - depth| over valid pixels (target > 0)."""
    valid = target > 0
    if not valid.any():
        return math.nan
    return (pred - target).abs()[valid].mean().item()


@torch.no_grad()
def depth_rel_error(pred: Tensor, target: Tensor) -> float:
    """Mean |pred - depth| / depth over valid pixels (target > 0)."""
    valid = target > 0
    if not valid.any():
        return math.nan
    return ((pred - target).abs()[valid] / target[valid]).mean().item()


def _normal_angles_deg(pred: Tensor, target: Tensor) -> Tensor:
    valid = target.norm(dim=1) > 0
    cos = (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0)))


@torch.no_grad()
def normal_mean_angle(pred: Tensor, target: Tensor) -> float:
    """Mean angle in degrees between predicted and true normals over valid pixels."""
    angles = _normal_angles_deg(pred, target)
    return angles.mean().item() if angles.numel() else math.nan


@torch.no_grad()
def normal_median_angle(pred: Tensor, target: Tensor) -> float:
    """Median angle in degrees; less sensitive than the mean to a few wild pixels."""
    angles = _normal_angles_deg(pred, target)
    return angles.median().item() if angles.numel() else math.nan


@torch.no_grad()
def normal_within(pred: Tensor, target: Tensor, degrees: float) -> float:
    """Share of valid pixels whose normal is off by less than `degrees` (11.25, 22.5, 30 in
    the literature): unlike the mean, it says how much of the scene is *usable*."""
    angles = _normal_angles_deg(pred, target)
    return (angles < degrees).float().mean().item() if angles.numel() else math.nan


@torch.no_grad()
def mse_error(pred: Tensor, target: Tensor) -> float:
    """Mean squared error over all pixels and channels (the MTSL paper's auto-encoding score)."""
    return (pred - target).pow(2).mean().item()


@torch.no_grad()
def binary_f1(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """F1 score of class 1 (e.g. "edge") over labelled pixels; 1.0 when neither side has any."""
    labelled = target != ignore_index
    guess = (pred.argmax(dim=1) == 1) & labelled
    truth = (target == 1) & labelled
    true_pos = (guess & truth).sum().item()
    denominator = guess.sum().item() + truth.sum().item()
    return 1.0 if denominator == 0 else 2 * true_pos / denominator


# ------------------------------------------------------------------ TaskInfo factories

def classification_task(num_classes: int) -> TaskInfo:
    """Image-level classification scored by accuracy."""
    return TaskInfo("classification", num_classes, cross_entropy,
                    {"accuracy": accuracy}, {"accuracy": True}, "accuracy")


def segmentation_task(num_classes: int, ignore_index: int = IGNORE_INDEX) -> TaskInfo:
    """Per-pixel classification scored by mIoU (primary) and pixel accuracy."""
    return TaskInfo(
        "segmentation", num_classes, partial(cross_entropy, ignore_index=ignore_index),
        {"miou": partial(mean_iou, num_classes=num_classes, ignore_index=ignore_index),
         "pixel_accuracy": partial(pixel_accuracy, ignore_index=ignore_index)},
        {"miou": True, "pixel_accuracy": True}, "miou")


def dense_regression_task(channels: int, loss: Literal["l1", "mse"] = "l1") -> TaskInfo:
    """Per-pixel regression (e.g. image reconstruction) scored by L1 error."""
    losses = {"l1": l1_loss, "mse": mse_loss}
    if loss not in losses:
        raise TaskSpecError(f"dense_regression_task(loss={loss!r}) is unknown; use 'l1' or 'mse'.")
    return TaskInfo("dense_regression", channels, losses[loss],
                    {"l1_error": l1_error}, {"l1_error": False}, "l1_error")


def depth_task() -> TaskInfo:
    """Depth (or inverse depth) with invalid pixels <= 0, scored by abs and rel error."""
    return TaskInfo("dense_regression", 1, depth_l1_loss,
                    {"abs_error": depth_abs_error, "rel_error": depth_rel_error},
                    {"abs_error": False, "rel_error": False}, "abs_error")


NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


def normal_task() -> TaskInfo:
    """Unit surface normals (3 channels), scored by angular error in degrees: mean (primary),
    median, and the share of pixels within 11.25°, 22.5° and 30°, the five numbers
    NYUv2 papers (MTAN, MTSL, LibMTL) report."""
    within = {f"within_{t:g}": partial(normal_within, degrees=t) for t in NORMAL_THRESHOLDS}
    return TaskInfo("dense_regression", 3, normal_cosine_loss,
                    {"mean_angle": normal_mean_angle, "median_angle": normal_median_angle, **within},
                    {"mean_angle": False, "median_angle": False, **dict.fromkeys(within, True)}, "mean_angle")


def autoencoding_task(channels: int = 3) -> TaskInfo:
    """Reconstruct the input image: L1 loss (robust to the few saturated pixels), scored by
    L1 error (primary) and mean squared error, which the MTSL paper reports."""
    return TaskInfo("dense_regression", channels, l1_loss, {"l1_error": l1_error, "mse": mse_error},
                    {"l1_error": False, "mse": False}, "l1_error")


def edge_task(ignore_index: int = IGNORE_INDEX) -> TaskInfo:
    """Semantic edges as 2-class segmentation (0 no edge, 1 edge), scored by edge F1."""
    return TaskInfo(
        "segmentation", 2, partial(balanced_edge_loss, ignore_index=ignore_index),
        {"f1": partial(binary_f1, ignore_index=ignore_index),
         "pixel_accuracy": partial(pixel_accuracy, ignore_index=ignore_index)},
        {"f1": True, "pixel_accuracy": True}, "f1")
