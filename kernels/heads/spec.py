"""Shapes, validation and shared helpers of the batched task heads.

T task heads are Linear maps W_t (N_t, K), b_t (N_t,) followed by one activation.
Every backend stores them the same way: the weights stacked row-wise into one
(ΣN_t, K) matrix and the biases into one (ΣN_t,) vector, so task t owns the
columns ``offsets[t]:offsets[t + 1]`` of a concatenated (M, ΣN_t) output.  That
layout lets a shared input run all heads as one GEMM and lets per-task outputs be
returned as zero-copy column views (`split_heads`).

A 1×1 convolution head is the same GEMM over pixels; `pixels_to_rows` and
`rows_to_pixels` move between (B, C, H, W) and (B·H·W, C).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from graphsurgeon.errors import GraphSurgeonError, HeadsInputError, OptionError

ACTIVATIONS: tuple[str, ...] = ("none", "relu", "gelu")


def check_activation(activation: str) -> None:
    """Reject unknown activation names before any work is done."""
    if activation not in ACTIVATIONS:
        raise OptionError(
            f"activation={activation!r} is not supported; use one of {', '.join(map(repr, ACTIVATIONS))}."
        )


def apply_activation(z: Tensor, activation: str) -> Tensor:
    """The activation every backend must reproduce.

    GELU is the exact erf form (``F.gelu(z)``, approximate="none"), the default of
    ``nn.GELU``, so a head built from ``nn.Sequential(nn.Linear, nn.GELU())`` keeps
    its numbers; the Triton epilogue evaluates the same formula with ``tl.erf``.
    """
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    return z


def activate_fresh(z: Tensor, activation: str) -> Tensor:
    """`apply_activation` on a tensor the caller just allocated (a GEMM's output).

    ReLU runs in place: a GEMM does not need its output for backward, so overwriting it saves
    an allocation and a memory pass per call, which at small sizes is a measurable share of
    the call (benchmarks/heads.py). GELU has no in-place form.
    """
    if activation == "relu":
        return z.relu_()
    return apply_activation(z, activation)


class HeadsProblem(NamedTuple):
    """What a batched-heads call computes, independent of the backend.

    ``shared`` is True for one (M, K) input read by every head and False for a
    stacked (T, M, K) input where head t reads ``x[t]``.  ``stacked`` says the
    weights already arrive as one (ΣN_t, K) tensor (`BatchedHeads`), so batched
    backends skip the ``torch.cat`` that lists of weights need.

    It is built on every call, and for small heads the per-call Python overhead
    decides whether the dispatcher keeps up with the plain loop (benchmarks/heads.py
    holds it within 5% on CPU), so: a NamedTuple rather than a dataclass, ``is_cuda``
    as a field (``device.type`` costs ~0.5 µs), and ``dtype``/``device`` read from the
    input tensor ``like`` only by the rules that need them (fetching ``x.device``
    builds a new object each time).
    """

    shared: bool
    rows: int
    in_features: int
    out_features: tuple[int, ...]
    has_bias: bool
    activation: str
    is_cuda: bool
    like: Tensor
    stacked: bool = False
    grad_enabled: bool = False
    """Autograd is recording (``torch.is_grad_enabled()``): a training call, whose backward
    changes which backend pays (benchmarks/heads.py, fwd vs fwd+bwd rows)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.like.dtype

    @property
    def device(self) -> torch.device:
        return self.like.device

    @property
    def tasks(self) -> int:
        return len(self.out_features)

    @property
    def total_out(self) -> int:
        return sum(self.out_features)

    @property
    def work(self) -> int:
        """Multiply-adds of the forward pass, the size the dispatch rules use."""
        return self.rows * self.total_out * self.in_features


def describe_problem(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None,
    activation: str,
) -> HeadsProblem:
    """Check the SHAPES of `batched_heads`'s arguments and summarise them.

    Shapes are what a backend could get silently wrong (a 1-D weight or a (1,) bias
    broadcasts in F.linear; zip drops surplus heads), so they are always checked.
    dtype/device agreement is checked by `check_dtypes_and_devices` where a backend
    needs it; the per-task loop lets F.linear detect it and `diagnose` name it.
    One flat loop checks the common valid call; only a failure walks the arguments
    again (`diagnose`) to say which one is wrong and what to pass instead.
    """
    out_features = _valid_out_features(x, weights, biases, activation)
    if out_features is None:
        raise diagnose(x, weights, biases, activation) or AssertionError("shape check and diagnose disagree")
    x_shape = x.shape
    return HeadsProblem(
        len(x_shape) == 2,
        x_shape[-2],
        x_shape[-1],
        out_features,
        biases is not None,
        activation,
        x.is_cuda,
        x,
        grad_enabled=torch.is_grad_enabled(),
    )


def _valid_out_features(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor] | None, activation: str
) -> tuple[int, ...] | None:
    """The heads' N_t if every shape is valid, else None."""
    try:
        w_shapes = tuple([w.shape for w in weights])
        b_shapes = None if biases is None else tuple([b.shape for b in biases])
        return _check_shapes(activation, x.shape, w_shapes, b_shapes)
    except (AttributeError, TypeError):
        return None


