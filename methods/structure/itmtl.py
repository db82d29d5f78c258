"""IT-MTL — Increased Transfer Multi-Task Learning (Fifty et al., "Measuring and Harnessing
Transference in Multi-Task Learning", 2020).

Each step forms several candidate combined gradients of the shared parameters (by default
the plain sum of the task gradients and PCGrad's), looks ahead along each (an SGD step on the
shared parameters, the task losses recomputed on the same batch: `graphsurgeon.methods.structure.lookahead`)
and takes the candidate with the highest *total transference*, the paper's criterion:

    Σ_j Z_j = Σ_j 1 − L_j(after the step) / L_j(before),

the tasks' relative loss changes, so each task counts by its proportional gain and a task with
a large loss scale does not decide alone (``criterion="total"``: the lowest raw sum of the
lookahead losses instead, which lets the highest-loss task dominate). Task-specific parameters
(heads, single-task branches) take their ordinary gradient. With ``every > 1`` the choice is
made every ``every`` steps and reused in between.

A candidate is any aggregator of `graphsurgeon.methods.aggregation.registry` by name. On choosing
steps every candidate aggregates (so stateful ones, e.g. DWA's loss history or UW's learnable
weights, keep up); between them only the chosen one does.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from graphsurgeon.errors import CheckpointError, MethodError, OptionError
from graphsurgeon.methods.aggregation.base import assign_gradient, per_task_gradients, split_parameters
from graphsurgeon.methods.aggregation.registry import make_aggregator
from graphsurgeon.methods.aggregation.weighting import EpochLossMean
from graphsurgeon.methods.base import Step
from graphsurgeon.methods.structure.lookahead import LookaheadMethod, lookahead_losses
from graphsurgeon.training.distributed import all_reduce_gradients, all_reduce_mean

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["ITMTL", "select_candidate"]


def select_candidate(
    before: torch.Tensor, after: torch.Tensor, criterion: Literal["relative", "total"] = "relative", tolerance: float = 0.0
) -> int:
    """The index of the best candidate: row k of ``after`` (``[K, T]``) holds the task losses
    after the lookahead along candidate k, ``before`` (``[T]``) the losses before it.

    ``relative`` ranks by Σ_j after_kj / |before_j| (lowest first), i.e. highest total
    transference Σ_j 1 − after_kj / before_j (tasks with a zero loss have nothing to gain and
    are left out); ``total`` by Σ_j after_kj. Scores within ``tolerance`` × |lowest| of the
    lowest tie, and the earliest tied candidate wins.
    """
    after = after.double()
    if criterion == "relative":
        scale = before.double().abs().reshape(-1)
        kept = scale > 0
        scores = (after[:, kept] / scale[kept]).sum(dim=1)
    elif criterion == "total":
        scores = after.sum(dim=1)
    else:
        raise OptionError(f"IT-MTL criterion={criterion!r}; use 'relative' (the paper's transference) or 'total'.")
    lowest = scores.min()
    return int(torch.nonzero(scores <= lowest + tolerance * lowest.abs())[0])


class ITMTL(LookaheadMethod):
    """Choose, by lookahead, the combined gradient that lowers the total loss most.

    Args:
        num_tasks: the number of tasks (the aggregators are built for it).
        candidates: aggregator names (``"ew"`` is the gradient of the sum of the losses).
            The lookahead compares the steps the candidates' directions give, so candidates
            should share a scale (the default sum and PCGrad do; MGDA and IMTL-G give convex
            or affine combinations, CAGrad the mean's scale: their shorter steps are then
            judged by length as much as by direction — see the table in `gradients`).
        every: choose every ``every`` steps; reuse the last choice in between.
        lookahead_lr: SGD step of the lookahead; ``None``: the optimizer's learning rate.
        criterion: ``"relative"`` (the paper's total transference, Σ_j 1 − L_j'/L_j) or
            ``"total"`` (the lowest sum of the lookahead losses, scale-dependent).
        options: per-candidate aggregator options, e.g. ``{"cagrad": {"c": 0.4}}``.
        tolerance: lookahead totals within ``tolerance * |lowest|`` of the lowest count as tied
            and the tie goes to the earliest candidate. Where the candidates barely differ
            (PCGrad equals the sum when no gradients conflict) the float32 forward decides by
            rounding alone, which would make the choice depend on summation order (one process
            vs several ranks); the default is a few float32 ulps above that noise.
    """

    name = "itmtl"
    # the loop runs backward under DDP's no_sync: the per-task gradient rows, the lookahead losses,
    # the task-specific gradients and the aggregators' own gradients are all-reduced here
    reduces_gradients = True

    def __init__(
        self,
        num_tasks: int,
        candidates: Sequence[str] = ("ew", "pcgrad"),
        every: int = 1,
        lookahead_lr: float | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        tolerance: float = 1e-6,
        criterion: Literal["relative", "total"] = "relative",
    ) -> None:
        candidates = [str(c).lower() for c in candidates]
        if not candidates or len(set(candidates)) != len(candidates):
            raise OptionError(f"IT-MTL needs distinct candidate aggregators, got {candidates}; e.g. ('ew', 'pcgrad').")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(f"IT-MTL every={every!r} must be an integer >= 1 (steps between choices).")
        options = dict(options or {})
        unknown = sorted(set(options) - set(candidates))
        if unknown:
            raise OptionError(f"IT-MTL options name {unknown}, which are not candidates {candidates}; drop them.")
        if criterion not in ("relative", "total"):
            raise OptionError(f"IT-MTL criterion={criterion!r}; use 'relative' (the paper's transference) or 'total'.")
        super().__init__()
        self.criterion = criterion
        self.candidates = tuple(candidates)
        self.aggregators = nn.ModuleDict({c: make_aggregator(c, num_tasks, **options.get(c, {})) for c in candidates})
        self.every = every
        if not tolerance >= 0:
            raise OptionError(f"IT-MTL tolerance={tolerance!r} must be >= 0 (a relative tie margin).")
        self.lookahead_lr = lookahead_lr
        self.tolerance = float(tolerance)
        self.choice = 0
        self.chosen = {c: 0 for c in candidates}
        self.epoch_chosen = {c: 0 for c in candidates}
        self.last_lookahead: list[float] | None = None  # the raw lookahead loss sums, for the record
        self.epoch_losses = EpochLossMean(num_tasks)  # for a DWA candidate

    def parameters(self) -> Iterator[nn.Parameter]:
        """The learnable state of the candidate aggregators (UW, GradNorm), for the optimizer."""
        return self.aggregators.parameters()

    def backward(self, trainer: Trainer, step: Step) -> None:
        losses = step.losses
        if step.extra is not None:
            raise MethodError("IT-MTL does not combine with an extra loss term; use a method without one.")
        order = list(trainer.net.tasks)
        values = [losses[t] for t in order]
        shared, specific = split_parameters(trainer.net)
        if not shared:  # nothing is shared, so there is nothing to combine
            return super().backward(trainer, step)
        grads = all_reduce_mean(per_task_gradients(values, shared, retain_graph=bool(specific)))
        if specific:
            torch.autograd.backward(sum(values), inputs=specific)
            all_reduce_gradients(specific)
        loss_values = all_reduce_mean(torch.stack([v.detach().reshape(()) for v in values]))
        self.epoch_losses.add(loss_values)
        if len(self.candidates) > 1 and trainer.step % self.every == 0:
            directions = torch.stack([self.aggregators[c].aggregate(grads, loss_values) for c in self.candidates])
            lr = self.step_size(trainer, self.lookahead_lr)
            after = all_reduce_mean(lookahead_losses(trainer.net, shared, directions, lr, self.batch_losses(trainer, step, order)))
            self.choice = select_candidate(loss_values, after, self.criterion, self.tolerance)
            self.last_lookahead = after.double().sum(dim=1).tolist()
            direction = directions[self.choice]
        else:
            direction = self.aggregators[self.candidates[self.choice]].aggregate(grads, loss_values)
        assign_gradient(shared, direction)
        all_reduce_gradients(list(self.parameters()))
        name = self.candidates[self.choice]
        self.chosen[name] += 1
        self.epoch_chosen[name] += 1

    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        self.epoch_losses.close(self.aggregators.values())
        record = {"epoch": trainer.epoch, "chosen": dict(self.epoch_chosen), "total_chosen": dict(self.chosen)}
        self.decisions.append(record)
        self.epoch_chosen = {c: 0 for c in self.candidates}
        return {"itmtl": record}

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "choice": self.choice,
            "chosen": self.chosen,
            "epoch_chosen": self.epoch_chosen,  # a checkpoint may be taken mid-epoch
            "decisions": self.decisions,
            "aggregators": {k: v.tolist() for k, v in self.aggregators.state_dict().items()},
            **self.epoch_losses.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("candidates", self.candidates))
        if saved != list(self.candidates):
            raise CheckpointError(
                f"this IT-MTL checkpoint chose among {saved}, not {list(self.candidates)}; "
                "resume with the same candidates."
            )
        self.choice = int(state.get("choice", 0))
        self.chosen = {c: int(state.get("chosen", {}).get(c, 0)) for c in self.candidates}
        self.epoch_chosen = {c: int(state.get("epoch_chosen", {}).get(c, 0)) for c in self.candidates}
        self.decisions = list(state.get("decisions", []))
        self.epoch_losses.load_state_dict(state)
        current = self.aggregators.state_dict()
        self.aggregators.load_state_dict(
            {k: torch.tensor(v, dtype=current[k].dtype) for k, v in state.get("aggregators", {}).items()}
        )
