"""The torch.export capture path (``capture="export"`` / ``"auto"``) for backbones fx rejects.

Two backbones that ``symbolic_trace`` cannot trace (a branch on a tensor's shape plus a loop
over the batch; a helper calling ``len`` and ``math.sqrt`` on shapes) are built with
``capture="export"`` and must compute exactly what the model computes: the network's forward
(eval, float64), the segment chain, train mode (BatchNorm with batch statistics and a running
mean update), one training step of a branched tree, and ``to_export`` of the result.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import graphsurgeon as gs
from graphsurgeon import ExampleInputError, TraceError
from graphsurgeon.core.trace import qualified_name, resolve_node

DTYPE = torch.float64


class ShapeBranchLoop(nn.Module):
    """Branches on a shape and iterates over the batch: fx cannot decide the ``if``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 8:
            x = x * 0.5
        x = x.mean((2, 3))
        x = torch.stack([row - row.mean() for row in x.unbind(0)])
        return self.fc(self.blocks(x))


def _untraceable_helper(x: torch.Tensor) -> torch.Tensor:
    """Code fx cannot run on a proxy: ``len`` of a tensor and ``math.sqrt`` of a shape."""
    return x.reshape(len(x), -1) / math.sqrt(x.shape[-1])


class CallsHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16))
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(_untraceable_helper(self.conv(x))))


class ValueBranch(nn.Module):
    """Branches on a tensor's *value*: neither fx nor export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(x)


CASES = {
    "shape_branch_loop": (ShapeBranchLoop, (2, 3, 12, 12)),
    "calls_helper": (CallsHelper, (3, 3, 8, 8)),
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cls, shape = CASES[name]
    return cls().to(DTYPE), torch.randn(*shape, dtype=DTYPE)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's classifier sees: the default trunk's value."""
    trunk = copy.deepcopy(model)
    trunk.fc = nn.Identity()
    with torch.no_grad():
        return trunk(x)


@pytest.mark.parametrize("name", list(CASES))
def test_fx_rejects_the_model_and_names_the_export_capture(name):
    model, _ = _case(name)
    with pytest.raises(TraceError, match="torch.fx cannot trace") as info:
        gs.trace(model)
    assert "capture='export' (or capture='auto'" in str(info.value)  # the fix when no leaf module helps


@pytest.mark.parametrize("name", list(CASES))
def test_forward_equals_the_model_in_eval(name):
    model, x = _case(name)
    model.eval()
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x)
    with torch.no_grad():
        assert torch.equal(net(x)["a"], model(x))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("granularity", ["block", "fine"])
def test_segment_chain_equals_the_model(name, granularity):
    model, x = _case(name)
    model.eval()
    gm = gs.trace(model, capture="export", example_input=x)
    segments = gs.segment(gm, None, granularity, example_input=x)
    assert len(segments) >= 2
    z = x
    with torch.no_grad():
        for s in segments:
            z = s.module(z)
    assert torch.equal(z, _features(model, x))


def test_block_granularity_cuts_between_the_blocks():
    model, x = _case("shape_branch_loop")
    gm = gs.trace(model, capture="export", example_input=x)
    fine = gs.segment(gm, None, "fine", example_input=x)
    block = gs.segment(gm, None, "block", example_input=x)
    assert len(block) == 3 and len(fine) > len(block)  # the stem (with the loop), blocks.0, blocks.1
    assert gs.get_graph_node_names(gm)[-1] == "fc"  # a torch.nn layer is named as by fx (and no "output")


def test_batchnorm_follows_the_mode():
    """BatchNorm exports to different aten ops in each mode; it is kept as one module call, so the
    network uses batch statistics (and updates the running mean) in train mode only."""
    model, x = _case("shape_branch_loop")
    model.train()
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x, sharing="shared")
    reference = copy.deepcopy(model)
    net.train()
    assert torch.equal(net(x)["a"], reference(x))
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, reference.stem[1].running_mean) and bn.num_batches_tracked.item() == 1
    net.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(net(x)["a"], reference(x))


