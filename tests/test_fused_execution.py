"""Horizontal fusion (`MultiTaskNetwork.fuse_execution`) computes exactly what the per-node loop does.

Every test builds one network, deep-copies it, turns fusion on in one copy only and compares
them in float64: outputs, the gradient of every parameter, and the parameters and BatchNorm
buffers (running_mean, running_var, num_batches_tracked) after an optimizer step in train mode.
The networks have no dropout, so the two paths draw no random numbers.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples, networks
from torch import nn

import graphsurgeon as gs
import graphsurgeon.core.fused as fused_module
from graphsurgeon import TaskTree
from graphsurgeon.apps.models import small_resnet

TOL = 1e-10  # float64; summation order differs between a grouped and a plain convolution


def resnet18_net(tree_or_tasks, *, seed: int = 0) -> gs.MultiTaskNetwork:
    torch.manual_seed(seed)
    tasks = tree_or_tasks.tasks if isinstance(tree_or_tasks, TaskTree) else tree_or_tasks
    sharing = tree_or_tasks if isinstance(tree_or_tasks, TaskTree) else "separate"
    heads = {t: nn.Linear(512, 2 + i) for i, t in enumerate(tasks)}
    net = gs.multitask(torchvision.models.resnet18(), heads, sharing=sharing, example_input=torch.randn(2, 3, 32, 32))
    return jitter(net.double())


def jitter(net: gs.MultiTaskNetwork) -> gs.MultiTaskNetwork:
    """Make every copy's parameters differ (deep copies start equal, which would hide a mix-up)."""
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    return net


def fused_and_loop(net: gs.MultiTaskNetwork) -> tuple[gs.MultiTaskNetwork, gs.MultiTaskNetwork]:
    loop = copy.deepcopy(net)
    return net.fuse_execution(True), loop


def assert_same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k in b:
        assert a[k].shape == b[k].shape, (what, k)
        err = (a[k].double() - b[k].double()).abs().max().item() if b[k].numel() else 0.0
        assert err <= TOL * max(1.0, b[k].double().abs().max().item()), f"{what} {k}: max error {err}"


def assert_train_step_equal(fused: gs.MultiTaskNetwork, loop: gs.MultiTaskNetwork, x: torch.Tensor) -> None:
    """Outputs, gradients, then parameters and buffers after one SGD step, all equal."""
    fused.train()
    loop.train()
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in (fused, loop)]
    outs = []
    for net, opt in zip((fused, loop), opts):
        opt.zero_grad()
        out = net(x)
        sum((o * torch.linspace(-1, 1, o.shape[1], dtype=o.dtype)).sum() for o in out.values()).backward()
        outs.append(out)
    assert_same(outs[0], outs[1], "train output")
    grads = [{n: p.grad for n, p in net.named_parameters()} for net in (fused, loop)]
    assert all(g is not None for g in grads[1].values())
    assert_same(grads[0], grads[1], "gradient")
    for opt in opts:
        opt.step()
    assert_same(dict(fused.named_parameters()), dict(loop.named_parameters()), "parameter after step")
    buffers = [dict(net.named_buffers()) for net in (fused, loop)]
    assert_same(buffers[0], buffers[1], "buffer after step")
    fused.eval()
    loop.eval()
    with torch.no_grad():
        assert_same(fused(x), loop(x), "eval output after step")


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(fused_module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_module, name, counted)
    return calls


def test_separate_resnet18_fused_equals_loop_in_a_train_step_and_in_eval(monkeypatch) -> None:
    fused, loop = fused_and_loop(resnet18_net(["a", "b", "c", "d"]))
    segment_calls = count_calls(monkeypatch, "fused_call")
    head_calls = count_calls(monkeypatch, "batched_heads")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert_train_step_equal(fused, loop, x)
    tracked = {n: b.item() for n, b in fused.named_buffers() if n.endswith("num_batches_tracked")}
    assert len(tracked) == 4 * 20 and set(tracked.values()) == {1}  # every BatchNorm copy moved once
    assert len(segment_calls) == 2 * fused.depth  # every depth fused, in train and in eval
    assert len(head_calls) == 2  # the four Linear heads ran as one batched call each time


def test_mixed_resnet18_tree_fused_equals_loop_for_all_and_for_some_tasks(monkeypatch) -> None:
    tasks = ["a", "b", "c", "d", "e"]
    stem = [[tasks]] * 3
    tree = TaskTree.from_partitions(
        tasks, stem + [[["a", "b", "c"], ["d", "e"]]] * 3 + [[["a", "b"], ["c"], ["d", "e"]]] * 3
    )
    fused, loop = fused_and_loop(resnet18_net(tree, seed=1))
    head_calls = count_calls(monkeypatch, "batched_heads")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert_train_step_equal(fused, loop, x)
    assert len(head_calls) == 2 * 2  # {a, b} and {d, e} share their leaves: one call per pair
    with torch.no_grad():
        assert_same(fused(x, tasks=["e", "a"]), loop(x, tasks=["e", "a"]), "output of some tasks")
        for depth in (0, 4, 8):
            assert_same(fused.features(x, depth=depth), loop.features(x, depth=depth), f"features at depth {depth}")


