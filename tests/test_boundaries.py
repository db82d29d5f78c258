"""Multi-value segment boundaries: encoder-decoders and dense blocks are cut between their blocks.

A decoder that reads encoder skips has no position where one value is live, so its segments
take and return the tuple of the live tensors. Everything built on segments must work
unchanged on top: the chain reproduces the model bit for bit (float64, eval), the network,
fused execution, export and checkpoints equal eager, and backbones whose boundaries carry one
value keep exactly the cut points they had before (pinned in tests/data/single_value_cuts.json,
computed on main before the change).
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from benchmark_modules import load_benchmark
from hypothesis import given, settings
from hypothesis import strategies as st
from model_zoo_gen import random_models
from strategies import examples, networks
from test_export_roundtrip import apply_random_surgery, assert_same_outputs, eager, export_round_trip
from test_fuse_identity import merge
from test_fuse_identity import outputs as fuse_outputs
from test_properties import run_random_surgery
from torch import fx, nn

import graphsurgeon as gs
from graphsurgeon import TaskTree
from graphsurgeon.apps.models import DenseHead, ResNetEncoderDecoder, UNet
from graphsurgeon.apps.report import plot_tree, segment_labels
from graphsurgeon.core.trace import MODULE_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
SINGLE_VALUE_CUTS = json.loads((ROOT / "tests" / "data" / "single_value_cuts.json").read_text())


zoo = load_benchmark("zoo")


def chain(segments, x):
    """Run the segments one after the other, checking that each takes what the last returned."""
    z = x
    with torch.no_grad():
        for prev, s in zip([None, *segments], segments):
            assert prev is None or s.input_names == prev.output_names
            z = s.module(z)
    return z


def unet() -> tuple[UNet, torch.Tensor]:
    torch.manual_seed(0)
    return UNet(1, (4, 8, 16)).eval().double(), torch.randn(2, 1, 16, 16, dtype=torch.float64)


def encoder_decoder() -> tuple[ResNetEncoderDecoder, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNetEncoderDecoder(in_channels=1, decoder_width=8, width_scale=0.125).eval().double()
    return model, torch.randn(2, 1, 32, 32, dtype=torch.float64)


# ---------------------------------------------------------------- single-value backbones unchanged
FAST = ["resnet18", "squeezenet1_0"]
ZOO_SAMPLE = sorted({key.split("/")[0] for key in SINGLE_VALUE_CUTS if not key.startswith("_")})


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ZOO_SAMPLE]
)
def test_single_value_backbones_keep_their_cut_points(name):
    size = zoo.image_size_for(name)
    torch.manual_seed(0)
    gm = gs.trace(zoo.build_backbone(name, size).eval())
    x = torch.randn(2, 3, size, size)
    for granularity in ("block", "fine"):
        key = f"{name}/{granularity}"
        if key not in SINGLE_VALUE_CUTS:  # densenet121/fine: now cut inside its dense blocks
            continue
        segments = gs.segment(gm, granularity=granularity, example_input=x)
        assert [[s.input_name, s.output_name] for s in segments] == SINGLE_VALUE_CUTS[key], key
        assert all(len(s.output_names) == 1 for s in segments), key


# ---------------------------------------------------------------- encoder-decoders
@pytest.mark.parametrize("granularity", ["block", "fine"])
@pytest.mark.parametrize("build, trunk", [(unet, "up0"), (encoder_decoder, "decoder.3")])
def test_segment_chain_of_an_encoder_decoder_equals_the_model(build, trunk, granularity):
    model, x = build()
    segments = gs.segment(gs.trace(model), trunk, granularity, example_input=x)
    assert any(len(s.output_names) > 1 for s in segments)  # cut inside the encoder-decoder
    assert len(segments[-1].output_names) == 1  # the heads read one tensor
    with torch.no_grad():
        assert torch.equal(chain(segments, x), model(x))


def test_every_block_of_the_encoder_decoder_is_a_segment():
    """MTSL can merge or split after the stem, every BasicBlock and every decoder stage."""
    model, x = encoder_decoder()
    gm = gs.trace(model)
    segments = gs.segment(gm, "decoder.3", "block", example_input=x)
    blocks = [n for n, m in model.named_modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    stages = [f"decoder.{k}" for k in range(len(model.decoder))]
    ends = {s.output_name for s in segments}
    assert {gm.meta[MODULE_OUTPUTS][b] for b in blocks + stages} <= ends
    assert len(segments) == 1 + len(blocks) + len(stages)  # and the stem


def _dense_net(model, x, trunk, tree=None):
    torch.manual_seed(1)
    channels = model(x).shape[1]
    heads = {t: DenseHead(channels, 2 + i, tuple(x.shape[-2:])).double() for i, t in enumerate("abc")}
    net = gs.multitask(model, heads, trunk=trunk, example_input=x, sharing=tree or "separate").eval()
    with torch.no_grad():  # every copy its own weights, so that a mixed-up copy shows
        for p in net.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize(
    "build, trunk", [(unet, "up0"), pytest.param(encoder_decoder, "decoder.3", marks=pytest.mark.slow)]
)
def test_network_fused_export_and_checkpoint_equal_eager_on_an_encoder_decoder(build, trunk, tmp_path):
    model, x = build()
    depth = len(gs.segment(gs.trace(model), trunk, example_input=x))
    # a, b share the first segments, then split; c is separate: copies of one segment with
    # different parents run fused, stacking the tuples of their boundaries
    tree = TaskTree.from_partitions(list("abc"), [[["a", "b"], ["c"]]] * 2 + [[["a"], ["b"], ["c"]]] * (depth - 2))
    net = _dense_net(model, x, trunk, tree)
    gs.check(net)
    with torch.no_grad():
        want = net(x)
        fused = copy.deepcopy(net).fuse_execution(True)(x)
        materialised = gs.materialize(net)(x)
        exported = gs.to_export(net, x).module()(x)
    for t in want:
        assert torch.allclose(fused[t], want[t], rtol=0, atol=1e-10), t
        assert torch.equal(materialised[t], want[t]), t
        assert torch.allclose(exported[t], want[t], rtol=0, atol=1e-10), t
    path = gs.save(net, tmp_path / "net.safetensors")
    loaded = gs.load(path, model, {t: copy.deepcopy(h) for t, h in net.heads.items()}).eval()
    with torch.no_grad():
        got = loaded(x)
    assert all(torch.equal(got[t], want[t]) for t in want)


def test_each_task_of_a_fresh_network_reads_the_models_own_output():
    model, x = unet()
    heads = {t: DenseHead(model.out_channels, 2 + i, (16, 16)).double() for i, t in enumerate("ab")}
    net = gs.multitask(model, heads, trunk="up0", example_input=x).eval()
    with torch.no_grad():
        out, features = net(x), model(x)
    assert all(torch.equal(out[t], heads[t](features)) for t in heads)


def test_representations_are_the_main_value_or_a_named_one():
    model, x = unet()
    net = _dense_net(model, x, "up0")
    depth = next(d for d in range(1, net.depth + 1) if len(net.boundary_names(d)) > 1)
    names = net.boundary_names(depth)
    with torch.no_grad():
        full = net.features(x, depth=depth)
        main = net.representations(x, depth)
        first = net.representations(x, depth, value=names[0])
    for i, values in full.items():
        assert isinstance(values, tuple) and len(values) == len(names)
        assert torch.equal(main[i], values[-1]) and torch.equal(first[i], values[0])
    with pytest.raises(gs.TaskSpecError) as err:
        net.representations(x, depth, value="nope")
    assert repr(names[0]) in str(err.value) and "value=None" in str(err.value)


class ConditionedUNet(UNet):
    """`UNet` whose decoder is conditioned on a metadata vector (FiLM after ``up1``): a side
    input read by a segment that starts at a multi-value boundary."""

    def __init__(self) -> None:
        super().__init__(1, (4, 8, 16))
        self.film = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"down{i}")(x)
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = getattr(self, f"up{i}")(x, skips[i])
            if i == 1:
                x = x * (1 + self.film(meta)[:, :, None, None])
        return x


def test_a_side_input_reaches_a_segment_between_multi_value_boundaries(tmp_path):
    """One mechanism: a segment takes its boundary (here the tuple of a skip and the decoder
    feature), then the side inputs it reads; the chain, the network, fused execution, the
    materialised graph, torch.export, surgery and checkpoints all pass both."""
    torch.manual_seed(0)
    model = ConditionedUNet().eval().double()
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64), "meta": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    x, meta = batch["x"], batch["meta"]
    segments = gs.segment(gs.trace(model), "up0", example_input=batch)
    reader = next(s for s in segments if s.side_inputs)
    assert reader.side_inputs == ("meta",) and len(reader.input_names) > 1
    z = x
    with torch.no_grad():
        for s in segments:
            z = s.module(z, *(batch[n] for n in s.side_inputs))
        assert torch.equal(z, model(x, meta))
    depth = len(segments)
    tree = TaskTree.from_partitions(list("abc"), [[["a", "b"], ["c"]]] * 2 + [[["a"], ["b"], ["c"]]] * (depth - 2))
    heads = {t: DenseHead(model.out_channels, 2 + i, (16, 16)).double() for i, t in enumerate("abc")}
    net = gs.multitask(model, heads, trunk="up0", example_input=batch, sharing=tree).eval()
    assert net.side_inputs == ("meta",)
    with torch.no_grad():  # every copy its own weights, so that a mixed-up copy shows
        for p in net.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    for d in range(3, reader.index + 1):  # a and b share through the reader; c stays apart
        gs.surgery.fuse(net, d, [[n.id for n in net.tree.at_depth(d) if set(n.tasks) <= {"a", "b"}]], init="mean")
    assert len(net.tree.at_depth(reader.index)) == 2
    gs.check(net)
    with torch.no_grad():
        want = net(x, meta=meta)
        fused = copy.deepcopy(net).fuse_execution(True)(x, meta=meta)
        materialised = gs.materialize(net)(x, meta)
        exported = gs.to_export(net, batch).module()(x, meta)
        other = net(x, meta=meta + 1)
    for t in want:
        assert torch.allclose(fused[t], want[t], rtol=0, atol=1e-10), t
        assert torch.equal(materialised[t], want[t]), t
        assert torch.allclose(exported[t], want[t], rtol=0, atol=1e-10), t
        assert not torch.equal(other[t], want[t]), t  # the metadata is read, not baked in
    path = gs.save(net, tmp_path / "net.safetensors")
    loaded = gs.load(path, copy.deepcopy(model), {t: copy.deepcopy(h) for t, h in net.heads.items()}).eval()
    with torch.no_grad():
        got = loaded(x, meta=meta)
    assert loaded.tree == net.tree
    assert all(torch.equal(got[t], want[t]) for t in want)


# ---------------------------------------------------------------- torchvision dense models
SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


def _segmentation_model(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
    return model.eval().double(), torch.randn(2, 3, 32, 32, dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEGMENTATION)
def test_torchvision_segmentation_model_chain_and_network_equal_the_model(name):
    """Their OrderedDict outputs: the default trunk is the input of the final classifier conv."""
    model, x = _segmentation_model(name)
    gm = gs.trace(model)
    for granularity in ("block", "fine"):
        segments = gs.segment(gm, granularity=granularity, example_input=x)
        assert len(segments) >= 4, granularity
        trunk = next(n for n in gm.graph.nodes if n.name == segments[-1].output_name)
        want = zoo.trunk_of(model, zoo.classifier_of(gm, trunk), x)
        assert torch.equal(chain(segments, x), want), granularity
    heads = {"a": nn.Conv2d(want.shape[1], 2, 1).double(), "b": nn.Conv2d(want.shape[1], 4, 1).double()}
    net = gs.multitask(model, heads, example_input=x).eval()
    with torch.no_grad():
        out = net(x)
    assert all(torch.equal(out[t], heads[t](want)) for t in heads)


@pytest.mark.slow
def test_lraspp_up_to_its_head_output_carries_the_low_level_skip():
    """trunk="classifier": the head adds a classifier of the low-level features to the upsampled
    high-level branch, so the low-level map is live across the high-level stages."""
    model, x = _segmentation_model("lraspp_mobilenet_v3_large")
    segments = gs.segment(gs.trace(model), "classifier", example_input=x)
    assert any(len(s.output_names) > 1 for s in segments)
    captured = {}
    model.classifier.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(x)
    assert torch.equal(chain(segments, x), captured["out"])


@pytest.mark.slow
def test_densenet121_fine_cuts_inside_its_dense_blocks():
    model = zoo.build_backbone("densenet121", 32).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = gs.trace(model)
    block = gs.segment(gm, granularity="block", example_input=x)
    fine = gs.segment(gm, granularity="fine", example_input=x)
    inside = [s for s in fine if len(s.output_names) > 1]
    assert inside and all("denseblock" in s.node_names[-1] for s in inside)
    trunk = next(n for n in gm.graph.nodes if n.name == fine[-1].output_name)
    want = zoo.trunk_of(model, zoo.classifier_of(gm, trunk), x)
    assert torch.equal(chain(fine, x), want) and torch.equal(chain(block, x), want)


# ---------------------------------------------------------------- bad input
def test_a_block_boundary_wider_than_the_bound_names_the_node_and_the_setting():
    model, _ = unet()  # after down2, the skips of down0 and down1 are live too: three values
    with pytest.raises(gs.BoundaryError) as err:
        gs.multitask(model, {"a": nn.Conv2d(4, 2, 1)}, trunk="up0", max_boundary_values=2)
    msg = str(err.value)
    assert "'down2.body.5'" in msg and "max_boundary_values=2" in msg and "max_boundary_values=3" in msg


@pytest.mark.parametrize("bound", [0, True, "8"])
def test_a_bound_that_is_not_a_positive_int_is_an_option_error(bound):
    model, _ = unet()
    with pytest.raises(gs.OptionError, match="max_boundary_values"):
        gs.segment(gs.trace(model), "up0", max_boundary_values=bound)


@fx.wrap
def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError("non-finite features")


class _CheckedAfter(nn.Module):
    """Checks its first feature map only after computing the second."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = self.b(y)
        _check_finite(y)
        return self.fc(z.mean((2, 3)))


