"""Datasets, task descriptions and corruptions for multi-task experiments.

MultiMNIST is built from 5,000 MNIST digits embedded in the package, so it needs no
download; NYUv2, Cityscapes and CelebA read copies the user downloaded. Every dataset
yields `(image, {task: target})` and describes its tasks with `TaskInfo`.
"""
from graphsurgeon.data.celeba import CelebAAttributes
from graphsurgeon.data.cityscapes import Cityscapes, cityscapes_tasks
from graphsurgeon.data.corruptions import CORRUPTIONS, corrupt
from graphsurgeon.data.dense_targets import Camera, depth_from_inverse, edges_from_labels, normals_from_depth
from graphsurgeon.data.errors import DataError
from graphsurgeon.data.mnist import load_mnist_5k
from graphsurgeon.data.multimnist import MULTIMNIST_TASKS, MultiMNIST, source_digit_pools
from graphsurgeon.data.nyuv2 import NYUV2_TASKS, NYUv2
from graphsurgeon.data.registry import DATASETS, get_dataset
from graphsurgeon.data.tasks import (
    TaskInfo,
    autoencoding_task,
    classification_task,
    confusion_matrix,
    dense_regression_task,
    depth_task,
    edge_task,
    iou_from_confusion,
    normal_task,
    segmentation_task,
)

__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "MULTIMNIST_TASKS",
    "NYUV2_TASKS",
    "Camera",
    "CelebAAttributes",
    "Cityscapes",
    "DataError",
    "MultiMNIST",
    "NYUv2",
    "TaskInfo",
    "autoencoding_task",
    "cityscapes_tasks",
    "classification_task",
    "confusion_matrix",
    "corrupt",
    "dense_regression_task",
    "depth_from_inverse",
    "depth_task",
    "edge_task",
    "edges_from_labels",
    "get_dataset",
    "iou_from_confusion",
    "load_mnist_5k",
    "normal_task",
    "normals_from_depth",
    "segmentation_task",
    "source_digit_pools",
]
