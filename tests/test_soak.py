"""Soak: many structural edits on a training network leak neither memory nor invariants.

Fuses and splits alternate at random depths on a network with an Adam optimizer (a training
step between edits), as a long MTSL / TAG run would do; after every edit `gs.check` holds, and
the process's resident memory after a warm-up grows by less than 5 %. The default run makes 30
edits; the slow one (``make test-all``) the 200 of the issue.
"""
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import graphsurgeon as gs

STATUS = Path("/proc/self/status")
# wide enough that one leaked tree node (its weights and two Adam moments, ~1.7 MB) per edit
# would grow the process by far more than 5 %
WIDTH = 384


def _rss_kib() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line in /proc/self/status")


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(4)])
        self.fc = nn.Linear(WIDTH, 1)

    def forward(self, x):
        return self.fc(self.blocks(x))


def _edit(net: gs.MultiTaskNetwork, optimizer: torch.optim.Optimizer, rng: random.Random) -> str:
    """Fuse two siblings somewhere, or, where no node has a sibling, split a shared node."""
    siblings = [
        (d, kids)
        for d in range(1, net.depth + 1)
        for parent in net.tree.at_depth(d - 1)
        if len(kids := [n.id for n in net.tree.children(parent.id)]) >= 2
    ]
    shared = [n for d in range(1, net.depth + 1) for n in net.tree.at_depth(d) if len(n.tasks) >= 2]
    if siblings and (not shared or rng.random() < 0.5):
        depth, kids = rng.choice(siblings)
        gs.surgery.fuse(net, depth, [rng.sample(kids, 2)], init="mean", optimizer=optimizer)
        return "fuse"
    node = rng.choice(shared)
    tasks = list(node.tasks)
    rng.shuffle(tasks)
    cut = rng.randint(1, len(tasks) - 1)
    gs.surgery.split(net, node.id, [tasks[:cut], tasks[cut:]], optimizer=optimizer)
    return "split"


def _train_step(net: gs.MultiTaskNetwork, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    sum(out.square().mean() for out in net(x).values()).backward()
    optimizer.step()


@pytest.mark.parametrize("edits", [30, pytest.param(200, marks=pytest.mark.slow)])
def test_structural_edits_keep_invariants_and_memory_flat(edits):
    if not STATUS.exists():
        pytest.skip("resident memory is read from /proc (Linux)")
    torch.manual_seed(0)
    rng = random.Random(0)
    net = gs.multitask(_Backbone(), {t: nn.Linear(WIDTH, 2) for t in "abcde"}, granularity="fine")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(8, WIDTH)
    warmup = 100  # the allocator grows its pools over the first ~100 edits, then RSS is flat
    kinds: list[str] = []
    for i in range(warmup + edits):
        if i == warmup:
            baseline = _rss_kib()
        kinds.append(_edit(net, optimizer, rng))
        gs.check(net)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in net.parameters()}, f"edit {i}: the optimizer lost track of the network"
        _train_step(net, optimizer, x)
    growth = _rss_kib() / baseline - 1
    assert {"fuse", "split"} <= set(kinds[warmup:])
    assert growth < 0.05, f"resident memory grew {100 * growth:.1f} % over {edits} edits"
