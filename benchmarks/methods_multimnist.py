"""Every method of the library on the embedded MultiMNIST task family, over several seeds.

Each variant runs the demo's settings (graphsurgeon.apps.demo.demo_config: small residual CNN,
five tasks, 3,000 training canvases, 7 epochs, Adam 2e-3, batch 64, CPU, one thread) and
only the method changes. Writes benchmarks/results/methods_multimnist.{json,md}: per-task
primary metric and Δm % vs single-task (mean ± std over seeds), parameters, training time
as a ratio to hard sharing in the same seed, and the groups TAG and DMTG found next to
MTSL's tree.

    python benchmarks/methods_multimnist.py --seeds 0 1 2 --jobs 2
    python benchmarks/methods_multimnist.py --reuse          # re-aggregate finished runs
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

# label -> (method, experiment overrides); "hps" is plain summed losses (EW)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "single": ("single", {}),
    "hps": ("hps", {}),
    "hps+uw": ("hps", {"grad": "uw"}),
    "hps+dwa": ("hps", {"grad": "dwa"}),
    "hps+gradnorm": ("hps", {"grad": "gradnorm"}),
    "hps+pcgrad": ("hps", {"grad": "pcgrad"}),
    "hps+cagrad": ("hps", {"grad": "cagrad"}),
    "hps+mgda": ("hps", {"grad": "mgda"}),
    "hps+imtl_g": ("hps", {"grad": "imtl_g"}),
    "hps+nash_mtl": ("hps", {"grad": "nash_mtl"}),
    "hps+sam": ("hps", {"grad": "ew", "sam": 0.05}),
    "hps+pcgrad+sam": ("hps", {"grad": "pcgrad", "sam": 0.05}),
    "itmtl": ("itmtl", {}),
    "tag": ("tag", {}),
    "dmtg": ("dmtg", {}),
    "mtsl": ("mtsl", {}),
}


def run_variant(job: tuple[str, int, str, bool]) -> dict[str, Any]:
    """Train and evaluate one variant for one seed (in its own process); returns a summary."""
    label, seed, runs, reuse = job
    import torch

    from graphsurgeon.apps.demo import DEMO_TASKS, demo_config

    folder = Path(runs) / f"seed{seed}" / label
    summary = folder / "summary.json"
    if reuse and summary.is_file():
        return json.loads(summary.read_text())
    torch.set_num_threads(1)
    from graphsurgeon.apps.experiment import run

    method, overrides = VARIANTS[label]
    cfg = demo_config(method, folder.parent, seed, progress=False)
    cfg.out_dir = str(folder)
    cfg.export = False
    cfg.corruptions = ()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    start = time.perf_counter()
    r = run(cfg)
    result = {
        "label": label,
        "seed": seed,
        "test": {t: r["test"][t] for t in DEMO_TASKS},
        "parameters": r["parameters"],
        "train_seconds": r["train_seconds"],
        "train_cpu_seconds": r["train_cpu_seconds"],
        "wall_seconds": time.perf_counter() - start,
        "tree": r["tree"],
        "partitions": r["tree_partitions"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=1, default=str))
    return result


def _levels(partitions: list[list[list[str]]]) -> str:
    """A task tree's partition per depth (``TaskTree.partitions()``, depth 1 first), runs of
    equal depths merged: ``d1–4: {all} · d5: {left} {right} …``."""
    runs: list[tuple[int, int, str]] = []
    for depth, partition in enumerate(partitions, start=1):
        # every depth partitions all the tasks: one block is everyone
        blocks = "{all}" if len(partition) == 1 else " ".join("{" + n + "}" for n in sorted(map(", ".join, partition)))
        if runs and runs[-1][2] == blocks:
            runs[-1] = (runs[-1][0], depth, blocks)
        else:
            runs.append((depth, depth, blocks))
    return " · ".join(f"d{a}: {b}" if a == e else f"d{a}–{e}: {b}" for a, e, b in runs)


def _mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(std)}"


def report(per_seed: dict[int, dict[str, dict]], seeds: list[int], labels: list[str]) -> str:
    from graphsurgeon.apps.demo import DEMO_TASKS
    from graphsurgeon.apps.experiment import delta_m
    from graphsurgeon.data.multimnist import MULTIMNIST_TASKS

    metric = {t: MULTIMNIST_TASKS[t].primary_metric for t in DEMO_TASKS}
    dm = {
        (label, s): delta_m(per_seed[s][label]["test"], per_seed[s]["single"]["test"], MULTIMNIST_TASKS)
        for s in seeds
        for label in labels
    }
    # CPU time of Trainer.fit on one thread: runs made side by side (--jobs) do not inflate it
    time_ratio = {
        (label, s): per_seed[s][label]["train_cpu_seconds"] / per_seed[s]["hps"]["train_cpu_seconds"]
        for s in seeds
        for label in labels
    }
    head = ["method", *[f"{t} ({metric[t]})" for t in DEMO_TASKS], "Δm % vs single", "params", "train CPU time / hps"]
    lines = [
        f"# All methods on MultiMNIST ({len(seeds)} seeds: {seeds}; mean ± std; CPU, 1 thread)",
        "",
        "Settings: `graphsurgeon.apps.demo.demo_config` (small residual CNN, 5 tasks, 3,000 training canvases, "
        "7 epochs, Adam 2e-3, batch 64); only the method changes. Generated by `python benchmarks/methods_multimnist.py`.",
        "",
        "How each method spends the 7 epochs (library defaults): `single` trains one network per task; "
        "`hps` and its `+aggregator` / `+sam` (ρ = 0.05) variants one shared trunk; `itmtl` chooses between "
        "the sum and PCGrad by lookahead every step; `tag` measures affinities under hard sharing for 2 epochs, "
        "then trains one network per group from scratch for the 5 left; `dmtg` searches a 2-branch supernet "
        "for 3 epochs (τ annealed 4 → 0.5; the official code holds τ constant), then prunes and fine-tunes 4; "
        "`mtsl` starts from one network per task and merges over 5 one-epoch phases (plus one distillation "
        "epoch each, not counted in the 7), then trains 2. Training time is the CPU time of `Trainer.fit` "
        "(all of the above and the per-epoch validation; one thread, so unaffected by the runs beside it), "
        "test evaluation excluded.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    order = sorted(labels, key=lambda lab: -statistics.mean(dm[lab, s] for s in seeds))
    for label in order:
        rows = [per_seed[s][label] for s in seeds]
        cells = [f"`{label}`", *[_mean_std([r["test"][t][metric[t]] for r in rows]) for t in DEMO_TASKS]]
        cells.append(_mean_std([dm[label, s] for s in seeds], "{:+.2f}"))
        cells.append(f"{statistics.mean(r['parameters'] for r in rows):,.0f}")
        cells.append(_mean_std([time_ratio[label, s] for s in seeds], "{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    best = order[0]
    best_dm = statistics.mean(dm[best, s] for s in seeds)
    runner = order[1]
    gap = best_dm - statistics.mean(dm[runner, s] for s in seeds)
    spread = statistics.stdev([dm[best, s] for s in seeds]) if len(seeds) > 1 else 0.0
    lines += [
        "",
        f"Best on mean Δm: `{best}` ({best_dm:+.2f} %), ahead of `{runner}` by {gap:.2f} points; "
        f"the seed-to-seed standard deviation of `{best}` is {spread:.2f} points"
        + (", so the lead is within the noise." if gap < spread else "."),
        "",
        "## Groups found",
        "",
        "| seed | " + " | ".join(f"`{m}`" for m in ("tag", "dmtg", "mtsl") if m in labels) + " |",
        "|---|" + "---|" * len([m for m in ("tag", "dmtg", "mtsl") if m in labels]),
    ]
    for s in seeds:
        cells = [_levels(per_seed[s][m]["partitions"]) for m in ("tag", "dmtg", "mtsl") if m in labels]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell is the learned tree, depth by depth (d1 = the first segment after the input; "
        "consecutive depths with the same partition are merged): `d1–4: {all}` means one node "
        "shared by every task at depths 1 to 4.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", default="runs/methods_multimnist")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose summary.json exists")
    args = parser.parse_args()
    labels = list(dict.fromkeys(["single", "hps", *args.methods]))
    jobs = [(label, s, args.runs, args.reuse) for s in args.seeds for label in labels]
    # the slowest first, so that the pool does not end on one long run
    slow = {"single": 0, "mtsl": 1, "dmtg": 2, "itmtl": 3}
    jobs.sort(key=lambda j: (slow.get(j[0], 9) if "sam" not in j[0] else 2, j[1]))
    per_seed: dict[int, dict[str, dict]] = {s: {} for s in args.seeds}
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(run_variant, jobs):
            per_seed[result["seed"]][result["label"]] = result
            print(f"[methods] {result['label']} seed {result['seed']}: {result['train_cpu_seconds']:.0f} s CPU", flush=True)
    text = report(per_seed, args.seeds, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods_multimnist.json").write_text(json.dumps(per_seed, indent=1, default=str))
    (out / "methods_multimnist.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
