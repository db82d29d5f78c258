"""Merging separately trained single-task models into one multi-task network, sharing only
where they agree (issue #14).

Users often hold T models of one architecture, each fine-tuned for its own task (often from the
same pretrained weights), and pay for T forward passes. `merge_trained` runs MTSL's structural
learning on them *post hoc*, with no task learning in between:

1. Every model is traced and cut into segments (`graphsurgeon.core`); the segments must line
   up (same code, same module configurations: `graphsurgeon.core.segments.fingerprint`), else
   the models are refused with a `MergeError`. The network starts fully split: task ``t``'s path
   holds model ``t``'s own segments and its head, so it computes exactly what model ``t`` does.
2. From the earliest depth down, the children of every node with two or more of them are
   compared by debiased linear CKA of their pooled outputs on the user's data
   (`graphsurgeon.methods.structure.mtsl.node_similarity`); MTSL's partition rule
   (`graphsurgeon.methods.structure.partition.mtsl_partition`) picks the groups to merge.
3. Each group becomes one group node (`graphsurgeon.core.surgery.fuse`): initialised from its
   members (default: the mean of their weights, meaningful for models fine-tuned from one
   init) and trained by knowledge amalgamation
   (`graphsurgeon.methods.structure.amalgamation.Amalgamation`) so that every task's output,
   through its unchanged nodes below and head, stays what its member gave: no task learning
   follows to adapt the children (unlike MTSL), so what is fitted is what the tasks read (MTSL's
   feature objective is ``distill_target="features"``). Members that are one and the same
   function (equal weights) need no distillation: the group node is a copy.
4. The budget (`MergeBudget`) is checked after every merge on the validation data: a merge
   that drops any task's metric by more than its tolerance versus its original model (by
   default: whose drop is not within the tolerance with 95 % confidence, a paired test on the
   validation samples, `MergeBudget.drop`) is undone
   (`graphsurgeon.core.surgery.relayout` puts the members back) and tried again in smaller
   groups: split by MTSL's rule on the similarity of the members' tasks at the deepest depth,
   else without the members whose tasks dropped past their tolerance (members left out stay
   apart from that depth down; `_Merger.merge_group`), and merging stops once a parameter or
   FLOP target is reached. Every merge tried is a point of
   the trade-off curve (`MergeResult.curve`).
5. Optionally the merged network is fine-tuned jointly for a few epochs (`MergeConfig.finetune_epochs`),
   each epoch measured as a merge is: what is returned is the state within the budget (the
   merged network before the fine-tune included) with the smallest mean drop over the tasks, so
   the budget holds for the returned network and a fine-tune that does not help is undone.

Heads: a task model is a whole model, backbone and its own classifier. By default each task's
head is its model's own final classifier, the module the trunk (by default the classifier's
input) feeds; ``heads="fc"`` names that module's path in every model, and ``heads={task: module}``
gives heads outright. Heads are never merged. With the models' own heads the network is checked
to reproduce every model's output before anything is merged.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from graphsurgeon.core.build import multitask
from graphsurgeon.core.invariants import count_flops
from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import GroupInit, MultiTaskNetwork, Task
from graphsurgeon.core.segments import Segment, find_trunk, segment
from graphsurgeon.core.surgery import fuse, relayout
from graphsurgeon.core.trace import LeafSpec, trace
from graphsurgeon.errors import MergeError
from graphsurgeon.methods.structure.amalgamation import Amalgamation
from graphsurgeon.methods.structure.mtsl import central_first, node_similarity
from graphsurgeon.methods.structure.partition import mtsl_partition
from graphsurgeon.training.config import TrainConfig
from graphsurgeon.training.trainer import Trainer

__all__ = ["MergeBudget", "MergeConfig", "MergeResult", "merge_trained"]


@dataclass
class MergeBudget:
    """When merging stops.

    Args:
        tolerance: the largest drop of a task's validation metric versus its original model
            that a merge may cause: one number for every task or ``{task: number}``; relative
            (0.01 = 1 %) unless ``relative=False``.
        relative: whether ``tolerance`` is a fraction of the original metric (an original of 0
            is compared absolutely).
        confidence: a merge is within the budget when the drop's one-sided upper confidence
            bound at this level is at most the tolerance (`drop`): the measured drop alone is
            noise-sized on a usual validation split (1 % of 0.8 accuracy on 1,000 samples is
            0.6 standard errors of the accuracy), so a merge that changes nothing real could be
            undone and one that costs more than the tolerance kept by luck. ``None``: the
            measured drop is compared as it is.
        max_parameters, max_flops: stop merging once the network has at most this many
            parameters / forward FLOPs per sample (``None``: no such target).
        groups: the source of each validation sample, in the validation set's order: an (n,)
            tensor of ids, or (n, k) for k groupings (the two digits of a two-digit canvas, the
            image of each of its crops). Samples of one source are not independent: the
            bound's standard error is then computed over sources (cluster-robust), the largest
            of the k, instead of over samples, which would take n correlated samples for n
            independent ones and make the bound too narrow. ``None``: samples are independent.
    """

    tolerance: float | Mapping[str, float] = 0.01
    relative: bool = True
    confidence: float | None = 0.95
    max_parameters: int | None = None
    max_flops: int | None = None
    groups: torch.Tensor | None = None

    def tolerance_of(self, task: str) -> float:
        return float(self.tolerance[task] if isinstance(self.tolerance, Mapping) else self.tolerance)

    def check(self, tasks: Sequence[str]) -> None:
        """Raise `MergeError` on a tolerance that is missing, negative or not a number."""
        if isinstance(self.tolerance, Mapping):
            missing = [t for t in tasks if t not in self.tolerance]
            if missing:
                raise MergeError(
                    f"MergeBudget.tolerance has no entry for tasks {missing}; give every task one "
                    f"(e.g. tolerance={{{', '.join(f'{t!r}: 0.01' for t in tasks)}}}) or one number for all."
                )
        for t in tasks:
            value = self.tolerance_of(t)
            if math.isnan(value) or value < 0:
                raise MergeError(
                    f"MergeBudget.tolerance for task {t!r} is {value!r}; use a number >= 0 (0.01: a 1 % drop), "
                    "or math.inf to merge whatever the metric does."
                )
        if self.confidence is not None and (isinstance(self.confidence, bool) or not 0 < self.confidence < 1):
            raise MergeError(
                f"MergeBudget.confidence={self.confidence!r}; use a level strictly between 0 and 1 (0.95: the drop is "
                "within the tolerance with 95 % confidence) or None (the measured drop as it is)."
            )
        for name in ("max_parameters", "max_flops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MergeError(f"MergeBudget.{name}={value!r}; use a positive int or None (no target).")
        if self.groups is not None and (not isinstance(self.groups, torch.Tensor) or self.groups.dim() not in (1, 2)
                                        or self.groups.is_floating_point() or self.groups.is_complex()):
            raise MergeError(
                f"MergeBudget.groups must be an integer tensor of shape (n,) or (n, k) (each validation sample's "
                f"source id), got {type(self.groups).__name__}"
                + (f" of shape {tuple(self.groups.shape)} and dtype {self.groups.dtype}" if isinstance(self.groups, torch.Tensor) else "")
                + "; pass e.g. torch.as_tensor(source_ids) or None."
            )

    def check_samples(self, n: int) -> None:
        """Raise `MergeError` when ``groups`` does not give one source per validation sample."""
        if self.groups is not None and len(self.groups) != n:
            raise MergeError(
                f"MergeBudget.groups has {len(self.groups)} rows for {n} validation samples; give the source id of "
                "every validation sample, in the validation set's order."
            )

    def _standard_error(self, worse: torch.Tensor) -> float:
        """Of the mean of ``worse``: over samples, or over each grouping's sources (the
        cluster-robust estimate, with the G/(G-1) correction; one sample per source gives the
        samples' own), the largest."""
        n = len(worse)
        if n < 2:
            return 0.0
        if self.groups is None:
            return float(worse.std()) / math.sqrt(n)
        centered = worse - worse.mean()
        columns = self.groups.reshape(n, -1).cpu()
        spread = 0.0
        for k in range(columns.shape[1]):
            ids, inverse = torch.unique(columns[:, k], return_inverse=True)
            if len(ids) < 2:
                raise MergeError(
                    f"MergeBudget.groups column {k} puts every validation sample in one source; a bound needs at least "
                    "two sources (or groups=None for independent samples)."
                )
            sums = torch.zeros(len(ids), dtype=worse.dtype).index_add_(0, inverse, centered)
            spread = max(spread, math.sqrt(float((sums ** 2).sum()) / n**2 * len(ids) / (len(ids) - 1)))
        return spread

    def drop(self, original: torch.Tensor, now: torch.Tensor, higher_is_better: bool) -> tuple[float, float]:
        """How much worse ``now`` is than ``original`` (negative: better), in the tolerance's
        unit, and the one-sided upper ``confidence`` bound of that drop.

        Both are per-sample values of the metric on the same validation samples, so the test
        is paired: its standard error is that of the per-sample differences, which is small when
        a merge changes few samples' results (an unpaired comparison of two accuracies would
        count every sample's noise twice). Samples are taken as independent unless ``groups``
        names their sources."""
        original, now = original.double().flatten(), now.double().flatten()
        worse = (original - now) if higher_is_better else (now - original)
        mean = float(worse.mean())
        z = 0.0 if self.confidence is None else NormalDist().inv_cdf(self.confidence)
        spread = self._standard_error(worse)
        base = float(original.mean())
        scale = abs(base) if self.relative and base != 0 else 1.0
        return mean / scale, (mean + z * spread) / scale


