"""Fast pure-PyTorch batched heads: few large ops instead of T small ones.

* Shared input: the heads' stacked weights (ΣN_t, K) make all heads ONE GEMM
  (``F.linear`` = addmm with the bias fused), followed by one activation over the
  whole (M, ΣN_t) output; per-task outputs are column views of it.
* Per-task inputs: ``torch._grouped_mm`` computes x[t] @ W_tᵀ for ragged N_t in one
  call without padding, where this torch build supports the layout (see
  `grouped_mm_supported`); otherwise the ragged weights are zero-padded to
  max N_t and the heads run as one ``baddbmm``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.kernels.heads_spec import apply_activation, head_offsets, split_heads

_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _activate_fresh(y: Tensor, activation: str) -> Tensor:
    """Activation of a tensor this module just allocated.

    ReLU runs in place: the GEMM that produced ``y`` does not need its output for
    backward, so overwriting it saves an (M, ΣN_t) allocation and a memory pass.
    """
    if activation == "relu":
        return y.relu_()
    return apply_activation(y, activation)


def concat_gemm_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Shared (M, K) input through all heads as one (M, K) x (K, ΣN_t) GEMM."""
    y = F.linear(x, weight, bias)
    return split_heads(_activate_fresh(y, activation), out_features)


def grouped_mm_supported(x: Tensor, out_features: Sequence[int]) -> bool:
    """Whether ``torch._grouped_mm(x, weight.t(), offs=...)`` is valid for these heads.

    ``torch._grouped_mm`` is a private op (torch >= 2.8).  Its stride check asks for
    16-byte aligned leading dimensions on every device, i.e. K and ΣN_t multiples of
    16 / itemsize.  On CPU it accepts fp32/fp16/bf16 (checked by this module's
    tests).  On CUDA only the bf16 CUTLASS path of Hopper (sm90) is used here, with
    every N_t aligned too, because each group's columns start at its offset; fp16
    needs a cuBLASLt >= 13.3 build and fp32 is rejected, so those fall back to bmm.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if x.shape[-1] % align or sum(out_features) % align:
        return False
    if x.device.type == "cpu":
        return x.dtype in _GROUPED_MM_CPU_DTYPES
    if x.device.type == "cuda":
        return (
            x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] == 9
            and all(n % align == 0 for n in out_features)
        )
    return False


def grouped_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Stacked (T, M, K) inputs, head t reading x[t]: one grouped GEMM, or padded bmm."""
    if not grouped_mm_supported(x, out_features):
        return padded_bmm_heads(x, weight, bias, out_features, activation)
    offs = torch.tensor(head_offsets(out_features)[1:], dtype=torch.int32, device=x.device)
    # The (M, ΣN_t) result is returned as split views, so the gradient that reaches
    # _grouped_mm is always the fresh contiguous tensor that split's backward
    # concatenates; its backward rejects expanded (stride-0) gradients.
    y = torch._grouped_mm(x.contiguous(), weight.contiguous().t(), offs=offs)
    if bias is not None:
        y = y.add_(bias)
    return split_heads(_activate_fresh(y, activation), out_features)


def padded_bmm_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Stacked inputs through zero-padded (T, max N_t, K) weights with one baddbmm.

    The padding rows cost (max N_t - N_t) wasted columns per task; equal N_t need
    no padding at all (the stacked weight is a view).
    """
    tasks, n_max = len(out_features), max(out_features)
    if all(n == n_max for n in out_features):
        w_pad = weight.view(tasks, n_max, weight.shape[1])
        b_pad = None if bias is None else bias.view(tasks, 1, n_max)
    else:
        w_pad = torch.nn.utils.rnn.pad_sequence(list(weight.split(list(out_features))), batch_first=True)
        b_pad = None
        if bias is not None:
            b_pad = torch.nn.utils.rnn.pad_sequence(list(bias.split(list(out_features))), batch_first=True)
            b_pad = b_pad.unsqueeze(1)
    w_t = w_pad.transpose(1, 2)
    y = torch.bmm(x, w_t) if b_pad is None else torch.baddbmm(b_pad, x, w_t)
    y = _activate_fresh(y, activation)
    return [y[t, :, :n] for t, n in enumerate(out_features)]