def test_a_trunk_that_leaves_a_value_dangling_says_which():
    with pytest.raises(gs.TrunkError) as err:
        gs.multitask(_CheckedAfter(), {"a": nn.Identity()}, trunk="b")
    msg = str(err.value)
    assert "trunk='b'" in msg and "['a']" in msg and "_check_finite" in msg and "dangling" in msg


# ---------------------------------------------------------------- random models with decoder stages
SKIP_MODELS = random_models(max_ops=4, max_channels=6, skip_stage=True)
PROPERTIES = settings(max_examples=examples(6), deadline=None)
EXPORT = settings(max_examples=examples(3), deadline=None)


def _has_multi_value_boundary(case) -> bool:
    return any(len(s.output_names) > 1 for s in case.net.segments)


@PROPERTIES
@given(st.data())
def test_random_edits_keep_every_invariant_on_models_with_skip_stages(data: st.DataObject) -> None:
    case = data.draw(networks(models=SKIP_MODELS, min_tasks=1, max_tasks=3, granularity="block"))
    assert _has_multi_value_boundary(case), case.model.program.summary()
    run_random_surgery(case, data, max_edits=3)


@PROPERTIES
@given(networks(models=SKIP_MODELS, min_tasks=2, max_tasks=3, layout="separate", granularity="block"))
def test_merging_identical_copies_across_multi_value_boundaries_changes_no_output(case) -> None:
    before = fuse_outputs(case.net, case.x)
    for depth in range(1, case.net.depth + 1):
        kids = [n.id for n in case.net.tree.at_depth(depth)]
        if len(kids) > 1:
            merge(case, depth, kids, "mean")
    after = fuse_outputs(case.net, case.x)
    assert all(torch.equal(after[t], before[t]) for t in before)


