"""Zoo coverage: torchvision backbones through the whole pipeline, and exact segment chains.

`benchmarks/zoo.py` sweeps every torchvision classifier (results in benchmarks/results/zoo.md);
here a fixed, diverse sample runs through the same `run_model` so a regression shows up in CI.
"""
import json
from pathlib import Path

import pytest
import torch
import torchvision
from benchmark_modules import load_benchmark

import graphsurgeon as gs

ROOT = Path(__file__).resolve().parents[1]


zoo = load_benchmark("zoo")

# diverse: residual, depthwise + squeeze-excite, attention with a class token, layer-scale
# (get_attr parameters), shifted windows, dense concatenation, regnet stages, Fire concatenation,
# channel shuffle
SAMPLE = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "vit_b_16",
    "convnext_tiny",
    "swin_t",
    "densenet121",
    "regnet_y_400mf",
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
]
# more of the zoo for `make test-all` (--runslow): inception blocks, 224x224 multi-axis attention,
# plain conv stacks, swin v2's continuous position bias, mnasnet
SLOW_SAMPLE = ["googlenet", "inception_v3", "maxvit_t", "vgg11_bn", "alexnet", "swin_v2_t", "mnasnet0_5"]

CHAIN_MODELS = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "vit_b_16",
    "convnext_tiny",
    "swin_t",
    "densenet121",
    "regnet_y_400mf",
]


@pytest.mark.parametrize("name", SAMPLE + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_SAMPLE])
def test_zoo_model_passes_every_step(name):
    result = zoo.run_model(name)
    assert result["steps"] == {step: "ok" for step in zoo.STEPS}, result["steps"]
    assert result["ok"]
    assert result["max_diff"]["forward"] == 0.0  # every branch reproduces the backbone's trunk bit for bit
    assert result["max_diff"]["modes"] == 0.0  # in train and eval mode, whichever mode it was built in
    for step in ("materialise", "torchscript", "export"):
        assert result["max_diff"][step] <= 1e-10


@pytest.mark.parametrize("name", CHAIN_MODELS)
def test_chain_of_segments_equals_traced_model_exactly(name):
    """Acceptance point 1: chaining the segments reproduces the backbone's trunk bit for bit."""
    torch.manual_seed(0)
    size = zoo.image_size_for(name)
    model = zoo.build_backbone(name, size).eval().double()
    x = torch.randn(zoo.BATCH, 3, size, size, dtype=torch.float64)
    gm = gs.trace(model)
    for granularity in ("block", "fine"):
        segments = gs.segment(gm, granularity=granularity, example_input=x)
        assert len(segments) >= 2, granularity
        trunk = next(n for n in gm.graph.nodes if n.name == segments[-1].output_name)
        # the reference: what the eager model's own final classifier receives
        want = zoo.trunk_of(model, zoo.classifier_of(gm, trunk), x)
        value = x
        with torch.no_grad():
            for prev, seg in zip([None, *segments], segments):
                assert prev is None or seg.input_name == prev.output_name
                value = seg.module(value)
        assert torch.equal(value, want), f"{name} {granularity}: max |diff| {(value - want).abs().max().item():.3g}"


@pytest.mark.filterwarnings("ignore::graphsurgeon.UnusedNodesWarning")  # their train-mode auxiliary classifiers
@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_blocks_held_by_the_root_module_are_blocks(name):
    size = zoo.image_size_for(name)
    gm = gs.trace(zoo.build_backbone(name, size).eval())
    segments = gs.segment(gm, granularity="block", example_input=torch.randn(zoo.BATCH, 3, size, size))
    assert len(segments) >= 4  # e.g. stem, inception blocks 3a, 3b, 4a, ...


def test_a_failing_step_is_recorded_with_its_error(monkeypatch):
    def broken(net, x, **kwargs):
        raise gs.ExportError("torch.export failed on the materialised graph: boom.\nsecond line")

    monkeypatch.setattr(gs, "to_export", broken)
    result = zoo.run_model("squeezenet1_0")
    assert result["steps"]["export"] == "ExportError: torch.export failed on the materialised graph: boom."
    assert all(result["steps"][s] == "ok" for s in zoo.STEPS if s != "export")
    assert not result["ok"]
    report = zoo.markdown([result])
    assert "0 / 1 (0.0 %)" in report
    assert "- `squeezenet1_0` export: ExportError: torch.export failed on the materialised graph: boom." in report


def test_a_hanging_model_does_not_stop_the_sweep():
    result = zoo.run_isolated("resnet18", None, "branched", timeout=0.5)
    assert not result["ok"]
    assert result["steps"]["build"].startswith("Timeout")
    assert all(result["steps"][s].startswith("skipped") for s in zoo.STEPS[1:])


def test_a_worker_that_dies_is_reported_in_the_step_it_died_in():
    partial = {"model": "m", "steps": {s: "ok" for s in zoo.STEPS[: zoo.STEPS.index("torchscript")]}, "running": "torchscript", "max_diff": {}}
    result = zoo._failed_result(partial, "m", "branched", "WorkerDied: signal 9", 12.0)
    assert result["steps"]["torchscript"] == "WorkerDied: signal 9"
    assert result["steps"]["materialise"] == "ok"
    assert result["steps"]["export"].startswith("skipped") and result["steps"]["invariants"].startswith("skipped")
    assert not result["ok"] and "running" not in result


def test_committed_sweep_covers_the_zoo():
    path = ROOT / "benchmarks" / "results" / "zoo.json"
    if not path.exists():
        pytest.skip("no committed sweep (run python benchmarks/zoo.py)")
    data = json.loads(path.read_text())
    results = {r["model"]: r for r in data["results"]}
    classifiers = set(torchvision.models.list_models(module=torchvision.models))
    segmentation = set(torchvision.models.list_models(module=torchvision.models.segmentation))
    # every classifier; segmentation models as far as they were run (the sweep's newer rows)
    assert classifiers <= set(results) <= classifiers | segmentation
    ok = sum(r["ok"] for r in results.values())
    assert ok >= 0.95 * len(results)
    for r in results.values():  # every failure is a clear error, with its type and message
        for status in r["steps"].values():
            assert status == "ok" or status.startswith("skipped") or ": " in status
