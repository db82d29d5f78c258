"""Per-task gradients and the interface every gradient-aggregation method implements.

Multi-task training has one loss per task but one set of shared parameters. The methods
in this package differ only in how they turn the ``T`` per-task gradients of the shared
parameters into one update direction, so the training loop is written once:

    grads = per_task_gradients(losses, shared_params)         # Tensor[T, P]
    direction = aggregator.aggregate(grads, torch.stack(losses).detach())
    assign_gradient(shared_params, direction)                 # then optimizer.step()

Every method here returns a direction of the form ``d = sum_t w_t g_t`` (even PCGrad and
CAGrad, whose directions stay in the span of the task gradients), so the base class asks
each method only for the task weights ``w``, forms ``d`` once, and keeps ``w`` in
``last_weights`` for logging. The weights are not normalised to a common scale; each
method keeps the scale of its paper:

==========  ==============================================  =========================
method      weights                                         scale of ``d``
==========  ==============================================  =========================
EW          1 (``reduction="sum"``) or 1/T (``"mean"``)     gradient of sum / mean
UW          exp(-s_t), learnable log-variances s            ~ sum
DWA         T * softmax(loss ratios / temperature)          ~ sum (weights sum to T)
GradNorm    learnable, renormalised to sum to T             ~ sum (weights sum to T)
PCGrad      column sums of the projection coefficients      sum of projected grads
CAGrad      (1/T + lambda w_t) / (1 + c)                    <= norm of mean gradient
MGDA        min-norm convex weights / normaliser            convex combination
IMTL-G      closed form, weights sum to 1                   affine combination
Nash-MTL    Nash bargaining solution on GG^T / ||GG^T||_F   ~ gradients
==========  ==============================================  =========================

With a single task there is nothing to balance, so ``aggregate`` returns the gradient
itself for every method (weight 1) without consulting the method.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from graphsurgeon.errors import GradientError, OptionError

__all__ = ["Aggregator", "assign_gradient", "batched_backward_pays", "gram", "per_task_gradients", "split_parameters"]

_log = logging.getLogger("graphsurgeon")


def split_parameters(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(shared, task_specific)`` parameters of a `MultiTaskNetwork`, in a stable order.

    A parameter is shared when its tree node serves two or more tasks: only there do the
    tasks' gradients compete, so only there do gradient methods aggregate. Heads and the
    nodes of a single task take their task's ordinary gradient. A network that is not a
    `MultiTaskNetwork` has no tree, so all its parameters count as shared.
    """
    tree = getattr(net, "tree", None)
    if tree is None:
        return [p for p in net.parameters() if p.requires_grad], []
    shared: list[nn.Parameter] = []
    specific: list[nn.Parameter] = []
    for d in range(1, tree.depth + 1):
        for node in tree.at_depth(d):
            target = shared if len(node.tasks) > 1 else specific
            target.extend(p for p in net.level(d)[node.name].parameters() if p.requires_grad)
    specific.extend(p for p in net.heads.parameters() if p.requires_grad)
    return shared, specific


def batched_backward_pays(device: torch.device) -> bool:
    """Whether `per_task_gradients`' one batched backward beats one backward per task on ``device``.

    Not on a CPU: there the T backward passes are compute-bound either way, and vmap's batching
    rule of ``convolution_backward`` adds a concatenation of the per-row results on top
    (``benchmarks/step_cost.py``, small ResNet, T = 5, one thread: the loop's step took 0.65x the
    batched one's). Elsewhere one batched pass keeps the device busy with T times larger kernels.
    """
    return torch.device(device).type != "cpu"


