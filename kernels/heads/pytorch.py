"""Fast pure-PyTorch batched heads: few large ops instead of T small ones.

* Shared input: the heads' stacked weights (ΣN_t, K) make all heads ONE GEMM
  (``F.linear`` = addmm with the bias fused), followed by one activation over the
  whole (M, ΣN_t) output; per-task outputs are column views of it.
* Per-task inputs: ``torch._grouped_mm`` computes x[t] @ W_tᵀ for ragged N_t in one
  call (at most the widths are padded to 16 bytes), where this torch build
  supports the layout (see `grouped_mm_supported`); otherwise the ragged weights
  are zero-padded to max N_t and the heads run as one ``baddbmm``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.kernels.heads.spec import activate_fresh, head_offsets, split_heads

_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Devices whose grouped GEMM is assumed to load each group at its own offset with
# 16-byte vector loads, so every group (not only the total) is padded there.
_GROUP_ALIGNED_DEVICES = ("cuda",)


def concat_gemm_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Shared (M, K) input through all heads as one (M, K) x (K, ΣN_t) GEMM."""
    y = F.linear(x, weight, bias)
    return split_heads(activate_fresh(y, activation), out_features)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, in_features: int) -> bool:
    """Whether `grouped_heads` can use ``torch._grouped_mm`` for these heads.

    ``torch._grouped_mm`` is a private op (torch >= 2.8).  Its stride check asks for
    16-byte aligned leading dimensions: K (of x and of the column-major weightᵀ) and,
    in backward, the ΣN_t of the output gradient — `grouped_heads` pads ΣN_t, so
    only K must be a multiple of 16 / itemsize.  On CPU it accepts fp32/fp16/bf16
    (checked by this module's tests).  On CUDA only Hopper's (sm90) bf16 CUTLASS
    path is used: fp16 needs a cuBLASLt >= 13.3 build and fp32 is rejected; each
    group's first column is kept 16-byte aligned there too (`_GROUP_ALIGNED_DEVICES`).
    The CUDA conditions are read from torch's meta checks, NOT yet run on a GPU.
    """
    if not hasattr(torch, "_grouped_mm") or in_features % (16 // dtype.itemsize):
        return False
    if device.type == "cpu":
        return dtype in _GROUPED_MM_CPU_DTYPES
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9
    return False


@functools.lru_cache(maxsize=128)
def _group_layout(out_features: tuple[int, ...], align: int, device: torch.device) -> tuple[list[int], Tensor]:
    """Padded per-group widths and the int32 group ends ``offs`` of `torch._grouped_mm`.

    Every width is rounded up to ``align`` on CUDA (group starts must be 16-byte
    aligned); on CPU only the total is, by widening the last group.  Cached: the
    offsets tensor would otherwise be rebuilt (and copied to the device) per call.
    """
    if device.type in _GROUP_ALIGNED_DEVICES:
        widths = [-(-n // align) * align for n in out_features]
    else:
        widths = list(out_features)
        widths[-1] += -sum(out_features) % align
    offs = torch.tensor(head_offsets(widths)[1:], dtype=torch.int32, device=device)
    return widths, offs


def grouped_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Stacked (T, M, K) inputs, head t reading x[t]: one grouped GEMM, or padded bmm.

    Heads whose widths needed alignment get zero weight rows (a copy of the stacked
    weight); their output columns are dropped and their gradients discarded.
    """
    if not grouped_mm_supported(x.dtype, x.device, x.shape[-1]):
        return padded_bmm_heads(x, weight, bias, out_features, activation)
    out_features = tuple(out_features)
    widths, offs = _group_layout(out_features, 16 // x.element_size(), x.device)
    if widths != list(out_features):
        weight = _pad_groups(weight, out_features, widths)
        bias = None if bias is None else _pad_groups(bias, out_features, widths)
    # The (M, ΣN_t) result is returned as split views, so the gradient that reaches
    # _grouped_mm is always the fresh contiguous tensor that split's backward
    # concatenates; its backward rejects expanded (stride-0) gradients.
    y = torch._grouped_mm(x.contiguous(), weight.contiguous().t(), offs=offs)
    if bias is not None:
        y = y.add_(bias)
    y = activate_fresh(y, activation)
    # One split (a single cat in backward), then a narrowing slice only per padded group.
    groups = y.split(widths, dim=1)
    return [g if g.shape[1] == n else g[:, :n] for g, n in zip(groups, out_features)]


def _pad_groups(stacked: Tensor, out_features: tuple[int, ...], widths: list[int]) -> Tensor:
    """Zero-pad each task's block of rows of a stacked weight/bias to its group width."""
    if widths[:-1] == list(out_features[:-1]):
        return F.pad(stacked, (0, 0) * (stacked.dim() - 1) + (0, widths[-1] - out_features[-1]))
    blocks = stacked.split(list(out_features))
    return torch.cat([F.pad(b, (0, 0) * (b.dim() - 1) + (0, w - n)) for b, w, n in zip(blocks, widths, out_features)])


def padded_bmm_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """Stacked inputs through zero-padded (T, max N_t, K) weights with one baddbmm.

    The padding rows cost (max N_t - N_t) wasted columns per task; equal N_t need
    no padding at all (the stacked weight is reshaped, a view when contiguous).
    """
    tasks, n_max = len(out_features), max(out_features)
    if all(n == n_max for n in out_features):
        w_pad = weight.reshape(tasks, n_max, weight.shape[1])
        b_pad = None if bias is None else bias.reshape(tasks, 1, n_max)
    else:
        w_pad = torch.nn.utils.rnn.pad_sequence(list(weight.split(list(out_features))), batch_first=True)
        b_pad = None
        if bias is not None:
            b_pad = torch.nn.utils.rnn.pad_sequence(list(bias.split(list(out_features))), batch_first=True)
            b_pad = b_pad.unsqueeze(1)
    w_t = w_pad.transpose(1, 2)
    y = torch.bmm(x, w_t) if b_pad is None else torch.baddbmm(b_pad, x, w_t)
    y = activate_fresh(y, activation)
    # unbind (one stack in backward), not y[t]: T index ops would each scatter a
    # full (T, M, max N_t) gradient.
    return [y_t if n == n_max else y_t[:, :n] for y_t, n in zip(y.unbind(0), out_features)]