def test_a_branched_tree_trains_one_step():
    model, x = _case("shape_branch_loop")
    gm = gs.trace(model, capture="export", example_input=x)
    depth = len(gs.segment(gm, None, "block", example_input=x))
    tree = gs.TaskTree.branched(["a", "b"], depth, [["a"], ["b"]], split_at=2)
    heads = {"a": nn.Linear(8, 3).to(DTYPE), "b": nn.Linear(8, 1).to(DTYPE)}
    net = gs.multitask(model, heads, capture="export", example_input=x, sharing=tree)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    out = net(x)
    loss = out["a"].square().mean() + out["b"].square().mean()
    loss.backward()
    optimiser.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("heads.a") for k in changed) and any(k.startswith("heads.b") for k in changed)
    assert sum(1 for k in changed if not k.startswith("heads")) >= 4  # shared and per-branch segments


@pytest.mark.parametrize("name", list(CASES))
def test_to_export_equals_eager(name):
    model, x = _case(name)
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc), "b": nn.Identity()}, capture="export", example_input=x)
    net.eval()
    program = gs.to_export(net, x)
    with torch.no_grad():
        got, want = program.module()(x), net(x)
    assert set(got) == set(want) and all(torch.equal(got[t], want[t]) for t in want)


def test_torchscript_compiles_the_shape_check(tmp_path):
    """The captured graph starts with `check_input_shape`, which TorchScript must compile (and
    keep: a scripted network refuses another shape too)."""
    model, x = _case("calls_helper")
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x).eval()
    scripted = gs.to_torchscript(net, method="script")
    torch.jit.save(scripted, tmp_path / "net.pt")
    loaded = torch.jit.load(tmp_path / "net.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x)["a"], net(x)["a"])
    with pytest.raises(Exception, match="captured with torch.export for inputs of shape"):
        loaded(torch.randn(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype))


def test_auto_falls_back_to_export_and_says_why():
    model, x = _case("calls_helper")
    with pytest.warns(UserWarning, match=r"capture='auto': torch.fx cannot trace CallsHelper .* torch.export") as record:
        net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="auto", example_input=x)
    assert len([w for w in record if "capture='auto'" in str(w.message)]) == 1
    assert "module '' " not in str(record[0].message) and "top-level CallsHelper.forward" in str(record[0].message)
    model.eval()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x)["a"], model(x))


