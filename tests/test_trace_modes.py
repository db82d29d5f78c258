"""Train/eval correctness, in-place writes and a user's model left as it was.

A graph records one path through Python control flow. These tests pin that a network built
from any backbone gives the original model's outputs in *both* modes, whichever mode it was
built in and after any number of switches; that in-place writes (including buffer updates) are
never dropped; that sibling branches never see each other's writes; and that no library call
changes the user's model.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.models.feature_extraction
from torch import nn

import graphsurgeon as gs
from graphsurgeon.core.trace import trace
from graphsurgeon.errors import TraceError

DTYPE = torch.float64


class ModeBranching(nn.Module):
    """A user block that branches on ``self.training`` in its own code (as timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x * 2
        return F.dropout(self.bn(x), 0.0, training=self.training)


class Backbone(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.conv = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(self.block(x))), 1))


def _trunk_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the backbone computes up to the default trunk (the classifier's input)."""
    seen = {}
    handle = model.fc.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen["z"]


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: sorted(vars(m)) for name, m in model.named_modules()}
    return state, attributes


@pytest.mark.parametrize("built_in_train", [True, False])
def test_user_module_branching_on_training_matches_in_both_modes(built_in_train):
    torch.manual_seed(0)
    model = Backbone(ModeBranching()).to(DTYPE).train(built_in_train)
    x = torch.randn(4, 3, 8, 8, dtype=DTYPE)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x)
    for mode in (True, False, True, False, True):
        model.train(mode)
        net.train(mode)
        assert torch.equal(net(x)["a"], _trunk_reference(model, x)), f"differs in {'train' if mode else 'eval'} mode"


@pytest.mark.parametrize("built_in_train", [True, False])
def test_stochastic_depth_follows_the_mode(built_in_train):
    """torchvision's StochasticDepth calls ``stochastic_depth(..., self.training)``: built in train
    mode, the old trace baked training=True in, so eval outputs were random."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.5).to(DTYPE).train(built_in_train)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x)  # trunk: classifier.1 (flatten)
    reference = torchvision.models.feature_extraction.create_feature_extractor(model, {"classifier.1": "z"})
    for mode in (False, True, False):
        net.train(mode)
        reference.train(mode)
        torch.manual_seed(1)
        expected = reference(x)["z"]
        torch.manual_seed(1)  # same draws in the same order: train mode is compared exactly too
        assert torch.equal(net(x)["a"], expected)
    net.eval()
    assert torch.equal(net(x)["a"], net(x)["a"])  # eval is deterministic


class InPlaceScale(nn.Module):
    """A mask scaled by ``div_`` whose result is not re-assigned (as timm's DropPath does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        mask = y.new_ones(y.shape[0], 1, 1, 1)
        mask.div_(0.5)
        return y * mask


class RunningMean(nn.Module):
    """Updates buffers in forward: a call counter and an exponential mean of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.register_buffer("calls", torch.zeros((), dtype=DTYPE))
        self.register_buffer("running", torch.zeros((), dtype=DTYPE))

    def forward(self, x):
        self.calls.add_(1)
        self.running.mul_(0.9).add_(0.1 * x.detach().mean())
        return self.conv(x) + self.running


class WithStateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = InPlaceScale()
        self.stateful = RunningMean()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stateful(self.block(x))), 1))


def test_in_place_writes_and_buffer_updates_are_kept():
    torch.manual_seed(0)
    model = WithStateful().to(DTYPE)
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    net = gs.multitask(model, {"a": nn.Identity()}, sharing="shared", granularity="fine")
    reference = copy.deepcopy(model)
    for _ in range(3):
        assert torch.equal(net(x)["a"], _trunk_reference(reference, x))
    buffers = {name.split(".", 2)[2]: b for name, b in net.named_buffers()}
    assert buffers["stateful.calls"].item() == reference.stateful.calls.item() == 3
    assert torch.equal(buffers["stateful.running"], reference.stateful.running)


class ScaleInPlace(nn.Module):
    def forward(self, x):
        x.mul_(2)  # writes to its input: the parent's output, which a sibling branch reads too
        return x


class BranchStartsInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Sequential(ScaleInPlace(), nn.Linear(4, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.second(self.first(x)))


def test_a_branch_that_writes_its_input_leaves_its_siblings_input_alone():
    torch.manual_seed(0)
    model = BranchStartsInPlace().to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    tree = gs.TaskTree.shared(["a", "b"], 2)
    tree, origin = tree.split(tree.at_depth(2)[0].id, [["a"], ["b"]])
    net = gs.multitask(model, {"a": nn.Identity(), "b": nn.Identity()}, sharing="shared", granularity="fine")
    net.rebuild(tree, origin, init="copy")
    out = net(x)
    expected = _trunk_reference(model, x.clone())
    assert torch.equal(out["a"], expected) and torch.equal(out["b"], expected)


def test_no_library_call_changes_the_users_model():
    torch.manual_seed(0)
    model = torchvision.models.swin_t().to(DTYPE)
    x = torch.randn(1, 3, 32, 32, dtype=DTYPE)
    before = _snapshot(model)
    gs.get_graph_node_names(model)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x)
    net.train()
    net(x)
    after = _snapshot(model)
    assert before[1] == after[1], "tracing added attributes to the user's model"
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    again = gs.multitask(model, {"a": nn.Identity()}, example_input=x)
    assert net.fingerprints == again.fingerprints  # tracing twice gives the same segments


class RootBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        if self.training:
            x = x + 1
        return self.fc(x)


def test_a_trunk_that_depends_on_the_mode_in_the_root_is_refused():
    with pytest.raises(TraceError, match=r"differently in train and eval mode.*node 'add'.*trunk='mean'"):
        gs.multitask(RootBranches(), {"a": nn.Identity()})
    # a trunk before the mode-dependent code is fine
    net = gs.multitask(RootBranches(), {"a": nn.Identity()}, trunk="mean")
    assert net.depth == 1


def test_timm_cnns_match_in_both_modes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    for name in ("efficientnet_b0", "convnext_atto"):
        for built_in_train in (True, False):
            model = timm.create_model(name, num_classes=0, drop_path_rate=0.2).to(DTYPE).train(built_in_train)
            trunk = gs.get_graph_node_names(model)[-1]
            net = gs.multitask(model, {"a": nn.Identity()}, example_input=x, trunk=trunk)
            for mode in (True, False, True):
                model.train(mode)
                net.train(mode)
                torch.manual_seed(2)
                expected = model(x)
                torch.manual_seed(2)
                assert torch.equal(net(x)["a"], expected), (name, built_in_train, mode)


class _Dropping(nn.Module):
    """Dropout in its own code: its graph depends on the mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, self.training)