@dataclass
class MergeConfig:
    """How `merge_trained` compares, merges and fine-tunes.

    Args:
        threshold: MTSL's CKA threshold for a group to merge.
        similarity_samples: training inputs the CKA is measured on (MTSL: 800).
        distill_epochs: passes of knowledge amalgamation over the training data per merge.
        distill_lr: Adam learning rate of the amalgamation.
        distill_target: what the amalgamation fits: ``"outputs"``, every task's output through
            the unchanged nodes below and its head (what the budget measures), or ``"features"``,
            the members' outputs (MTSL's objective; cheaper, as nothing below runs).
        adapt_below: with ``"outputs"``, the amalgamation also trains the nodes below the group
            and its tasks' heads, each path towards the outputs it gave before the merge: the
            models' deeper layers were trained on their own shallow features and cannot move
            otherwise, so a shallow merge would have to reproduce every member's features alone
            (undone with the merge when the budget undoes it).
        gated: with ``"features"``, MTSL's per-member channel gates (off: the group node is
            fitted to the members' features as they are, which the children were trained on).
        group_init: how a group node starts: ``"mean"`` of the members' weights (their common
            init makes the average meaningful), ``"copy"`` of the most central member,
            ``"fresh"``, or ``"pristine"`` (the first model's segment).
        finetune_epochs: joint training of the merged network afterwards (0: none), checked
            against the budget after every epoch (`MergeResult.curve`'s ``"finetune"`` points).
        exhaustive_limit: largest sibling set whose partitions are searched exhaustively.
        train: the trainer's settings (batch size, device, optimizer and lr of the fine-tune).
    """

    threshold: float = 0.8
    similarity_samples: int = 800
    distill_epochs: int = 1
    distill_lr: float = 1e-3
    gated: bool = False
    distill_target: Literal["features", "outputs"] = "outputs"
    adapt_below: bool = True
    group_init: GroupInit = "mean"
    gate_reduction: int = 1
    finetune_epochs: int = 0
    exhaustive_limit: int = 10
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))


