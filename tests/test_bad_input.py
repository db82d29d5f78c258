"""Bad input raises a GraphSurgeonError subclass naming the module/node and the fix."""
import pytest
import torch
import torchvision
from torch import nn

import graphsurgeon as gs


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace through `if x.sum() > 0`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.gate(x)
        x = self.stem(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_data_dependent_control_flow_names_module_line_and_fix():
    with pytest.raises(gs.TraceError) as err:
        gs.trace(Backbone())
    msg = str(err.value)
    assert "'gate'" in msg and "Gate" in msg
    assert "if x.sum() > 0" in msg  # the offending source line
    assert "leaf_modules=['gate']" in msg


def test_leaf_module_suggested_by_the_error_makes_it_traceable():
    net = gs.multitask(Backbone(), {"a": nn.Linear(4, 3)}, leaf_modules=["gate"], example_input=torch.randn(2, 3, 8, 8))
    assert net(torch.randn(2, 3, 8, 8))["a"].shape == (2, 3)


def test_unknown_leaf_module_name():
    with pytest.raises(gs.TraceError, match="not a submodule"):
        gs.trace(Backbone(), leaf_modules=["gates"])


def test_unknown_trunk_node_suggests_close_names():
    with pytest.raises(gs.TrunkError) as err:
        gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, trunk="layer4.2.relu")
    msg = str(err.value)
    assert "'layer4.2.relu'" in msg and "get_graph_node_names" in msg
    assert "'layer4.1.relu'" in msg  # a close match is offered, by its qualified name


def test_trunk_at_the_input_is_rejected():
    with pytest.raises(gs.TrunkError, match="model input"):
        gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, trunk="x")


@pytest.mark.parametrize(
    "tasks, match",
    [
        ({}, "no tasks"),
        ([], "no tasks"),
        ({"": nn.Linear(512, 2)}, "non-empty"),
        ([("a", nn.Linear(512, 2)), ("a", nn.Linear(512, 3))], "appears twice"),
        ({"a.b": nn.Linear(512, 2)}, "contains '.'"),
        ({"a": "not a module"}, "nn.Module head"),
        ({"a": 3}, "head factory"),
    ],
)
def test_bad_task_specs(tasks, match):
    with pytest.raises(gs.TaskSpecError, match=match):
        gs.multitask(torchvision.models.resnet18(), tasks)


def test_head_that_does_not_fit_the_trunk_is_caught_at_build():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(gs.HeadMismatchError) as err:
        gs.multitask(torchvision.models.resnet18(), {"ok": nn.Linear(512, 2), "bad": nn.Linear(100, 2)}, example_input=x)
    msg = str(err.value)
    assert "'bad'" in msg and "(2, 512)" in msg and "flatten" in msg and "Fix" in msg


def test_forward_with_unknown_task():
    net = gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)})
    with pytest.raises(gs.TaskSpecError, match="unknown tasks"):
        net(torch.randn(1, 3, 32, 32), tasks=["b"])


def test_tree_of_wrong_depth_is_rejected():
    tree = gs.TaskTree.separate(["a"], 3)
    with pytest.raises(gs.TreeEditError, match="segments"):
        gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, sharing=tree)


def test_merging_nodes_that_are_not_siblings():
    net = gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2), "b": nn.Linear(512, 2)})
    a2, b2 = (n.id for n in net.tree.at_depth(2))
    with pytest.raises(gs.TreeEditError) as err:
        net.tree.merge(2, [a2, b2])
    assert "not siblings" in str(err.value) and f"n{a2}" in str(err.value) and "Merge their parents first" in str(err.value)


def test_errors_share_one_base_class():
    for cls in (gs.TraceError, gs.TrunkError, gs.TaskSpecError, gs.HeadMismatchError, gs.CheckpointError, gs.TreeEditError):
        assert issubclass(cls, gs.GraphSurgeonError)
