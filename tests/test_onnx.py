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