def _check_shapes(
    activation: str, x_shape: torch.Size, w_shapes: tuple[torch.Size, ...], b_shapes: tuple[torch.Size, ...] | None
) -> tuple[int, ...] | None:
    tasks = len(w_shapes)
    if activation not in ACTIVATIONS or len(x_shape) not in (2, 3) or x_shape[-1] == 0 or tasks == 0:
        return None
    if len(x_shape) == 3 and x_shape[0] != tasks:
        return None
    if any(len(w) != 2 or w[1] != x_shape[-1] or w[0] == 0 for w in w_shapes):
        return None
    out_features = tuple(w[0] for w in w_shapes)
    if b_shapes is not None and (len(b_shapes) != tasks or any(b != (n,) for b, n in zip(b_shapes, out_features))):
        return None
    return out_features


def check_dtypes_and_devices(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor] | None) -> None:
    """Every weight and bias must share x's dtype and device (backends that stack them
    would otherwise promote dtypes silently, or launch on mixed devices)."""
    dtype, device = x.dtype, x.get_device()
    for t in (*weights, *(biases or ())):
        if t.dtype is not dtype or t.get_device() != device:
            raise diagnose(x, weights, biases, "none") or AssertionError("dtype check and diagnose disagree")


def diagnose(x: object, weights: object, biases: object, activation: str) -> GraphSurgeonError | None:
    """The GraphSurgeonError naming the first invalid argument, or None if all are valid."""
    try:
        check_activation(activation)
        _diagnose_arguments(x, weights, biases)
    except GraphSurgeonError as err:
        return err
    return None


def _diagnose_arguments(x: object, weights: object, biases: object) -> None:
    if not isinstance(x, Tensor):
        raise HeadsInputError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if isinstance(weights, Tensor) or not hasattr(weights, "__len__") or len(weights) == 0:
        raise HeadsInputError(
            "weights must be a non-empty sequence with one (N_t, K) tensor per task head."
        )
    if x.dim() not in (2, 3):
        raise HeadsInputError(
            f"x has shape {tuple(x.shape)}; pass a shared (M, K) input or stacked "
            "per-task inputs (T, M, K) (flatten extra batch dimensions into M)."
        )
    if x.dim() == 3 and x.shape[0] != len(weights):
        raise HeadsInputError(
            f"x holds {x.shape[0]} per-task inputs (x.shape[0]) but {len(weights)} weights were "
            "given; pass one input per head, or a 2-D (M, K) input shared by all heads."
        )
    in_features = x.shape[-1]
    if in_features == 0:
        raise HeadsInputError("x has K=0 features; heads need at least one input feature.")
    for t, w in enumerate(weights):
        _check_like_x(f"weights[{t}]", w, x)
        if w.dim() != 2 or w.shape[0] == 0:
            raise HeadsInputError(
                f"weights[{t}] has shape {tuple(w.shape)}; each weight must be a non-empty "
                "(N_t, K) matrix as in nn.Linear.weight."
            )
        if w.shape[1] != in_features:
            raise HeadsInputError(
                f"weights[{t}] takes {w.shape[1]} in_features but x has K={in_features} "
                "(its last dimension); every head must read the input's feature size."
            )
    if biases is None:
        return
    if isinstance(biases, Tensor) or not hasattr(biases, "__len__") or len(biases) != len(weights):
        raise HeadsInputError(
            f"biases must be None or a sequence of {len(weights)} tensors, one per weight."
        )
    for t, (b, w) in enumerate(zip(biases, weights)):
        _check_like_x(f"biases[{t}]", b, x)
        if tuple(b.shape) != (w.shape[0],):
            raise HeadsInputError(
                f"biases[{t}] has shape {tuple(b.shape)} but weights[{t}] has {w.shape[0]} "
                f"out_features; pass a ({w.shape[0]},) bias."
            )


def _check_like_x(name: str, t: object, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise HeadsInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype != x.dtype:
        raise HeadsInputError(
            f"{name} is {t.dtype} but x is {x.dtype}; cast the heads or the input "
            "(e.g. module.to(x.dtype)) so that both match."
        )
    if t.device != x.device:
        raise HeadsInputError(
            f"{name} is on {t.device} but x is on {x.device}; move both to one device."
        )


def head_offsets(out_features: Sequence[int]) -> list[int]:
    """Column offsets of each task in the concatenated output: [0, N_0, N_0+N_1, ...]."""
    offsets = [0]
    for n in out_features:
        offsets.append(offsets[-1] + n)
    return offsets


def split_heads(y: Tensor, out_features: Sequence[int]) -> list[Tensor]:
    """Split a concatenated (M, ΣN_t) output into per-task (M, N_t) column views (no copy)."""
    if y.shape[-1] != sum(out_features):
        raise HeadsInputError(
            f"y has {y.shape[-1]} columns but out_features sum to {sum(out_features)}; "
            "pass the out_features the output was computed with."
        )
    return list(y.split(list(out_features), dim=-1))


def pixels_to_rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(B, C, H, W) -> (B·H·W, C): a 1×1 conv head is a Linear head over pixels."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c), (b, h, w)


def rows_to_pixels(y: Tensor, bhw: tuple[int, int, int]) -> Tensor:
    """(B·H·W, N) -> (B, N, H, W), the inverse of `pixels_to_rows` (a channels-last view)."""
    b, h, w = bhw
    return y.reshape(b, h, w, y.shape[-1]).permute(0, 3, 1, 2)

