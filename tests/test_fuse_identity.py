"""Fusing sibling copies: identical copies fuse without changing any output; inits do what they say.

A "separate" network starts with every node a deep copy of the same segment, so its sibling
copies are identical, and merging any set of them with ``init="copy"`` or ``init="mean"`` must
leave every task's output bit for bit the same. Once copies differ, ``mean`` must average the
members' parameters (keeping the first member's buffers), ``copy`` must take the first member,
``fresh`` must re-initialise, and a callable gets the members in the order they were listed.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_zoo_gen import Op, Program, build_model
from strategies import NetCase, build_case, examples, full_precision, networks, sibling_sets
from torch import nn

import graphsurgeon as gs
from graphsurgeon import TaskSpecError

FUSE = settings(max_examples=examples(20), deadline=None)


def outputs(net, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def merge(case: NetCase, depth: int, ids, init):
    tree2, origin = case.net.tree.merge(depth, ids)
    case.net.rebuild(tree2, origin, init=init)
    (group,) = [n for n in tree2.at_depth(depth) if len(origin[n.id]) > 1]
    gs.check(case.net)
    return group


def perturb(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in module.parameters():
            p.add_(torch.randn_like(p))
        for _name, b in module.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))


@FUSE
@given(st.data())
def test_merging_identical_siblings_with_copy_or_mean_of_two_changes_no_output(data: st.DataObject) -> None:
    """Repeatedly merge random sibling sets of a separate network, down to hard sharing if drawn."""
    case = data.draw(networks(min_tasks=2, max_tasks=4, layout="separate"))
    before = outputs(case.net, case.x)
    for _ in range(data.draw(st.integers(1, 5))):
        siblings = sibling_sets(case.net.tree)
        if not siblings:
            break
        depth, kids = data.draw(st.sampled_from(siblings))
        init = data.draw(st.sampled_from(["copy", "mean"]))
        ids = data.draw(st.lists(st.sampled_from(kids), min_size=2, max_size=len(kids), unique=True))
        merge(case, depth, ids, init)
        after = outputs(case.net, case.x)
        for t in before:
            assert torch.equal(after[t], before[t]), f"merging {ids} at depth {depth} (init={init}) changed {t!r}"


@FUSE
@given(networks(min_tasks=2, max_tasks=4, layout="separate"))
def test_merging_all_identical_copies_level_by_level_gives_hard_sharing_with_the_same_outputs(case: NetCase) -> None:
    before = outputs(case.net, case.x)
    params_before = gs.count_parameters(case.net)
    for depth in range(1, case.net.depth + 1):
        for _, kids in [s for s in sibling_sets(case.net.tree) if s[0] == depth]:
            merge(case, depth, list(kids), "copy")
    assert case.net.tree.same_structure(gs.TaskTree.shared(case.net.tasks, case.net.depth))
    heads = sum(p.numel() for h in case.net.heads.values() for p in h.parameters())
    k = len(case.net.tasks)
    assert gs.count_parameters(case.net) - heads == (params_before - heads) // k
    after = outputs(case.net, case.x)
    for t in before:
        assert torch.equal(after[t], before[t])


def _three_task_net():
    prog = Program(7, 2, 6, 6, (Op("conv", "conv1", (0,), 6, "3x3"), Op("norm", "bn2", (1,), 6, "batch")), 8, 3)
    model, x = build_model(prog)
    full_precision(model, 0)
    return build_case(model, x, ["a", "b", "c"], seed=1, granularity="fine"), model


def test_mean_of_three_identical_siblings_changes_no_output() -> None:
    case, _ = _three_task_net()
    before = outputs(case.net, case.x)
    weights = {k: v.clone() for k, v in case.net.node_module(1).named_parameters()}
    group = merge(case, 1, [n.id for n in case.net.tree.at_depth(1)], "mean")
    for k, p in case.net.node_module(group).named_parameters():
        assert torch.equal(p, weights[k]), f"the mean of three copies of {k} is not {k}"
    after = outputs(case.net, case.x)
    for t in before:
        assert torch.equal(after[t], before[t]), t


@FUSE
@given(networks(min_tasks=2, max_tasks=3, layout="separate"), st.booleans())
def test_mean_of_two_perturbed_siblings_averages_parameters_and_keeps_the_first_buffers(case: NetCase, flip: bool) -> None:
    a, b = case.net.tree.at_depth(1)[:2]
    perturb(case.net.node_module(a), 1)
    perturb(case.net.node_module(b), 2)
    first, second = (b, a) if flip else (a, b)
    p1 = {k: v.clone() for k, v in case.net.node_module(first).named_parameters()}
    p2 = {k: v.clone() for k, v in case.net.node_module(second).named_parameters()}
    b1 = {k: v.clone() for k, v in case.net.node_module(first).named_buffers()}
    kids = {n.id: case.net.node_module(n) for n in case.net.tree.at_depth(2) if n.parent in (a.id, b.id)}
    group = merge(case, 1, [first.id, second.id], "mean")
    merged = case.net.node_module(group)
    assert p1, "segment 1 has parameters"
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, (p1[name] + p2[name]) / 2, rtol=1e-15, atol=1e-15, msg=name)
        assert not torch.equal(p, p1[name]), f"{name} was not averaged"
    for name, buf in merged.named_buffers():
        assert torch.equal(buf, b1[name]), f"buffer {name} is not the first member's"
    # the members' children now hang under the group and keep their modules
    for node_id, module in kids.items():
        assert case.net.tree.node(node_id).parent == group.id and case.net.node_module(node_id) is module


@FUSE
@given(networks(min_tasks=2, max_tasks=3, layout="separate"))
def test_copy_takes_the_first_member_as_an_independent_copy(case: NetCase) -> None:
    a, b = case.net.tree.at_depth(1)[:2]
    perturb(case.net.node_module(b), 3)
    state_b = {k: v.clone() for k, v in case.net.node_module(b).state_dict().items()}
    old_b = case.net.node_module(b)
    before = outputs(case.net, case.x)
    group = merge(case, 1, [b.id, a.id], "copy")
    merged = case.net.node_module(group)
    assert merged is not old_b
    assert all(p is not q for p in merged.parameters() for q in old_b.parameters())
    for k, v in merged.state_dict().items():
        assert torch.equal(v, state_b[k]), k
    after = outputs(case.net, case.x)
    for t in b.tasks:
        assert torch.equal(after[t], before[t])


@settings(max_examples=examples(10), deadline=None)
@given(networks(min_tasks=2, max_tasks=2, layout="separate"))
def test_fresh_reinitialises_layers_and_resets_norm_statistics(case: NetCase) -> None:
    a, b = case.net.tree.at_depth(1)
    member = case.net.node_module(a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        group = merge(case, 1, [a.id, b.id], "fresh")
    merged = case.net.node_module(group)
    old = dict(member.named_parameters())
    for mod_name, mod in merged.named_modules():
        if mod is merged:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert not torch.equal(mod.weight, old[f"{mod_name}.weight"]), f"{mod_name} kept its weights"
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(mod.running_mean, torch.zeros_like(mod.running_mean))
            assert torch.equal(mod.running_var, torch.ones_like(mod.running_var))
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))


def test_fresh_reinitialises_every_parameter_including_bare_ones() -> None:
    prog = Program(3, 2, 6, 6, (Op("conv", "conv1", (0,), 4, "3x3"), Op("scale", "scale2", (1,), 4)), 8, 3)
    model, x = build_model(prog)
    case = build_case(model, x, ["a", "b"], seed=0, granularity="block")
    a, b = case.net.tree.at_depth(1)
    old = {k: v.clone() for k, v in case.net.node_module(a).named_parameters()}
    assert "scale2" in old
    group = merge(case, 1, [a.id, b.id], "fresh")
    for k, p in case.net.node_module(group).named_parameters():
        assert not torch.equal(p, old[k]), f"{k} was not re-initialised"


def test_a_callable_init_gets_the_members_in_the_order_listed() -> None:
    case, _ = _three_task_net()
    n1, _n2, n3 = case.net.tree.at_depth(1)
    seen = []

    def init(members):
        seen.extend(members)
        return members[-1]

    expected = [case.net.node_module(n3), case.net.node_module(n1)]
    group = merge(case, 1, [n3.id, n1.id], init)
    assert seen == expected
    assert case.net.node_module(group) is expected[-1]


def test_an_unknown_init_raises_task_spec_error() -> None:
    case, _ = _three_task_net()
    tree2, origin = case.net.tree.merge(1, [1, 2])
    with pytest.raises(TaskSpecError, match="unknown group init 'average'"):
        case.net.rebuild(tree2, origin, init="average")
