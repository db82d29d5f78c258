"""The random-model generator itself: what the graph-engine property tests rely on it for.

A generator bug shows up as baffling failures in the tests that use it (a model that does not
trace, a traced graph that disagrees with eager, an output that ignores its input and so makes
every equivalence check vacuous), so those guarantees are checked here on their own, together
with the claim that it produces the graph features (cat, skips, get_attr...) it exists for.
"""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from model_zoo_gen import BATCH, GeneratedNet, Program, ResidualBlock, SkipFusion, build_model, programs, random_models
from strategies import examples
from torch import Tensor, fx, nn

from graphsurgeon.core.trace import trace

FAST = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `find` stops at the first hit and never shrinks; derandomised so that a diversity check
# cannot fail on an unlucky seed.
FIND = settings(max_examples=examples(60), deadline=None, phases=[Phase.generate], derandomize=True, database=None)


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
    """Engine tests compare rewritten graphs to eager outputs, so tracing itself must be exact."""
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
    """A constant output would let any wrong rewrite pass an equivalence check."""
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
    """Shrinking replays draws, so a failing model must rebuild bit for bit, whatever the RNG."""
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
    """Default-initialised eval-mode norms are identities, hiding a dropped or misplaced norm."""
    model, _ = drawn
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.equal(m.running_var, torch.ones_like(m.running_var))
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            assert not torch.equal(m.weight, torch.ones_like(m.weight))


def _features(drawn: tuple[GeneratedNet, Tensor]) -> set[str]:
    """The graph features of one generated model that the engine's tests need to meet."""
    model, _ = drawn
    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    live = _max_live_activations(gm)
    called = Counter(n.target for n in nodes if n.op == "call_module")
    found = {
        "cat": any(n.target is torch.cat for n in nodes),
        "add": any(n.target is operator.add for n in nodes),
        "get_attr": any(n.op == "get_attr" for n in nodes),
        "pure_chain": live == 1,
        "skip": live >= 2,
        "three_live": live >= 3,
        "branch_from_input": len(nodes[0].users) >= 2,
        "module_called_twice": any(count >= 2 for count in called.values()),
        "residual_block": any(isinstance(m, ResidualBlock) for m in model.children()),
        "sequential_stage": any(isinstance(m, nn.Sequential) for m in model.children()),
        "decoder_stage": any(isinstance(m, SkipFusion) for m in model.children()),
        "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "group_norm": any(isinstance(m, nn.GroupNorm) for m in model.modules()),
    }
    assert found.keys() == set(FEATURES), "keep FEATURES in step with the checks above"
    return {name for name, present in found.items() if present}


FEATURES = (
    "add", "batch_norm", "branch_from_input", "cat", "decoder_stage", "get_attr", "group_norm",
    "module_called_twice", "pure_chain", "residual_block", "sequential_stage", "skip", "three_live",
)


@pytest.mark.parametrize("feature", FEATURES)
def test_generator_produces(feature: str) -> None:
    """Each graph feature the engine must handle turns up within a few dozen examples."""
    find(random_models(), lambda drawn: feature in _features(drawn), settings=FIND)
