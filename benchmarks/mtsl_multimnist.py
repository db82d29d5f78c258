"""MTSL vs single-task vs hard sharing on the embedded MultiMNIST, over several seeds.

Runs the demo's configuration (graphsurgeon.apps.demo) for each seed and writes
benchmarks/results/mtsl_multimnist.{json,md}: per-task primary metric and Δm % vs
single-task as mean ± std over seeds, parameters, FLOPs, and every learned MTSL tree.

    python benchmarks/mtsl_multimnist.py --seeds 0 1 2
    python benchmarks/mtsl_multimnist.py --seeds 0 1 2 --reuse   # seeds run in parallel by `graphsurgeon demo --seed N`
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from graphsurgeon.apps.demo import DEMO_TASKS, run_demo
from graphsurgeon.apps.experiment import delta_m
from graphsurgeon.data.multimnist import MULTIMNIST_TASKS


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/mtsl_multimnist")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reuse", action="store_true", help="aggregate seeds whose run folder is complete")
    args = parser.parse_args()
    metric = {t: MULTIMNIST_TASKS[t].primary_metric for t in DEMO_TASKS}
    per_seed = {}
    for seed in args.seeds:
        folder = Path(args.runs) / f"seed{seed}"
        if args.reuse and (folder / "results.json").is_file():
            results = json.loads((folder / "results.json").read_text())
        else:
            results = run_demo(folder, seed=seed, progress=False)
        base = {t: results["single"]["test"][t] for t in DEMO_TASKS}
        per_seed[seed] = {
            m: {
                "metrics": {t: r["test"][t][metric[t]] for t in DEMO_TASKS},
                "delta_m": delta_m({t: r["test"][t] for t in DEMO_TASKS}, base, MULTIMNIST_TASKS),
                "parameters": r["parameters"],
                "flops": r["flops"],
                "train_seconds": r["train_seconds"],
                "tree": r["tree"],
            }
            for m, r in results.items()
        }
    methods = list(next(iter(per_seed.values())))
    head = ["method", *[f"{t} ({metric[t]})" for t in DEMO_TASKS], "Δm % vs single", "params (mean)", "MFLOPs (mean)"]
    lines = [
        f"# MTSL on MultiMNIST ({len(args.seeds)} seeds: {args.seeds}; mean ± std; CPU)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m in methods:
        rows = [per_seed[s][m] for s in args.seeds]
        cells = [m, *[_mean_std([r["metrics"][t] for r in rows]) for t in DEMO_TASKS]]
        cells.append(_mean_std([r["delta_m"] for r in rows]))
        cells.append(f"{statistics.mean(r['parameters'] for r in rows):,.0f}")
        cells.append(f"{statistics.mean(r['flops'] for r in rows) / 1e6:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    mtsl_dm = statistics.mean(per_seed[s]["mtsl"]["delta_m"] for s in args.seeds)
    hps_dm = statistics.mean(per_seed[s]["hps"]["delta_m"] for s in args.seeds)
    verdict = "beats" if mtsl_dm > hps_dm else "does not beat"
    lines += ["", f"MTSL {verdict} hard sharing on Δm ({mtsl_dm:+.2f} % vs {hps_dm:+.2f} %, mean over seeds).", ""]
    for s in args.seeds:
        lines += [f"Learned MTSL tree, seed {s}:", "```", per_seed[s]["mtsl"]["tree"], "```", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mtsl_multimnist.json").write_text(json.dumps(per_seed, indent=1))
    (out / "mtsl_multimnist.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
