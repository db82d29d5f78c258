"""Network invariants under random trees and random surgery, on random DAG models and torchvision.

Each edit is drawn against the network's current tree, applied to the tree
(``tree2, origin = net.tree.merge(...)``) and then to the network (``net.rebuild``) with a
random group init. After every edit the network must pass `graphsurgeon.check`, its
materialised fx graph must compute exactly what the eager network computes, running a
subset of tasks must give exactly the full run's outputs for them, and the parameter count
must be Σ over tree nodes of that segment's parameters plus the heads. Edits that only copy
weights (split, replicate) or do not touch a task's path must not change its output.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from model_zoo_gen import random_models
from strategies import GROUP_INITS, Merge, NetCase, build_case, cut, edits, examples, networks, task_lists, trees
from torch import nn

import graphsurgeon as gs
from graphsurgeon import InvariantError, TaskSpecError

NETS = settings(max_examples=examples(20), deadline=None)
TORCHVISION = settings(max_examples=examples(4), deadline=None)


def outputs(net, x, tasks=None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(x, tasks=tasks)


def expected_parameter_count(case: NetCase) -> int:
    tree = case.net.tree
    segs = sum(len(tree.at_depth(d)) * case.segment_params[d - 1] for d in range(1, tree.depth + 1))
    return segs + sum(p.numel() for h in case.net.heads.values() for p in h.parameters())


def assert_network_properties(case: NetCase, subset: list[str]) -> None:
    net, x = case.net, case.x
    gs.check(net)
    full = outputs(net, x)
    assert list(full) == list(net.tasks)
    # the materialised graph is the same computation, bit for bit
    gm = gs.materialise(net)
    with torch.no_grad():
        flat = gm(x)
    assert set(flat) == set(full)
    for t in full:
        assert torch.equal(flat[t], full[t]), f"materialised output of {t!r} differs from eager"
    # running a subset of the tasks computes the same outputs for them (and only them)
    part = outputs(net, x, tasks=subset)
    assert list(part) == subset
    for t in subset:
        assert torch.equal(part[t], full[t]), f"forward(tasks={subset}) changes {t!r}"
    # parameter count: Σ over tree nodes of one copy of that segment, plus the heads
    count = expected_parameter_count(case)
    assert gs.count_parameters(net) == count
    assert sum(p.numel() for p in net.parameters()) == count


def run_random_surgery(case: NetCase, data: st.DataObject, max_edits: int) -> None:
    net, x = case.net, case.x
    event(f"depth {net.depth}, {len(net.tasks)} tasks")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)  # "fresh" inits draw from the global RNG
        assert_network_properties(case, data.draw(st.lists(st.sampled_from(net.tasks), min_size=1, unique=True)))
        for _ in range(data.draw(st.integers(1, max_edits))):
            edit = data.draw(edits(net.tree))
            init = data.draw(st.sampled_from(GROUP_INITS))
            event(f"{type(edit).__name__}" + (f" of {len(edit.node_ids)} ({init})" if isinstance(edit, Merge) else ""))
            before = outputs(net, x)
            old_tree = net.tree
            old_modules = {n.id: net.node_module(n) for n in old_tree.nodes if n.depth}
            tree2, origin = edit.apply(net.tree)
            created = net.rebuild(tree2, origin, init=init)
            assert net.tree is tree2
            # surviving ids keep their very module (weights, optimizer state); others are new
            for n in tree2.nodes:
                if not n.depth:
                    continue
                module = net.node_module(n)
                if origin[n.id] == (n.id,):
                    assert module is old_modules[n.id] and n.id not in created
                else:
                    assert created[n.id] is module
                    assert all(module is not m for m in old_modules.values())
            after = outputs(net, x)
            if not isinstance(edit, Merge):
                # split and replicate only copy weights: no output may change
                for t in net.tasks:
                    assert torch.equal(after[t], before[t]), f"{edit} changed the output of {t!r}"
            else:
                members = {t for i in edit.node_ids for t in old_tree.node(i).tasks}
                kept = [t for t in net.tasks if t not in members]
                if init == "copy":
                    kept += list(old_tree.node(edit.node_ids[0]).tasks)
                for t in kept:
                    assert torch.equal(after[t], before[t]), f"{edit} (init={init}) changed {t!r}"
            subset = data.draw(st.lists(st.sampled_from(net.tasks), min_size=1, unique=True))
            assert_network_properties(case, subset)


# ---------------------------------------------------------------------------------- random DAG models
@NETS
@given(st.data())
def test_random_edit_sequences_keep_every_invariant_on_random_models(data: st.DataObject) -> None:
    case = data.draw(networks(min_tasks=1, max_tasks=4))
    run_random_surgery(case, data, max_edits=4)


@NETS
@given(networks(min_tasks=1, max_tasks=4, granularity="block"))
def test_random_trees_with_block_segments_satisfy_the_invariants(case: NetCase) -> None:
    assert_network_properties(case, list(case.net.tasks)[::-1])


@settings(max_examples=examples(15), deadline=None)
@given(st.data())
def test_networks_built_with_any_tree_compute_the_same_outputs_at_the_start(data: st.DataObject) -> None:
    """Every node starts as a copy of the same segment, so the tree cannot matter before training."""
    case = data.draw(networks(min_tasks=2, max_tasks=3, layout="separate"))
    ref = outputs(case.net, case.x)
    tree = data.draw(trees(tasks=case.net.tasks, depth=case.net.depth))
    other = build_case(case.model, case.x, tree, case.seed, case.granularity)
    got = outputs(other.net, case.x)
    for t in ref:
        assert torch.equal(got[t], ref[t])


# ---------------------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def mobilenet():
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v3_small().double().eval()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return model, x, cut(model, x, "block")


@TORCHVISION
@given(st.data())
def test_random_edit_sequences_keep_every_invariant_on_mobilenet_v3_small(mobilenet, data: st.DataObject) -> None:
    model, x, segments = mobilenet
    tasks = data.draw(task_lists(2, 3))
    tree = data.draw(trees(tasks=tasks, depth=len(segments[0])))
    case = build_case(model, x, tree, data.draw(st.integers(0, 99)), "block", segments)
    run_random_surgery(case, data, max_edits=2)


# ---------------------------------------------------------------------------------- bad input / known bugs
def _tiny():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    return model.double().eval(), torch.randn(2, 2, 8, 8, dtype=torch.float64)


def test_check_catches_a_segment_copy_without_a_tree_node() -> None:
    model, x = _tiny()
    net = gs.multitask(model, {"a": nn.Linear(3, 2).double(), "b": nn.Linear(3, 2).double()}, example_input=x)
    tree2, origin = net.tree.merge(1, [1, 2])
    net.rebuild(tree2, origin, init="mean")
    gs.check(net)
    net.seg1["n99"] = net.seg1[f"n{tree2.at_depth(1)[0].id}"]  # a stray copy that shares weights
    with pytest.raises(InvariantError, match="n99"):
        gs.check(net)


def test_check_rejects_segment_copies_that_share_a_parameter() -> None:
    model, x = _tiny()
    net = gs.multitask(model, {"a": nn.Linear(3, 2).double(), "b": nn.Linear(3, 2).double()}, example_input=x)
    a, b = (net.node_module(n) for n in net.tree.at_depth(1))
    name = next(n for n, _ in a.named_parameters())
    owner, _, leaf = name.rpartition(".")
    setattr(b.get_submodule(owner), leaf, getattr(a.get_submodule(owner), leaf))
    with pytest.raises(InvariantError, match="same tensor"):
        gs.check(net)


@pytest.mark.parametrize("name", ["keys", "training", "forward", "update"])
def test_task_names_that_clash_with_module_dict_attributes_raise_task_spec_error(name: str) -> None:
    model, x = _tiny()
    with pytest.raises(TaskSpecError, match=name):
        gs.multitask(model, {name: nn.Linear(3, 2).double()}, example_input=x)


def test_forward_with_unknown_tasks_raises_task_spec_error() -> None:
    model, x = _tiny()
    net = gs.multitask(model, {"a": nn.Linear(3, 2).double()}, example_input=x)
    with pytest.raises(TaskSpecError, match=r"unknown tasks \['zz'\]"):
        net(x, tasks=["a", "zz"])


@settings(max_examples=examples(10), deadline=None)
@given(random_models(max_ops=4, max_channels=6), st.integers(1, 3))
def test_every_task_path_computes_the_original_backbone_trunk_exactly(drawn, n_tasks) -> None:
    """Every tree over one backbone computes the backbone's own trunk features for each task."""
    model, x = drawn
    tasks = [f"t{i}" for i in range(n_tasks)]
    case = build_case(model, x, tasks, seed=0, granularity="fine")
    # heads that expose the trunk itself: identity
    for t in tasks:
        case.net.heads[t] = nn.Identity()
    with torch.no_grad():
        trunk = torch.relu(model.fc1(model.pool(model.features(x)).flatten(1)))
    for t, y in outputs(case.net, x).items():
        assert torch.equal(y, trunk), t
