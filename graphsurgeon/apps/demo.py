"""The main job: learn the sharing structure of MultiMNIST's tasks, and compare with baselines.

Trains MTSL, single-task networks and hard sharing the same way (same backbone, data, epochs,
optimizer), evaluates on the clean and corrupted test split, and writes to the run folder:
``results.md`` / ``results.json`` (per-task metrics, Δm vs single-task, parameters, FLOPs),
the learned tree (text and PNG), CKA heatmaps of every structural decision, loss curves, and
the exported MTSL network (``mtsl/model.pt2``, torch.export).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from graphsurgeon.apps.experiment import ExperimentConfig, delta_m, run
from graphsurgeon.apps.report import metrics_table, plot_cka, plot_losses, plot_tree
from graphsurgeon.data.multimnist import MULTIMNIST_TASKS
from graphsurgeon.training.trainer import TrainConfig

__all__ = ["DEMO_TASKS", "run_demo"]

# related pairs by construction: left/left_parity read the left digit, right/right_ge5 the right one
DEMO_TASKS = ("left", "right", "left_parity", "right_ge5", "sum_mod10")


def demo_config(method: str, out: Path, seed: int, progress: bool, quick: bool = False) -> ExperimentConfig:
    """The demo's settings; ``quick`` shrinks data and schedule to seconds (for tests)."""
    phases = (1, 1) if quick else (1, 1, 1, 1, 1)
    return ExperimentConfig(
        method=method,
        tasks=DEMO_TASKS,
        train_size=128 if quick else 3000,
        val_size=64 if quick else 500,
        test_size=64 if quick else 1000,
        epochs=sum(phases) + 2,
        train=TrainConfig(epochs=sum(phases) + 2, lr=2e-3, batch_size=64, seed=seed, progress=progress),
        mtsl={"task_phases": phases, "distill_epochs": (1,) * len(phases), "similarity_samples": 128 if quick else 800},
        out_dir=str(out / method),
        export=method == "mtsl",
    )


def summarise(results: dict[str, dict[str, Any]], out: Path) -> str:
    single = results["single"]
    info = MULTIMNIST_TASKS
    metric_of = {t: info[t].primary_metric for t in DEMO_TASKS}
    base = {t: single["test"][t] for t in DEMO_TASKS}
    rows = []
    for method, r in results.items():
        rows.append(
            {
                "method": method,
                "metrics": {t: f"{r['test'][t][metric_of[t]]:.3f}" for t in DEMO_TASKS},
                "delta_m": f"{delta_m({t: r['test'][t] for t in DEMO_TASKS}, base, info):+.2f}",
                "parameters": r["parameters"],
                "flops": r["flops"],
                "train_seconds": r["train_seconds"],
            }
        )
    table = metrics_table(rows, DEMO_TASKS, metric_of)
    corrupted = ["", "Corrupted test split (mean primary metric over tasks):", ""]
    names = list(single["corrupted"])
    corrupted.append("| method | clean | " + " | ".join(names) + " |")
    corrupted.append("|" + "---|" * (len(names) + 2))
    for method, r in results.items():
        clean = sum(r["test"][t][metric_of[t]] for t in DEMO_TASKS) / len(DEMO_TASKS)
        cells = [sum(r["corrupted"][n][t][metric_of[t]] for t in DEMO_TASKS) / len(DEMO_TASKS) for n in names]
        corrupted.append(f"| {method} | {clean:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    text = "\n".join([table, *corrupted, "", "Learned MTSL tree:", "```", results["mtsl"]["tree"], "```"])
    (out / "results.md").write_text(text + "\n")
    return text


def run_demo(out: Path, seed: int = 0, progress: bool = True, quick: bool = False) -> dict[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    # small convolutions do not scale over 2 cores, and oversubscribed threads on a busy
    # machine are 5-8x slower than one thread: the demo runs single-threaded
    torch.set_num_threads(1)
    results = {}
    for method in ("single", "hps", "mtsl"):
        print(f"[graphsurgeon demo] training {method} ...", flush=True)
        r = run(demo_config(method, out, seed, progress, quick))
        results[method] = r
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

