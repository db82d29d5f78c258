"""Batched task heads: every backend equals the per-task loop, forward and backward.

Triton kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1,
set before anything imports the kernels), exactly as CI runs them.

Tolerances are relative to the largest magnitude of the reference tensor (so they
cover both outputs O(1) and weight gradients summed over M rows):
  fp32 1e-5 — same arithmetic, different summation order;
  fp16 1e-2 — the reference rounds the GEMM to fp16 before the activation while the
              fused kernels activate the fp32 accumulator (fp16 eps = 1e-3);
  bf16 4e-2 — the same with bf16 eps = 8e-3.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples
from torch import nn

import graphsurgeon as gs
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.kernels.heads import (
    BatchedHeads,
    batched_heads,
    explain,
    pixels_to_rows,
    reference_heads,
    rows_to_pixels,
    split_heads,
)
from graphsurgeon.kernels.heads.pytorch import grouped_heads, grouped_mm_supported, padded_bmm_heads
from graphsurgeon.kernels.heads.spec import apply_activation

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
ACTIVATIONS = ("none", "relu", "gelu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_skip_reason() -> str | None:
    try:
        from graphsurgeon.kernels.heads import triton_kernel as heads_triton
    except ImportError:
        return "triton is not installed"
    if not heads_triton.INTERPRETED:
        return "TRITON_INTERPRET was not 1 when the kernels were imported, and tests run on CPU"
    return None


TRITON_SKIP = _triton_skip_reason()
BACKENDS = (
    "torch",
    "auto",
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))),
)


def ragged(tasks: int) -> list[int]:
    """Distinct small N_t, including ones that are not multiples of 8 or 16."""
    return [3 + (7 * t) % 19 for t in range(tasks)]


def make_heads(tasks, rows, in_features, out_features, shared, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    x = leaf(rows, in_features) if shared else leaf(tasks, rows, in_features)
    weights = [leaf(n, in_features, scale=in_features**-0.5) for n in out_features]
    biases = [leaf(n) for n in out_features] if bias else None
    return x, weights, biases


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    expected = expected.float()
    err = (actual.float() - expected).abs().max().item() if expected.numel() else 0.0
    bound = TOL[dtype] * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def check_against_reference(x, weights, biases, activation, backend, dtype):
    leaves = [x, *weights, *(biases or [])]
    expected = reference_heads(x, weights, biases, activation)
    actual = batched_heads(x, weights, biases, activation, backend=backend)
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype, f"output {t}")
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(e.shape, generator=g).to(dtype) for e in expected]
    grads_e = torch.autograd.grad(expected, leaves, upstream)
    grads_a = torch.autograd.grad(actual, leaves, upstream)
    names = ["x"] + [f"weights[{t}]" for t in range(len(weights))] + [f"biases[{t}]" for t in range(len(biases or []))]
    for name, a, e in zip(names, grads_a, grads_e):
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("tasks", (1, 3, 8))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shared", (True, False), ids=("shared", "per_task"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, shared, activation, tasks, dtype):
    x, weights, biases = make_heads(tasks, 10, 24, ragged(tasks), shared, dtype)
    check_against_reference(x, weights, biases, activation, backend, dtype)


@settings(max_examples=examples(25), deadline=None)
@given(
    tasks=st.integers(1, 4),
    rows=st.integers(1, 12),
    in_features=st.integers(1, 40),
    out_seed=st.lists(st.integers(1, 20), min_size=4, max_size=4),
    shared=st.booleans(),
    bias=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    backend=st.sampled_from(("torch", "triton") if TRITON_SKIP is None else ("torch",)),
)
def test_random_shapes_match_reference(tasks, rows, in_features, out_seed, shared, bias, activation, backend):
    x, weights, biases = make_heads(tasks, rows, in_features, out_seed[:tasks], shared, torch.float32, bias)
    check_against_reference(x, weights, biases, activation, backend, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_features", ([5, 12, 7], [8, 8, 8]), ids=("ragged", "equal"))
def test_padded_bmm_matches_reference(out_features, activation):
    """The bmm fallback (no valid _grouped_mm layout) pads ragged heads, views equal ones."""
    x, weights, biases = make_heads(3, 6, 10, out_features, False, torch.float32)
    expected = reference_heads(x, weights, biases, activation)
    actual = padded_bmm_heads(x, torch.cat(weights), torch.cat(biases), out_features, activation)
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float32, "padded bmm")
    grads_e = torch.autograd.grad(sum(e.sum() for e in expected), [x, *weights])
    grads_a = torch.autograd.grad(sum(a.sum() for a in actual), [x, *weights])
    for a, e in zip(grads_a, grads_e):
        assert_close(a, e, torch.float32, "padded bmm grad")


def test_grouped_mm_path_is_taken_and_survives_expanded_gradients():
    """A lone `.sum()` sends a stride-0 gradient that torch._grouped_mm rejects;
    the split views in front of it must hand it a contiguous one."""
    if not grouped_mm_supported(torch.float32, torch.device("cpu"), 8):
        pytest.skip("torch._grouped_mm is not available in this torch build")
    x, weights, _ = make_heads(1, 5, 8, [4], False, torch.float32)
    (y,) = grouped_heads(x, weights[0], None, [4], "none")
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (ex,) = torch.autograd.grad(reference_heads(x, weights, None, "none")[0].sum(), [x])
    assert_close(gx, ex, torch.float32, "grad x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_strided_input(backend):
    x, weights, biases = make_heads(3, 0, 16, [4, 8, 4], True, torch.float32)
    check_against_reference(x, weights, biases, "gelu", backend, torch.float32)
    base = torch.randn(7, 3, 16)
    x = base.transpose(0, 1).requires_grad_()  # (T, M, K) with non-contiguous rows
    _, weights, biases = make_heads(3, 7, 16, [4, 8, 4], False, torch.float32)
    check_against_reference(x, weights, biases, "relu", backend, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_features", ((3, 9, 5), (3, 9, 5, 4, 7, 2, 8, 6)), ids=("T3", "T8"))
@pytest.mark.parametrize("shared", (True, False), ids=("shared", "per_task"))
def test_module_equals_list_of_linears(shared, out_features, activation):
    torch.manual_seed(0)
    linears = [nn.Linear(12, n) for n in out_features]
    heads = BatchedHeads.from_linears(linears, activation=activation, shared_input=shared)
    x = torch.randn(2, 4, 12) if shared else torch.randn(len(linears), 2, 4, 12)
    outputs = heads(x)
    expected = [apply_activation(lin(x if shared else x[t]), activation) for t, lin in enumerate(linears)]
    for a, e in zip(outputs, expected):
        assert_close(a, e, torch.float32, "module output")
    sum(o.square().sum() for o in outputs).backward()
    sum(e.square().sum() for e in expected).backward()
    assert_close(heads.weight.grad, torch.cat([lin.weight.grad for lin in linears]), torch.float32, "weight grad")
    assert_close(heads.bias.grad, torch.cat([lin.bias.grad for lin in linears]), torch.float32, "bias grad")


def test_module_accepts_a_sequence_of_task_inputs_and_triton_backend():
    torch.manual_seed(0)
    linears = [nn.Linear(16, n, bias=False) for n in (4, 6)]
    backend = "triton" if TRITON_SKIP is None else "torch"
    heads = BatchedHeads.from_linears(linears, activation="relu", shared_input=False, backend=backend)
    xs = [torch.randn(5, 16), torch.randn(5, 16)]
    for t, (y, lin) in enumerate(zip(heads(xs), linears)):
        assert_close(y, torch.relu(lin(xs[t])), torch.float32, f"head {t}")
    assert heads.bias is None


def test_module_init_matches_linear_layout():
    heads = BatchedHeads(32, [10, 3], activation="gelu")
    assert heads.weight.shape == (13, 32) and heads.bias.shape == (13,)
    assert heads.weight.abs().max() <= 32**-0.5 + 1e-6  # nn.Linear's kaiming-uniform bound
    assert [tuple(y.shape) for y in heads(torch.randn(7, 32))] == [(7, 10), (7, 3)]
    assert "out_features=[10, 3]" in repr(heads)


def test_conv1x1_heads_via_pixel_rows():
    torch.manual_seed(0)
    convs = [nn.Conv2d(6, n, 1) for n in (2, 5)]
    heads = BatchedHeads.from_linears([_conv_as_linear(c) for c in convs])
    x = torch.randn(2, 6, 3, 4)
    rows, bhw = pixels_to_rows(x)
    for y, conv in zip(heads(rows), convs):
        assert_close(rows_to_pixels(y, bhw), conv(x), torch.float32, "1x1 conv head")


def _conv_as_linear(conv: nn.Conv2d) -> nn.Linear:
    lin = nn.Linear(conv.in_channels, conv.out_channels)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.flatten(1))
        lin.bias.copy_(conv.bias)
    return lin


def test_explain_names_the_chosen_path():
    x, weights, biases = make_heads(3, 64, 256, [64, 64, 64], True, torch.float32)
    assert explain(x, weights, biases).startswith("torch: shared input: one (M, K) x (K, ΣN_t) GEMM")
    assert explain(x[:4], weights, biases).startswith("reference: shared input, M·ΣN_t·K < ")
    assert explain(x, weights[:1], biases[:1]).startswith("reference: a single head")
    assert explain(x, weights, biases, backend="torch").startswith("torch: requested explicitly")
    x_tasks = x.detach().expand(3, -1, -1)
    assert explain(x_tasks, weights).startswith("reference: per-task inputs on CPU")
    # lists of weights, per-task inputs: batched for T >= 8 when autograd records (training)
    x8, weights8, biases8 = make_heads(8, 16, 32, [4] * 8, False, torch.float32)
    assert explain(x8, weights8, biases8).startswith("torch: per-task inputs, autograd recording, T >= 8")
    with torch.no_grad():
        assert explain(x8, weights8, biases8).startswith("reference: per-task inputs on CPU")
        assert explain(x8, weights8, biases8).endswith("grad off]")
    small_heads = BatchedHeads(256, [64, 64])  # pre-stacked weights batch at any size
    assert small_heads.explain(x[:4].detach()).startswith("torch: shared input")
    per_task = BatchedHeads(256, [8] * 8, shared_input=False)
    assert per_task.explain(torch.randn(8, 4, 256)).startswith("torch: per-task inputs, stacked weights, T >= 8")


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    if TRITON_SKIP is not None:
        pytest.skip(TRITON_SKIP)
    from graphsurgeon.kernels.heads import triton_kernel as heads_triton

    monkeypatch.setattr(heads_triton, "INTERPRETED", False)
    x, weights, _ = make_heads(2, 4, 16, [4, 4], True, torch.float32)
    with pytest.raises(gs.BackendError, match="TRITON_INTERPRET=1.*backend='torch'"):
        batched_heads(x, weights, backend="triton")
    with pytest.raises(gs.BackendError, match="float64"):
        batched_heads(x.double(), [w.double() for w in weights], backend="triton")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, w, b: (x, [w[0], w[1][:, :-1]], b, "none"), r"weights\[1\] takes 15 in_features but x has K=16"),
        (lambda x, w, b: (x.expand(3, -1, -1), w, b, "none"), r"3 per-task inputs .* but 2 weights"),
        (lambda x, w, b: (x, w, b, "swish"), r"activation='swish' is not supported; use one of 'none', 'relu', 'gelu'"),
        (lambda x, w, b: (x, w, [b[0], b[1][:-1]], "none"), r"biases\[1\] has shape \(3,\) but weights\[1\] has 4"),
        (lambda x, w, b: (x, w, b[:1], "none"), r"biases must be None or a sequence of 2 tensors"),
        (lambda x, w, b: (x, [w[0].half(), w[1]], b, "none"), r"weights\[0\] is torch.float16 but x is torch.float32"),
        (lambda x, w, b: (x[None, None], w, b, "none"), r"pass a shared \(M, K\) input or stacked"),
        (lambda x, w, b: (x, [], None, "none"), r"weights must be a non-empty sequence"),
    ],
    ids=["mismatched_K", "wrong_T", "unknown_activation", "bias_shape", "bias_count", "dtype", "x_rank", "no_heads"],
)
def test_bad_input_raises_clear_error(mutate, message):
    x, weights, biases = make_heads(2, 4, 16, [4, 4], True, torch.float32)
    batched_heads(x.detach(), weights, biases)  # a cached valid signature must not let a bad call through
    x, weights, biases, activation = mutate(x.detach(), weights, biases)
    with pytest.raises(GraphSurgeonError, match=message):
        batched_heads(x, weights, biases, activation)


def test_bad_backend_and_module_input_raise_clear_errors():
    x, weights, _ = make_heads(2, 4, 16, [4, 4], True, torch.float32)
    with pytest.raises(gs.OptionError, match=r"backend='cuda' is not supported; use one of 'auto'"):
        batched_heads(x, weights, backend="cuda")
    heads = BatchedHeads(16, [4, 4], shared_input=False)
    with pytest.raises(gs.HeadsInputError, match=r"has 2 heads but x holds 3 per-task inputs"):
        heads(torch.randn(3, 5, 16))
    with pytest.raises(gs.HeadsInputError, match=r"in_features=16 in the last dimension, got shape \(2, 5, 8\)"):
        heads(torch.randn(2, 5, 8))
    with pytest.raises(gs.HeadsInputError, match=r"x is torch.float64 on cpu but the heads are torch.float32"):
        heads(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(gs.HeadsInputError, match=r"linears\[1\] has in_features=8 but linears\[0\] has 16"):
        BatchedHeads.from_linears([nn.Linear(16, 2), nn.Linear(8, 2)])
    with pytest.raises(gs.HeadsInputError, match="out_features must be a non-empty sequence of positive ints"):
        BatchedHeads(16, [4, 0])
    with pytest.raises(gs.HeadsInputError, match="out_features sum to 8"):
        split_heads(torch.randn(2, 9), [4, 4])


def test_dispatch_checks_each_call_signature_once(monkeypatch):
    from graphsurgeon.kernels.heads import dispatch as heads_dispatch

    checked = []
    original = heads_dispatch.describe_problem
    monkeypatch.setattr(heads_dispatch, "describe_problem", lambda *a: checked.append(1) or original(*a))
    monkeypatch.setattr(heads_dispatch, "_DISPATCH", {})
    x, weights, biases = make_heads(2, 5, 16, [3, 4], True, torch.float32)
    want = reference_heads(x, weights, biases, "relu")
    for _ in range(3):
        got = batched_heads(x, weights, biases, "relu")
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(checked) == 1
    batched_heads(x[:3], weights, biases, "relu")  # new shapes: checked again
    batched_heads(x, weights, biases, "gelu")  # new activation: checked again
    assert len(checked) == 3
    with torch.no_grad():  # the grad mode can change the choice: checked again
        batched_heads(x, weights, biases, "gelu")
    assert len(checked) == 4
