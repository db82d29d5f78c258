"""MTSL on a whole encoder-decoder: where does it branch inside the decoder?

The backbone is `graphsurgeon.apps.models.ResNetEncoderDecoder` (torchvision's ResNet-18 encoder
with an MTSL-style decoder over its skips), cut at multi-value boundaries after the stem, every
BasicBlock and every decoder stage (``trunk="decoder.3"``). The tasks are the embedded MultiMNIST
dense family plus a classification task: ``segmentation`` (3 classes), ``reconstruction`` (of the
left digit) and ``left`` (its class); heads are per task (`graphsurgeon.apps.models.make_head`).
MTSL runs with one-epoch phases, as many as the network has segments up to its first decoder
stage plus one, so that it can reach the decoder; a tiny training set keeps the run on a CPU.

Writes ``<out>/mtsl_dense.{json,md}`` (the tree, every structural decision with its depth and
the segment it ends at, the test metrics, machine and torch build) and ``mtsl_dense_tree.png``
(the learned tree, each depth labelled with the node its segment ends at)::

    python benchmarks/mtsl_dense.py [--train-size 96] [--seed 0] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from graphsurgeon.apps.experiment import ExperimentConfig, run
from graphsurgeon.apps.report import plot_tree, segment_labels
from graphsurgeon.training.trainer import TrainConfig

TASKS = ("segmentation", "reconstruction", "left")
TRUNK = "decoder.3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.8, help="MTSL's CKA threshold (its default)")
    parser.add_argument("--phases", type=int, default=None, help="structural phases (default: up to the decoder + 1)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/mtsl_dense")
    parser.add_argument("--report", action="store_true", help="only rewrite mtsl_dense.md from mtsl_dense.json")
    args = parser.parse_args()
    if args.report:
        record = json.loads((Path(args.out) / "mtsl_dense.json").read_text())
        (Path(args.out) / "mtsl_dense.md").write_text(markdown(record))
        print(markdown(record))
        return
    torch.set_num_threads(1)  # small convolutions on a shared CPU: one thread is fastest
    # 10 encoder segments (stem, 8 BasicBlocks... see ResNetEncoderDecoder) then 4 decoder stages
    phases = args.phases or 11
    cfg = ExperimentConfig(
        method="mtsl",
        backbone="resnet18_decoder",
        trunk=TRUNK,
        tasks=TASKS,
        train_size=args.train_size,
        val_size=32,
        test_size=64,
        epochs=phases + 1,
        train=TrainConfig(epochs=phases + 1, lr=2e-3, batch_size=32, seed=args.seed, progress=False),
        mtsl={
            "task_phases": (1,) * phases,
            "distill_epochs": (1,) * phases,
            "similarity_samples": args.train_size,
            "threshold": args.threshold,
        },
        corruptions=(),
        out_dir=str(Path(args.runs) / f"seed{args.seed}"),
        export=False,
    )
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    net = result["net"]
    labels = segment_labels(net)
    decoder = [d for d, label in enumerate(labels, start=1) if label.startswith("decoder.")]
    decisions = [
        {
            "phase": d["phase"],
            "depth": d["depth"],
            "segment_ends_at": labels[d["depth"] - 1],
            "in_decoder": d["depth"] in decoder,
            "tasks": d["tasks"],
            "merged": [[d["tasks"][d["nodes"].index(i)] for i in g] for g in d["merged"]],
            "cka": d["similarity"],
        }
        for d in result["decisions"]
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_tree(net.tree, out / "mtsl_dense_tree.png", "MTSL, ResNet-18 + decoder", labels)
    machine = f"{os.cpu_count()}-core {platform.machine()} {platform.processor() or platform.platform()}, 1 torch thread"
    record = {
        "machine": machine,
        "torch": torch.__version__,
        "command": f"python benchmarks/mtsl_dense.py --train-size {args.train_size} --seed {args.seed} "
        f"--threshold {args.threshold} --phases {phases}",
        "seconds": seconds,
        "segments": labels,
        "decoder_depths": decoder,
        "boundary_widths": [len(s.output_names) for s in net.segments],
        "tree": str(net.tree),
        "decisions": decisions,
        "test": result["test"],
        "parameters": result["parameters"],
    }
    (out / "mtsl_dense.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "mtsl_dense.md").write_text(markdown(record))
    print(markdown(record))


def _node(tasks) -> str:
    return "+".join(tasks)


def markdown(record: dict) -> str:
    """The report of one run (``--report`` rewrites it from ``mtsl_dense.json``)."""
    decisions = record["decisions"]
    lines = [
        f"# MTSL on a whole encoder-decoder (MultiMNIST {', '.join(TASKS)}; CPU)",
        "",
        f"{record['machine']}; torch {record['torch']}; {record['seconds']:.0f} s wall. Command: `{record['command']}` "
        "(one-epoch phases; a tiny training set: the metrics below show that the run works, not what MTSL achieves).",
        "",
        f"Segments ({len(record['segments'])}, each labelled by the node it ends at; boundary widths "
        f"{record['boundary_widths']}); decoder stages at depths {record['decoder_depths']}.",
        "",
        "| phase | depth | segment ends at | in decoder | compared | merged |",
        "|---|---|---|---|---|---|",
        *[
            f"| {d['phase']} | {d['depth']} | `{d['segment_ends_at']}` | {'yes' if d['in_decoder'] else 'no'} "
            f"| {', '.join(_node(t) for t in d['tasks'])} "
            f"| {'; '.join('{' + ', '.join(_node(t) for t in g) + '}' for g in d['merged']) or 'none (split)'} |"
            for d in decisions
        ],
        "",
        "Learned tree (`mtsl_dense_tree.png`):",
        "```",
        record["tree"],
        "```",
        "",
        "Test metrics:",
        "",
        "| task | " + " | ".join(sorted({m for v in record["test"].values() for m in v})) + " |",
    ]
    metrics = sorted({m for v in record["test"].values() for m in v})
    lines.append("|" + "---|" * (len(metrics) + 1))
    for task, values in record["test"].items():
        lines.append(f"| {task} | " + " | ".join(f"{values[m]:.3f}" if m in values else "–" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
