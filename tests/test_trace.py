"""`graphsurgeon.core.trace`: torchvision's node names, what ``trunk=`` accepts, forward
arguments with defaults, timm's no-trace registry, and the default trunk of a model without
a classifier."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names as tv_get_graph_node_names

import graphsurgeon as gs
from graphsurgeon.core.trace import bound_arguments


class TwoBranch(nn.Module):
    """A user model with repeated ops at several depths (``add``, ``relu``, ``flatten``), so
    that the ``_k`` suffixes are counted per name, and a top-level ``flatten`` that fx names
    ``flatten_1`` (a nested ``flatten`` comes first) but torchvision names ``flatten``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.ModuleDict({"a": nn.Conv2d(4, 4, 1), "b": nn.Conv2d(4, 4, 1)})
        self.inner = Inner()
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = x + self.block["a"](x)
        x = self.relu(x + self.block["b"](x))
        z = self.inner(x)
        return self.fc(torch.flatten(z, 1) + 1)


class Inner(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 2).mean(-1).unsqueeze(-1)


def _segments(model, trunk):
    gm = gs.trace(model.eval())
    return [(s.input_name, s.output_name, s.node_names) for s in gs.segment(gm, trunk)]


@pytest.mark.parametrize("make", [torchvision.models.resnet18, TwoBranch], ids=["resnet18", "user"])
def test_node_names_are_torchvisions_eval_names(make):
    model = make().eval()
    assert gs.get_graph_node_names(model) == tv_get_graph_node_names(model, suppress_diff_warning=True)[1]


def test_resnet_names_are_qualified():
    names = gs.get_graph_node_names(torchvision.models.resnet18())
    assert names[0] == "x" and names[-3:] == ["avgpool", "flatten", "fc"]
    assert "layer4.1.relu_1" in names and "layer4_1_relu_1" not in names


def test_qualified_names_count_repeats_per_name_not_globally():
    names = gs.get_graph_node_names(TwoBranch())
    assert names.count("relu") == 1 and "relu_1" in names
    assert "inner.flatten" in names and "flatten" in names  # fx: flatten and flatten_1


@pytest.mark.parametrize("trunk", ["layer4", "layer4.1.relu_1", "layer4_1_relu_1"])
def test_module_path_qualified_name_and_fx_name_give_the_same_segments(trunk):
    model = torchvision.models.resnet18()
    assert _segments(model, trunk) == _segments(model, "layer4_1_relu_1")


def test_qualified_name_wins_over_an_fx_name_of_another_node():
    model = TwoBranch()
    gm = gs.trace(model)
    fx_flatten = next(n for n in gm.graph.nodes if n.name == "flatten")
    assert fx_flatten.meta["graphsurgeon_qualname"] == "inner.flatten"  # fx's "flatten" is the nested one
    by_qualified = gs.segment(gm, "flatten")[-1]
    assert by_qualified.output_name == "flatten_1"  # torchvision's top-level "flatten"


def test_unknown_trunk_offers_qualified_close_matches():
    with pytest.raises(gs.TrunkError) as err:
        gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, trunk="layer4.1.relu_2")
    msg = str(err.value)
    assert "'layer4.1.relu_1'" in msg and "get_graph_node_names(model)" in msg


def test_network_and_checkpoint_name_the_trunk_by_its_qualified_name(tmp_path):
    model = torchvision.models.resnet18()
    def head():
        return nn.Sequential(nn.Flatten(), nn.Linear(512, 2))

    net = gs.multitask(model, {"a": head()}, trunk="layer4", example_input=torch.randn(2, 3, 32, 32))
    assert net.trunk_name == "layer4.1.relu_1" and net.config["trunk"] == "layer4.1.relu_1"
    gs.save(net, tmp_path / "net.safetensors")
    again = gs.load(tmp_path / "net.safetensors", model, {"a": head()})
    assert again.depth == net.depth and again.trunk_name == net.trunk_name


def test_checkpoints_that_stored_the_fx_trunk_name_still_load(tmp_path):
    """Checkpoints written before qualified names stored the trunk's fx name."""
    model = torchvision.models.resnet18()
    head = nn.Sequential(nn.Flatten(), nn.Linear(512, 2))
    net = gs.multitask(model, {"a": head}, trunk="layer4")
    net.config["trunk"] = "layer4_1_relu_1"
    gs.save(net, tmp_path / "old.safetensors")
    again = gs.load(tmp_path / "old.safetensors", model, {"a": nn.Sequential(nn.Flatten(), nn.Linear(512, 2))})
    assert again.trunk_name == "layer4.1.relu_1"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)["a"], net.eval()(x)["a"])


class Pair(nn.Module):
    def forward(self, x):
        return x.relu(), x.sigmoid()


class PairUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.pair = Pair()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        a, b = self.pair(self.lin(x))
        return self.fc(a + b)


def test_a_module_without_one_output_is_named_with_its_nodes():
    with pytest.raises(gs.TrunkError, match=r"'pair' is a module.*several values.*pair\.sigmoid"):
        gs.multitask(PairUser(), {"a": nn.Identity()}, trunk="pair")


class Masked(nn.Module):
    """A forward with options after the input, as timm's ViT has (``attn_mask=None``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x, mask=None, scale=1.0):
        y = self.lin(x) * scale
        if mask is not None:
            y = y.masked_fill(mask, 0.0)
        return self.out(torch.relu(y))


def test_forward_arguments_with_defaults_are_bound_to_them():
    model = Masked().double().eval()
    assert bound_arguments(model, None) == {"mask": None, "scale": 1.0}
    assert bound_arguments(model, {"scale": 2.0}) == {"mask": None, "scale": 2.0}
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=torch.randn(4, 6, dtype=torch.float64)).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net(x)["a"], torch.relu(model.lin(x)))


def test_concrete_args_override_a_default():
    model = Masked().double().eval()
    net = gs.multitask(model, {"a": nn.Identity()}, concrete_args={"scale": 2.0}).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net(x)["a"], torch.relu(model.lin(x) * 2.0))


def test_timm_vit_traces_with_its_attn_mask_default():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    net = gs.multitask(model, {"logits": model.head}, trunk="head_drop", example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)["logits"], model(x), rtol=0, atol=1e-12)


def test_timm_models_are_traced_with_timms_notrace_registry():
    """MobileViT's unfolding reads tensor shapes in Python control flow; timm registers it as
    a no-trace module, so it becomes one leaf call (it fails to trace without the registry)."""
    timm = pytest.importorskip("timm")
    import importlib

    trace_module = importlib.import_module("graphsurgeon.core.trace")
    model = timm.create_model("mobilevit_xxs").eval()
    modules, _ = trace_module._timm_registry(model)
    assert modules and any(isinstance(m, modules) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)["a"], model.forward_head(model.forward_features(x), pre_logits=True))


def test_non_timm_models_do_not_get_timms_registry():
    import importlib

    trace_module = importlib.import_module("graphsurgeon.core.trace")
    assert trace_module._timm_registry(torchvision.models.resnet18()) == ((), ())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_model_without_classifier_shares_its_pooled_features(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x).eval()
    with torch.no_grad():
        out = net(x)["a"]
        assert out.shape == (2, model.num_features)
        torch.testing.assert_close(out, model(x))


def test_a_classifier_replaced_by_identity_makes_the_output_the_trunk():
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    net = gs.multitask(model, {"a": nn.Linear(512, 2)})
    assert net.trunk_name == "fc" and net.depth == gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}).depth


def test_an_example_input_the_model_does_not_take_names_the_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(gs.ExampleInputError, match=r"shape \(1, 3, 16, 16\).*node '2'"):
        gs.multitask(model, {"a": nn.Identity()}, example_input=torch.randn(1, 3, 16, 16))


ZEROS = torch.zeros(3)


class TensorDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, bias=ZEROS, times=2):
        return self.lin(x) * times + bias


def test_a_default_fx_cannot_write_into_code_is_a_trace_error_naming_it():
    assert bound_arguments(TensorDefault(), None) == {"times": 2}  # the tensor stays unbound
    with pytest.raises(gs.TraceError, match=r"\['bias'\].*wrap the model"):
        gs.trace(TensorDefault())


def test_spatial_trunk_is_the_last_feature_map():
    import torchvision

    from graphsurgeon.errors import TrunkError

    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    net = gs.multitask(model, {"seg": torch.nn.Conv2d(512, 3, 1)}, trunk="spatial", example_input=x)
    assert net.trunk_name == "layer4.1.relu_1"  # layer4's output, before the global pooling
    assert net(x)["seg"].shape == (2, 3, 2, 2)
    with pytest.raises(TrunkError, match='trunk="spatial" needs the shapes.*example_input'):
        gs.multitask(model, {"seg": torch.nn.Conv2d(512, 3, 1)}, trunk="spatial")


def test_timm_vit_without_classifier_defaults_to_its_pooled_output():
    """timm's ViT ends in an Identity head after a LayerNorm that fx traces into F.layer_norm (a
    functional op on get_attr weights): the last weighted op is not a Linear, so the trunk is the
    model's output (the pooled token), not the input of the last block's MLP."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    net = gs.multitask(model, {"z": torch.nn.Identity()}, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(net(x)["z"], model(x)) and net(x)["z"].shape == (2, model.num_features)
