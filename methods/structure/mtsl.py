"""MTSL — Multi-Task Structural Learning (Gurulingan et al., ICML 2023), on the graph engine.

Training starts fully split (one copy of every segment per task, all identical copies of the
backbone's) and alternates task-learning phases with structural phases. In a structural phase,
for every set of sibling task nodes at the frontier, the members' outputs are compared by
debiased linear CKA on a fixed sample of training images; the partition search of
`graphsurgeon.methods.structure.partition.mtsl_partition` picks the groups to merge; each group's knowledge is
amalgamated into a new group node (`graphsurgeon.methods.structure.amalgamation.Amalgamation`); the members are
removed and their children re-parented (`graphsurgeon.core.surgery.fuse`).

The frontier, as in the official code (`train_stubs.py: fusion_phase`, ``ungrouped_tasks``), is
every open set, each at its own depth: (a) the children of each group node, compared at the
depth below it in the phase after it was formed; and (b) the *leftovers*: siblings a phase
compared but did not merge; they stay a set, are compared again at the same depth in every
later phase, and stay under the alignment loss until fewer than two are left. During task learning, up to the last
structural phase, an alignment loss w·(1 − mean pairwise CKA) pulls the frontier siblings'
outputs together; from the last structural phase on it is off (official ``loss_stub``).

Under torchrun every rank accumulates the CKA statistics on its share of the similarity
sample and the statistics (O(D²) per sibling set, never activations) are summed over ranks;
rank 0 decides the partition and broadcasts it; every rank applies the same fuse, distilling
the group node on its share of the batches with averaged gradients; the trainer then re-wraps
the network for DDP (`Trainer.structure_changed`).

A checkpoint holds the tree, the weights and this method's state, not the pristine templates a
``group_init="pristine"`` copies (they are the backbone as built or loaded, an input of the
run): a resume checks their digest and refuses another backbone's.

The official code is ResNet-18-only and cuts stages by hand; here a "layer" is a segment
at ``granularity="block"`` of whatever backbone was traced. Heads are never merged.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork, main_value
from graphsurgeon.core.surgery import fuse
from graphsurgeon.errors import CheckpointError, OptionError
from graphsurgeon.methods.base import Method
from graphsurgeon.methods.structure.amalgamation import Amalgamation
from graphsurgeon.methods.structure.partition import GroupingError, mtsl_partition
from graphsurgeon.methods.structure.similarity import CKAAccumulator, global_avg_pool, minibatch_debiased_cka
from graphsurgeon.training import distributed

if TYPE_CHECKING:
    from graphsurgeon.training.trainer import Trainer

__all__ = ["MTSL", "RETRY_PHASES", "MTSLConfig", "central_first", "depth_schedule", "node_similarity"]


def pristine_digest(net: MultiTaskNetwork) -> str:
    """SHA-256 of every pristine segment template's tensors (parameters and buffers, in order)."""
    h = hashlib.sha256()
    for segment in net.segments:
        for name, tensor in segment.module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def node_similarity(trainer: Trainer, depth: int, ids: Sequence[int], samples: int) -> torch.Tensor:
    """Debiased linear CKA between the outputs of nodes ``ids`` at ``depth`` (a multi-value
    boundary's main value, see `MultiTaskNetwork.representations`), globally average pooled, on
    a fixed sample of ``samples`` training inputs (drawn from the trainer's seed, so a rerun
    compares on the same inputs); under torchrun each rank takes its share of the sample and the
    statistics are summed over ranks."""
    net = trainer.net
    acc = CKAAccumulator(debiased=True)
    data = trainer.train_data
    g = torch.Generator().manual_seed(trainer.config.seed + 7919)
    order = torch.randperm(len(data), generator=g)[:samples].tolist()
    if len(order) < distributed.world_size():
        raise GroupingError(
            f"the similarity of nodes {list(ids)} is measured on {len(order)} samples but runs on {distributed.world_size()} ranks; "
            "raise similarity_samples (or use the data set's size) to at least the number of ranks."
        )
    subset = torch.utils.data.Subset(data, distributed.shard(order))
    with eval_mode(net):
        for batch in trainer.loader(subset, shuffle=False, batch_size=trainer.config.eval_batch_size):
            x, _ = trainer.to_device(batch)
            values = net.representations(x, depth)  # a multi-value boundary: its main value
            acc.update({i: global_avg_pool(values[i]) for i in ids})
    return acc.all_reduce().matrix().cpu()


