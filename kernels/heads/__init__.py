"""Batched task heads: T per-task Linear heads (+ activation) executed together.

Public entry points (implemented in the modules beside this one):
  * `batched_heads` — functional form on lists of weights/biases, any backend;
  * `explain` — which backend "auto" picks for given arguments, and why;
  * `BatchedHeads` — the nn.Module the engine uses (`BatchedHeads.from_linears`);
  * `reference_heads` — the per-task loop every backend is tested against;
  * `split_heads`, `pixels_to_rows`, `rows_to_pixels` — layout helpers (a 1×1
    conv head is a Linear head over the B·H·W pixels).
"""
from graphsurgeon.kernels.heads.dispatch import BACKENDS, BackendChoice, batched_heads, choose_backend, explain
from graphsurgeon.kernels.heads.module import BatchedHeads
from graphsurgeon.kernels.heads.reference import reference_heads
from graphsurgeon.kernels.heads.spec import (
    ACTIVATIONS,
    HeadsProblem,
    describe_problem,
    pixels_to_rows,
    rows_to_pixels,
    split_heads,
)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BackendChoice",
    "BatchedHeads",
    "HeadsProblem",
    "batched_heads",
    "choose_backend",
    "describe_problem",
    "explain",
    "pixels_to_rows",
    "reference_heads",
    "rows_to_pixels",
    "split_heads",
]