@EXPORT
@given(st.data())
def test_export_and_checkpoints_equal_eager_on_models_with_skip_stages(data: st.DataObject) -> None:
    case = data.draw(networks(models=SKIP_MODELS, min_tasks=1, max_tasks=3, granularity="block"))
    apply_random_surgery(case, data)
    want = eager(case.net, case.x)
    exported, reloaded = export_round_trip(case.net, case.x)
    assert_same_outputs(exported, want, "torch.export")
    assert_same_outputs(reloaded, want, "torch.export save/load")
    with tempfile.TemporaryDirectory() as folder:
        path = gs.save(case.net, Path(folder) / "net.safetensors")
        loaded = gs.load(path, case.model, case.heads()).eval()
        assert_same_outputs(eager(loaded, case.x), want, "gs.save/gs.load")


def test_the_tree_plot_labels_each_depth_with_where_its_segment_ends(tmp_path):
    model, x = unet()
    net = gs.multitask(model, {"a": nn.Conv2d(4, 2, 1).double()}, trunk="up0", example_input=x)
    labels = segment_labels(net)
    assert len(labels) == net.depth and labels[-1].startswith("up0.")
    assert any(label.startswith("down2.") for label in labels)
    plot_tree(net.tree, tmp_path / "tree.png", depth_labels=labels)
    assert (tmp_path / "tree.png").stat().st_size > 0
