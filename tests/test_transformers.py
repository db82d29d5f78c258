"""Hugging Face backbones (BERT, GPT-2, ViT) through `gs.multitask`, end to end.

Each model is built from a tiny config (no model hub: `benchmarks/tiny_transformers.py`), in
float64 with every dropout probability 0, so that the multi-task network must reproduce the
model's own output exactly in both modes: any op that tracing dropped, duplicated or froze to
the tracing mode shows.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import pytest
import torch
from benchmark_modules import load_benchmark
from torch import nn

import graphsurgeon as gs
from graphsurgeon.errors import MissingDependencyError, TraceError, TrunkError

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.utils.fx", reason="transformers >= 5 has no torch.fx tracer")

# the tiny configs the coverage sweep runs too (benchmarks/tiny_transformers.py)
tiny = load_benchmark("tiny_transformers")
HIDDEN = tiny.HIDDEN
_bert, _gpt2, _vit, _tokens, _pixels = tiny.bert, tiny.gpt2, tiny.vit, tiny.tokens, tiny.pixels


# (model factory, input factory, trunk= value, ModelOutput field the trunk is); None = the default
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str | None, str]] = {
    "bert-pooled": (_bert, _tokens, None, "pooler_output"),
    "bert-tokens": (_bert, _tokens, "last_hidden_state", "last_hidden_state"),
    "gpt2-tokens": (_gpt2, _tokens, None, "last_hidden_state"),
    # ln_f's output is last_hidden_state before its reshape to the input's shape, which would
    # keep the input's shape live across every block: cutting earlier gives a segment per block
    "gpt2-ln_f": (_gpt2, _tokens, "ln_f", "last_hidden_state"),
    "vit-pooled": (_vit, _pixels, "pooler_output", "pooler_output"),
    "vit-tokens": (_vit, _pixels, "last_hidden_state", "last_hidden_state"),
}


def _heads() -> dict[str, nn.Module]:
    """A classifier and a small MLP; both act on the last dimension, so they fit a pooled
    (batch, hidden) trunk and a per-token (batch, tokens, hidden) one alike."""
    torch.manual_seed(1)
    return {
        "cls": nn.Linear(HIDDEN, 3).double(),
        "tag": nn.Sequential(nn.Linear(HIDDEN, 16), nn.Tanh(), nn.Linear(16, 5)).double(),
    }


@pytest.fixture(params=list(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor, str | None, str]:
    make_model, make_input, trunk, field = CASES[request.param]
    torch.manual_seed(0)
    return make_model().double().eval(), make_input(), trunk, field


def _reference(model: nn.Module, heads: dict[str, nn.Module], x: torch.Tensor, field: str) -> dict[str, torch.Tensor]:
    name = "pixel_values" if x.is_floating_point() else "input_ids"
    with torch.no_grad():
        features = model(**{name: x})[field]
        return {t: head(features) for t, head in heads.items()}


def _build(model: nn.Module, x: torch.Tensor, trunk: str | None) -> tuple[gs.MultiTaskNetwork, dict[str, nn.Module]]:
    heads = _heads()
    net = gs.multitask(model, copy.deepcopy(heads), trunk=trunk, example_input=x)
    return net, heads


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for t in want:
        assert got[t].shape == want[t].shape, (what, t)
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-10, msg=f"{what}: task {t}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_equal_the_models_own(case, mode: str) -> None:
    model, x, trunk, field = case
    net, heads = _build(model, x, trunk)
    model = copy.deepcopy(model).train(mode == "train")
    net.train(mode == "train")
    with torch.no_grad():
        got = net(x)
    _assert_equal(got, _reference(model, heads, x, field), f"{mode} mode")


def test_one_training_step_moves_the_parameters(case) -> None:
    model, x, trunk, _ = case
    net, _ = _build(model, x, trunk)
    net.train()
    before = [p.detach().clone() for p in net.parameters()]
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = sum(out.pow(2).mean() for out in net(x).values())
    assert torch.isfinite(loss)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2, f"only {sum(moved)} of {len(moved)} parameters moved"
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_export_equals_eager(case) -> None:
    model, x, trunk, _ = case
    net, _ = _build(model, x, trunk)
    net.eval()
    program = gs.to_export(net, x)
    with torch.no_grad():
        _assert_equal(program.module()(x), net(x), "torch.export")


def test_save_load_round_trip(case, tmp_path) -> None:
    model, x, trunk, _ = case
    net, _ = _build(model, x, trunk)
    with torch.no_grad():  # weights that differ from a fresh build, so a load that did nothing shows
        for i, p in enumerate(net.parameters()):
            p.add_(0.001 * (i + 1))
    path = gs.save(net.eval(), tmp_path / "net.safetensors")
    loaded = gs.load(path, model, _heads()).eval()
    with torch.no_grad():
        got, want = loaded(x), net(x)
    for t in want:
        assert torch.equal(got[t], want[t]), t


def test_nodes_are_named_by_module_path_and_layers_are_traced_through() -> None:
    """BertEncoder reads ``self.training`` (for gradient checkpointing) but traces the same in
    both modes: only the attention modules (dropout on the attention weights) become leaves, so
    the encoder's layers stay visible; the names are the modules' own, even though HFTracer runs
    leaf modules a second time on meta tensors to learn their shapes."""
    config = transformers.BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        attention_probs_dropout_prob=0.1,  # the attention's dropout: its graph depends on the mode
    )
    names = gs.get_graph_node_names(transformers.BertModel(config).eval())
    assert "encoder.layer.1.attention.self" in names  # a leaf: one node
    assert "encoder.layer.1.output.dense" in names and "pooler.dense" in names
    assert "encoder" not in names and not any(n.startswith("encoder.layer.1.attention.self.") for n in names)


def test_gpt2_cut_before_its_final_reshape_has_a_segment_per_block() -> None:
    model, x = _gpt2().double().eval(), _tokens()
    assert len(gs.multitask(model, _heads(), example_input=x).segments) == 1
    assert len(gs.multitask(model, _heads(), trunk="ln_f", example_input=x).segments) >= 3


def test_vit_cuts_between_its_encoder_layers() -> None:
    """ViTEncoder loops over a ModuleList of layers: each is a block of its own."""
    net = gs.multitask(_vit().double().eval(), _heads(), example_input=_pixels())
    assert len(net.segments) >= 2 + 2  # embeddings, the two layers, (layernorm, pooler)


def test_dropout_inside_a_leaf_attention_follows_the_mode() -> None:
    config = transformers.BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5,
    )
    model, x = transformers.BertModel(config).double().eval(), _tokens()
    net, heads = _build(model, x, None)
    with torch.no_grad():
        _assert_equal(net.eval()(x), _reference(model, heads, x, "pooler_output"), "eval mode")
        first, second = net.train()(x), net(x)
    assert not torch.equal(first["cls"], second["cls"]), "no dropout in train mode"


def test_trunk_names_the_output_fields() -> None:
    model = _bert().double().eval()
    names = gs.get_graph_node_names(model)
    assert "pooler_output" not in names  # a field of the output, not a node: resolved separately
    with pytest.raises(TrunkError, match="pooler_outptu"):
        gs.multitask(model, _heads(), trunk="pooler_outptu")


class _TinyConfig(transformers.PretrainedConfig):
    model_type = "graphsurgeon-tiny"


class _TinyModel(transformers.PreTrainedModel):
    """A PreTrainedModel that transformers' fx tracer does not list as supported."""

    config_class = _TinyConfig

    def __init__(self, config: _TinyConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(input_ids)


def test_an_unsupported_pretrained_model_is_a_trace_error_naming_it() -> None:
    with pytest.raises(TraceError, match="does not support _TinyModel.*Fix:"):
        gs.multitask(_TinyModel(_TinyConfig()), _heads())


def test_a_transformers_without_its_fx_tracer_says_which_to_install(monkeypatch) -> None:
    """transformers 5 removed ``transformers.utils.fx``: the error says which version to pin."""
    monkeypatch.delattr(transformers.utils, "fx")
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)
    with pytest.raises(MissingDependencyError, match=r"BertModel.*graphsurgeon\[transformers\]"):
        gs.multitask(_bert(), _heads())