@dataclass
class MergeResult:
    """What `merge_trained` built and everything it measured on the way.

    ``curve`` has one point per network measured: the separate start (``"start"``), every
    merge tried (``"merge"``, with ``accepted``; a rejected one names the tasks it would have
    dropped past their tolerance in ``violations``) and every fine-tune epoch (``"finetune"``,
    ``accepted`` on the one kept, if any). Each point holds the parameters, the forward FLOPs
    per sample, every task's validation metric, its drop versus the original (``drops``) and
    that drop's upper confidence bound (``bounds``, what the budget compares), and the tree
    (one partition per depth).
    """

    net: MultiTaskNetwork
    separate: MultiTaskNetwork
    """The network before any merge: every task on its own model's path (the originals)."""
    metric: dict[str, str]
    """The metric the budget reads for each task."""
    original: dict[str, dict[str, float]]
    """The original models' validation metrics (and losses), by task."""
    final: dict[str, dict[str, float]]
    """The returned network's validation metrics (and losses), by task: its curve point's."""
    curve: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    """Every sibling set compared: depth, tasks, CKA matrix, MTSL's partition and its groups."""
    stopped: str
    """Why merging ended."""


def _base(data: Dataset) -> Dataset:
    while isinstance(data, Subset):
        data = data.dataset
    return data