def test_auto_keeps_fx_when_fx_works(recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    gm = gs.trace(model, capture="auto", example_input=torch.randn(2, 4, dtype=DTYPE))
    assert any(n.op == "call_module" for n in gm.graph.nodes)  # fx keeps nn.Linear as a module call
    assert not [w for w in recwarn if "capture='auto'" in str(w.message)]


def test_a_model_neither_path_captures_names_both_failures():
    torch.manual_seed(0)
    model, x = ValueBranch().to(DTYPE), torch.randn(2, 4, dtype=DTYPE)
    with pytest.raises(TraceError, match=r"neither capture path works for ValueBranch") as info:
        gs.multitask(model, {"a": nn.Identity()}, capture="auto", example_input=x)
    message = str(info.value)
    assert "fx: torch.fx cannot trace" in message and "export: torch.export cannot capture ValueBranch" in message


def test_export_needs_an_example_input():
    model, _ = _case("calls_helper")
    with pytest.raises(TraceError, match="capture='export' needs example_input"):
        gs.multitask(model, {"a": nn.Identity()}, capture="export")


def test_an_input_of_another_shape_is_refused():
    """The graph is specialised to the example's shape (the loop over the batch is unrolled)."""
    model, x = _case("shape_branch_loop")
    net = gs.multitask(model, {"a": nn.Identity()}, capture="export", example_input=x)
    with pytest.raises(ExampleInputError, match=r"captured with torch.export for inputs of shape \(2, 3, 12, 12\)"):
        net(torch.randn(3, 3, 12, 12, dtype=DTYPE))


def test_an_unknown_capture_is_refused():
    model, x = _case("calls_helper")
    with pytest.raises(gs.OptionError, match="capture='jit'"):
        gs.trace(model, capture="jit", example_input=x)


class RunningMean(nn.Module):
    """Writes its buffers in place in forward: export records ``add_``/``mul_`` on ``get_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("calls", torch.zeros((), dtype=DTYPE))
        self.register_buffer("running", torch.zeros((), dtype=DTYPE))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        self.running.mul_(0.9).add_(0.1 * x.detach().mean())
        return self.fc((self.conv(x) + self.running).mean((2, 3)))


def test_buffer_writes_are_kept_as_on_the_fx_path():
    torch.manual_seed(0)
    model, x = RunningMean().to(DTYPE), torch.randn(2, 3, 4, 4, dtype=DTYPE)
    nets = {
        capture: gs.multitask(model, {"a": nn.Identity()}, capture=capture, example_input=x, granularity="fine")
        for capture in ("fx", "export")
    }
    for _ in range(3):
        assert torch.equal(nets["export"](x)["a"], nets["fx"](x)["a"])
    buffers = {c: {k.split(".", 2)[2]: b for k, b in net.named_buffers()} for c, net in nets.items()}
    assert buffers["export"].keys() == buffers["fx"].keys() == {"calls", "running"}
    assert all(torch.equal(buffers["export"][k], buffers["fx"][k]) for k in buffers["fx"])
    assert buffers["export"]["calls"].item() > 3  # every call wrote it, the build's included


def test_a_torchvision_resnet_segments_as_on_the_fx_path():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).to(DTYPE).eval()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    gm = gs.trace(model, capture="export", example_input=x)
    segments = gs.segment(gm, None, "block", example_input=x)
    assert len(segments) == len(gs.segment(gs.trace(model), None, "block", example_input=x))
    z = x
    with torch.no_grad():
        for s in segments:
            z = s.module(z)
    assert torch.equal(z, _features(model, x))
    def op_names(graph: torch.fx.GraphModule) -> list[str]:
        return [qualified_name(n) for n in graph.graph.nodes if n.op in ("call_function", "call_module")]

    assert op_names(gm) == ["check_input_shape", *op_names(gs.trace(model))]  # trunk= takes the fx names
    layer4 = gs.segment(gm, "layer4", "block", example_input=x)  # a module path: what layer4 returns
    assert layer4[-1].output_name == resolve_node(gm, "layer4.1.relu_1").name


class DropoutInRoot(nn.Module):
    """Reads ``self.training`` in the root's own forward, which no leaf module can hide."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(self.body(x), 0.5, training=self.training))


def test_a_trunk_that_depends_on_the_mode_in_the_root_is_refused():
    torch.manual_seed(0)
    model, x = DropoutInRoot().to(DTYPE).train(), torch.randn(2, 4, dtype=DTYPE)
    with pytest.raises(TraceError, match="differently in train and eval mode"):
        gs.multitask(model, {"a": nn.Identity()}, capture="export", example_input=x)


@pytest.mark.parametrize("capture", ["export", pytest.param("auto", marks=pytest.mark.slow)])
def test_a_checkpoint_loads_back_with_the_capture_it_was_built_with(tmp_path, capture):
    """The checkpoint records the path taken (export, also under "auto") and the example
    input's shape: gs.load needs neither capture= nor example_input=."""
    model, x = _case("shape_branch_loop")
    with pytest.warns(UserWarning) if capture == "auto" else contextlib.nullcontext():
        net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture=capture, example_input=x)
    with torch.no_grad():
        for p in net.parameters():  # weights a fresh build does not have
            p.add_(0.01)
    gs.save(net, tmp_path / "run")
    loaded = gs.load(tmp_path / "run", model, {"a": nn.Linear(8, 3).to(DTYPE)})
    net.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)["a"], net(x)["a"])


