"""Cost and strength of the 15 ImageNet-C corruptions at every severity.

    python benchmarks/corruptions.py --threads 1

For each corruption and severity: the process CPU time to corrupt the MultiMNIST test
split (1,000 × 1 × 36 × 36, what the demo evaluates) and a NYUv2-sized batch
(8 × 3 × 288 × 384, smooth random colour images), and the mean absolute change from the
clean MultiMNIST images, which the tests require to grow with severity. CPU time (not
wall time) is measured, so other jobs on a shared machine do not inflate it; the best of
`--repeats` runs is kept. Results go to benchmarks/results/corruptions_cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from graphsurgeon.data import MultiMNIST
from graphsurgeon.data.corruptions import CORRUPTIONS, DEFAULT_CORRUPTIONS, SEVERITIES, corrupt

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_seconds(images: torch.Tensor, name: str, severity: int, repeats: int) -> float:
    corrupt(images, name, severity, torch.Generator().manual_seed(0))  # warm-up (kernel selection, caches)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        corrupt(images, name, severity, torch.Generator().manual_seed(0))
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits, _ = MultiMNIST("test", size=1000, tasks=["left"]).batch(slice(None))
    g = torch.Generator().manual_seed(0)
    nyu = F.interpolate(torch.rand(8, 3, 36, 48, generator=g), size=(288, 384), mode="bilinear", align_corners=False)
    rows = []
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            change = (corrupt(digits, name, severity, torch.Generator().manual_seed(1)) - digits).abs().mean().item()
            rows.append({"corruption": name, "severity": severity, "mean_abs_change_multimnist": change,
                         "cpu_s_multimnist_1000": _cpu_seconds(digits, name, severity, args.repeats),
                         "cpu_s_nyuv2_8": _cpu_seconds(nyu, name, severity, args.repeats)})
    default_cost = sum(r["cpu_s_multimnist_1000"] for r in rows
                       if r["corruption"] in DEFAULT_CORRUPTIONS and r["severity"] in (1, 3, 5))
    out = {"machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
           "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
           "default_selection": list(DEFAULT_CORRUPTIONS), "default_cpu_s_multimnist_1000": default_cost, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "corruptions_cpu.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Corruptions: cost and strength ({out['machine']}, torch {out['torch']}, {args.threads} thread(s), "
             f"process CPU time, best of {args.repeats})", "",
             f"Default selection {', '.join(DEFAULT_CORRUPTIONS)} at severities 1, 3, 5 on the MultiMNIST test split: "
             f"{default_cost:.2f} s CPU.", "",
             "| corruption | severity | mean abs change (MultiMNIST) | CPU s, MultiMNIST 1000×1×36×36 | CPU s, 8×3×288×384 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['corruption']} | {r['severity']} | {r['mean_abs_change_multimnist']:.4f} | "
              f"{r['cpu_s_multimnist_1000']:.3f} | {r['cpu_s_nyuv2_8']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (RESULTS / "corruptions_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
