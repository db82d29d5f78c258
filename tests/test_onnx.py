"""ONNX export (`gs.to_onnx`): outputs equal eager in ONNX Runtime, clear errors otherwise."""
import pytest
import torch
import torchvision
from torch import nn

import graphsurgeon as gs
from graphsurgeon.errors import MissingDependencyError

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# the zoo test sample (tests/test_zoo.py); two in the default run, the rest with --runslow
FAST = ["resnet18", "mobilenet_v3_small"]
SLOW = ["vit_b_16", "efficientnet_b0", "convnext_tiny", "swin_t", "densenet121", "regnet_y_400mf", "squeezenet1_0", "shufflenet_v2_x0_5"]


def _branched(model: nn.Module, x: torch.Tensor) -> gs.MultiTaskNetwork:
    depth = len(gs.segment(gs.trace(model), example_input=x))
    tree = gs.TaskTree.branched(["a", "b", "c"], depth, [["a"], ["b", "c"]], split_at=depth // 2 + 1)
    heads = {t: nn.Sequential(nn.Flatten(), nn.LazyLinear(k)) for t, k in zip("abc", (3, 5, 7))}
    net = gs.multitask(model, heads, sharing=tree, example_input=x)
    return net.eval()


@pytest.mark.parametrize("name", FAST + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW])
def test_onnx_runtime_outputs_equal_eager(name, tmp_path):
    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    net = _branched(model, x)
    path = gs.to_onnx(net, x, tmp_path / "net.onnx", dynamic_batch=True)  # checks itself at atol 1e-5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["a", "b", "c"]
    x3 = torch.randn(3, 3, 32, 32)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        want = net(x3)
    for task, got in zip("abc", session.run(None, {"x": x3.numpy()})):
        torch.testing.assert_close(torch.from_numpy(got), want[task], rtol=1e-5, atol=1e-5)


def test_export_runs_in_eval_mode_and_restores_every_modules_mode(tmp_path):
    torch.manual_seed(0)
    net = gs.multitask(torchvision.models.resnet18(), {"a": nn.Linear(512, 2)}, sharing="shared")
    net.train()
    frozen = net.seg1.n1.bn1 if hasattr(net.seg1.n1, "bn1") else next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()  # a user-frozen BatchNorm inside a training network
    gs.to_onnx(net, torch.randn(2, 3, 32, 32), tmp_path / "net.onnx")
    assert net.training and not frozen.training
    assert all(m.training for m in net.modules() if m is not frozen and isinstance(m, nn.BatchNorm2d))


class _Eigen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return torch.linalg.eigh(y.T @ y).eigenvalues.expand(x.shape[0], -1) + y


class _NoOnnx(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Eigen()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x))


def test_an_op_onnx_cannot_express_is_named_and_nothing_is_written(tmp_path):
    net = gs.multitask(_NoOnnx(), {"a": nn.Identity()})
    target = tmp_path / "net.onnx"
    with pytest.raises(gs.ExportError, match=r"aten\._linalg_eigh.*gs\.to_export"):
        gs.to_onnx(net, torch.randn(3, 4), target)
    assert list(tmp_path.iterdir()) == []  # no model, no temporary left behind


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    import graphsurgeon.optional as optional

    real = optional.importlib.import_module

    def without_onnxscript(name, *args):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", without_onnxscript)
    net = gs.multitask(_NoOnnx(), {"a": nn.Identity()})
    with pytest.raises(MissingDependencyError, match=r"gs\.to_onnx needs .*'onnxscript'.*graphsurgeon\[onnx\]"):
        gs.to_onnx(net, torch.randn(3, 4), tmp_path / "net.onnx")


class _Attention(nn.Module):
    """timm's attention, two ways the exporter rejects its fused op: over 5-d q, k, v (attention
    within groups of tokens, as Twins, NesT and Hiera), or with a relative-position bias read out
    of a table (a non-contiguous mask, as BEiT), whose decomposition changes the output's strides
    after a view of them was recorded. It reads ``self.training``, so it is one leaf call in the graph."""

    def __init__(self, grouped: bool, dim: int = 64, heads: int = 2, tokens: int = 4) -> None:
        super().__init__()
        self.grouped, self.heads, self.tokens = grouped, heads, tokens
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = None if grouped else nn.Parameter(torch.randn(tokens * tokens, heads))

    def forward(self, x):
        if self.grouped:  # (batch, groups, tokens, dim)
            B, G, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, G, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
            bias = None
        else:  # (batch, tokens, dim)
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            bias = self.table.view(self.tokens, self.tokens, -1).permute(2, 0, 1).unsqueeze(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1 if self.training else 0.0)
        if self.grouped:
            return self.proj(out.transpose(2, 3).reshape(B, G, N, C))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize(
    ("grouped", "exporter_error"),
    [(True, "only 4D query, key, and value are supported"), (False, "ValueError: Cannot view a tensor with shape")],
)
def test_fused_attention_the_exporter_rejects_is_exported_written_out(grouped, exporter_error, tmp_path):
    from graphsurgeon.core.export import _onnx_failure

    torch.manual_seed(0)
    model = nn.Sequential(_Attention(grouped), nn.Flatten(), nn.Linear(256 * (3 if grouped else 1), 2)).eval()
    x = torch.randn(2, 3, 4, 64) if grouped else torch.randn(2, 4, 64)
    with pytest.raises(Exception) as bare:  # the backbone on its own: the exporter's limit
        torch.onnx.export(model, (x,), str(tmp_path / "bare.onnx"), dynamo=True, verbose=False)
    assert exporter_error in _onnx_failure(bare.value)  # the cause, not "ConversionError: ... Next steps:"
    net = gs.multitask(model, {"a": nn.Identity()}, example_input=x).eval()
    path = gs.to_onnx(net, x, tmp_path / "net.onnx")  # checks itself against eager
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net(x)["a"]
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), want, rtol=1e-5, atol=1e-5)


def test_the_output_check_is_relative_to_the_outputs_scale(tmp_path):
    """A float32 output of magnitude 1e8 (a random-init deep CNN's, timm's inception_v3 reaches
    1e12) rounds by more than 1e-5 absolute; a wrong output still fails."""
    from graphsurgeon.core.export import _check_onnx_outputs

    torch.manual_seed(0)
    net = gs.multitask(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"a": nn.Linear(4, 2)}).eval()
    with torch.no_grad():
        net.heads["a"].weight.mul_(1e8)
    x = torch.randn(3, 4)
    path = gs.to_onnx(net, x, tmp_path / "net.onnx")
    with torch.no_grad():
        want = net(x)
    assert want["a"].abs().max() > 1e7
    wrong = {"a": want["a"] * (1 + 1e-3)}
    with pytest.raises(gs.ExportError, match=r"output 'a' differs from eager: .* > 1e-05 x"):
        _check_onnx_outputs(path, {"x": x}, wrong, ("a",), 1e-5)