def _task_specs(names: Sequence[str], tasks: Mapping[str, Any] | None, data: Dataset) -> dict[str, Any]:
    """Each task's loss, metrics and directions: ``tasks`` or the data set's ``task_info``."""
    source = tasks if tasks is not None else getattr(_base(data), "task_info", None)
    if source is None:
        raise MergeError(
            "merge_trained measures every task on the data, and neither tasks= nor the data set's task_info says "
            "how; pass tasks={task: graphsurgeon.Task(head=None, loss=..., metrics=..., higher_is_better=...)} "
            "(or a graphsurgeon.data.TaskInfo per task)."
        )
    missing = [t for t in names if t not in source or getattr(source[t], "loss", None) is None]
    if missing:
        raise MergeError(
            f"tasks {missing} have no loss among {sorted(source)}; give each model's task a loss and metrics "
            "(tasks={name: graphsurgeon.Task(head=None, loss=..., metrics=...)}), named as the models are."
        )
    return {t: source[t] for t in names}


def _metric_of(spec: Any) -> tuple[str, bool]:
    """The metric the budget reads: the spec's primary metric, else its first, else its loss."""
    metrics = list(getattr(spec, "metrics", {}) or {})
    name = getattr(spec, "primary_metric", None) or (metrics[0] if metrics else "loss")
    return name, name != "loss" and bool(dict(getattr(spec, "higher_is_better", {}) or {}).get(name, True))


def _classifier_path(gm: torch.fx.GraphModule, trunk_node: torch.fx.Node) -> str:
    """The module the trunk feeds: the model's own classifier (``fc`` of a ResNet)."""
    for user in trunk_node.users:
        if user.op == "call_module" and any(True for _ in gm.get_submodule(str(user.target)).parameters()):
            return str(user.target)
    raise MergeError(
        f"cannot find the classifier that the trunk {trunk_node.name!r} feeds in the traced {type(gm).__name__}; "
        "pass heads='<module path of each model's classifier>' (e.g. heads='fc') or heads={task: module}."
    )


def _heads(
    models: Mapping[str, nn.Module], heads: str | Mapping[str, nn.Module] | None, gm: torch.fx.GraphModule, trunk_node: torch.fx.Node
) -> dict[str, nn.Module]:
    if isinstance(heads, Mapping):
        missing = [t for t in models if t not in heads]
        if missing:
            raise MergeError(f"heads= has no head for tasks {missing}; give one per model, keyed as the models are.")
        return {t: copy.deepcopy(heads[t]) for t in models}
    path = heads if heads is not None else _classifier_path(gm, trunk_node)
    out = {}
    for t, model in models.items():
        try:
            out[t] = copy.deepcopy(model.get_submodule(path))
        except AttributeError:
            raise MergeError(
                f"the model of task {t!r} ({type(model).__name__}) has no module {path!r} to take as its head; "
                "pass heads='<the classifier's module path>' or heads={task: module}."
            ) from None
    return out


