"""Benchmark horizontal fusion of task branches against the per-node loop (CPU).

    python benchmarks/branches.py            # full grid (~5 min on one CPU core)
    python benchmarks/branches.py --quick    # seconds-long smoke run

Each case is a `MultiTaskNetwork` with T task-specific copies (``sharing="separate"``) of a
segment chain and one Linear head per task, run with ``fuse_execution(True)`` ("fused": one
vmapped call per depth, batched heads) and with the loop (the reference), interleaved in the
same run on the same network. Reported: the time RATIO fused / loop (< 1: fusion is faster),
the median of per-round paired ratios (see ``heads.time_interleaved``), on process CPU time
with one thread so that other jobs on a shared machine do not skew it.

  segment  "small"     a residual block 16 -> 16 channels on 14x14 maps (graphsurgeon.apps.models);
           "resnet18"  torchvision resnet18's layer2 (two blocks, 64 -> 128 channels, 16x16 -> 8x8);
  batch    small (4) and large (32 images);
  pass     "fwd": eval mode under no_grad; "fwd+bwd": train mode (BatchNorm statistics
           updated) forward and backward of the sum of the outputs.

Results: benchmarks/results/branches_cpu.json and .md (``--out`` picks another folder).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import time_interleaved

import graphsurgeon as gs
from graphsurgeon.apps.models import ResidualBlock

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (2, 4, 8, 16, 40)
BATCHES = {"small": 4, "large": 32}
PASSES = ("fwd", "fwd+bwd")


class Body(nn.Module):
    """A segment chain and a classifier, so that the trunk ends at the classifier's input."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


@dataclass(frozen=True)
class Segment:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    width: int


SEGMENTS = (
    Segment("small", lambda: ResidualBlock(16, 16, 1), (16, 14, 14), 16),
    Segment("resnet18", lambda: torchvision.models.resnet18().layer2, (64, 16, 16), 128),
)


def build(segment: Segment, tasks: int) -> gs.MultiTaskNetwork:
    torch.manual_seed(tasks)
    heads = {f"t{i}": nn.Linear(segment.width, 2 + i % 7) for i in range(tasks)}
    return gs.multitask(
        Body(segment.make(), segment.width), heads, sharing="separate",
        example_input=torch.randn(2, *segment.input_shape),
    )


def variant_fns(net: gs.MultiTaskNetwork, x: torch.Tensor, pass_: str) -> dict[str, Callable[[], object]]:
    """The loop and the fused run of one step on the SAME network (fusion toggled per call)."""

    def step(fused: bool) -> Callable[[], object]:
        def run() -> object:
            net.fuse_execution(fused)
            if pass_ == "fwd":
                with torch.no_grad():
                    return net(x)
            out = net(x)
            sum(o.sum() for o in out.values()).backward()
            return None

        return run

    return {"loop": step(False), "fused": step(True)}


def run(quick: bool) -> list[dict]:
    tasks = (2, 4) if quick else TASKS
    batches = {"small": BATCHES["small"]} if quick else BATCHES
    records = []
    for segment in SEGMENTS:
        for t in tasks:
            net = build(segment, t)
            for size, batch in batches.items():
                x = torch.randn(batch, *segment.input_shape)
                for pass_ in PASSES:
                    net.train(pass_ == "fwd+bwd")
                    rounds = 3 if quick else (5 if segment.name == "resnet18" and size == "large" else 9)
                    min_sample_s = 0.0 if quick else 0.02
                    times, ratios = time_interleaved(
                        variant_fns(net, x, pass_), rounds, lambda: None, time.process_time, min_sample_s
                    )
                    net.zero_grad(set_to_none=True)
                    record = {
                        "segment": segment.name,
                        "batch": size,
                        "B": batch,
                        "pass": pass_,
                        "T": t,
                        "ratio": {"loop": 1.0, "fused": ratios["fused"]},
                        "loop_ms": times["loop"] * 1e3,
                    }
                    records.append(record)
                    print(_row(record), flush=True)
            net.fuse_execution(False)
    return records


def _row(r: dict) -> str:
    cells = [r["segment"], f"{r['batch']} ({r['B']})", r["pass"], str(r["T"]), f"{r['ratio']['fused']:.2f}"]
    cells.append(f"{r['loop_ms']:.2f}")
    return "| " + " | ".join(cells) + " |"


def markdown(records: list[dict], meta: dict) -> str:
    head = ["segment", "batch (B)", "pass", "T", "fused / loop", "loop ms (CPU time)"]
    best = min(records, key=lambda r: r["ratio"]["fused"])
    worst = max(records, key=lambda r: r["ratio"]["fused"])
    return "\n".join(
        [
            f"# Horizontal fusion of task branches on {meta['device']} (float32, threads={meta['threads']})",
            "",
            "Time of `fuse_execution(True)` divided by the per-node loop's on the same network, same run",
            "(< 1 = fused is faster); median of per-round paired ratios. T task-specific copies of the",
            "segment plus T Linear heads. fwd: eval, no_grad; fwd+bwd: train mode, forward + backward.",
            f"torch {meta['torch']}, quick={meta['quick']}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *(_row(r) for r in records),
            "",
            f"Range of fused/loop: {best['ratio']['fused']:.2f} ({_row(best)}) to "
            f"{worst['ratio']['fused']:.2f} ({_row(worst)}).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {2, 4}, small batch, 3 rounds (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for branches_cpu.json and .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    meta = {
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
    }
    records = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "branches_cpu.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = markdown(records, meta)
    (args.out / "branches_cpu.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
