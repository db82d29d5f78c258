"""The main job: does learned sharing find the tree the tasks have by construction?

Trains single-task networks, hard sharing and MTSL the same way (same backbone, data split,
schedule, optimizer) on the embedded ``gt_twins`` family (`graphsurgeon.data.ground_truth`: two
pairs of twin digit tasks, an unrelated texture task and a parity control), evaluates on the
clean and corrupted test split, prints MTSL's learned tree next to the true one, and writes to
the run folder: ``results.md`` / ``results.json`` (per-task accuracy, Δm vs single-task over the
learnable tasks, parameters, FLOPs, the tree's score), the learned tree (text and PNG), CKA
heatmaps of every structural decision, loss curves, and the exported MTSL network
(``mtsl/model.pt2``, torch.export). ``benchmarks/ground_truth.py`` runs the same experiment for
every method over several seeds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from graphsurgeon.apps.experiment import ExperimentConfig, delta_m, run
from graphsurgeon.apps.report import levels, metrics_table, plot_cka, plot_losses, plot_tree
from graphsurgeon.data.ground_truth import GROUND_TRUTH, GROUND_TRUTH_TASKS, learnable_tasks, score_partitions
from graphsurgeon.methods.structure.mtsl import depth_schedule
from graphsurgeon.training.trainer import TrainConfig

__all__ = ["DEMO_DATA", "DEMO_DEPTH", "DEMO_EPOCHS", "DEMO_SCHEDULE", "demo_config", "run_demo"]

DEMO_DATA = "gt_twins"
DEMO_EPOCHS = 10
# the segments of `small_resnet`, the demo's backbone
DEMO_DEPTH = 5
# MTSL: one one-epoch phase per depth, then retries in every epoch but the last (`depth_schedule`),
# each phase with one distillation epoch
DEMO_SCHEDULE = depth_schedule(DEMO_DEPTH, epochs=DEMO_EPOCHS)


def demo_config(method: str, out: Path, seed: int, progress: bool, quick: bool = False, data: str = DEMO_DATA) -> ExperimentConfig:
    """The demo's settings (and the ground-truth benchmark's): a cosine schedule, the best
    validation epoch restored, one data split for every seed; ``quick`` shrinks data and
    schedule to seconds (for tests)."""
    schedule = {"task_phases": (1, 1), "distill_epochs": (1, 1)} if quick else DEMO_SCHEDULE
    epochs = 3 if quick else DEMO_EPOCHS
    return ExperimentConfig(
        method=method,
        data=data,
        data_seed=0,
        train_size=128 if quick else 2000,
        val_size=64 if quick else 500,
        test_size=64 if quick else 1000,
        epochs=epochs,
        train=TrainConfig(epochs=epochs, lr=2e-3, batch_size=64, seed=seed, schedule="cosine", restore_best=True,
                          progress=progress),
        mtsl={**schedule, "similarity_samples": 64 if quick else 500},
        out_dir=str(out / method),
        export=method == "mtsl",
    )


def summarise(results: dict[str, dict[str, Any]], out: Path, data: str = DEMO_DATA) -> str:
    variant = data.removeprefix("gt_")
    info = GROUND_TRUTH_TASKS[variant]
    tasks = list(info)
    single = results["single"]
    learnable = learnable_tasks({t: single["test"][t]["accuracy"] for t in tasks}, info)
    base = {t: single["test"][t] for t in learnable}
    rows = [
        {
            "method": method,
            "metrics": {t: f"{r['test'][t]['accuracy']:.3f}" for t in tasks},
            "delta_m": f"{delta_m({t: r['test'][t] for t in learnable}, base, info):+.2f}",
            "parameters": r["parameters"],
            "flops": r["flops"],
            "train_seconds": r["train_seconds"],
        }
        for method, r in results.items()
    ]
    table = metrics_table(rows, tasks, {t: "accuracy" for t in tasks})
    left_out = [t for t in tasks if t not in learnable]
    note = (f"Δm averages the learnable tasks; left out as within 0.05 of chance for single-task networks: {', '.join(left_out)}."
            if left_out else "Δm averages every task (all are learnable).")
    names = list(single["corrupted"])
    corrupted = ["", "Corrupted test split (mean accuracy over tasks):", "",
                 "| method | clean | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for method, r in results.items():
        clean = sum(r["test"][t]["accuracy"] for t in tasks) / len(tasks)
        cells = [sum(r["corrupted"][n][t]["accuracy"] for t in tasks) / len(tasks) for n in names]
        corrupted.append(f"| {method} | {clean:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    truth = GROUND_TRUTH[variant]
    partitions = results["mtsl"]["tree_partitions"]
    score = score_partitions(partitions, variant)
    where = "the last depth" if truth.depths == "last" else "every depth"
    tree = [
        "",
        f"True tree ({where}): " + " ".join("{" + ", ".join(g) + "}" for g in truth.groups)
        + "".join(f"; control {c} (a coarsening of {of}) is not scored" for c, of in truth.controls.items()),
        f"MTSL learned:   {levels(partitions)}",
        f"Match: {'exact' if score['exact'] else 'not exact'} (adjusted Rand index {score['ari']:.2f})"
        + "".join(f"; {c} shares its last node with {', '.join(v) or 'no scored task'}" for c, v in score["controls"].items()),
        "",
        "```",
        results["mtsl"]["tree"],
        "```",
    ]
    text = "\n".join([table, "", note, *corrupted, *tree])
    (out / "results.md").write_text(text + "\n")
    results["mtsl"]["ground_truth_score"] = score
    return text


def run_demo(out: Path, seed: int = 0, progress: bool = True, quick: bool = False) -> dict[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    # small convolutions do not scale over 2 cores, and oversubscribed threads on a busy
    # machine are 5-8x slower than one thread: the demo runs single-threaded
    torch.set_num_threads(1)
    results = {}
    for method in ("single", "hps", "mtsl"):
        print(f"[graphsurgeon demo] training {method} ...", flush=True)
        results[method] = run(demo_config(method, out, seed, progress, quick))
    text = summarise(results, out)
    mtsl = results["mtsl"]
    plot_tree(mtsl["net"].tree, out / "mtsl_tree.png")
    plot_cka(mtsl["decisions"], out / "mtsl_cka.png")
    plot_losses({m: r["history"] for m, r in results.items()}, out / "losses.png")
    (out / "results.json").write_text(
        json.dumps({m: {k: v for k, v in r.items() if k != "net"} for m, r in results.items()}, default=str, indent=1)
    )
    print(text)
    print(f"\n[graphsurgeon demo] wrote {out}/ (results.md, mtsl_tree.png, mtsl_cka.png, losses.png, mtsl/model.pt2)")
    return results