def test_a_checkpoint_that_does_not_record_its_capture_says_what_to_pass(tmp_path):
    model, x = _case("shape_branch_loop")
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x)
    for key in ("capture", "example_input"):  # as written before the capture was recorded
        del net.config[key]
    gs.save(net, tmp_path / "old")
    with pytest.raises(gs.CheckpointError, match=r"does not record how its backbone was captured.*capture='export'"):
        gs.load(tmp_path / "old", model, {"a": nn.Linear(8, 3).to(DTYPE)})
    loaded = gs.load(tmp_path / "old", model, {"a": nn.Linear(8, 3).to(DTYPE)}, capture="export", example_input=x)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x)["a"], net.eval()(x)["a"])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def test_a_classifier_replaced_by_identity_leaves_the_output_as_default_trunk():
    """As on the fx path: export records no op for the Identity, so the last parametrised op
    (block's BatchNorm) would otherwise end the trunk inside the last block."""
    torch.manual_seed(0)
    model, x = SmallCNN().to(DTYPE).eval(), torch.randn(2, 3, 10, 10, dtype=DTYPE)
    model.fc = nn.Identity()
    with torch.no_grad():
        for capture in ("fx", "export"):
            net = gs.multitask(model, {"a": nn.Identity()}, capture=capture, example_input=x).eval()
            assert torch.equal(net(x)["a"], model(x)), capture


class CallsTwice(nn.Module):
    """Calls one BatchNorm twice: each call becomes its own module call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 1:  # len of a tensor: fx cannot trace it
            x = self.bn(self.bn(x))
        return self.fc(self.body(x))


@pytest.mark.parametrize("training", [True, False])
def test_a_module_called_twice_is_called_twice(training):
    torch.manual_seed(0)
    model, x = CallsTwice().to(DTYPE).train(training), torch.randn(3, 4, dtype=DTYPE)
    gm = gs.trace(model, capture="export", example_input=x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["bn", "bn"]
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x, granularity="fine")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(net(x)["a"], reference(x))


class WritesThroughAView(nn.Module):
    """Writes one entry of a buffer (``aten.select`` then ``add_`` after export)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(2, dtype=DTYPE))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[len(x) % 2] += 1
        return self.fc(x * 2)


def test_a_buffer_written_through_a_view_is_written():
    torch.manual_seed(0)
    model, x = WritesThroughAView().to(DTYPE), torch.randn(3, 4, dtype=DTYPE)
    net = gs.multitask(model, {"a": nn.Identity()}, capture="export", example_input=x, sharing="shared")
    (seen,) = (b for name, b in net.named_buffers() if name.endswith("seen"))
    before = seen[1].item()
    net(x)
    assert seen[1].item() == before + 1 and seen[0].item() == 0


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


class WithTwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = TwoOutputs()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return self.fc(self.body(a * b / math.sqrt(x.shape[-1])))