def _segments_of(
    task: str, model: nn.Module, reference: Sequence[Segment], trunk: str | None, granularity: str, example: torch.Tensor,
    leaf_modules: Iterable[LeafSpec], concrete_args: Mapping[str, Any] | None, first: str,
) -> list[Segment]:
    """``model`` cut as the reference model was; a `MergeError` naming the first difference."""
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    segments = segment(gm, trunk, granularity, example_input=example)  # type: ignore[arg-type]
    if len(segments) != len(reference):
        raise MergeError(
            f"the model of task {task!r} ({type(model).__name__}) cuts into {len(segments)} segments, the model of "
            f"task {first!r} into {len(reference)}: they are not one architecture, and only models of one "
            "architecture (possibly with other weights) can be merged."
        )
    for seg, ref in zip(segments, reference):
        if seg.fingerprint != ref.fingerprint:
            raise MergeError(
                f"segment {seg.index} (nodes {seg.node_names[0]}..{seg.node_names[-1]}) of the model of task {task!r} "
                f"differs from the model of task {first!r} in its code or module configuration: they are not one "
                "architecture, and only models of one architecture (possibly with other weights) can be merged."
            )
    return segments


def _start(
    models: Mapping[str, nn.Module], specs: Mapping[str, Any], heads: str | Mapping[str, nn.Module] | None,
    example: torch.Tensor, trunk: str | None, granularity: str, leaf_modules: Iterable[LeafSpec],
    concrete_args: Mapping[str, Any] | None,
) -> MultiTaskNetwork:
    """The fully split network whose task ``t`` path holds model ``t``'s segments and head."""
    leaf_modules = tuple(leaf_modules)
    names = list(models)
    first = names[0]
    gm = trace(models[first], leaf_modules=leaf_modules, concrete_args=concrete_args)
    reference = segment(gm, trunk, granularity, example_input=example)  # type: ignore[arg-type]
    trunk_node = find_trunk(gm, reference[-1].output_name)
    head_modules = _heads(models, heads, gm, trunk_node)
    tasks = {
        t: Task(head=head_modules[t], loss=specs[t].loss, metrics=dict(getattr(specs[t], "metrics", {}) or {}),
                higher_is_better=dict(getattr(specs[t], "higher_is_better", {}) or {}))
        for t in names
    }
    net = multitask(
        models[first], tasks, trunk=trunk, sharing="separate", granularity=granularity,  # type: ignore[arg-type]
        example_input=example, leaf_modules=leaf_modules, concrete_args=concrete_args,
    )
    for t in names:
        segments = reference if t == first else _segments_of(
            t, models[t], reference, trunk, granularity, example, leaf_modules, concrete_args, first
        )
        for node, seg in zip(net.tree.path(t)[1:], segments):
            try:
                net.node_module(node).load_state_dict(seg.module.state_dict())
            except RuntimeError as exc:
                raise MergeError(
                    f"segment {seg.index} of the model of task {t!r} holds tensors of other shapes than the model of "
                    f"task {first!r} ({str(exc).splitlines()[-1].strip()}); only models of one architecture can be merged."
                ) from None
    if heads is None or isinstance(heads, str):
        _check_reproduces(net, models, example)
    return net


@torch.no_grad()
def _check_reproduces(net: MultiTaskNetwork, models: Mapping[str, nn.Module], x: torch.Tensor) -> None:
    """Every task's path computes what its model computes (else the head is not the model's tail)."""
    with eval_mode(net, *models.values()):
        outputs = net(x)
        for t, model in models.items():
            expected = model(x)
            if not isinstance(expected, torch.Tensor) or expected.shape != outputs[t].shape or not torch.allclose(
                expected, outputs[t], rtol=1e-4, atol=1e-5
            ):
                raise MergeError(
                    f"the network's path for task {t!r} does not compute what its model computes: the head taken "
                    f"from the model is not all of the model after the trunk {net.trunk_name!r}. Pass heads= (the "
                    "module path of the classifier, or {task: module}) or trunk= (the classifier's input)."
                )


def _identical(modules: Sequence[nn.Module]) -> bool:
    first = modules[0].state_dict()
    return all(all(torch.equal(first[k], v) for k, v in m.state_dict().items()) for m in modules[1:])