def per_task_gradients(
    losses: Sequence[Tensor], params: Sequence[Tensor], retain_graph: bool = False, batched: bool = True
) -> Tensor:
    """Gradient of each task loss with respect to the shared parameters, one row per task.

    One batched backward for all tasks (``torch.autograd.grad(..., is_grads_batched=True)``),
    falling back to one ``torch.autograd.grad`` call per task, with a DEBUG log line, where an
    op has no batching rule; either way restricted to ``params`` so that the task-specific
    heads are not differentiated ``T`` times. Rows are the parameters'
    gradients flattened and concatenated in the order of ``params`` (the layout
    ``assign_gradient`` expects). A parameter a task does not reach, a parameter that does
    not require grad, and a loss that does not depend on any parameter (e.g. a task
    absent from the batch gives a constant loss) all contribute zeros.

    Args:
        losses: ``T`` scalar task losses sharing one autograd graph.
        params: the shared parameters.
        retain_graph: keep the graph after the last task, e.g. to back-propagate the
            weighted loss into the task heads afterwards. The graph is always kept
            between tasks.
        batched: try the one batched backward first (``False``: one backward per task,
            which `batched_backward_pays` prefers on a CPU). A single loss always takes
            one plain backward: there is nothing to batch.

    Returns:
        ``Tensor[T, P]`` with ``P`` the total number of elements of ``params``, on the
        parameters' device, in their common (promoted) dtype.
    """
    losses, params = list(losses), list(params)
    if not losses:
        raise GradientError("per_task_gradients got no losses; pass one scalar loss per task.")
    if not params:
        raise GradientError(
            "per_task_gradients got no parameters; pass the shared parameters, "
            "e.g. list(trunk.parameters())."
        )
    for t, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise GradientError(
                f"loss {t} is not a scalar tensor (got {shape}); reduce it first, e.g. loss.mean()."
            )
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    device = params[0].device
    live = [i for i, p in enumerate(params) if p.requires_grad]
    differentiable = [t for t, loss in enumerate(losses) if loss.requires_grad]
    by_task: dict[int, Sequence[Tensor | None]] = {}
    if live and differentiable:
        targets = [params[i] for i in live]
        rows_at_once = _batched_gradients([losses[t] for t in differentiable], targets) if batched and len(differentiable) > 1 else None
        if rows_at_once is not None:
            by_task = {t: [None if g is None else g[row] for g in rows_at_once] for row, t in enumerate(differentiable)}
        else:
            for t in differentiable:
                keep = retain_graph or t < differentiable[-1]
                by_task[t] = torch.autograd.grad(losses[t].reshape(()), targets, retain_graph=keep, allow_unused=True)
    # the T x P matrix is materialised once: each gradient is copied straight into its slice
    out = torch.zeros(len(losses), sum(p.numel() for p in params), dtype=dtype, device=device)
    for t, grads in by_task.items():
        offset = 0
        for p, g in zip(params, _aligned(live, grads, len(params))):
            if g is not None:
                out[t, offset : offset + p.numel()].copy_(g.reshape(-1))
            offset += p.numel()
    return out


def _aligned(live: Sequence[int], grads: Sequence[Tensor | None], count: int) -> list[Tensor | None]:
    """The gradients of the ``live`` parameters, spread out to all ``count`` (None elsewhere)."""
    out: list[Tensor | None] = [None] * count
    for i, g in zip(live, grads):
        out[i] = g
    return out


def _batched_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Sequence[Tensor | None] | None:
    """Every task's gradient in one backward pass (``is_grads_batched``: autograd vmaps the
    backward over the rows of an identity), or ``None`` where an op of the graph has no batching
    rule; then the caller runs one backward per task. The graph is always kept (the fallback
    needs it after a failure); it is released with the losses at the end of the step."""
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "performance drop" notes for slow fallbacks
            return torch.autograd.grad(
                stacked, list(params), grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
    except RuntimeError as exc:  # an op without a batching rule in the backward
        _log.debug("per_task_gradients: one backward per task (no batched backward: %s)", str(exc).splitlines()[0])
        return None


@contextlib.contextmanager
def restoring(tensors: Sequence[Tensor]) -> Iterator[Callable[[], None]]:
    """Copy ``tensors`` now; yield ``restore()`` that writes the copy back; restore on exit.

    SAM's perturbed passes and the lookahead steps move the parameters in place and let
    BatchNorm update its running statistics; both must leave the model bit for bit as they
    found it (from a copy: subtracting the step again would drift by rounding), also when
    a pass raises, so both use this one helper.
    """
    tensors = list(tensors)
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]

    def restore() -> None:
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)

    try:
        yield restore
    finally:
        restore()


def assign_gradient(params: Sequence[Tensor], vector: Tensor) -> None:
    """Write a flat update direction into ``p.grad`` of each parameter (overwriting it).

    ``vector`` uses the layout of ``per_task_gradients``: the parameters flattened and
    concatenated in order. Slices of parameters that do not require grad are skipped, so a
    frozen parameter keeps ``grad=None`` and the optimizer leaves it alone.
    """
    params = list(params)
    if not isinstance(vector, Tensor) or vector.dim() != 1:
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise GradientError(
            f"assign_gradient needs a 1-D tensor, got {shape}; pass the output of aggregate()."
        )
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise GradientError(
            f"assign_gradient got a vector of {vector.numel()} elements for parameters with "
            f"{total} elements; pass the same parameters, in the same order, as to "
            "per_task_gradients."
        )
    offset = 0
    for p in params:
        n = p.numel()
        if p.requires_grad:
            p.grad = vector[offset : offset + n].detach().reshape(p.shape).to(p.dtype).clone()
        offset += n


