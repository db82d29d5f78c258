"""Triton grouped GEMM for batched heads, with bias and activation fused.

Layout (see `heads_spec`): weights stacked into W (ΣN_t, K), bias into b (ΣN_t,),
output Y (M, ΣN_t) where task t owns columns ``offsets[t]:offsets[t + 1]``.

Forward: one launch over a (M-tile, head-tile) grid.  The head-tile axis
enumerates the N-tiles of every task (a host-built table maps it to the task and
its first column), so ragged N_t waste no programs; masks stop a tile at its
task's last column.  A shared input is the per-task case with a task stride of 0.
fp32/fp16/bf16 operands are accumulated in fp32; bias and activation are applied
to the fp32 accumulator before the single rounding to the output dtype.

Backward: G = dY ⊙ act'(·) is never materialised; both backward kernels apply the
activation derivative to the dY tiles they load.
  * dX: x[t] receives G_t W_t (per-task), or G W over all ΣN_t columns (shared).
  * dW_t = G_tᵀ X_t, with db_t = Σ_m G_t summed in the same loop over M.
The derivative needs the pre-activation Z for GELU; it is SAVED by the forward
epilogue rather than recomputed, because heads are narrow (ΣN_t is small next to
K) so Z costs far less memory than a second GEMM costs time.  ReLU needs only the
sign, which the output Y already carries (y > 0 <=> z > 0), so nothing extra is
stored for it; "none" saves nothing.

Interpreter (TRITON_INTERPRET=1, how the tests run on CPU): it stores bf16 as raw
uint16 and its ``tl.dot`` multiplies those integers, so bf16 tiles are upcast to
fp32 before every dot when interpreted.  Kernels are decorated at import, so the
variable must be set before this module is first imported.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphsurgeon.kernels.heads.spec import head_offsets, split_heads

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """Epilogue activation on the fp32 accumulator (GELU: exact erf form)."""
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    return z


@triton.jit
def _activation_grad(g, s, ACTIVATION: tl.constexpr):
    """dL/dZ from dL/dY; ``s`` is the saved Y (ReLU) or Z (GELU), in fp32."""
    if ACTIVATION == 1:
        g = tl.where(s > 0.0, g, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.erf(s * _SQRT1_2))
        g = g * (cdf + s * tl.exp(-0.5 * s * s) * _INV_SQRT_2PI)
    return g


@triton.jit
def _heads_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    offsets_ptr, tile_task_ptr, tile_col_ptr,
    M, K,
    stride_xt, stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    task = tl.load(tile_task_ptr + pid_n)
    col_end = tl.load(offsets_ptr + task + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.load(tile_col_ptr + pid_n) + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < col_end
    x_rows = x_ptr + task.to(tl.int64) * stride_xt + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    out_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    acc = _activate(acc, ACTIVATION)
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _heads_dx_kernel(
    dy_ptr, s_ptr, w_ptr, dx_ptr, spans_ptr,
    M, K,
    stride_dym, stride_dyn,
    stride_sm, stride_sn,
    stride_wn, stride_wk,
    stride_dxt, stride_dxm, stride_dxk,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX tile = Σ over the span's columns n of G[:, n] W[n, :].

    Program axis 2 walks the spans: one span per task for per-task inputs, one span
    [0, ΣN_t) for a shared input (whose gradient sums over every head).
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    span = tl.program_id(2)
    n_lo = tl.load(spans_ptr + span)
    n_hi = tl.load(spans_ptr + span + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_k = rk < K
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        nn = n0 + rn
        mask_n = nn < n_hi
        tile_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(dy_ptr + rm64[:, None] * stride_dym + nn[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        g = g.to(tl.float32)
        if ACTIVATION != 0:
            s = tl.load(s_ptr + rm64[:, None] * stride_sm + nn[None, :] * stride_sn, mask=tile_mask, other=0.0)
            g = _activation_grad(g, s.to(tl.float32), ACTIVATION)
        w = tl.load(
            w_ptr + nn.to(tl.int64)[:, None] * stride_wn + rk[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        )
        if DOT_FP32:
            w = w.to(tl.float32)
        else:
            g = g.to(w.dtype)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    dx = dx_ptr + span.to(tl.int64) * stride_dxt + rm64[:, None] * stride_dxm + rk[None, :] * stride_dxk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _heads_dw_kernel(
    dy_ptr, s_ptr, x_ptr, dw_ptr, db_ptr,
    offsets_ptr, tile_task_ptr, tile_col_ptr,
    M, K,
    stride_dym, stride_dyn,
    stride_sm, stride_sn,
    stride_xt, stride_xm, stride_xk,
    stride_dwn, stride_dwk,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW tile = G_tᵀ X_t over all M rows; the K-tile-0 programs also write db."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    task = tl.load(tile_task_ptr + pid_n)
    col_end = tl.load(offsets_ptr + task + 1)
    rn = tl.load(tile_col_ptr + pid_n) + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    mask_n = rn < col_end
    mask_k = rk < K
    x_base = x_ptr + task.to(tl.int64) * stride_xt
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mm = (m0 + rm).to(tl.int64)
        mask_m = mm < M
        tile_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(dy_ptr + mm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        g = g.to(tl.float32)
        if ACTIVATION != 0:
            s = tl.load(s_ptr + mm[:, None] * stride_sm + rn[None, :] * stride_sn, mask=tile_mask, other=0.0)
            g = _activation_grad(g, s.to(tl.float32), ACTIVATION)
        if HAS_BIAS:
            db += tl.sum(g, axis=0)
        xt = tl.load(
            x_base + mm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if DOT_FP32:
            xt = xt.to(tl.float32)
        else:
            g = g.to(xt.dtype)
        acc = tl.dot(tl.trans(g), xt, acc, input_precision=INPUT_PRECISION)
    dw = dw_ptr + rn.to(tl.int64)[:, None] * stride_dwn + rk[None, :] * stride_dwk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + rn, db.to(db_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


@dataclass(frozen=True)
class _Tiles:
    """Tile sizes of one problem (powers of two >= 16, as ``tl.dot`` requires)."""

    m: int
    n: int
    k: int
    num_warps: int


def _pick_tiles(rows: int, max_out: int, in_features: int, dtype: torch.dtype) -> _Tiles:
    """A fixed heuristic, NOT autotuned: tune on a GPU with benchmarks/heads.py.

    Interpreted, each program is a Python loop, so tiles grow up to 64 to cover the
    (tiny) test shapes with few programs.  Compiled, heads are narrow: N-tiles
    follow max N_t up to 128 so a typical head is one tile wide.
    """
    def fit(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    if INTERPRETED:
        return _Tiles(fit(rows, 64), fit(max_out, 64), fit(in_features, 64), num_warps=1)
    block_m = 128 if rows >= 1024 else 64
    block_n = fit(max_out, 128)
    block_k = 32 if dtype == torch.float32 else 64
    return _Tiles(block_m, block_n, block_k, num_warps=8 if block_m * block_n >= 128 * 128 else 4)


@dataclass(frozen=True)
class _TaskTables:
    """Device-side index tables of a head layout (int32)."""

    offsets: Tensor  # (T + 1,) column offsets of the tasks
    whole: Tensor  # (2,) = [0, ΣN_t], the single dX span of a shared input
    tile_task: Tensor  # (n_tiles,) task of each N-tile
    tile_col: Tensor  # (n_tiles,) first column of each N-tile


@functools.lru_cache(maxsize=128)
def _task_tables(out_features: tuple[int, ...], block_n: int, device: torch.device) -> _TaskTables:
    """Cached so a training step pays no host->device copy after its first call."""
    offsets = head_offsets(out_features)
    tile_task, tile_col = [], []
    for t, n in enumerate(out_features):
        for start in range(0, n, block_n):
            tile_task.append(t)
            tile_col.append(offsets[t] + start)

    def table(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return _TaskTables(table(offsets), table([0, offsets[-1]]), table(tile_task), table(tile_col))


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs of the dots: bf16 upcast under the interpreter; fp32 honours allow_tf32."""
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": INTERPRETED and dtype == torch.bfloat16,
        "INPUT_PRECISION": "tf32" if allow_tf32 and not INTERPRETED else "ieee",
    }