class _CheckpointingStage(nn.Module):
    """Reads ``self.training`` for a branch that is off (as BertEncoder's gradient checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpointing = False
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), _Dropping()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x) if self.checkpointing and self.training else block(x)
        return x


class _LoopedBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = _CheckpointingStage()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(x))


def test_only_the_innermost_mode_readers_become_leaves_when_that_suffices():
    gm = trace(_LoopedBackbone())
    assert gm.meta["graphsurgeon_leaf_modules"] == ("stage.blocks.0.1", "stage.blocks.1.1", "stage.blocks.2.1")
    assert "stage.blocks.2.0" in gs.get_graph_node_names(gm)  # the stage is traced through


def test_elements_of_a_looped_module_list_are_blocks():
    gm = trace(_LoopedBackbone())
    x = torch.randn(4, 8)
    assert len(gs.segment(gm, granularity="block", example_input=x)) == 3  # before: one (the stage)
    net = gs.multitask(_LoopedBackbone().eval(), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)}, example_input=x)
    assert len(net.segments) == 3


class RootDropout(nn.Module):
    """Dropout called in the model's own forward with its mode (timm's GhostNet head), in the
    keyword or the positional form: no submodule to make a leaf of."""

    def __init__(self, positional: bool) -> None:
        super().__init__()
        self.positional = positional
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        x = F.dropout(x, 0.5, self.training) if self.positional else F.dropout(x, p=0.5, training=self.training)
        return self.fc(x)


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("built_in_train", [True, False])
def test_a_root_level_dropout_follows_the_mode(built_in_train, positional):
    torch.manual_seed(0)
    model = RootDropout(positional).to(DTYPE).train(built_in_train)
    x = torch.randn(4, 3, 8, 8, dtype=DTYPE)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x)  # trunk: the dropout's output
    flat = gs.materialize(net)
    for mode in (True, False, True, False):
        model.train(mode)
        net.train(mode)
        flat.train(mode)
        torch.manual_seed(1)
        expected = _trunk_reference(model, x)
        for runs in (net, flat):
            torch.manual_seed(1)  # the same draws in the same order: train mode is compared exactly
            assert torch.equal(runs(x)["a"], expected), (type(runs).__name__, mode)
    assert not torch.equal(net.train()(x)["a"], net.eval()(x)["a"])  # dropout is on in train mode only
