"""Checkpoints: save → load reproduces the network exactly; saving is atomic; bad files are named.

A checkpoint is one safetensors file holding the tree (as JSON), the config, a fingerprint of
every segment and the weights. Loading rebuilds the network from the user's model and heads,
lays it out as the saved tree (whose ids need not be contiguous after surgery) and must then
compute exactly what the saved network computed. Every way a checkpoint can fail to match
(corrupt bytes, a foreign safetensors file, other tasks, another backbone, other heads) must
raise `CheckpointError` saying what is wrong and what to do.
"""
from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from strategies import GROUP_INITS, NetCase, edit_sequences, examples, make_heads, networks
from torch import nn

import graphsurgeon as gs
import graphsurgeon.core.checkpoint as checkpoint
from graphsurgeon import CheckpointError
from graphsurgeon.core.checkpoint import read_metadata

ROUND_TRIP = settings(max_examples=examples(10), deadline=None)


def eager(net, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def assert_same_network(loaded, saved, x) -> None:
    gs.check(loaded)
    assert loaded.tree == saved.tree
    want, got = saved.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    out, ref = eager(loaded, x), eager(saved, x)
    assert set(out) == set(ref)
    for t in ref:
        assert torch.equal(out[t], ref[t]), t


# ---------------------------------------------------------------------------------- round trip
@ROUND_TRIP
@given(data=st.data())
def test_save_load_round_trip_equals_eager_for_random_trees_after_surgery(data: st.DataObject, tmp_path_factory) -> None:
    case: NetCase = data.draw(networks(min_tasks=1, max_tasks=3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        for edit in data.draw(edit_sequences(case.net.tree, min_size=0, max_size=3)):
            tree2, origin = edit.apply(case.net.tree)
            case.net.rebuild(tree2, origin, init=data.draw(st.sampled_from(GROUP_INITS)))
    path = tmp_path_factory.mktemp("ckpt") / "net.safetensors"
    gs.save(case.net, path)
    # heads from another seed: the checkpoint's weights must overwrite them
    loaded = gs.load(path, case.model, case.heads(seed=case.seed + 1)).eval()
    assert_same_network(loaded, case.net, case.x)
    assert read_metadata(path)["tree"] == case.net.tree


def _tiny(act: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), act or nn.ReLU(), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)
        )
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    return model.double().eval(), x


def _tiny_net(tasks=("a", "b", "c"), act=None, seed=0):
    model, x = _tiny(act)
    net = gs.multitask(model, make_heads(tasks, 3, seed), example_input=x).eval()
    return net, model, x


@pytest.fixture
def merged(tmp_path):
    """A three-task network after two merges and a split (ids no longer contiguous), saved."""
    net, model, x = _tiny_net()

    def node_of(tree, depth, task):
        return tree.path(task)[depth].id

    for edit in (
        lambda t: t.merge(1, [node_of(t, 1, "b"), node_of(t, 1, "a")]),
        lambda t: t.merge(2, [node_of(t, 2, "a"), node_of(t, 2, "b")]),
        lambda t: t.split(node_of(t, 1, "a"), [["b"], ["a"]]),
    ):
        tree2, origin = edit(net.tree)
        net.rebuild(tree2, origin, init="mean")
    with torch.no_grad():  # make every copy different, so a mixed-up copy shows
        for i, p in enumerate(net.parameters()):
            p.add_(0.01 * (i + 1))
    ids = sorted(n.id for n in net.tree.nodes)
    assert ids != list(range(len(ids)))
    path = gs.save(net, tmp_path / "ckpt" / "net.safetensors", extra={"epoch": 3, "note": "after surgery"})
    return net, model, x, path


def test_round_trip_after_merges_with_non_contiguous_ids(merged) -> None:
    net, model, x, path = merged
    loaded = gs.load(path, model, make_heads(net.tasks, 3, seed=99)).eval()
    assert [n.id for n in loaded.tree.nodes] == [n.id for n in net.tree.nodes]
    assert_same_network(loaded, net, x)
    assert read_metadata(path)["extra"] == {"epoch": 3, "note": "after surgery"}


def test_round_trip_with_the_tasks_listed_in_another_order(merged) -> None:
    net, model, x, path = merged
    heads = make_heads(net.tasks, 3, seed=99)
    loaded = gs.load(path, model, dict(reversed(list(heads.items())))).eval()
    assert set(loaded.tasks) == set(net.tasks)
    out, ref = eager(loaded, x), eager(net, x)
    for t in ref:
        assert torch.equal(out[t], ref[t]), t


def test_load_weights_into_a_network_with_another_tree_raises(merged) -> None:
    _, _model, _x, path = merged
    other, _, _ = _tiny_net()
    with pytest.raises(CheckpointError, match="(?s)different task tree.*graphsurgeon.load"):
        checkpoint.load_weights(other, path)


# ---------------------------------------------------------------------------------- atomic writes
def test_save_leaves_only_the_checkpoint_in_its_directory(merged) -> None:
    net, _, _, path = merged
    gs.save(net, path)  # overwrite
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp_file(merged, monkeypatch) -> None:
    net, model, _x, path = merged
    old = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the disk fills up
            f.write(old[: len(old) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", broken_save_file)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        gs.save(net, path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(path.parent)) == [path.name]
    monkeypatch.undo()
    gs.load(path, model, make_heads(net.tasks, 3, seed=1))  # still a valid checkpoint


def test_tasks_sharing_one_head_module_are_rejected_at_build(tmp_path) -> None:
    # every task owns its head; a shared one could neither be counted nor saved (aliased tensors)
    model, x = _tiny()
    head = nn.Linear(3, 2).double()
    with pytest.raises(gs.TaskSpecError, match=r"same head module.*copy.deepcopy"):
        gs.multitask(model, {"a": head, "b": head}, example_input=x)


# ---------------------------------------------------------------------------------- bad files
def _corruptions(data: bytes) -> dict[str, bytes]:
    rng = random.Random(0)
    header = struct.pack("<Q", 64) + bytes(rng.randrange(256) for _ in range(64))
    return {
        "truncated-half": data[: len(data) // 2],
        "truncated-last-byte": data[:-1],
        "truncated-header": data[:5],
        "empty": b"",
        "random-bytes": bytes(rng.randrange(256) for _ in range(len(data))),
        "random-header": header + data[8 + 64 :],
    }


@pytest.mark.parametrize(
    "kind", ["truncated-half", "truncated-last-byte", "truncated-header", "empty", "random-bytes", "random-header"]
)
def test_a_corrupt_file_raises_checkpoint_error_saying_to_re_save(merged, kind: str) -> None:
    net, model, _, path = merged
    path.write_bytes(_corruptions(path.read_bytes())[kind])
    with pytest.raises(CheckpointError, match=r"corrupt.*Re-save it") as info:
        gs.load(path, model, make_heads(net.tasks, 3, seed=1))
    assert str(path) in str(info.value)


def test_a_missing_file_raises_checkpoint_error_naming_the_path(tmp_path) -> None:
    model, _ = _tiny()
    with pytest.raises(CheckpointError, match="does not exist.*graphsurgeon.save"):
        gs.load(tmp_path / "nope.safetensors", model, make_heads(["a"], 3, 0))


def test_a_safetensors_file_without_graphsurgeon_metadata_is_rejected(tmp_path) -> None:
    model, _ = _tiny()
    net = gs.multitask(model, make_heads(["a", "b"], 3, 0))
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="not a graphsurgeon checkpoint.*graphsurgeon.save"):
        gs.load(path, model, make_heads(["a", "b"], 3, 0))


@pytest.mark.parametrize(
    "metadata",
    [
        {"format": "graphsurgeon-checkpoint/1"},  # no tree
        {"format": "graphsurgeon-checkpoint/1", "tree": "{oops", "config": "{}", "fingerprints": "[]"},
        {"format": "graphsurgeon-checkpoint/1", "tree": '{"tasks": ["a"], "depth": 1, "nodes": []}', "config": "{}",
         "fingerprints": "[]"},
    ],
    ids=["no-tree", "tree-not-json", "tree-breaks-invariants"],
)
def test_corrupt_graphsurgeon_metadata_raises_checkpoint_error(tmp_path, metadata) -> None:
    model, _ = _tiny()
    path = tmp_path / "meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="corrupt metadata.*Re-save it"):
        gs.load(path, model, make_heads(["a"], 3, 0))


# ---------------------------------------------------------------------------------- mismatches
def test_loading_with_other_task_names_raises_naming_the_saved_tasks(merged) -> None:
    _, model, _, path = merged
    with pytest.raises(CheckpointError, match=r"saved for tasks \['a', 'b', 'c'\].*same task names"):
        gs.load(path, model, make_heads(["a", "b", "z"], 3, 0))
    with pytest.raises(CheckpointError, match="saved for tasks"):
        gs.load(path, model, make_heads(["a", "b"], 3, 0))


def test_loading_into_a_different_backbone_raises_naming_the_segment(merged) -> None:
    net, _, _, path = merged
    # same parameters and segment count, but segment 1 applies its activation twice: other code
    other, _x = _tiny(act=nn.Sequential(nn.ReLU(), nn.ReLU()))
    assert gs.multitask(other, make_heads(net.tasks, 3, 0)).depth == net.depth
    with pytest.raises(CheckpointError, match=r"different backbone: segment 1 differs.*same model"):
        gs.load(path, other, make_heads(net.tasks, 3, 0))


def test_loading_into_a_backbone_with_other_leaf_modules_raises(merged) -> None:
    net, _, _, path = merged
    other, _ = _tiny(act=nn.GELU())
    with pytest.raises(CheckpointError, match="different backbone"):
        gs.load(path, other, make_heads(net.tasks, 3, 0))


def test_loading_into_a_backbone_with_another_number_of_segments_raises(tmp_path) -> None:
    model, x = _tiny()
    net = gs.multitask(model, make_heads(["a"], 3, 0), granularity="fine", example_input=x)
    path = gs.save(net, tmp_path / "n.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        deeper = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4),
        ).double()
    with pytest.raises(CheckpointError, match=rf"has {net.depth} segments; this backbone gives \d+.*same model"):
        gs.load(path, deeper, make_heads(["a"], 3, 0))


def test_loading_into_an_unrelated_backbone_raises_checkpoint_error(merged) -> None:
    net, _, _, path = merged
    unrelated = nn.Sequential(nn.Flatten(), nn.Linear(128, 3), nn.ReLU(), nn.Linear(3, 4)).double()
    with pytest.raises(CheckpointError, match="backbone"):
        gs.load(path, unrelated, make_heads(net.tasks, 3, 0))


def test_loading_with_a_head_of_another_shape_raises_naming_the_tensor(merged) -> None:
    net, model, _, path = merged
    heads = make_heads(net.tasks, 3, 0)
    heads["b"] = nn.Linear(3, 7).double()
    with pytest.raises(CheckpointError, match=r"heads\.b\.(weight|bias) has shape \(\d[,)].*the network expects \(7[,)].*same heads"):
        gs.load(path, model, heads)


def test_loading_with_a_head_of_another_structure_raises_listing_missing_and_unexpected(merged) -> None:
    net, model, _, path = merged
    heads = make_heads(net.tasks, 3, 0)
    heads["c"] = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(CheckpointError, match=r"missing \['heads\.c\.0\.bias'.*unexpected \['heads\.c\.bias'.*heads"):
        gs.load(path, model, heads)


def test_metadata_is_plain_json_readable_without_loading_weights(merged) -> None:
    net, _, _, path = merged
    meta = read_metadata(path)
    assert meta["tree"] == net.tree
    assert meta["config"] == json.loads(json.dumps(net.config))
    assert len(meta["fingerprints"]) == net.depth and all(isinstance(f, str) for f in meta["fingerprints"])


# ---------------------------------------------------------------------------------- hardening
def _data_offset(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_byte_flips_in_the_tensor_data_are_detected_by_the_hash(merged) -> None:
    """safetensors checks the layout, not the values: without the stored hash each of these
    flips loaded a network with one wrong weight."""
    net, model, _, path = merged
    data = path.read_bytes()
    start = _data_offset(data)
    rng = random.Random(1)
    for position in rng.sample(range(start, len(data)), 20):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=r"the data of .* does not match its hash.*Re-save it") as info:
            gs.load(path, model, make_heads(net.tasks, 3, seed=1))
        assert str(path) in str(info.value)


def test_a_tensor_of_another_dtype_is_refused_not_cast(merged) -> None:
    net, model, _, path = merged  # saved in float64
    with pytest.raises(CheckpointError, match=r"(?s): \S+ is torch.float64, the network's is torch.float32.*net.to"):
        gs.load(path, model.float(), {t: h.float() for t, h in make_heads(net.tasks, 3, seed=1).items()})


def _rewrite(path, **fields: str) -> None:
    """``path`` with its metadata fields replaced (the tensors kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, **fields})


_DEEP = "[" * 200_000 + "]" * 200_000
_TREE = {"tasks": ["a", "b", "c"], "depth": 2, "nodes": [{"id": 0, "depth": 0, "parent": None, "tasks": ["a", "b", "c"]}]}
_MUTATIONS = {
    "config": ["[]", '"backbone"', "1", "null", _DEEP, '{"a": ' * 5000 + "1" + "}" * 5000],
    "extra": ["[]", '"x"', "3", _DEEP],
    "fingerprints": ["{}", "[1, 2]", '"abc"', _DEEP],
    "sha256": ["[]", '{"x": 1}', "7", _DEEP],
    "tree": [
        "[]", '"tree"', "null", _DEEP, json.dumps({**_TREE, "depth": "2"}), json.dumps({**_TREE, "tasks": "abc"}),
        json.dumps({**_TREE, "nodes": {"0": 1}}), json.dumps({**_TREE, "nodes": [[0, 0, None, ["a"]]]}),
        json.dumps({**_TREE, "nodes": [{**_TREE["nodes"][0], "id": "0"}]}),
        json.dumps({**_TREE, "nodes": [{**_TREE["nodes"][0], "depth": 0.0}]}),
        json.dumps({**_TREE, "nodes": [{**_TREE["nodes"][0], "tasks": [1, 2]}]}),
        json.dumps({**_TREE, "depth": True}), json.dumps({"tasks": ["a"]}),
    ],
}


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, vs in _MUTATIONS.items() for v in vs],
    ids=[f"{f}-{i}" for f, vs in _MUTATIONS.items() for i in range(len(vs))],
)
def test_metadata_of_the_wrong_json_type_raises_checkpoint_error(merged, field: str, value: str) -> None:
    net, model, _, path = merged
    _rewrite(path, **{field: value})
    with pytest.raises(CheckpointError, match=rf"corrupt metadata .*{field}.*Re-save it") as info:
        gs.load(path, model, make_heads(net.tasks, 3, seed=1))
    assert str(path) in str(info.value)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)


def _mutated(data: st.DataObject, value):
    """``value`` with one part of it (possibly all of it) replaced by arbitrary JSON."""
    if isinstance(value, (dict, list)) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(value) if isinstance(value, dict) else range(len(value))))
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[key] = _mutated(data, value[key])
        return copy
    return data.draw(_JSON)


@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_any_mutation_of_any_metadata_field_loads_or_raises_checkpoint_error(tmp_path_factory, data: st.DataObject) -> None:
    """One part of one field of a real checkpoint's metadata replaced by arbitrary JSON: loading
    gives the saved network or raises `CheckpointError`, nothing else."""
    from safetensors import safe_open

    net, model, x = _tiny_net()
    path = gs.save(net, tmp_path_factory.mktemp("meta") / "net.safetensors", extra={"epoch": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    field = data.draw(st.sampled_from(["tree", "config", "fingerprints", "extra", "sha256"]))
    _rewrite(path, **{field: json.dumps(_mutated(data, json.loads(meta[field])))})
    try:
        loaded = gs.load(path, model, make_heads(net.tasks, 3, seed=0))
    except CheckpointError:
        return
    assert_same_network(loaded, net, x)


def test_a_large_tree_validates_in_linear_time() -> None:
    """Checking a 15,001-node tree scanned every node per node (13 s); it must take well under a second."""
    import time

    from graphsurgeon.core.tree import TaskTree

    for tasks, depth in ([f"t{i}" for i in range(15_000)], 1), (["a"], 15_000):
        text = TaskTree.separate(tasks, depth).to_json()
        start = time.perf_counter()
        tree = TaskTree.from_json(text)
        tree.check()
        assert time.perf_counter() - start < 3.0
        assert len(tree.nodes) == 15_001 and str(tree).count("\n") == 15_001