def central_first(ids: Sequence[int], similarity: torch.Tensor, blocks: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each block (indices into ``ids`` and ``similarity``) as node ids, its most central member
    first: the one with the highest summed similarity to the rest of its block, which a
    ``group_init="copy"`` copies."""

    def centrality(i: int, block: Sequence[int]) -> float:
        return sum(float(similarity[i, j]) for j in block if j != i)

    return [[ids[i] for i in sorted(block, key=lambda i, b=block: -centrality(i, b))] for block in blocks]


# phases after the one per depth: the times a set that failed at the deepest depth is compared again
RETRY_PHASES = 2


def depth_schedule(depth: int, retries: int = RETRY_PHASES, phase_epochs: int = 1, distill_epochs: int = 1,
                   *, epochs: int | None = None) -> dict[str, tuple[int, ...]]:
    """``task_phases`` and ``distill_epochs`` for a backbone of ``depth`` segments: one phase
    per depth, then ``retries`` more (``MTSLConfig(**depth_schedule(net.depth))``); with
    ``epochs`` (the run's length), as many retries as fit before its last epoch instead.

    Why this shape: the frontier goes down one depth per phase (a group's children are first
    compared in the phase after the group formed), so ``depth`` phases are the fewest that can
    reach every depth, and with exactly that many a set that fails at the deepest depth is never
    compared again; each retry phase after them compares the sets left unmerged once more (at
    any depth), after one more task-learning phase under the alignment loss, as the official
    schedule's phases do while any set can still merge (`train_and_evaluate`). The official
    code retries in every phase its schedule has left; ``epochs`` does the same in a run of that
    length, keeping the last ``phase_epochs`` after the last structural phase, where the final
    structure trains with the alignment loss off. ``retries=0`` is the one-phase-per-depth
    schedule (an ablation: it cannot retry the last depth).
    """
    if epochs is not None:
        retries = (epochs - phase_epochs) // max(phase_epochs, 1) - depth
    if depth < 1 or retries < 0 or phase_epochs < 1 or distill_epochs < 1:
        length = "" if epochs is None else f", epochs={epochs}"
        raise OptionError(
            f"depth_schedule(depth={depth}, retries={retries}, phase_epochs={phase_epochs}, distill_epochs={distill_epochs}{length}): "
            "depth, phase_epochs and distill_epochs must be >= 1 and retries >= 0 (with epochs: a run of at least "
            "(depth + 1) * phase_epochs epochs); pass the network's depth (net.depth)."
        )
    phases = depth + retries
    return {"task_phases": (phase_epochs,) * phases, "distill_epochs": (distill_epochs,) * phases}


@dataclass
class MTSLConfig:
    """Every knob of MTSL; the defaults are the official code's.

    The default schedule stays the official one (10 phases, `--tse-ends` 3, 5, …, 49: enough
    for a network of up to 8 depths with 2 retries) rather than one derived from the depth: a
    default that changed with the backbone would no longer be the paper's recipe. What goes
    wrong silently with too few phases is reported instead: `MTSL` warns at the start of
    training when fewer phases than the network's depth fit in the trainer's epochs (the
    deepest depths then stay split whatever their similarity), and `depth_schedule` builds one
    phase per depth plus retries for any depth (what the demo and the ground-truth benchmark
    run). A schedule of exactly one phase per depth is not warned about: it reaches every
    depth, it only cannot retry a set that fails at the last one.
    """

    task_phases: Sequence[int] = (2, 2, 2, 2, 4, 4, 8, 8, 8, 8)
    distill_epochs: Sequence[int] = (1, 1, 2, 2, 2, 2, 4, 4, 8, 8)
    schedule_scale: float = 1.0
    threshold: float = 0.8
    align_weight: float = 0.2
    similarity_samples: int = 800
    # "pristine": the group node starts as the backbone's segment as loaded (pretrained), which is
    # what the official rebuild does; "fresh" re-randomises it (the engine's meaning, elsewhere too);
    # "mean" of the members' parameters (meaningful because the copies start identical); "copy" of
    # the most central member
    group_init: str = "pristine"
    # the amalgamation gate's hidden width is channels // gate_reduction; the official gate is C → C → C
    gate_reduction: int = 1
    distill_lr: float | None = None
    exhaustive_limit: int = 10

    def scaled(self, epochs: Sequence[int]) -> list[int]:
        return [max(1, math.ceil(e * self.schedule_scale)) for e in epochs]


@dataclass
class MTSL(Method):
    config: MTSLConfig = field(default_factory=MTSLConfig)
    decisions: list[dict] = field(default_factory=list)
    phase: int = 0
    # parents whose children are done: fewer than two of them are left to compare
    decided: set[int] = field(default_factory=set)
    # group nodes MTSL created: done at their own depth (their children form a new set)
    settled: set[int] = field(default_factory=set)
    # a digest of the pristine templates a "pristine" group init copies: they are an input of the
    # run (the loaded backbone), not part of a checkpoint, so a resume checks it builds on the same
    _pristine_digest: str | None = field(default=None, init=False, repr=False)
    # the alignment's forward hooks and what they captured in the current step
    _hooks: list = field(default_factory=list, init=False, repr=False)
    _captured: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    name = "mtsl"

    # ------------------------------------------------------------------ schedule
    def phase_ends(self) -> list[int]:
        """Epochs after which the structural phases run."""
        return list(itertools.accumulate(self.config.scaled(self.config.task_phases)))

    def candidates(self, tree, parent: int) -> list[int]:
        """The children of ``parent`` still to be compared: all of them but the groups MTSL made."""
        return [c.id for c in tree.children(parent) if c.id not in self.settled]

    def frontier(self, tree) -> list[tuple[int, int, list[int]]]:
        """The sibling sets the next structural phase compares, as (depth, parent, ids), shallow first.

        As the official ``fusion_phase`` walks its ``current_task_groups``: every open set at
        once, each at its own depth: the children of every group node, and the leftovers of
        every set compared before (retried at their depth, as the official ``ungrouped_tasks``).
        """
        sets = []
        for depth in range(1, tree.depth + 1):
            for p in tree.at_depth(depth - 1):
                ids = self.candidates(tree, p.id)
                if p.id not in self.decided and len(ids) >= 2:
                    sets.append((depth, p.id, ids))
        return sets

    def aligning(self) -> bool:
        """Whether the alignment loss is on: only before the last structural phase (``loss_stub``)."""
        return self.config.align_weight > 0 and self.phase < len(self.phase_ends())

    # ------------------------------------------------------------------ task learning
    def on_start(self, trainer: Trainer) -> None:
        if self.config.group_init == "pristine":
            digest = pristine_digest(trainer.net)
            if self._pristine_digest is not None and self._pristine_digest != digest:
                raise CheckpointError(
                    "this MTSL run was checkpointed on other pristine segment weights than this network's, and "
                    "its group_init='pristine' copies them into every new group node; resume with the network "
                    "built from the same backbone weights (e.g. the same --weights), or set group_init='fresh'."
                )
            self._pristine_digest = digest
        self._warn_short_schedule(trainer)
        self._install_hooks(trainer)

    def _warn_short_schedule(self, trainer: Trainer) -> None:
        """Warn when the phases that fit in the run cannot reach every depth (a warning, not an
        error: sharing only the first depths is a legitimate choice, but it should be one)."""
        depth, epochs = trainer.net.depth, trainer.config.epochs
        ends = self.phase_ends()
        runs = sum(end <= epochs for end in ends)
        if runs < depth:
            warnings.warn(
                f"MTSL runs {runs} structural phase(s)"
                + (f" ({len(ends)} in task_phases, those ending after epoch {epochs} never run)" if len(ends) > runs else "")
                + f" on a network of depth {depth}: the frontier goes down one depth "
                f"per phase, so depths {runs + 1}-{depth} stay split whatever their similarity. Use "
                + (f"MTSLConfig(**depth_schedule({depth}, epochs={epochs}))" if epochs > depth else
                   f"at least {depth + 1} epochs and MTSLConfig(**depth_schedule({depth}, epochs={depth + 1}))")
                + " (one phase per depth, then a retry in every epoch left but the last).",
                stacklevel=2,
            )

    def _install_hooks(self, trainer: Trainer) -> None:
        """Capture the frontier siblings' outputs during the normal forward (no second pass)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._captured = [], {}
        if not self.aligning():
            return
        for _, _, ids in self.frontier(trainer.net.tree):
            for node_id in ids:
                module = trainer.net.node_module(node_id)
                self._hooks.append(module.register_forward_hook(self._capture(node_id)))

    def _capture(self, node_id: int):
        def hook(module, args, output):
            if module.training:
                self._captured[node_id] = output

        return hook

    def extra_loss(self, trainer: Trainer, x: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not self._captured or x.shape[0] < 4 or not self.aligning():
            return None
        terms = []
        for _, _, ids in self.frontier(trainer.net.tree):
            # a multi-value boundary aligns its main value (the last), as `similarity` compares it
            feats = [global_avg_pool(main_value(self._captured[i])) for i in ids if i in self._captured]
            if len(feats) >= 2:
                cka = minibatch_debiased_cka(feats)
                k = cka.shape[0]
                off = cka[~torch.eye(k, dtype=torch.bool, device=cka.device)]
                terms.append(1 - off.mean())
        self._captured = {}
        if not terms:
            return None
        return self.config.align_weight * torch.stack(terms).mean()

    # ------------------------------------------------------------------ structural learning
    def after_epoch(self, trainer: Trainer) -> dict[str, Any] | None:
        ends = self.phase_ends()
        if self.phase >= len(ends) or trainer.epoch != ends[self.phase]:
            return None
        events = self.structural_phase(trainer)
        self.phase += 1
        self._install_hooks(trainer)
        return {"structural_phase": events}

    def similarity(self, trainer: Trainer, depth: int, ids: Sequence[int]) -> torch.Tensor:
        """Debiased linear CKA between the nodes' GAP'd outputs on a fixed training sample
        (`node_similarity`)."""
        return node_similarity(trainer, depth, ids, self.config.similarity_samples)

    def structural_phase(self, trainer: Trainer) -> list[dict]:
        """Compare every frontier set, merge what passes the threshold, keep the rest as leftovers."""
        net = trainer.net
        sets = self.frontier(net.tree)
        if not sets:
            return []
        distill_epochs = self.config.scaled(self.config.distill_epochs)[min(self.phase, len(self.config.distill_epochs) - 1)]
        events = []
        for depth, parent, ids in sets:
            if any(net.tree.node(i).parent != parent for i in ids):
                continue  # an earlier fuse this phase re-parented them; the next phase sees the new set
            before = sum(p.numel() for p in net.parameters())
            node_tasks = [list(net.tree.node(i).tasks) for i in ids]
            sim = self.similarity(trainer, depth, ids)
            decision = None
            if distributed.is_main():
                decision = mtsl_partition(sim.numpy(), self.config.threshold, exhaustive_limit=self.config.exhaustive_limit)
            sim, decision = distributed.broadcast_object((sim, decision))  # rank 0 decides for all
            groups = central_first(ids, sim, decision.merge_groups)
            amalgamation = Amalgamation(
                batches=lambda: (b[0].to(trainer.device) for b in trainer.loader(trainer.train_data, shuffle=True)),
                epochs=distill_epochs,
                lr=self.config.distill_lr or trainer.config.lr,
                reduction=self.config.gate_reduction,
                progress=(lambda it, d=depth: trainer.progress(it, desc=f"distil d{d}")) if trainer.config.progress else None,
            )
            if groups:
                fuse(net, depth, groups, init=self.config.group_init, distill=amalgamation, optimizer=trainer.optimizer)
                trainer.structure_changed()
                # the group nodes are the parent's children that hold more than one former member
                merged_tasks = [{t for i in g for t in node_tasks[ids.index(i)]} for g in groups]
                self.settled.update(c.id for c in net.tree.children(parent) if set(c.tasks) in merged_tasks)
            leftovers = self.candidates(net.tree, parent)
            if len(leftovers) < 2:
                self.decided.add(parent)
            event = {
                "phase": self.phase + 1,
                "epoch": trainer.epoch,
                "depth": depth,
                "parent": parent,
                "nodes": ids,
                "tasks": node_tasks,
                "similarity": sim.tolist(),
                "trials": [{"k": t.k, "partition": [list(b) for b in t.partition], "score": t.score} for t in decision.trials],
                "merged": groups,
                "leftovers": leftovers if len(leftovers) >= 2 else [],
                "distill_loss": [h["loss_curve"] for h in amalgamation.history],
                "parameters_before": before,
                "parameters_after": sum(p.numel() for p in net.parameters()),
            }
            events.append(event)
            self.decisions.append(event)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "decided": sorted(self.decided),
            "settled": sorted(self.settled),
            "decisions": self.decisions,
            "pristine_digest": self._pristine_digest,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.phase = int(state.get("phase", 0))
        self.decided = set(state.get("decided", []))
        self.settled = set(state.get("settled", []))
        self._pristine_digest = state.get("pristine_digest")
        self.decisions = list(state.get("decisions", []))

