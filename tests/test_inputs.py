"""Side inputs: a backbone that reads inputs besides its main one (an image and a metadata
vector), carried unchanged through the segments, the task tree, surgery, fused execution,
export and checkpoints (`graphsurgeon.core.inputs`; a transformer's attention mask is in
test_transformers.py)."""
import copy

import pytest
import torch
from torch import nn

import graphsurgeon as gs

DTYPE = torch.float64


class ImageAndMetadata(nn.Module):
    """``forward(img, meta)``: a CNN on the image, a small MLP on the metadata, joined before
    the classifier (the usual way to add tabular data to an image model)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()),
        )
        self.encode_meta = nn.Linear(4, 8)
        self.fc = nn.Linear(16, 3)

    def forward(self, img: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        z = self.features(img).mean((2, 3))
        return self.fc(torch.cat([z, torch.relu(self.encode_meta(meta))], 1))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"img": torch.randn(4, 3, 8, 8, generator=g, dtype=DTYPE), "meta": torch.randn(4, 4, generator=g, dtype=DTYPE)}


def _trunk_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the model feeds its classifier."""
    seen = {}
    handle = model.fc.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen["z"]


def _build() -> tuple[nn.Module, gs.MultiTaskNetwork]:
    torch.manual_seed(0)
    model = ImageAndMetadata().to(DTYPE)
    net = gs.multitask(model, {"a": nn.Identity(), "b": nn.Identity()}, example_input=_batch())
    return model, net


def test_the_metadata_reaches_the_segment_that_reads_it_in_both_modes():
    model, net = _build()
    batch = _batch()
    assert net.side_inputs == ("meta",) and net.depth == 3
    assert [s.side_inputs for s in net.segments] == [(), (), ("meta",)]
    for mode in (True, False, True):
        model.train(mode)
        net.train(mode)
        want = _trunk_reference(model, batch)
        out = net(batch["img"], meta=batch["meta"])
        assert torch.equal(out["a"], want) and torch.equal(out["b"], want), mode
    other = net.eval()(batch["img"], meta=batch["meta"] + 1)["a"]
    assert not torch.equal(other, _trunk_reference(model.eval(), batch))


def test_surgery_fusion_export_and_checkpoints_carry_the_side_input(tmp_path):
    model, net = _build()
    batch = _batch()
    img, meta = batch["img"], batch["meta"]
    gs.surgery.fuse(net, 1, [[n.id for n in net.tree.at_depth(1)]], init="mean")  # depth 3 stays per task
    net.eval()
    with torch.no_grad():
        want = net(img, meta=meta)
        for what, got in (
            ("fused", net.fuse_execution()(img, meta=meta)),
            ("materialised", gs.materialize(net)(img, meta)),
            ("torch.export", gs.to_export(net, batch).module()(img, meta)),
        ):
            for t in want:
                torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-12, msg=f"{what}: {t}")
        loaded = gs.load(gs.save(net, tmp_path / "net.safetensors"), copy.deepcopy(model), {"a": nn.Identity(), "b": nn.Identity()})
        got = loaded.eval()(img, meta=meta)
    assert loaded.tree == net.tree
    assert all(torch.equal(got[t], want[t]) for t in want)


def test_a_missing_or_unknown_side_input_is_named():
    _, net = _build()
    img = _batch()["img"]
    with pytest.raises(gs.SideInputError, match=r"takes the side inputs \['meta'\]; missing \['meta'\].*meta=\.\.\."):
        net(img)
    with pytest.raises(gs.SideInputError, match=r"unknown \['mask'\]"):
        net(img, meta=_batch()["meta"], mask=img)
    with pytest.raises(gs.SideInputError, match=r"example_input.*missing \['meta'\]"):
        gs.multitask(ImageAndMetadata().to(DTYPE), {"a": nn.Identity()}, example_input=img)
    with pytest.raises(gs.TraceError, match=r"side_inputs names 'scale', which is not one of its arguments"):
        gs.multitask(ImageAndMetadata(), {"a": nn.Identity()}, side_inputs=["scale"])


@pytest.mark.slow
def test_onnx_takes_the_side_input_by_name(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    _, net = _build()
    batch = {k: v.float() for k, v in _batch().items()}
    path = gs.to_onnx(net.float().eval(), batch, tmp_path / "net.onnx")  # checks every output against eager
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "meta"]