def test_mixed_small_resnet_tree_with_non_linear_heads_equals_loop() -> None:
    torch.manual_seed(2)
    tasks = ["p", "q", "r", "s"]
    tree = TaskTree.from_partitions(tasks, [[tasks], [["p", "q"], ["r", "s"]], [["p", "q"], ["r", "s"]],
                                            [["p"], ["q"], ["r", "s"]], [["p"], ["q"], ["r"], ["s"]]])
    heads = {t: nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3)) for t in tasks}
    net = gs.multitask(small_resnet(), heads, sharing=tree, example_input=torch.randn(2, 1, 28, 28))
    fused, loop = fused_and_loop(jitter(net.double()))
    assert_train_step_equal(fused, loop, torch.randn(4, 1, 28, 28, dtype=torch.float64))


def test_toggling_fusion_keeps_outputs_parameters_and_names() -> None:
    net = resnet18_net(["a", "b", "c"]).eval()
    names = [n for n, _ in net.named_parameters()]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
        assert not net.fused_execution
        for enabled in (True, False, True):
            assert net.fuse_execution(enabled) is net and net.fused_execution is enabled
            assert_same(net(x), want, f"output with fusion {enabled}")
    assert [n for n, _ in net.named_parameters()] == names
    assert copy.deepcopy(net).fused_execution


class ItemScaled(nn.Module):
    """A block whose forward reads a Python number from a tensor (``.item()``): vmap cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)  # the classifier: the trunk ends at its input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).relu()
        h = h / (1 + h.abs().max().item())
        return self.fc(self.conv2(h).mean((2, 3)))


def test_a_segment_vmap_cannot_run_falls_back_to_the_loop_with_one_warning(caplog) -> None:
    torch.manual_seed(3)
    heads = {t: nn.Linear(4, 2) for t in ("a", "b", "c")}
    net = gs.multitask(ItemScaled(), heads, granularity="fine", example_input=torch.randn(2, 3, 8, 8))
    fused, loop = fused_and_loop(jitter(net.double()))
    item_depth = next(d for d in range(1, fused.depth + 1) if "item" in next(iter(fused.level(d).values())).code)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="graphsurgeon.core.fused"):
        assert_train_step_equal(fused, loop, x)
        with torch.no_grad():
            fused(x)
    warnings = [r.getMessage() for r in caplog.records if r.name == "graphsurgeon.core.fused"]
    assert len(warnings) == 1, warnings
    assert f"segment {item_depth} " in warnings[0] and "item" in warnings[0].lower()


def test_an_input_error_is_raised_by_the_loop_not_hidden_by_the_fallback() -> None:
    net = resnet18_net(["a", "b"]).fuse_execution(True)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5, 32, 32, dtype=torch.float64))  # 5 channels into a 3-channel stem
    assert not net._fusion._loop_only  # the structure was not marked loop-only


def test_torchscript_and_torch_export_of_a_fused_network_equal_its_outputs() -> None:
    torch.manual_seed(4)
    tree = TaskTree.from_partitions(["a", "b", "c"], [[["a", "b", "c"]], [["a", "b"], ["c"]], [["a"], ["b"], ["c"]],
                                                      [["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]]])
    heads = {t: nn.Linear(32, 3) for t in "abc"}
    net = gs.multitask(small_resnet(), heads, sharing=tree, example_input=torch.randn(2, 1, 28, 28))
    net = jitter(net.double()).eval().fuse_execution(True)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
        scripted = gs.to_torchscript(net, method="script")(x)
        exported = gs.to_export(net, x).module()(x)
    for got in (scripted, exported):
        got = dict(zip(net.tasks, got)) if isinstance(got, (tuple, list)) else got
        assert_same(got, want, "exported output")


@settings(max_examples=examples(8), deadline=None)
@given(case=networks(min_tasks=2, max_tasks=4), train=st.booleans())
def test_fused_equals_loop_on_random_models_and_trees(case, train: bool) -> None:
    fused, loop = fused_and_loop(case.net)
    x = torch.cat([case.x, case.x.flip(0)])  # BatchNorm in train mode needs more than one value per channel
    if train:
        assert_train_step_equal(fused, loop, x)
    else:
        with torch.no_grad():
            assert_same(fused(x), loop(x), "eval output")


def test_branches_benchmark_quick_run_writes_its_tables(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "branches.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True, env=env,
                   capture_output=True, timeout=300)
    records = json.loads((tmp_path / "branches_cpu.json").read_text())["records"]
    rows = {(r["segment"], r["batch"], r["pass"], r["T"]) for r in records}
    assert rows == {(s, "small", p, t) for s in ("small", "resnet18") for p in ("fwd", "fwd+bwd") for t in (2, 4)}
    assert all(r["ratio"]["fused"] > 0 and r["loop_ms"] > 0 for r in records)
    table = (tmp_path / "branches_cpu.md").read_text()
    assert table.count("\n| resnet18 | small (4) |") == 4 and "fused / loop" in table


def test_fused_inference_from_four_threads_gives_the_outputs_of_one():
    """Served models are called concurrently: functional_call swapped the tensors of one shared
    module, so 4 threads failed with 'tensor escaped from inside a function being vmapped'."""
    import threading

    import torchvision

    torch.manual_seed(0)
    net = gs.multitask(torchvision.models.resnet18(), {t: nn.Linear(512, 3) for t in "abcd"}, sharing="separate")
    net.fuse_execution(True).eval()
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    with torch.no_grad():
        expected = [net(x) for x in inputs]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = net(inputs[i])
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i in range(4):
        for task in "abcd":
            assert torch.equal(results[i][task], expected[i][task])