@torch.no_grad()
def _scores(trainer: Trainer, data: Dataset, metric: Mapping[str, tuple[str, bool]]) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Every task's loss and metrics on ``data`` (means over the samples) and the budget's
    metric per sample, for the paired test (`MergeBudget.drop`). One pass of the network; each
    sample is scored on its own (a batch of one), so a metric must be a mean over samples, as
    `Trainer.evaluate` assumes too when it weights batches by their size."""
    net = trainer.net
    values: dict[str, dict[str, list[float]]] = {t: {"loss": [], **{k: [] for k in trainer.tasks[t].metrics}} for t in net.tasks}
    with eval_mode(net):
        for batch in trainer.loader(data, shuffle=False, batch_size=trainer.config.eval_batch_size):
            x, targets = trainer.to_device(batch)
            with trainer.autocast():
                outputs = net(x)
            for t, pred in outputs.items():
                spec, pred = trainer.tasks[t], pred.float()
                for i in range(len(pred)):
                    p, y = pred[i : i + 1], targets[t][i : i + 1]
                    values[t]["loss"].append(float(spec.loss(p, y)))
                    for name, fn in spec.metrics.items():
                        values[t][name].append(float(fn(p, y)))
    results = {t: {k: sum(v) / max(len(v), 1) for k, v in m.items()} for t, m in values.items()}
    return results, {t: torch.tensor(values[t][m], dtype=torch.float64) for t, (m, _) in metric.items()}


def _mean_drop(point: Mapping[str, Any]) -> float:
    return sum(point["drops"].values()) / len(point["drops"])


class _Merger:
    """One merge run: the trainer over the current network, the budget, the curve."""

    def __init__(self, trainer: Trainer, val: Dataset, budget: MergeBudget, config: MergeConfig,
                 metric: dict[str, tuple[str, bool]], example: torch.Tensor) -> None:
        self.trainer, self.val, self.budget, self.config = trainer, val, budget, config
        self.metric, self.example = metric, example
        self.curve: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.original, self.per_sample = _scores(trainer, val, metric)
        self.current = self.measure("start")
        """The point that describes the network as it now stands."""

    def measure(self, kind: str, **extra: Any) -> dict[str, Any]:
        net = self.trainer.net
        results, per_sample = _scores(self.trainer, self.val, self.metric)
        drops, bounds = {}, {}
        for t, (_, up) in self.metric.items():
            drops[t], bounds[t] = self.budget.drop(self.per_sample[t], per_sample[t], up)
        point = {
            "kind": kind,
            **extra,
            "parameters": sum(p.numel() for p in net.parameters()),
            "flops": count_flops(net, self.example.to(self.trainer.device)),
            "metrics": {t: results[t][m] for t, (m, _) in self.metric.items()},
            "drops": drops,
            "bounds": bounds,
            "violations": [t for t, b in bounds.items() if b > self.budget.tolerance_of(t)],
            "tree": [list(map(list, p)) for p in net.tree.partitions()],
            "results": results,
        }
        self.curve.append(point)
        return point

    def target_reached(self, point: Mapping[str, Any]) -> str | None:
        if self.budget.max_parameters is not None and point["parameters"] <= self.budget.max_parameters:
            return f"parameter target reached ({point['parameters']:,} <= {self.budget.max_parameters:,})"
        if self.budget.max_flops is not None and point["flops"] <= self.budget.max_flops:
            return f"FLOP target reached ({point['flops']:,} <= {self.budget.max_flops:,})"
        return None

    def try_merge(self, depth: int, group: list[int]) -> dict[str, Any]:
        """Fuse ``group`` at ``depth``; keep it within the budget, undo it otherwise."""
        trainer = self.trainer
        before = trainer.net.tree
        members = {i: trainer.net.node_module(i) for i in group}
        tasks = [t for i in group for t in before.node(i).tasks]
        same = _identical(list(members.values()))
        amalgamation = None if same else Amalgamation(
            batches=lambda: (b[0].to(trainer.device) for b in trainer.loader(trainer.train_data, shuffle=True)),
            epochs=self.config.distill_epochs,
            lr=self.config.distill_lr,
            reduction=self.config.gate_reduction,
            gated=self.config.gated,
            target=self.config.distill_target,
            adapt_below=self.config.adapt_below,
        )
        # with adapt_below the amalgamation trains the nodes below too: an undone merge puts them back
        state = copy.deepcopy(trainer.net.state_dict()) if amalgamation is not None and amalgamation.adapt_below else None
        fuse(trainer.net, depth, [group], init="copy" if same else self.config.group_init, distill=amalgamation)
        point = self.measure("merge", depth=depth, tasks=tasks, distilled=not same)
        point["accepted"] = not point["violations"]
        if amalgamation is not None:
            point["distill_loss"] = [h["loss_curve"] for h in amalgamation.history]
        if point["accepted"]:
            self.current = point
        else:  # the members come back, with their children under them again
            relayout(trainer.net, before, {n.id: (n.id,) for n in before.nodes if n.id not in members}, modules=members)
            if state is not None:
                trainer.net.load_state_dict(state)
        return point

    def finetune(self, epochs: int) -> None:
        """Joint training of the merged network, measured after every epoch; the state kept is
        the one within the budget with the smallest mean drop over the tasks, the merged network
        before the fine-tune included (which the budget accepted).

        Training every task's loss together can cost one task what it gives another, and a few
        epochs on the training split can overfit: checked only before it, the budget would not
        hold for what is returned. The choice is made on the validation split the budget reads,
        so that split's numbers are optimistic for the kept state; the test split is not used."""
        trainer = self.trainer
        trainer.set_network(trainer.net)  # a fresh optimizer over the merged network's parameters
        kept, state = self.current, copy.deepcopy(trainer.net.state_dict())
        tried = []
        for epoch in range(1, epochs + 1):
            trainer.fit(trainer.epoch + 1)
            point = self.measure("finetune", epoch=epoch)
            tried.append(point)
            if not point["violations"] and _mean_drop(point) < _mean_drop(kept):
                kept, state = point, copy.deepcopy(trainer.net.state_dict())
        for point in tried:
            point["accepted"] = point is kept
        if kept is not tried[-1]:
            trainer.net.load_state_dict(state)
        self.current = kept

    def deepest_blocks(self, depth: int, group: list[int]) -> list[list[int]]:
        """The blocks of ``group`` (sibling nodes at ``depth``) that MTSL's rule merges on the
        similarity of their tasks' nodes at the deepest depth, which still hold one task each
        (merging runs from the earliest depth down, so every node below ``depth`` is one task's)."""
        net = self.trainer.net
        deepest = [net.tree.path(net.tree.node(i).tasks[0])[-1].id for i in group]
        sim = node_similarity(self.trainer, net.depth, deepest, self.config.similarity_samples)
        decision = mtsl_partition(sim.numpy(), self.config.threshold, exhaustive_limit=self.config.exhaustive_limit)
        blocks = central_first(group, sim, decision.merge_groups)
        self.decisions.append({
            "depth": depth,
            "retry": True,
            "measured_at": net.depth,
            "tasks": [list(net.tree.node(i).tasks) for i in group],
            "similarity": sim.tolist(),
            "partition": [list(b) for b in decision.partition],
            "merged": [[list(net.tree.node(i).tasks) for i in b] for b in blocks],
        })
        return blocks

    def merge_group(self, depth: int, group: list[int]) -> str | None:
        """Merge ``group`` at ``depth`` within the budget; why merging must stop, if it must.

        A merge the budget undoes is tried again in smaller groups. First split by the agreement
        of the members' tasks at the deepest depth (MTSL's rule on the CKA there): a shallow
        segment is alike in nearly every model (CKA near 1 whatever the task), so which tasks
        drop past their tolerance when it is shared by all is a small, task-unrelated effect,
        and a task left apart at a depth is apart at every depth below: splitting where the
        models disagree deep keeps together the tasks that could go on sharing. When the deep
        rule would merge the same group again (or nothing), the members whose tasks dropped
        past their tolerance leave it instead."""
        tree = self.trainer.net.tree
        pending = [group]
        while pending:
            group = pending.pop(0)
            if len(group) < 2:
                continue
            point = self.try_merge(depth, group)
            if point["accepted"]:
                reached = self.target_reached(point)
                if reached:
                    return reached
                continue
            blocks = self.deepest_blocks(depth, group)
            if blocks and sorted(blocks[0]) != sorted(group):
                pending[:0] = blocks
                continue
            kept = [i for i in group if not set(tree.node(i).tasks) & set(point["violations"])]
            if len(kept) < len(group):
                pending.insert(0, kept)
        return None

    def run(self) -> str:
        net = self.trainer.net
        for depth in range(1, net.depth + 1):
            for parent in self.trainer.net.tree.at_depth(depth - 1):
                ids = [c.id for c in self.trainer.net.tree.children(parent.id)]
                if len(ids) < 2:
                    continue
                tree = self.trainer.net.tree
                sim = node_similarity(self.trainer, depth, ids, self.config.similarity_samples)
                decision = mtsl_partition(sim.numpy(), self.config.threshold, exhaustive_limit=self.config.exhaustive_limit)
                groups = central_first(ids, sim, decision.merge_groups)
                self.decisions.append({
                    "depth": depth,
                    "tasks": [list(tree.node(i).tasks) for i in ids],
                    "similarity": sim.tolist(),
                    "partition": [list(b) for b in decision.partition],
                    "merged": [[list(tree.node(i).tasks) for i in g] for g in groups],
                })
                for group in groups:
                    reached = self.merge_group(depth, group)
                    if reached:
                        return reached
        return "no more siblings similar enough (MTSL's rule) within the budget"