def test_leaf_modules_are_kept_as_one_call():
    torch.manual_seed(0)
    model, x = WithTwoOutputs().to(DTYPE).eval(), torch.randn(2, 4, dtype=DTYPE)
    gm = gs.trace(model, capture="export", example_input=x, leaf_modules=["body"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body"]
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x, leaf_modules=[nn.Sequential])
    with torch.no_grad():
        assert torch.equal(net(x)["a"], model(x))


def test_a_leaf_module_that_is_not_one_tensor_call_is_refused():
    torch.manual_seed(0)
    model, x = WithTwoOutputs().to(DTYPE), torch.randn(2, 4, dtype=DTYPE)
    with pytest.raises(TraceError, match=r"leaf_modules names 'pair' \(TwoOutputs\).*one tensor"):
        gs.trace(model, capture="export", example_input=x, leaf_modules=["pair"])


def test_the_batch_stays_dynamic_unless_the_code_fixes_it():
    torch.manual_seed(0)
    model, x = WithTwoOutputs().to(DTYPE).eval(), torch.randn(2, 4, dtype=DTYPE)
    net = gs.multitask(model, {"a": copy.deepcopy(model.fc)}, capture="export", example_input=x)
    other = torch.randn(5, 4, dtype=DTYPE)
    with torch.no_grad():
        assert torch.equal(net(other)["a"], model(other))
    with pytest.raises(ExampleInputError, match=r"inputs of shape \(\*, 4\)"):
        net(torch.randn(5, 5, dtype=DTYPE))
    fixed, y = _case("calls_helper")  # len(x) fixes the batch
    fixed_net = gs.multitask(fixed, {"a": nn.Identity()}, capture="export", example_input=y)
    with pytest.raises(ExampleInputError, match=r"inputs of shape \(3, 3, 8, 8\)"):
        fixed_net(torch.randn(5, 3, 8, 8, dtype=DTYPE))


def test_dropout_follows_the_mode():
    model, x = _case("calls_helper")
    gm = gs.trace(model, capture="export", example_input=x)
    assert "body.2" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    net = gs.multitask(model, {"a": nn.Identity()}, capture="export", example_input=x, granularity="fine")
    net.train()
    torch.manual_seed(1)
    first = net(x)["a"]
    assert not torch.equal(first, net(x)["a"])  # a fresh mask per call
    net.eval()
    assert torch.equal(net(x)["a"], net(x)["a"])


def test_block_granularity_of_a_sequential_backbone_is_fx_s():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4), nn.Linear(4, 2)
    ).to(DTYPE)
    x = torch.randn(2, 4, dtype=DTYPE)
    exported = gs.segment(gs.trace(model, capture="export", example_input=x), None, "block", example_input=x)
    traced = gs.segment(gs.trace(model), None, "block", example_input=x)
    assert len(exported) == len(traced) > 1


def test_a_small_vit_segments_as_on_the_fx_path():
    """MultiheadAttention takes (q, k, v): it is not collapsed into a one-argument call, and the
    batch size ViT reshapes with is fixed rather than left live across every cut."""
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    ).to(DTYPE).eval()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    segments = gs.segment(gs.trace(model, capture="export", example_input=x), None, "block", example_input=x)
    assert len(segments) == len(gs.segment(gs.trace(model), None, "block", example_input=x))
    z = x
    for s in segments:  # with grad: eager MultiheadAttention's no-grad fast path is another kernel
        z = s.module(z)
    reference = copy.deepcopy(model)
    reference.heads = nn.Identity()
    assert torch.equal(z, reference(x))


class _ReturnsAMapping(nn.Module):
    """Reads ``self.training`` (as Hugging Face's encoders do for gradient checkpointing) and
    returns a mapping whose one tensor is used, as they return a ``ModelOutput``: the graph sees
    one tensor out, the module does not return one. Its dropout is the mode-dependent part."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout, self.checkpointing = nn.Linear(4, 4), nn.Dropout(0.5), False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.checkpointing and self.training:
            raise NotImplementedError
        return {"hidden": self.dropout(self.linear(x))}


class _EncoderModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ReturnsAMapping()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.norm(self.encoder(x)["hidden"])
        return {"last_hidden_state": hidden, "pooler_output": self.fc(hidden.mean(1) * len(x))}


def test_a_module_returning_a_mapping_is_traced_through_and_output_fields_are_trunks():
    torch.manual_seed(0)
    model, x = _EncoderModel().to(DTYPE).eval(), torch.randn(2, 3, 4, dtype=DTYPE)
    gm = gs.trace(model, capture="export", example_input=x)
    # collapsed, the encoder would hand its dict to the LayerNorm: its dropout is collapsed instead
    assert gm.meta["graphsurgeon_leaf_modules"] == ("encoder.dropout",)
    net = gs.multitask(model, {"a": nn.Identity()}, trunk="last_hidden_state", capture="export", example_input=x)
    pooled = gs.multitask(model, {"a": nn.Identity()}, capture="export", example_input=x)  # default: pooler_output
    with torch.no_grad():
        assert torch.equal(net.eval()(x)["a"], model(x)["last_hidden_state"])
        assert torch.equal(pooled.eval()(x)["a"], model(x)["pooler_output"])