class Aggregator(nn.Module, ABC):
    """Turns per-task gradients ``Tensor[T, P]`` into one update direction ``Tensor[P]``.

    Subclasses implement ``_weights``; ``aggregate`` validates the input, handles the
    single-task case and forms ``d = weights @ grads``. Methods with learnable state
    (uncertainty weighting, GradNorm) register it as ``nn.Parameter`` and, inside
    ``_weights``, accumulate the gradient of their own objective into ``.grad`` the way
    ``backward()`` would; the training loop only has to give ``aggregator.parameters()``
    to an optimizer. Being an ``nn.Module`` also puts that state in ``state_dict()``.
    """

    last_weights: Tensor | None
    uses_gradients: bool = True
    """False where the weights depend on the losses alone (EW, UW, DWA): the direction
    ``sum_t w_t g_t`` is then the gradient of ``sum_t w_t L_t``, which one backward pass gives
    (`loss_weights`), where the per-task gradients cost T."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise OptionError(
                f"{type(self).__name__} needs num_tasks >= 1, got {num_tasks!r}; "
                "pass the number of tasks as an int."
            )
        self.num_tasks = num_tasks
        self.last_weights = None

    def epoch_end(self, mean_losses: Tensor | list[float]) -> None:
        """The mean training loss of each task over the epoch that just ended; only aggregators
        that weight by the losses' history (DWA) use it."""

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Update direction for the shared parameters.

        Args:
            grads: ``Tensor[T, P]`` per-task gradients (float32 or float64).
            losses: ``Tensor[T]`` current task loss values; used by the methods that
                look at losses (UW, GradNorm, MGDA's loss normalisations), detached here.

        Returns:
            ``Tensor[P]`` in the dtype and on the device of ``grads``. The task weights it
            used are stored, detached, in ``self.last_weights``.
        """
        grads, losses = self._check(grads, losses)
        if self.num_tasks == 1:
            weights = torch.ones(1, dtype=grads.dtype, device=grads.device)
        else:
            # A copy, so that an optimizer step on a method's own weights cannot rewrite it.
            weights = self._weights(grads, losses).detach().to(grads.dtype, copy=True)
        self.last_weights = weights
        return weights @ grads

    def loss_weights(self, losses: Tensor) -> Tensor:
        """The task weights of a loss weighting (``uses_gradients = False``), with no gradient
        at hand; the same bookkeeping as `aggregate` (``last_weights``, learnable state)."""
        if self.uses_gradients:
            raise GradientError(
                f"{type(self).__name__} weights the tasks by their gradients; call aggregate(grads, losses)."
            )
        losses = torch.as_tensor(losses)
        dtype = losses.dtype if losses.dtype in (torch.float32, torch.float64) else torch.float64
        # the weights ignore the gradients: one zero column carries only the dtype and device
        self.aggregate(torch.zeros(self.num_tasks, 1, dtype=dtype, device=losses.device), losses)
        return self.last_weights

    def forward(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Same as ``aggregate``, so that an aggregator can be called like any module."""
        return self.aggregate(grads, losses)

    @abstractmethod
    def _weights(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Task weights ``Tensor[T]`` for validated ``grads`` (``T >= 2``) and ``losses``."""

    def _check(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        if not isinstance(grads, Tensor) or grads.dim() != 2:
            shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
            raise GradientError(
                f"{name}.aggregate needs grads of shape [tasks, params], got {shape}; "
                "build it with per_task_gradients()."
            )
        if grads.dtype not in (torch.float32, torch.float64):
            raise GradientError(
                f"{name}.aggregate needs float32 or float64 grads, got {grads.dtype}; "
                "cast them with grads.float()."
            )
        if grads.shape[0] != self.num_tasks or grads.shape[1] == 0:
            raise GradientError(
                f"{name} was built for {self.num_tasks} tasks but got grads of shape "
                f"{tuple(grads.shape)}; pass one non-empty gradient row per task."
            )
        if not isinstance(losses, Tensor):
            losses = torch.as_tensor(losses)
        losses = losses.detach().reshape(-1).to(device=grads.device, dtype=grads.dtype)
        if losses.numel() != self.num_tasks:
            raise GradientError(
                f"{name} got {losses.numel()} losses for {self.num_tasks} tasks; "
                "pass one loss value per task, e.g. torch.stack(losses).detach()."
            )
        if not (torch.isfinite(grads).all() and torch.isfinite(losses).all()):
            raise GradientError(
                f"{name}.aggregate got a non-finite gradient or loss; a task diverged, "
                "lower the learning rate or check that task's loss."
            )
        return grads.detach(), losses


def gram(grads: Tensor) -> Tensor:
    """``G G^T`` in float64: the methods solving small ``T x T`` problems need only this."""
    g = grads.double()  # products formed in float64: the conflict signs and the solvers are sensitive
    return g @ g.T
