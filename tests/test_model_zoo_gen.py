"""The random-model generator itself: what the graph-engine property tests rely on it for.

A generator bug shows up as baffling failures in the tests that use it (a model that does not
trace, a traced graph that disagrees with eager, an output that ignores its input and so makes
every equivalence check vacuous), so those guarantees are checked here on their own, together
with the claim that it produces the graph features (cat, skips, get_attr...) it exists for.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from model_zoo_gen import BATCH, GeneratedNet, Program, build_model, programs, random_models
from torch import Tensor, fx, nn

from graphsurgeon.trace import trace

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `find` stops at the first hit and never shrinks; derandomised so that a diversity check
# cannot fail on an unlucky seed.
FIND = settings(max_examples=60, deadline=None, phases=[Phase.generate], derandomize=True, database=None)


def _max_live_activations(gm: fx.GraphModule) -> int:
    """Most tensors live at once between two nodes; parameters (get_attr) are not counted.

    A value is live after the node that makes it until its last user runs. A pure chain has
    one live value everywhere; any skip or branch makes two or more live somewhere.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {n: max(position[u] for u in n.users) for n in nodes}
    values = [n for n in nodes if n.op != "get_attr"]
    return max(sum(position[v] <= i < last_use[v] for v in values) for i in range(len(nodes)))


@FAST
@given(random_models())
def test_traces_and_matches_eager_exactly(drawn: tuple[GeneratedNet, Tensor]) -> None:
    model, x = drawn
    assert not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert x.dtype == torch.float64 and x.shape[0] == BATCH
    assert 1 <= x.shape[1] <= 4 and all(6 <= s <= 12 for s in x.shape[2:])
    expected = model(x)
    assert expected.shape == (BATCH, model.program.num_classes)
    for gm in (fx.symbolic_trace(model), trace(model)):
        assert torch.equal(gm(x), expected)
        kinds = {n.op for n in gm.graph.nodes}
        assert {"placeholder", "call_module", "call_function", "call_method", "output"} <= kinds
        # No dead code: every value is read, so liveness is well defined.
        assert all(n.users for n in gm.graph.nodes if n.op != "output")
        for n in gm.graph.nodes:
            if n.op in ("call_module", "get_attr"):
                owner, _, leaf = n.target.rpartition(".")
                assert hasattr(gm.get_submodule(owner), leaf), n.target


@FAST
@given(random_models())
def test_output_is_finite_and_depends_on_input(drawn: tuple[GeneratedNet, Tensor]) -> None:
    model, x = drawn
    with torch.no_grad():
        out = model(x)
        other = model(torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(out).all()
    # Beyond rounding noise: a mathematically constant output can still differ in the last bits.
    noise = 1e-9 * (1 + out.abs().max())
    assert (out[0] - out[1]).abs().max() > noise
    assert (out - other).abs().max() > noise


@FAST
@given(programs())
def test_same_program_rebuilds_same_model(program: Program) -> None:
    rng_before = torch.get_rng_state()
    first, x1 = build_model(program)
    second, x2 = build_model(program)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(x1, x2)
    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@FAST
@given(random_models())
def test_norms_are_not_identity(drawn: tuple[GeneratedNet, Tensor]) -> None:
    model, _ = drawn
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.equal(m.running_var, torch.ones_like(m.running_var))
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            assert not torch.equal(m.weight, torch.ones_like(m.weight))


def _graph(drawn: tuple[GeneratedNet, Tensor]) -> fx.Graph:
    return fx.symbolic_trace(drawn[0]).graph


FEATURES: dict[str, Callable[[tuple[GeneratedNet, Tensor]], bool]] = {
    "cat": lambda d: any(n.target is torch.cat for n in _graph(d).nodes),
    "add": lambda d: any(n.target is operator.add for n in _graph(d).nodes),
    "get_attr": lambda d: any(n.op == "get_attr" for n in _graph(d).nodes),
    "skip": lambda d: _max_live_activations(fx.symbolic_trace(d[0])) >= 2,
    "three_live": lambda d: _max_live_activations(fx.symbolic_trace(d[0])) >= 3,
    "pure_chain": lambda d: _max_live_activations(fx.symbolic_trace(d[0])) == 1,
    "sequential_stage": lambda d: any(isinstance(m, nn.Sequential) for m in d[0].children()),
    "residual_block": lambda d: any(n.startswith("block") for n, _ in d[0].named_children()),
    "batch_norm": lambda d: any(isinstance(m, nn.BatchNorm2d) for m in d[0].modules()),
    "group_norm": lambda d: any(isinstance(m, nn.GroupNorm) for m in d[0].modules()),
    "branch_from_input": lambda d: sum(1 for _ in next(iter(_graph(d).nodes)).users) >= 2,
    "module_called_twice": lambda d: any(
        [n.target for n in _graph(d).nodes if n.op == "call_module"].count(t) >= 2
        for t in {n.target for n in _graph(d).nodes if n.op == "call_module"}
    ),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_generator_produces(feature: str) -> None:
    """Each graph feature the engine must handle turns up within a few dozen examples."""
    find(random_models(), FEATURES[feature], settings=FIND)