def _padded_batch() -> dict[str, torch.Tensor]:
    """Token ids with an attention mask that pads two of the three sequences."""
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    return {"input_ids": _tokens(), "attention_mask": mask}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_an_attention_mask_reaches_every_segment_that_reads_it(attention: str, tmp_path) -> None:
    config = transformers.BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attention,
    )
    torch.manual_seed(0)
    model, batch = transformers.BertModel(config).double().eval(), _padded_batch()
    heads = _heads()
    net = gs.multitask(model, copy.deepcopy(heads), side_inputs=["attention_mask"], example_input=batch).eval()
    assert net.side_inputs == ("attention_mask",)
    readers = [s.index for s in net.segments if "attention_mask" in s.side_inputs]
    if attention == "eager":  # SDPA's mask reads the embeddings' dtype: the layers share a segment
        assert len(readers) == 2, [s.side_inputs for s in net.segments]  # one per encoder layer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    want = _reference_with(model, heads, batch)
    with torch.no_grad():
        _assert_equal(net(ids, attention_mask=mask), want, "with the mask")
        unmasked = net(ids, attention_mask=torch.ones_like(mask))
        assert not torch.allclose(unmasked["cls"], want["cls"]), "the mask changed nothing"
        _assert_equal(net.fuse_execution()(ids, attention_mask=mask), want, "fused")
        _assert_equal(gs.materialize(net)(ids, mask), want, "materialised")
        _assert_equal(gs.to_export(net, batch).module()(ids, mask), want, "torch.export")
    loaded = gs.load(gs.save(net, tmp_path / "net.safetensors"), model, _heads()).eval()
    with torch.no_grad():
        _assert_equal(loaded(ids, attention_mask=mask), want, "save/load")
    with pytest.raises(gs.SideInputError, match=r"side inputs \['attention_mask'\]; missing \['attention_mask'\]"):
        net(ids)


def _reference_with(model: nn.Module, heads: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        features = model(**batch)["pooler_output"]
        return {t: head(features) for t, head in heads.items()}


def test_gpt2_reads_its_batch_size_from_the_ids_in_every_block_that_applies_the_mask() -> None:
    """GPT-2 reshapes its mask to ``input_ids.view(-1, n).shape[0]`` rows: the blocks take the ids
    for that shape read, so a padded batch still gets a segment per block (trunk ln_f, as without a mask)."""
    model, batch = _gpt2().double().eval(), _padded_batch()
    heads = _heads()
    net = gs.multitask(
        model, copy.deepcopy(heads), trunk="ln_f", side_inputs=["attention_mask"], example_input=batch
    ).eval()
    assert [s.side_inputs for s in net.segments][1:3] == [("input_ids", "attention_mask")] * 2
    with torch.no_grad():
        features = model(**batch).last_hidden_state
        want = {t: head(features) for t, head in heads.items()}
        _assert_equal(net(batch["input_ids"], attention_mask=batch["attention_mask"]), want, "with the mask")
        unmasked = net(batch["input_ids"], attention_mask=torch.ones_like(batch["attention_mask"]))
    assert not torch.allclose(unmasked["cls"], want["cls"])
