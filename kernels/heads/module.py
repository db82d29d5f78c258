"""`BatchedHeads`: T Linear task heads held as one stacked weight, run together.

The engine replaces a set of per-task ``nn.Linear`` heads by one `BatchedHeads`
(`BatchedHeads.from_linears`).  Storing the heads pre-stacked — weight (ΣN_t, K),
bias (ΣN_t,) — is what makes the batched backends cheap: no per-step
``torch.cat`` of the weights, and the per-task outputs are views.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from graphsurgeon.errors import HeadsInputError
from graphsurgeon.kernels.heads.dispatch import BackendChoice, check_backend, choose_backend, run_concatenated
from graphsurgeon.kernels.heads.spec import HeadsProblem, check_activation


class BatchedHeads(nn.Module):
    """T Linear heads in_features -> out_features[t], then one shared activation.

    ``shared_input=True``: ``forward(x)`` with x (*, K) feeds every head.
    ``shared_input=False``: x is (T, *, K) (or a sequence of T tensors (*, K)) and
    head t reads x[t].  Either way the result is a list of T tensors (*, N_t),
    exactly what ``[act(lin(x)) for lin in linears]`` returns.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Sequence[int],
        bias: bool = True,
        activation: str = "none",
        shared_input: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise HeadsInputError(f"in_features must be a positive int, got {in_features!r}.")
        out_features = tuple(out_features)
        if not out_features or not all(isinstance(n, int) and n >= 1 for n in out_features):
            raise HeadsInputError(
                f"out_features must be a non-empty sequence of positive ints (one per task), got {out_features!r}."
            )
        check_activation(activation)
        check_backend(backend)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.shared_input = shared_input
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(sum(out_features), in_features, **factory))
        self.bias = nn.Parameter(torch.empty(sum(out_features), **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation; every head has fan_in = K, so one call covers all."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linears(
        cls,
        linears: Sequence[nn.Linear],
        activation: str = "none",
        shared_input: bool = True,
        backend: str = "auto",
    ) -> BatchedHeads:
        """Copy the weights of T ``nn.Linear`` heads into one `BatchedHeads`."""
        linears = list(linears)
        if not linears or not all(isinstance(lin, nn.Linear) for lin in linears):
            raise HeadsInputError("from_linears needs a non-empty list of nn.Linear heads.")
        first = linears[0]
        for t, lin in enumerate(linears):
            if lin.in_features != first.in_features:
                raise HeadsInputError(
                    f"linears[{t}] has in_features={lin.in_features} but linears[0] has "
                    f"{first.in_features}; batched heads must read the same features."
                )
            if (lin.bias is None) != (first.bias is None):
                raise HeadsInputError(
                    f"linears[{t}] and linears[0] disagree on bias; give every head a bias or none."
                )
            if lin.weight.dtype != first.weight.dtype or lin.weight.device != first.weight.device:
                raise HeadsInputError(
                    f"linears[{t}] is {lin.weight.dtype} on {lin.weight.device} but linears[0] is "
                    f"{first.weight.dtype} on {first.weight.device}; move the heads to one dtype/device."
                )
        heads = cls(
            first.in_features,
            [lin.out_features for lin in linears],
            bias=first.bias is not None,
            activation=activation,
            shared_input=shared_input,
            backend=backend,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            heads.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if heads.bias is not None:
                heads.bias.copy_(torch.cat([lin.bias for lin in linears]))
        return heads

    def forward(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        rows, lead, choice = self._plan(x)
        outputs = run_concatenated(choice.backend, rows, self.weight, self.bias, self.out_features, self.activation)
        if len(lead) == 1:  # rows were not flattened: outputs already have their shape
            return outputs
        return [y.reshape(*lead, y.shape[-1]) for y in outputs]

    def explain(self, x: Tensor | Sequence[Tensor]) -> str:
        """The backend `forward(x)` runs, and why (see `dispatch.choose_backend`)."""
        rows, _, choice = self._plan(x)
        return f"{choice.backend}: {choice.reason} [T={len(self.out_features)}, rows={tuple(rows.shape)}]"

    def _plan(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, torch.Size, BackendChoice]:
        rows, lead = self._as_rows(x)
        problem = HeadsProblem(
            shared=self.shared_input,
            rows=rows.shape[-2],
            in_features=self.in_features,
            out_features=self.out_features,
            has_bias=self.bias is not None,
            activation=self.activation,
            is_cuda=rows.is_cuda,
            like=rows,
            stacked=True,
            grad_enabled=torch.is_grad_enabled(),
        )
        return rows, lead, choose_backend(problem, self.backend)

    def _as_rows(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, torch.Size]:
        """Flatten the leading dims into rows, (M, K) shared or (T, M, K) per-task,
        and return the per-task leading shape the outputs are reshaped back to."""
        tasks = len(self.out_features)
        if not isinstance(x, Tensor):
            if self.shared_input:
                raise HeadsInputError("BatchedHeads(shared_input=True) takes one tensor (*, K), not a sequence.")
            x = torch.stack(list(x))
        if x.dim() < (1 if self.shared_input else 2) or x.shape[-1] != self.in_features:
            raise HeadsInputError(
                f"BatchedHeads expects inputs with in_features={self.in_features} in the last "
                f"dimension, got shape {tuple(x.shape)}."
            )
        if self.weight.dtype is not x.dtype or self.weight.get_device() != x.get_device():
            raise HeadsInputError(
                f"x is {x.dtype} on {x.device} but the heads are {self.weight.dtype} on "
                f"{self.weight.device}; call .to() on the module or the input."
            )
        if not self.shared_input and x.shape[0] != tasks:
            raise HeadsInputError(
                f"BatchedHeads(shared_input=False) has {tasks} heads but x holds {x.shape[0]} "
                "per-task inputs (x.shape[0]); stack exactly one input per head."
            )
        lead = x.shape[:-1] if self.shared_input else x.shape[1:-1]
        if len(lead) == 1:  # already (M, K) or (T, M, K): skip the reshape op
            return x, lead
        if self.shared_input:
            return x.reshape(-1, self.in_features), lead
        return x.reshape(tasks, -1, self.in_features), lead

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={list(self.out_features)}, "
            f"bias={self.bias is not None}, activation={self.activation!r}, "
            f"shared_input={self.shared_input}, backend={self.backend!r}"
        )
