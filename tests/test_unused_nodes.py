"""`UnusedNodesWarning`: nodes of the backbone that the multi-task network never runs are named.

The segments end at the trunk, so whatever the model computes from its input that neither leads
to the trunk nor comes after it (an auxiliary classifier, a skip connection into the head) is
dropped; the warning says which modules, so a skip connection is never lost without a word.
"""
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import graphsurgeon as gs


class SideBranch(nn.Module):
    """A body to the classifier, and a side convolution that joins the output after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.side = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x).mean((2, 3))
        return self.fc(self.body(x).mean((2, 3))) + side


class ShapeReads(nn.Module):
    """Reads the input's shape (dead ``n, c`` entries, and an upsampling to ``x.shape[-2:]`` after
    the trunk, as LRASPP's head does): metadata, no dropped computation."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _n, _c, h, w = x.shape
        return F.interpolate(self.head(self.body(x)), size=(h, w))


def _unused_nodes_warnings(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if issubclass(w.category, gs.UnusedNodesWarning)]


def test_a_side_branch_left_outside_the_tree_is_named_with_the_fix():
    messages = _unused_nodes_warnings(lambda: gs.multitask(SideBranch(), {"a": nn.Linear(4, 3)}))
    assert len(messages) == 1, messages
    message = messages[0]
    assert "SideBranch computes values that the multi-task network will not run" in message
    assert "side (1 node)" in message  # the side conv; its mean is top-level glue
    assert "the top-level SideBranch.forward (1 node: mean)" in message
    assert "body" not in message and "fc" not in message  # the trunk's path and the classifier after it
    assert "pick a trunk that consumes them" in message
    assert "warnings.filterwarnings('ignore', category=graphsurgeon.UnusedNodesWarning)" in message


def test_the_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gs.multitask(SideBranch(), {"a": nn.Linear(4, 3)})
    [warning] = [w for w in caught if issubclass(w.category, gs.UnusedNodesWarning)]
    assert warning.filename == __file__  # this multitask call, not a line inside graphsurgeon


def test_the_warning_can_be_silenced_as_it_says():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=gs.UnusedNodesWarning)
        gs.multitask(SideBranch(), {"a": nn.Linear(4, 3)})


@pytest.mark.parametrize("make", [torchvision.models.resnet18, ShapeReads], ids=["resnet18", "shape_reads"])
def test_a_model_whose_computation_all_runs_gives_no_warning(make):
    model = make()
    trunk = "body" if isinstance(model, ShapeReads) else None
    for training in (True, False):
        model.train(training)
        assert _unused_nodes_warnings(lambda: gs.multitask(model, {"a": nn.Identity()}, trunk=trunk)) == []


@pytest.mark.parametrize("training", [True, False])
def test_googlenet_names_its_auxiliary_classifiers_in_train_mode(training):
    """Built in either mode: the network also runs in train mode, where GoogLeNet's forward
    computes aux1 and aux2 and the network does not."""
    model = torchvision.models.googlenet(weights=None, init_weights=False).train(training)
    messages = _unused_nodes_warnings(lambda: gs.multitask(model, {"a": nn.Linear(1024, 3)}))
    assert len(messages) == 1, messages
    assert "aux1 (9 nodes in train mode: aux1." in messages[0]
    assert "aux2 (9 nodes in train mode: aux2." in messages[0]
    assert "inception" not in messages[0]


def test_lraspp_names_its_low_level_skip_into_the_head():
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    messages = _unused_nodes_warnings(lambda: gs.multitask(model, {"a": nn.Identity()}))
    assert len(messages) == 1, messages
    assert "classifier.low_classifier (1 node)" in messages[0]
    assert "backbone" not in messages[0]  # the low-level feature itself is on the trunk's path