def _x_strides(x: Tensor) -> tuple[int, int, int]:
    """(task, row, feature) strides; a shared 2-D input has task stride 0."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


class _TritonHeadsFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward are both Triton launches."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,
                out_features: tuple[int, ...], activation: str) -> Tensor:
        rows, in_features = x.shape[-2], x.shape[-1]
        tiles = _pick_tiles(rows, max(out_features), in_features, x.dtype)
        tables = _task_tables(out_features, tiles.n, x.device)
        act = _ACTIVATION_CODES[activation]
        y = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
        store_z = act == 2 and any(ctx.needs_input_grad)
        z = torch.empty_like(y) if store_z else y
        if rows > 0:
            grid = (triton.cdiv(rows, tiles.m), tables.tile_task.numel())
            _heads_fwd_kernel[grid](
                x, weight, weight if bias is None else bias, y, z,
                tables.offsets, tables.tile_task, tables.tile_col,
                rows, in_features, *_x_strides(x), weight.stride(0), weight.stride(1),
                y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None, ACTIVATION=act, STORE_Z=store_z,
                BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_K=tiles.k,
                num_warps=tiles.num_warps, **_dot_options(x.dtype),
            )
        saved = {0: None, 1: y, 2: z if store_z else None}[act]
        ctx.save_for_backward(x, weight, saved)
        ctx.meta = (tiles, tables, act, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, saved = ctx.saved_tensors
        tiles, tables, act, has_bias = ctx.meta
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        s = dy if saved is None else saved
        rows, in_features = x.shape[-2], x.shape[-1]
        options = dict(BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_K=tiles.k,
                       num_warps=tiles.num_warps, **_dot_options(x.dtype))
        dx = dw = db = None
        if need_dx:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            spans = tables.whole if x.dim() == 2 else tables.offsets
            grid = (triton.cdiv(rows, tiles.m), triton.cdiv(in_features, tiles.k), spans.numel() - 1)
            if rows > 0:
                _heads_dx_kernel[grid](
                    dy, s, weight, dx, spans, rows, in_features,
                    dy.stride(0), dy.stride(1), s.stride(0), s.stride(1),
                    weight.stride(0), weight.stride(1), *_x_strides(dx),
                    ACTIVATION=act, **options,
                )
        if need_dw or need_db:
            dw = torch.empty_like(weight)
            db = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if has_bias else None
            grid = (tables.tile_task.numel(), triton.cdiv(in_features, tiles.k))
            _heads_dw_kernel[grid](
                dy, s, x, dw, dw if db is None else db,
                tables.offsets, tables.tile_task, tables.tile_col, rows, in_features,
                dy.stride(0), dy.stride(1), s.stride(0), s.stride(1),
                *_x_strides(x), dw.stride(0), dw.stride(1),
                HAS_BIAS=has_bias, ACTIVATION=act, **options,
            )
        return dx, dw if need_dw else None, db if need_db else None, None, None


def triton_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_features: Sequence[int], activation: str
) -> list[Tensor]:
    """All heads in one Triton launch; per-task outputs are column views of (M, ΣN_t)."""
    y = _TritonHeadsFunction.apply(x, weight, bias, tuple(out_features), activation)
    return split_heads(y, out_features)
