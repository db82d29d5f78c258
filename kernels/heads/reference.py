"""Ground truth of the batched heads: one F.linear + activation per task.

Deliberately the obvious loop: every faster backend is tested against it, and the
dispatcher falls back to it where batching does not pay (one head, or sizes where
the benchmark shows the loop is as fast).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.kernels.heads.spec import activate_fresh, apply_activation


def reference_heads(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None,
    activation: str,
    *,
    inplace: bool = False,
) -> list[Tensor]:
    """Head t maps ``x`` (shared, (M, K)) or ``x[t]`` (stacked, (T, M, K)) to (M, N_t).

    ``inplace`` applies the activation in place on each fresh GEMM output (`activate_fresh`):
    the same numbers, one allocation fewer per head; the dispatcher's loop path uses it, the
    ground truth the other backends are tested against does not.
    """
    activate = activate_fresh if inplace else apply_activation
    # unbind, not x[t]: T index ops would each scatter a full (T, M, K) gradient.
    inputs = [x] * len(weights) if x.dim() == 2 else x.unbind(0)
    outputs = []
    for t, (x_t, w) in enumerate(zip(inputs, weights)):
        b = None if biases is None else biases[t]
        outputs.append(activate(F.linear(x_t, w, b), activation))
    return outputs
