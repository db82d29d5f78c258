"""Benchmark the batched-heads backends against the per-task loop.

    python benchmarks/heads.py --quick --threads 1   # CPU run (rows above 5% re-measured: --reruns)
    python benchmarks/heads.py                       # full grid (on a GPU: tunes the dispatch rule)

Every variant is timed in the same run as the loop and reported as a RATIO
(variant time / loop time, < 1 is faster), because absolute CPU times depend on the
machine; absolute times are added only on a GPU.  CPU runs time process CPU time,
so other jobs on a shared machine do not skew the ratios.  Variants:

  loop    reference_heads: F.linear + activation per task (the baseline)
  torch   batched_heads(backend="torch") on weight lists (includes torch.cat)
  bmm     weights zero-padded to max N_t, one baddbmm (shared input broadcast)
  triton  batched_heads(backend="triton")  — CUDA only
  auto    batched_heads(backend="auto") on weight lists
  module  BatchedHeads (stacked weights, backend="auto"), what the engine runs

Results go to benchmarks/results/heads_<device>.json and .md; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from graphsurgeon.kernels.heads import BatchedHeads, batched_heads, reference_heads
from graphsurgeon.kernels.heads.pytorch import padded_bmm_heads

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (2, 4, 8, 16, 40)
VARIANTS = ("loop", "torch", "bmm", "triton", "auto", "module")


@dataclass(frozen=True)
class Case:
    """One benchmark point."""

    size: str  # "small" | "large"
    shared: bool
    tasks: int
    rows: int
    in_features: int
    out_features: tuple[int, ...]


def ragged_out_features(tasks: int, low: int = 10, high: int = 64) -> tuple[int, ...]:
    """Deterministic ragged N_t spread over [low, high] (heads differ per task)."""
    span = high - low + 1
    return tuple(low + (t * 23) % span for t in range(tasks))


def cases(quick: bool, on_gpu: bool) -> list[Case]:
    """Small ragged heads everywhere; the large size only where it is affordable.

    The large case (M=8192, K=2048, N=1024) costs 17 GFLOP per head forward, seconds
    per call on a CPU, so CPUs run it at T <= 4 (T=2 with --quick).
    """
    small_rows = (64, 512) if quick else (64, 128, 256, 512)
    large_tasks = TASKS if on_gpu else ((2,) if quick else (2, 4))
    out = []
    for shared in (True, False):
        for tasks in TASKS:
            for rows in small_rows:
                out.append(Case("small", shared, tasks, rows, 256, ragged_out_features(tasks)))
        for tasks in large_tasks:
            out.append(Case("large", shared, tasks, 8192, 2048, (1024,) * tasks))
    return out


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(case.tasks * 1000 + case.rows)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=g) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    shape = (case.rows, case.in_features) if case.shared else (case.tasks, case.rows, case.in_features)
    x = randn(*shape)
    weights = [randn(n, case.in_features, scale=case.in_features**-0.5) for n in case.out_features]
    biases = [randn(n) for n in case.out_features]
    return x, weights, biases


def variant_fns(
    case: Case, x, weights, biases, activation: str, on_gpu: bool
) -> tuple[dict[str, Callable[[], list]], BatchedHeads]:
    module = BatchedHeads.from_linears(
        [_linear(w, b) for w, b in zip(weights, biases)], activation=activation, shared_input=case.shared
    )

    def bmm() -> list:
        xs = x if not case.shared else x.expand(case.tasks, *x.shape)
        return padded_bmm_heads(xs, torch.cat(weights), torch.cat(biases), case.out_features, activation)

    fns = {
        "loop": lambda: reference_heads(x, weights, biases, activation),
        "torch": lambda: batched_heads(x, weights, biases, activation, backend="torch"),
        "bmm": bmm,
        "auto": lambda: batched_heads(x, weights, biases, activation, backend="auto"),
        "module": lambda: module(x),
    }
    if on_gpu:
        fns["triton"] = lambda: batched_heads(x, weights, biases, activation, backend="triton")
    return fns, module


def _linear(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def with_backward(fn: Callable[[], list], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """Forward + backward to every leaf (grads returned, not accumulated: no .grad traffic)."""

    def step() -> None:
        outs = fn()
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    return step


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    sync: Callable[[], None],
    clock: Callable[[], float],
    min_sample_s: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-call seconds (median over rounds) and time ratios against "loop".

    Each round times every variant back to back in a fresh random (seeded) order: a
    rotating order kept the cyclic sequence, so one variant always followed the same
    cache- and allocator-heavy one (measured: "auto" after "bmm" read 2-10% slow while
    an alternating A/B run of auto and loop read 1.00).  Each sample is ``number`` calls
    long enough (>= min_sample_s) to swamp the clock's resolution.  The ratio is the
    median of the per-round ratios, so a disturbance of one round of one variant is
    discarded.
    """
    for fn in fns.values():  # warm-up (allocator, Triton compile, MKL threads)
        fn()
    sync()
    start = clock()
    fns["loop"]()
    sync()
    number = max(1, int(min_sample_s / max(clock() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            fn = fns[name]
            start = clock()
            for _ in range(number):
                fn()
            sync()
            samples[name].append((clock() - start) / number)
    times = {name: statistics.median(s) for name, s in samples.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(s, samples["loop"])) for name, s in samples.items()}
    return times, ratios


# The dispatcher's promise on CPU: "auto" within 5% of the loop (see graphsurgeon.kernels.heads.dispatch).
AUTO_TOLERANCE = 1.05


def run(
    quick: bool, device: torch.device, dtype: torch.dtype, activation: str, reruns: int = 0
) -> list[dict]:
    """Every case, forward and forward+backward.  A row whose auto/loop ratio exceeds
    AUTO_TOLERANCE is measured again, up to ``reruns`` times with three times the rounds
    (a shared machine's load comes in bursts); the record keeps the last measurement and
    says how many reruns it took."""
    on_gpu = device.type == "cuda"
    records = []
    for case in cases(quick, on_gpu):
        large = case.size == "large"
        rounds = (3 if quick else 7) if large else (11 if quick else 31)
        for with_grad in (False, True):
            record = measure(case, with_grad, rounds, quick, device, dtype, activation)
            for attempt in range(1, reruns + 1):
                if record["ratio"]["auto"] <= AUTO_TOLERANCE:
                    break
                print(_row(record) + f" rerun {attempt}", flush=True)
                record = measure(case, with_grad, 3 * rounds, quick, device, dtype, activation)
                record["reruns"] = attempt
            records.append(record)
            print(_row(record), flush=True)
    return records


def measure(
    case: Case, with_grad: bool, rounds: int, quick: bool, device: torch.device, dtype: torch.dtype, activation: str
) -> dict:
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    # On CPU: the process's CPU time, which other processes' load does not inflate
    # (with --threads 1 it is exactly the work done; more threads add spin-waits).
    clock = time.perf_counter if on_gpu else time.process_time
    min_sample_s = 0.0 if case.size == "large" else (0.005 if quick else 0.02)
    x, weights, biases = make_inputs(case, dtype, device, with_grad)
    fns, module = variant_fns(case, x, weights, biases, activation, on_gpu)
    if with_grad:
        leaves = [x, *weights, *biases]
        fns = {
            name: with_backward(fn, [x, *module.parameters()] if name == "module" else leaves)
            for name, fn in fns.items()
        }
        times, ratios = time_interleaved(fns, rounds, sync, clock, min_sample_s)
    else:
        with torch.no_grad():
            times, ratios = time_interleaved(fns, rounds, sync, clock, min_sample_s)
    record = {
        "size": case.size,
        "input": "shared" if case.shared else "per-task",
        "pass": "fwd+bwd" if with_grad else "fwd",
        "T": case.tasks,
        "M": case.rows,
        "K": case.in_features,
        "N": list(case.out_features),
        "ratio": ratios,
    }
    if on_gpu:
        record["ms"] = {name: t * 1e3 for name, t in times.items()}
    return record


def _n_label(n: list[int]) -> str:
    return str(n[0]) if len(set(n)) == 1 else f"{min(n)}..{max(n)}"


def _row(r: dict) -> str:
    cells = [r["size"], r["input"], r["pass"], str(r["T"]), str(r["M"]), _n_label(r["N"])]
    cells += [f"{r['ratio'][v]:.2f}" if v in r["ratio"] else "—" for v in VARIANTS]
    if "ms" in r:
        cells.append(f"{r['ms']['loop']:.3f}")
    cells.append(str(r.get("reruns", 0)))
    return "| " + " | ".join(cells) + " |"


def markdown(records: list[dict], meta: dict) -> str:
    head = ["size", "input", "pass", "T", "M", "N_t"] + list(VARIANTS)
    if any("ms" in r for r in records):
        head.append("loop ms")
    head.append("reruns")
    lines = [
        f"# Batched heads on {meta['device']} ({meta['dtype']}, activation={meta['activation']})",
        "",
        "Time of each variant divided by the per-task loop's, same run (< 1 = faster than the loop);",
        "median of per-round paired ratios. A row with auto/loop above "
        f"{AUTO_TOLERANCE} was measured again (3x the rounds, at most {meta['reruns']} times; column reruns).",
        f"K=256 for small cases, K=2048 for large. torch {meta['torch']}, triton {meta['triton']}, "
        f"quick={meta['quick']}, threads={meta['threads']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [_row(r) for r in records]
    worst = max(records, key=lambda r: r["ratio"]["auto"])
    lines += ["", f"Worst auto/loop ratio: {worst['ratio']['auto']:.2f} ({_row(worst)})", ""]
    return "\n".join(lines)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--activation", default="relu", choices=["none", "relu", "gelu"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 keeps ratios stable on a loaded machine)")
    parser.add_argument("--reruns", type=int, default=2, help=f"re-measure rows with auto/loop > {AUTO_TOLERANCE}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "activation": args.activation,
        "torch": torch.__version__,
        "triton": triton_version,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "reruns": args.reruns,
    }
    records = run(args.quick, device, dtype, args.activation, args.reruns)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"heads_{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = markdown(records, meta)
    stem.with_suffix(".md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
