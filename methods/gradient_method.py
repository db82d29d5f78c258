"""Gradient-method training: the shared parameters follow an aggregation of the per-task gradients.

`GradientMethod` is the strategy that plugs any aggregator of `graphsurgeon.methods.aggregation.registry`
(EW, UW, DWA, GradNorm, PCGrad, CAGrad, MGDA, IMTL-G, Nash-MTL) into the one training loop. Each
step it

1. takes one gradient per task of the *shared* parameters (those of tree nodes serving two or more
   tasks, `split_parameters`), one backward per task restricted to them;
2. averages that ``T x P`` matrix (and the losses) across ranks (the Trainer leaves the gradients
   of a method with ``reduces_gradients = True`` to it), so that every rank aggregates the
   same gradients and takes the same step (aggregating each rank's own gradients and averaging the
   directions would be a different, rank-count-dependent method);
3. writes the aggregated direction into the shared parameters' ``.grad``.

The task-specific parameters (nodes of one task, the heads) get their ordinary gradient: only one
task reaches each of them, so there is nothing to balance. For the loss weightings (UW, DWA,
GradNorm) this differs from LibMTL, which also scales a head's gradient by its task's weight; under
Adam a constant factor on one parameter's gradient barely changes its step, and keeping heads
unweighted keeps every aggregator on one code path. The ``extra`` loss of the loop (e.g. MTSL's
alignment) is not a task: its gradient is added on top of the aggregated direction, unweighted.

With ``rep_grad=True`` the per-task gradients are taken with respect to the shared
*representation* instead (LibMTL's ``rep_grad``): the output of the deepest tree node serving every
task, captured by a forward hook. They are aggregated, and the aggregated representation gradient is
back-propagated once through the shared part. This is cheaper when the representation is smaller
than the shared parameters; the aggregated object is the gradient of the flattened representation
of the whole batch (LibMTL sums it over the batch first). Nodes below the representation that still
serve several tasks take the gradient of the sum of their tasks' losses. Under DDP the
representation is each rank's own samples, so each rank aggregates its own and the resulting
parameter gradients are averaged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from graphsurgeon.errors import MethodError, TaskSpecError
from graphsurgeon.methods.aggregation.base import (
    Aggregator,
    assign_gradient,
    batched_backward_pays,
    per_task_gradients,
    split_parameters,
)
from graphsurgeon.methods.aggregation.registry import make_aggregator
from graphsurgeon.methods.aggregation.weighting import EpochLossMean
from graphsurgeon.methods.base import Method, Step
from graphsurgeon.training import distributed

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["GradientMethod", "shared_representation_depth"]


def shared_representation_depth(net: nn.Module) -> int:
    """Depth of the deepest tree node that serves every task (``rep_grad``'s representation).

    The tree's nodes nest, so the tasks share depths ``1..d`` exactly when each of those depths
    holds a single node.
    """
    tree = getattr(net, "tree", None)
    if tree is None:
        raise MethodError(
            f"rep_grad needs a MultiTaskNetwork (with a task tree), got {type(net).__name__}; "
            "build it with graphsurgeon.multitask(...), or use rep_grad=False."
        )
    depth = 0
    while depth < tree.depth and len(tree.at_depth(depth + 1)) == 1:
        depth += 1
    if depth == 0:
        raise MethodError(
            f"rep_grad needs a tree node shared by all tasks, but the tree splits at depth 1 "
            f"(partitions {tree.partitions()[0]}); share the first segment (sharing='shared' or "
            "TaskTree.branched(..., split_at>=2)) or use rep_grad=False."
        )
    return depth


class GradientMethod(Method):
    """Train the shared parameters along an aggregation of the per-task gradients.

    Args:
        aggregator: a name of the registry (``"ew"``, ``"pcgrad"``, ``"mgda"``, ...).
        tasks: the network's task names; they fix the order of the gradient rows (and of
            ``last_weights``), and the aggregator is built for ``len(tasks)`` tasks now, so that a
            learnable one (UW, GradNorm) is in the optimizer the `Trainer` builds.
        rep_grad: aggregate gradients of the shared representation instead of the shared
            parameters (see the module docstring).
        **options: the aggregator's own options (``c`` for CAGrad, ``normalization`` for MGDA, ...).

    Each epoch logs ``grad_weights`` (the task weights of the last step); DWA gets each task's mean
    training loss of the epoch that ended.
    """

    name = "grad"
    # The Trainer must not average this method's gradients across ranks: it does it itself,
    # before aggregating (see the module docstring).
    reduces_gradients = True

    def __init__(self, aggregator: str, tasks: Sequence[str], *, rep_grad: bool = False, **options: Any) -> None:
        if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
            raise TaskSpecError(
                f"GradientMethod needs the network's distinct task names, got {tasks!r}; pass net.tasks."
            )
        super().__init__()
        self.tasks = tuple(tasks)
        self.aggregator_name = str(aggregator).lower()
        self.aggregator: Aggregator = make_aggregator(aggregator, len(self.tasks), **options)
        self.rep_grad = bool(rep_grad)
        self.name = f"{type(self).name}-{self.aggregator_name}"
        self.epoch_losses = EpochLossMean(len(self.tasks))
        self._rep: Tensor | None = None
        self._hooked: tuple[nn.Module, Any] | None = None

    # ------------------------------------------------------------------ loop hooks
    def parameters(self) -> list[nn.Parameter]:
        """The aggregator's learnable weights (UW, GradNorm); the Trainer's optimizer takes them."""
        return list(self.aggregator.parameters())

    def on_start(self, trainer: Trainer) -> None:
        missing = set(self.tasks) ^ set(trainer.net.tasks)
        if missing:
            raise TaskSpecError(
                f"{type(self).__name__} was built for tasks {list(self.tasks)} but the network has "
                f"{list(trainer.net.tasks)}; pass tasks=net.tasks."
            )
        if self.rep_grad:
            self._attach(trainer.net)

    def backward(self, trainer: Trainer, step: Step) -> None:
        values = self._ordered(step.losses)
        loss_vec = self._loss_vector(values)
        if self.rep_grad:
            self._backward_representation(trainer.net, values, loss_vec, step.extra)
        else:
            self._backward_parameters(trainer.net, values, loss_vec, step.extra)
        distributed.all_reduce_gradients(self.parameters())

    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        self.epoch_losses.close([self.aggregator])  # DWA
        if self.rep_grad:  # a network replaced between epochs needs the hook on its new node
            self._attach(trainer.net)
        weights = self.aggregator.last_weights
        if weights is None:
            return None
        return {"grad_weights": {t: float(w) for t, w in zip(self.tasks, weights)}}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the aggregator's weights and buffers, and the epoch's loss sums (a
        checkpoint taken mid-epoch resumes DWA's epoch mean exactly)."""
        return {
            "aggregator": {k: v.tolist() for k, v in self.aggregator.state_dict().items()},
            **self.epoch_losses.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("aggregator", {})
        own = self.aggregator.state_dict()
        self.aggregator.load_state_dict({k: torch.tensor(saved[k], dtype=v.dtype) for k, v in own.items() if k in saved})
        self.epoch_losses.load_state_dict(state)

    # ------------------------------------------------------------------ pieces
    def _ordered(self, losses: Mapping[str, Tensor]) -> list[Tensor]:
        if set(losses) != set(self.tasks):
            raise TaskSpecError(
                f"{type(self).__name__} got losses for {sorted(losses)} but was built for {list(self.tasks)}; "
                "every step needs one loss per task (pass tasks=net.tasks)."
            )
        return [losses[t] for t in self.tasks]

    def _loss_vector(self, values: Sequence[Tensor]) -> Tensor:
        """The losses as the aggregators see them: detached, averaged across ranks; kept for DWA."""
        vec = torch.stack([v.detach().reshape(()).double() for v in values])
        vec = distributed.all_reduce_mean(vec)
        self.epoch_losses.add(vec)
        return vec

    def _aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        return self.aggregator.aggregate(grads, losses.to(grads.dtype))

    def _backward_parameters(self, net: nn.Module, values: list[Tensor], loss_vec: Tensor, extra: Tensor | None) -> None:
        shared, specific = split_parameters(net)
        if shared and not self.aggregator.uses_gradients:
            # a loss weighting: sum_t w_t g_t + g_extra is the gradient of one weighted loss
            weights = self.aggregator.loss_weights(loss_vec.to(shared[0].dtype))  # dtype as aggregate's
            total = sum(w * v for w, v in zip(weights.unbind(), values)) + (extra if extra is not None else 0)
            torch.autograd.backward(total, inputs=shared, retain_graph=bool(specific))
            distributed.all_reduce_gradients(shared)
        elif shared:
            rows = per_task_gradients(
                values + ([extra] if extra is not None else []), shared, retain_graph=True, batched=batched_backward_pays(shared[0].device)
            )
            rows = distributed.all_reduce_mean(rows)
            direction = self._aggregate(rows[: len(values)], loss_vec)
            if extra is not None:
                direction = direction + rows[len(values)]
            assign_gradient(shared, direction)
        if specific:
            total = sum(values) + (extra if extra is not None else 0)
            torch.autograd.backward(total, inputs=specific)
            distributed.all_reduce_gradients(specific)

    def _backward_representation(self, net: nn.Module, values: list[Tensor], loss_vec: Tensor, extra: Tensor | None) -> None:
        rep, self._rep = self._rep, None
        if rep is None:
            raise MethodError(
                "rep_grad found no shared representation from this step's forward pass; the method's "
                "on_start(trainer) attaches the hook that captures it (Trainer.fit calls it)."
            )
        depth = shared_representation_depth(net)
        trunk = [p for d in range(1, depth + 1) for p in net.level(d).parameters() if p.requires_grad]
        in_trunk = {id(p) for p in trunk}
        rest = [p for p in net.parameters() if p.requires_grad and id(p) not in in_trunk]
        rows = per_task_gradients(values, [rep], retain_graph=True, batched=batched_backward_pays(rep.device))
        direction = self._aggregate(rows, loss_vec)
        if rest:
            torch.autograd.backward(sum(values), inputs=rest, retain_graph=True)
        if trunk:
            grad = direction.reshape(rep.shape).to(rep.dtype)
            torch.autograd.backward(rep, grad_tensors=grad, inputs=trunk, retain_graph=extra is not None)
        if extra is not None and extra.requires_grad:
            extra.backward()
        distributed.all_reduce_gradients(trunk + rest)

    def _attach(self, net: nn.Module) -> None:
        """Hook the output of the deepest node shared by all tasks (once per module)."""
        depth = shared_representation_depth(net)
        module = net.level(depth)[net.tree.at_depth(depth)[0].name]
        if self._hooked is not None and self._hooked[0] is module:
            return
        if self._hooked is not None:
            self._hooked[1].remove()

        def capture(mod: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():  # evaluation passes
                return
            if not isinstance(output, Tensor):
                raise MethodError(
                    f"rep_grad needs the shared node at depth {depth} to output one tensor, got "
                    f"{type(output).__name__}; use rep_grad=False for this backbone."
                )
            self._rep = output

        self._hooked = (module, module.register_forward_hook(capture))
