"""Exported networks compute exactly what the eager network computes.

TorchScript (``torch.jit.script`` of the materialised graph, saved with ``torch.jit.save`` to
bytes and loaded back) and ``torch.export`` (run directly, and after ``torch.export.save`` /
``load``) must give the eager outputs bit for bit (float64, eval mode), for random trees on
random DAG models, after random surgery, and on a torchvision backbone. Export is slow, so
examples are few.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GROUP_INITS, NetCase, build_case, cut, edit_sequences, examples, networks
from torch import nn

import graphsurgeon as gs
from graphsurgeon import ExportError

EXPORT = settings(max_examples=examples(5), deadline=None)


def eager(net, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def assert_same_outputs(got, want, what: str) -> None:
    assert set(got) == set(want), f"{what} returns tasks {sorted(got)}, not {sorted(want)}"
    for t in want:
        assert got[t].dtype == want[t].dtype and got[t].shape == want[t].shape, (what, t)
        assert torch.equal(got[t], want[t]), f"{what} output of {t!r} differs from eager"


def torchscript_round_trip(net, x):
    scripted = gs.to_torchscript(net, method="script")
    assert isinstance(scripted, torch.jit.ScriptModule)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        return scripted(x), loaded(x)


def export_round_trip(net, x):
    program = gs.to_export(net, x)
    assert isinstance(program, torch.export.ExportedProgram)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        return program.module()(x), loaded.module()(x)


def apply_random_surgery(case: NetCase, data: st.DataObject) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        for edit in data.draw(edit_sequences(case.net.tree, min_size=0, max_size=3)):
            tree2, origin = edit.apply(case.net.tree)
            case.net.rebuild(tree2, origin, init=data.draw(st.sampled_from(GROUP_INITS)))
    gs.check(case.net)


# ---------------------------------------------------------------------------------- random models
@EXPORT
@given(st.data())
def test_torchscript_script_save_load_equals_eager_on_random_models_and_trees(data: st.DataObject) -> None:
    case = data.draw(networks(min_tasks=1, max_tasks=3))
    apply_random_surgery(case, data)
    want = eager(case.net, case.x)
    scripted, loaded = torchscript_round_trip(case.net, case.x)
    assert_same_outputs(scripted, want, "torch.jit.script")
    assert_same_outputs(loaded, want, "torch.jit.save/load")


@EXPORT
@given(st.data())
def test_torch_export_and_its_save_load_equal_eager_on_random_models_and_trees(data: st.DataObject) -> None:
    case = data.draw(networks(min_tasks=1, max_tasks=3))
    apply_random_surgery(case, data)
    want = eager(case.net, case.x)
    exported, loaded = export_round_trip(case.net, case.x)
    assert_same_outputs(exported, want, "torch.export")
    assert_same_outputs(loaded, want, "torch.export.save/load")


@settings(max_examples=examples(3), deadline=None)
@given(networks(min_tasks=2, max_tasks=2))
def test_export_with_a_dynamic_batch_equals_eager_on_other_batch_sizes(case: NetCase) -> None:
    program = gs.to_export(case.net, case.x, dynamic_batch=True)
    bigger = torch.cat([case.x, case.x.flip(0), case.x * 0.5])
    with torch.no_grad():
        got = program.module()(bigger)
    assert_same_outputs(got, eager(case.net, bigger), "torch.export(dynamic_batch=True) at batch 6")


@settings(max_examples=examples(3), deadline=None)
@given(networks(min_tasks=2, max_tasks=3))
def test_the_materialised_graph_shares_the_network_parameters(case: NetCase) -> None:
    """materialise() documents that it shares parameters: training the network updates it too."""
    gm = gs.materialise(case.net)
    assert {id(p) for p in gm.parameters()} <= {id(p) for p in case.net.parameters()}
    with torch.no_grad():
        for p in case.net.parameters():
            p.mul_(1.5)
        got = gm(case.x)
    assert_same_outputs(got, eager(case.net, case.x), "materialise after the weights changed")


# ---------------------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def resnet18_case():
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18().double().eval()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    segments = cut(model, x, "block")
    tree = gs.TaskTree.branched(["seg", "depth"], len(segments[0]), [["seg"], ["depth"]], split_at=len(segments[0]) - 1)
    return build_case(model, x, tree, seed=0, granularity="block", segments=segments)


def test_torchscript_save_load_equals_eager_on_a_branched_resnet18(resnet18_case: NetCase) -> None:
    want = eager(resnet18_case.net, resnet18_case.x)
    scripted, loaded = torchscript_round_trip(resnet18_case.net, resnet18_case.x)
    assert_same_outputs(scripted, want, "torch.jit.script")
    assert_same_outputs(loaded, want, "torch.jit.save/load")


def test_torch_export_save_load_equals_eager_on_a_branched_resnet18(resnet18_case: NetCase) -> None:
    want = eager(resnet18_case.net, resnet18_case.x)
    exported, loaded = export_round_trip(resnet18_case.net, resnet18_case.x)
    assert_same_outputs(exported, want, "torch.export")
    assert_same_outputs(loaded, want, "torch.export.save/load")


# ---------------------------------------------------------------------------------- errors / known bugs
def _tiny(tasks):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    model = model.double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    return gs.multitask(model, {t: nn.Linear(3, 2).double() for t in tasks}, example_input=x).eval(), x


def test_to_torchscript_rejects_an_unknown_method_and_tracing_without_an_input() -> None:
    net, _ = _tiny(["a"])
    with pytest.raises(ExportError, match="method must be"):
        gs.to_torchscript(net, method="compile")
    with pytest.raises(ExportError, match="example_input"):
        gs.to_torchscript(net, method="trace")


def test_torchscript_trace_equals_eager_too() -> None:
    net, x = _tiny(["a", "b"])
    traced = gs.to_torchscript(net, example_input=x, method="trace")
    with torch.no_grad():
        assert_same_outputs(traced(x), eager(net, x), "torch.jit.trace")


@pytest.mark.parametrize("name", ["def", "class", "lambda"])
def test_a_keyword_task_name_is_rejected_before_it_reaches_generated_code(name: str) -> None:
    with pytest.raises(gs.TaskSpecError, match=f"task name '{name}'.*Rename the task"):
        _tiny([name, "b"])


def test_a_non_ascii_task_name_is_rejected_since_torchscript_cannot_reload_it() -> None:
    with pytest.raises(gs.TaskSpecError, match="ASCII"):
        _tiny(["é", "b"])