def merge_trained(
    models: Mapping[str, nn.Module],
    *,
    data: Dataset,
    val: Dataset | None = None,
    tasks: Mapping[str, Any] | None = None,
    heads: str | Mapping[str, nn.Module] | None = None,
    budget: MergeBudget | None = None,
    config: MergeConfig | None = None,
    trunk: str | None = None,
    granularity: str = "block",
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Merge separately trained models of one architecture into one multi-task network.

    Args:
        models: ``{task: model}``, each a whole trained model (backbone and its classifier).
        data: ``(input, {task: target})`` samples for the CKA, the amalgamation and the fine-tune.
        val: the data the budget measures every task on (default: ``data``).
        tasks: each task's ``loss``, ``metrics`` and ``higher_is_better`` (a `graphsurgeon.Task`
            or a `graphsurgeon.data.TaskInfo`; default: ``data``'s ``task_info``). The budget
            reads the primary metric (its first metric; its loss without one).
        heads: ``None`` (each model's own classifier, the module the trunk feeds), a module path
            in every model (``"fc"``), or ``{task: head module}``.
        budget: when to stop merging (`MergeBudget`; default: a 1 % relative drop of any task).
        config: how to compare, merge and fine-tune (`MergeConfig`).
        trunk, granularity, leaf_modules, concrete_args: as `graphsurgeon.multitask`.

    Returns:
        A `MergeResult`: the merged `MultiTaskNetwork` (exportable as any other), the original
        and final metrics and the trade-off curve.
    """
    if not isinstance(models, Mapping) or not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise MergeError("models must be a non-empty mapping {task: trained nn.Module}, e.g. {'left': m1, 'right': m2}.")
    budget = budget or MergeBudget()
    config = config or MergeConfig()
    names = list(models)
    budget.check(names)
    specs = _task_specs(names, tasks, data)
    example = data[0][0][None]
    net = _start(models, specs, heads, example, trunk, granularity, leaf_modules, concrete_args)
    separate = copy.deepcopy(net)
    val_data = val if val is not None else data
    budget.check_samples(len(val_data))
    trainer = Trainer(net, None, data, None, config.train)  # the merger measures the validation data itself
    merger = _Merger(trainer, val_data, budget, config, {t: _metric_of(specs[t]) for t in names}, example)
    stopped = merger.target_reached(merger.current) or merger.run()
    if config.finetune_epochs > 0:
        merger.finetune(config.finetune_epochs)
    return MergeResult(
        net=trainer.net,
        separate=separate,
        metric={t: m for t, (m, _) in merger.metric.items()},
        original=merger.original,
        final=merger.current["results"],
        curve=merger.curve,
        decisions=merger.decisions,
        stopped=stopped,
    )
