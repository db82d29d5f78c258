"""Choose and run a batched-heads backend.

Backends:
  "reference" the per-task loop (`reference`), the ground truth;
  "torch"     one concatenated GEMM (shared input) or one grouped/padded GEMM
              (per-task inputs), see `pytorch`;
  "triton"    one fused grouped-GEMM launch, see `triton_kernel`;
  "auto"      the fastest correct one for the problem, by `choose_backend`.

The CPU rules (also used for other non-CUDA devices) come from
``benchmarks/heads.py --threads 1`` (benchmarks/results/heads_cpu.md): the
loop is kept wherever batching measured no clear gain, so "auto" costs at most the
loop plus one lookup: the checked shapes and the chosen backend are cached per call
signature (`_dispatch`), because validating and choosing on every call cost ~3.5 µs,
10% of the smallest benchmarked heads (T=2, M=64, K=256); the lookup costs ~1 µs.
The CUDA rule is a first guess written without a GPU (this project's kernels are
developed on CPU under the Triton interpreter) and must be tuned with the same
benchmark on one.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from graphsurgeon.errors import BackendError, OptionError
from graphsurgeon.kernels.heads.pytorch import concat_gemm_heads, grouped_heads, grouped_mm_supported
from graphsurgeon.kernels.heads.reference import reference_heads
from graphsurgeon.kernels.heads.spec import (
    HeadsProblem,
    check_dtypes_and_devices,
    describe_problem,
    diagnose,
)

BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# CPU, shared input, weights given as a list: below this many forward
# multiply-adds (M·ΣN_t·K) stacking the weights (a copy) and splitting the output
# cost as much as the T-1 GEMM calls they save (measured, K=256: T=2, M=64 (0.7M)
# loses, 1.10x the loop; T=2, M=128 (1.4M) ties; T=4, M=64 (2.0M) wins, 0.9x).
# Pre-stacked weights (`BatchedHeads`) batch at any size.
CPU_SHARED_MIN_WORK = 3 << 19
# CPU, per-task inputs: from this many heads one torch._grouped_mm call beats the
# loop in training (fwd+bwd 0.75-0.9x the loop, also with lists of weights, whose
# torch.cat the single grouped backward pays for) and, with pre-stacked weights,
# ties it in inference; below, and for lists in inference (1.04-1.46x), the loop wins.
CPU_PER_TASK_MIN_TASKS = 8
# CUDA, shared input: above this many multiply-adds one cuBLAS GEMM is assumed to
# beat the untuned Triton kernel; below it the single fused launch (no separate
# bias/activation kernels) is assumed to win.  UNTUNED: set it from a GPU run.
TRITON_SHARED_MAX_WORK = 1 << 30

_log = logging.getLogger(__name__)


class BackendChoice(NamedTuple):
    """The backend a call runs on and the human-readable reason (a constant: cheap)."""

    backend: str
    reason: str


_EXPLICIT = "requested explicitly"
_ONE_HEAD = BackendChoice("reference", "a single head is already one GEMM; nothing to batch")
_CPU_SHARED = BackendChoice("torch", "shared input: one (M, K) x (K, ΣN_t) GEMM replaces T GEMMs")
_CPU_SHARED_SMALL = BackendChoice(
    "reference", f"shared input, M·ΣN_t·K < {CPU_SHARED_MIN_WORK}: stacking the weights costs what batching saves"
)
_CPU_PER_TASK_GROUPED = BackendChoice(
    "torch", f"per-task inputs, stacked weights, T >= {CPU_PER_TASK_MIN_TASKS}: one torch._grouped_mm call"
)
_CPU_PER_TASK_GROUPED_TRAINING = BackendChoice(
    "torch",
    f"per-task inputs, autograd recording, T >= {CPU_PER_TASK_MIN_TASKS}: one torch._grouped_mm forward and "
    "backward beat T small ones, the weights' concatenation included",
)
_CPU_PER_TASK = BackendChoice(
    "reference",
    "per-task inputs on CPU: grouped or padded GEMMs measured no faster than the loop here "
    f"(inference with lists of weights, or T < {CPU_PER_TASK_MIN_TASKS}; the CPU grouped GEMM is itself a loop of GEMMs)",
)
_CUDA_PER_TASK = BackendChoice("triton", "per-task ragged heads: one grouped launch, no padding (untuned rule)")
_CUDA_SHARED_SMALL = BackendChoice(
    "triton", f"shared input, M·ΣN_t·K <= {TRITON_SHARED_MAX_WORK}: one fused launch (untuned rule)"
)
_CUDA_SHARED_LARGE = BackendChoice(
    "torch", f"shared input, M·ΣN_t·K > {TRITON_SHARED_MAX_WORK}: one cuBLAS GEMM (untuned rule)"
)


def check_backend(backend: str) -> None:
    """Reject unknown backend names with the list of valid ones."""
    if backend not in BACKENDS:
        raise OptionError(
            f"backend={backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}."
        )


def triton_unavailable(problem: HeadsProblem) -> str | None:
    """Why the Triton backend cannot run this problem, or None when it can."""
    if problem.dtype not in TRITON_DTYPES:
        return f"the Triton kernel supports float32/float16/bfloat16, not {problem.dtype}"
    try:
        from graphsurgeon.kernels.heads import triton_kernel as heads_triton
    except ImportError:
        return "triton is not installed (pip install triton)"
    if problem.is_cuda or heads_triton.INTERPRETED:
        return None
    return (
        f"Triton kernels need a CUDA device, but x is on {problem.device}; set the "
        "environment variable TRITON_INTERPRET=1 before the first Triton call to run "
        "them on CPU through the (slow) interpreter"
    )


def choose_backend(problem: HeadsProblem, backend: str = "auto") -> BackendChoice:
    """Pick the backend for ``problem``; an explicit backend is validated, not second-guessed."""
    if backend != "auto":
        check_backend(backend)
        if backend == "triton":
            why_not = triton_unavailable(problem)
            if why_not is not None:
                raise BackendError(f"backend='triton' cannot run: {why_not}; or use backend='torch'.")
        return BackendChoice(backend, _EXPLICIT)
    if len(problem.out_features) == 1:
        return _ONE_HEAD
    if problem.is_cuda:
        return _choose_cuda(problem)
    if problem.shared:
        return _CPU_SHARED if problem.stacked or problem.work >= CPU_SHARED_MIN_WORK else _CPU_SHARED_SMALL
    if (
        (problem.stacked or problem.grad_enabled)
        and len(problem.out_features) >= CPU_PER_TASK_MIN_TASKS
        and grouped_mm_supported(problem.dtype, problem.device, problem.in_features)
    ):
        return _CPU_PER_TASK_GROUPED if problem.stacked else _CPU_PER_TASK_GROUPED_TRAINING
    return _CPU_PER_TASK


def _choose_cuda(problem: HeadsProblem) -> BackendChoice:
    why_not = triton_unavailable(problem)
    if why_not is not None:
        return BackendChoice("torch", f"{why_not}; using the batched PyTorch path")
    if not problem.shared:
        return _CUDA_PER_TASK
    return _CUDA_SHARED_SMALL if problem.work <= TRITON_SHARED_MAX_WORK else _CUDA_SHARED_LARGE


def run_concatenated(
    backend: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_features: Sequence[int],
    activation: str,
) -> list[Tensor]:
    """Run a concrete backend on stacked (ΣN_t, K) weights and (ΣN_t,) bias."""
    if backend == "reference":
        sizes = list(out_features)
        biases = None if bias is None else bias.split_with_sizes(sizes)
        return reference_heads(x, weight.split_with_sizes(sizes), biases, activation, inplace=True)
    if backend == "triton":
        from graphsurgeon.kernels.heads.triton_kernel import triton_heads

        return triton_heads(x, weight, bias, out_features, activation)
    if x.dim() == 2:
        return concat_gemm_heads(x, weight, bias, out_features, activation)
    return grouped_heads(x, weight, bias, out_features, activation)


def batched_heads(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    activation: str = "none",
    backend: str = "auto",
) -> list[Tensor]:
    """T Linear heads (+ activation) on a shared (M, K) or stacked (T, M, K) input.

    Returns the T outputs (M, N_t).  Gradients flow to ``x``, every weight and bias
    on every backend.  ``explain`` tells which backend "auto" picks and why; the
    choice is also logged at DEBUG level on the ``graphsurgeon.kernels`` loggers, once
    per call signature (shapes, dtype, device).
    """
    out_features, chosen = _dispatch(x, weights, biases, activation, backend)
    if chosen == "reference":
        try:
            return reference_heads(x, weights, biases, activation, inplace=True)
        except RuntimeError as err:  # F.linear found a dtype/device mismatch: name it
            raise (diagnose(x, weights, biases, activation) or err) from err
    check_dtypes_and_devices(x, weights, biases)
    bias = None if biases is None else torch.cat(list(biases))
    return run_concatenated(chosen, x, torch.cat(list(weights)), bias, out_features, activation)


# backend="auto" calls: (activation, grad mode, x's dtype/device index/shape, weight
# shapes, bias shapes or None) -> (N_t, backend).  Heads are called with one signature step after step; a
# new one is checked by `describe_problem`, decided by `choose_backend` and logged once.
# Explicit backends are checked on every call (whether Triton can run is looked up
# afresh).  Bounded: cleared when full.
_DISPATCH: dict[tuple, tuple[tuple[int, ...], str]] = {}
_DISPATCH_MAX = 256


def _dispatch(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor] | None, activation: str, backend: str
) -> tuple[tuple[int, ...], str]:
    if backend != "auto":
        problem = describe_problem(x, weights, biases, activation)
        return problem.out_features, choose_backend(problem, backend).backend
    try:
        # one flat tuple: nested tuples cost ~0.3 µs more to build, 1% of the smallest heads
        key = (
            activation,
            torch.is_grad_enabled(),
            x.dtype,
            x.get_device(),
            x.shape,
            len(weights),  # where the weight shapes end and the bias shapes begin
            *[w.shape for w in weights],
            *([None] if biases is None else [b.shape for b in biases]),
        )
        hit = _DISPATCH.get(key)
    except (AttributeError, TypeError):  # not tensors: describe_problem names the culprit
        key, hit = None, None
    if hit is not None:
        return hit
    problem = describe_problem(x, weights, biases, activation)
    choice = choose_backend(problem)
    _log.debug("batched_heads %s -> %s: %s", key, choice.backend, choice.reason)
    hit = (problem.out_features, choice.backend)
    if key is not None:
        if len(_DISPATCH) >= _DISPATCH_MAX:
            _DISPATCH.clear()
        _DISPATCH[key] = hit
    return hit


def explain(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    activation: str = "none",
    backend: str = "auto",
) -> str:
    """One line: the backend `batched_heads` would run with these arguments, and why."""
    problem = describe_problem(x, weights, biases, activation)
    choice = choose_backend(problem, backend)
    kind = "shared input" if problem.shared else "per-task inputs"
    return (
        f"{choice.backend}: {choice.reason} [T={problem.tasks}, {kind}, M={problem.rows}, "
        f"K={problem.in_features}, N_t={list(problem.out_features)}, M·ΣN_t·K={problem.work}, "
        f"{problem.dtype}, {problem.device}, grad {'on' if problem.grad_enabled else 'off'}]"
    )
