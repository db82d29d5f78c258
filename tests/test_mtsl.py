"""MTSL on the engine: merge decisions, distillation, invariants after every structural phase."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import graphsurgeon as gs
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.core.network import reinitialise
from graphsurgeon.errors import OptionError
from graphsurgeon.methods.structure.amalgamation import Amalgamation, feature_mse
from graphsurgeon.methods.structure.mtsl import MTSL, RETRY_PHASES, MTSLConfig, depth_schedule
from graphsurgeon.training.trainer import TrainConfig, Trainer


class Spec:
    """Cross-entropy task with accuracy."""

    loss = staticmethod(F.cross_entropy)
    metrics = {"accuracy": lambda p, t: float((p.argmax(1) == t).float().mean())}
    higher_is_better = {"accuracy": True}


class Toy(Dataset):
    """Tasks `a` and `twin` are identical (same labels); `other` depends on another feature."""

    def __init__(self, n=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 12, 12, generator=g)
        self.a = (self.x[:, 0, :6].mean((1, 2)) > self.x[:, 0, 6:].mean((1, 2))).long()
        self.other = (self.x[:, 0, :, :6].std((1, 2)) > self.x[:, 0, :, 6:].std((1, 2))).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "twin": self.a[i], "other": self.other[i]}


def toy_net(seed=0):
    torch.manual_seed(seed)
    backbone = small_resnet(1, (4, 8, 8, 8))
    head = nn.Linear(8, 2)
    heads = {"a": copy.deepcopy(head), "twin": copy.deepcopy(head), "other": nn.Linear(8, 2)}
    net = gs.multitask(backbone, heads, sharing="separate", example_input=torch.rand(2, 1, 12, 12))
    # `a` and `twin` start identical (and stay so: same data, same gradients); `other` is independent
    for d in range(1, net.depth + 1):
        reinitialise(net.level(d)[f"n{net.tree.path('other')[d].id}"])
    return net


def make_trainer(net, method, epochs, data=None):
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, progress=False)
    return Trainer(net, {t: Spec for t in net.tasks}, data or Toy(), None, cfg, method)


def test_identical_tasks_merge_at_the_first_phase_and_the_unrelated_one_does_not():
    net = toy_net()
    # a singleton scores 0, so {a, twin} | {other} scores 2/3: the threshold must lie below that
    method = MTSL(MTSLConfig(task_phases=(1, 1), distill_epochs=(1, 1), threshold=0.6, align_weight=0.0, similarity_samples=96))
    trainer = make_trainer(net, method, epochs=1)
    trainer.fit()
    first = method.decisions[0]
    assert first["depth"] == 1 and first["phase"] == 1
    ids = {tuple(t): i for t, i in zip(first["tasks"], first["nodes"])}
    a, twin = ids[("a",)], ids[("twin",)]
    sim = torch.tensor(first["similarity"])
    assert sim[first["nodes"].index(a), first["nodes"].index(twin)] == pytest.approx(1.0, abs=1e-9)
    assert first["merged"] == [[a, twin]]
    depth1 = {n.tasks for n in net.tree.at_depth(1)}
    assert depth1 == {("a", "twin"), ("other",)}
    gs.check(net)


def test_every_structural_phase_keeps_invariants_and_the_network_trains():
    net = toy_net(1)
    method = MTSL(MTSLConfig(task_phases=(1, 1, 1), distill_epochs=(1, 1, 1), threshold=0.0, align_weight=0.2, similarity_samples=64))
    trainer = make_trainer(net, method, epochs=3)
    checked = []
    original = method.after_epoch

    def after_epoch(tr):
        events = original(tr)
        gs.check(tr.net)
        # every parameter the tree holds still receives gradient, and the optimizer holds them all
        x, targets = next(iter(tr.loader(tr.train_data, shuffle=False)))
        tr.net.zero_grad()
        out = tr.net(x)
        sum(F.cross_entropy(out[t], targets[t]) for t in out).backward()
        held = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        for name, p in tr.net.named_parameters():
            assert p.grad is not None, name
            assert id(p) in held, name
        checked.append(tr.net.tree)
        return events

    method.after_epoch = after_epoch
    trainer.fit()
    assert len(checked) == 3
    assert len(method.decisions) >= 3
    # threshold 0: everything merges, one depth per phase, from the earliest depth on
    assert [d["depth"] for d in method.decisions[:3]] == [1, 2, 3]
    for d in (1, 2, 3):
        assert len(net.tree.at_depth(d)) == 1
    assert len(net.tree.at_depth(4)) == 3
    before, after = method.decisions[0]["parameters_before"], method.decisions[-1]["parameters_after"]
    assert after < before


def test_distillation_lowers_each_members_feature_mse_on_held_out_data():
    net = toy_net(2)
    train, held_out = Toy(128, seed=3), Toy(64, seed=4)
    # the root's children are siblings in a separate tree: distil all three into one group
    depth, members = 1, [net.level(1)[f"n{n.id}"] for n in net.tree.at_depth(1)]
    root = net.tree.at_depth(0)[0].id
    group = gs.core.network.init_group(members, "fresh")
    batches = lambda data: [data.x[i : i + 32] for i in range(0, len(data), 32)]
    before = feature_mse(net, depth, root, members, group, None, batches(held_out))
    amalgamation = Amalgamation(batches=lambda: batches(train), epochs=15, lr=1e-2)
    amalgamation(net, depth, root, members, group)
    after = feature_mse(net, depth, root, members, group, amalgamation.gates, batches(held_out))
    curve = amalgamation.history[-1]["loss_curve"]
    assert curve[-1] < curve[0]
    for b, a in zip(before, after):
        assert a < b


def test_fuse_averages_the_members_adam_state_into_the_group():
    net = toy_net(3)
    trainer = make_trainer(net, None, epochs=1)
    trainer.fit()
    ids = [n.id for n in net.tree.at_depth(1)]
    name = next(k for k, _ in net.level(1)[f"n{ids[0]}"].named_parameters())
    states = [trainer.optimizer.state[dict(net.level(1)[f"n{i}"].named_parameters())[name]] for i in ids]
    expected = torch.stack([s["exp_avg"] for s in states]).mean(0)
    gs.surgery.fuse(net, 1, [ids], init="mean", optimizer=trainer.optimizer)
    group = net.tree.at_depth(1)[0]
    p = dict(net.level(1)[group.name].named_parameters())[name]
    assert torch.allclose(trainer.optimizer.state[p]["exp_avg"], expected)
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small", "vit_b_16"])
def test_mtsl_runs_one_phase_on_torchvision_backbones(backbone):
    from graphsurgeon.apps.experiment import GreyToRGB

    kwargs = {"image_size": 32} if backbone.startswith("vit") else {}
    torch.manual_seed(0)
    model = GreyToRGB(torchvision.models.get_model(backbone, weights=None, **kwargs))
    data = Toy(16)
    data.x = F.interpolate(data.x, size=32)
    heads = {t: (lambda shape: nn.Linear(shape[-1], 2)) for t in ("a", "twin")}
    net = gs.multitask(model, heads, example_input=data.x[:2])
    method = MTSL(MTSLConfig(task_phases=(1,), distill_epochs=(1,), threshold=0.0, similarity_samples=16))
    trainer = Trainer(net, {t: Spec for t in net.tasks}, data, None, TrainConfig(epochs=1, batch_size=8, progress=False), method)
    trainer.fit()
    assert method.decisions and method.decisions[0]["merged"]
    assert len(net.tree.at_depth(1)) == 1
    gs.check(net)
    out = net.eval()(data.x[:2])
    assert set(out) == {"a", "twin"} and all(torch.isfinite(v).all() for v in out.values())


def test_a_set_that_did_not_merge_is_retried_next_phase_and_merges_when_its_cka_rises():
    """Official `fusion_phase`/`ungrouped_tasks`: unmerged siblings stay a set at their depth,
    are compared again in the next phase (under the alignment loss meanwhile), and merge once
    their similarity passes the threshold; deeper depths wait below them."""
    net = toy_net(4)
    method = MTSL(MTSLConfig(task_phases=(1, 1, 1), distill_epochs=(1, 1, 1), threshold=0.5, align_weight=0.2, similarity_samples=32))
    trainer = make_trainer(net, method, epochs=3)
    real = method.similarity

    def similarity(tr, depth, ids):  # the first phase sees dissimilar features, later ones similar
        measured = real(tr, depth, ids)
        level = 0.0 if method.phase == 0 else 1.0
        return torch.full_like(measured, level).fill_diagonal_(1.0)

    method.similarity = similarity
    aligned_after_first = []
    original = method.after_epoch

    def after_epoch(tr):
        events = original(tr)
        if tr.epoch == 1:
            aligned_after_first.append(sorted(i for _, _, ids in method.frontier(tr.net.tree) for i in ids))
        return events

    method.after_epoch = after_epoch
    trainer.fit()
    first, second = method.decisions[0], method.decisions[1]
    assert first["depth"] == 1 and first["merged"] == [] and sorted(first["leftovers"]) == sorted(first["nodes"])
    # retried at the same depth, not skipped: the leftovers are the next phase's (and the alignment's) set
    assert aligned_after_first == [sorted(first["nodes"])]
    assert len(method._hooks) == 0  # the last phase has run: alignment off
    assert second["phase"] == 2 and second["depth"] == 1 and second["parent"] == first["parent"]
    assert sorted(i for g in second["merged"] for i in g) == sorted(first["nodes"])
    assert len(net.tree.at_depth(1)) == 1
    assert method.decisions[2]["phase"] == 3 and method.decisions[2]["depth"] == 2
    gs.check(net)


def test_no_alignment_loss_from_the_last_structural_phase_on():
    """Fewer phases than depths: after the last one, no hooks and no alignment term (`loss_stub`)."""
    net = toy_net(5)
    method = MTSL(MTSLConfig(task_phases=(1,), distill_epochs=(1,), threshold=0.9, align_weight=0.2, similarity_samples=32))
    trainer = make_trainer(net, method, epochs=3)
    seen: list[tuple[int, bool]] = []
    original = method.extra_loss

    def extra_loss(tr, x, outputs):
        loss = original(tr, x, outputs)
        seen.append((tr.epoch, loss is not None))
        return loss

    method.extra_loss = extra_loss
    trainer.fit()
    assert method.frontier(net.tree), "sets are left undecided: the alignment would have had something to align"
    during = {on for epoch, on in seen if epoch == 0}
    after = {on for epoch, on in seen if epoch >= 1}
    assert during == {True} and after == {False}
    assert method._hooks == []


class Toy4(Toy):
    """Toy with a fourth task, a copy of `other`."""

    def __getitem__(self, i):
        x, targets = super().__getitem__(i)
        return x, {**targets, "other2": targets["other"]}


def test_every_open_set_is_compared_in_each_phase_at_its_own_depth():
    """As the official `fusion_phase` walks all its groups: in phase 2 the new group's children
    (depth 2) and the phase-1 leftovers (depth 1) are both compared."""
    torch.manual_seed(6)
    heads = {t: nn.Linear(8, 2) for t in ("a", "twin", "other", "other2")}
    net = gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing="separate", example_input=torch.rand(2, 1, 12, 12))
    method = MTSL(MTSLConfig(task_phases=(1, 1), distill_epochs=(1, 1), threshold=0.5, align_weight=0.0, similarity_samples=32))
    trainer = make_trainer(net, method, epochs=2, data=Toy4())

    def similarity(tr, depth, ids):  # phase 1: only a ~ twin; later: everything alike
        kin = [set(tr.net.tree.node(i).tasks) <= {"a", "twin"} for i in ids]
        sim = torch.tensor([[1.0 if method.phase or (p and q) else 0.0 for q in kin] for p in kin], dtype=torch.float64)
        return sim.fill_diagonal_(1.0)

    method.similarity = similarity
    trainer.fit()
    first = method.decisions[0]
    merged_tasks = [sorted(t for i in g for t in first["tasks"][first["nodes"].index(i)]) for g in first["merged"]]
    assert merged_tasks == [["a", "twin"]] and len(first["leftovers"]) == 2
    second = [d for d in method.decisions if d["phase"] == 2]
    assert sorted(d["depth"] for d in second) == [1, 2]
    assert all(d["merged"] for d in second)
    assert {n.tasks for n in net.tree.at_depth(1)} == {("a", "twin"), ("other", "other2")}
    gs.check(net)


def test_depth_schedule_is_one_phase_per_depth_then_the_retries():
    assert depth_schedule(5) == {"task_phases": (1,) * (5 + RETRY_PHASES), "distill_epochs": (1,) * (5 + RETRY_PHASES)}
    assert depth_schedule(3, retries=0, phase_epochs=2, distill_epochs=4) == {"task_phases": (2, 2, 2), "distill_epochs": (4, 4, 4)}
    with pytest.raises(OptionError, match=r"retries=-1"):
        depth_schedule(5, retries=-1)


def test_depth_schedule_for_a_run_retries_in_every_phase_but_the_last_epoch():
    """With the run's length, every epoch but the last ends a structural phase (the official
    code compares the sets left unmerged in every phase it has), so the final structure trains
    one phase with the alignment loss off; a run too short for one phase per depth is refused."""
    assert depth_schedule(5, epochs=10) == depth_schedule(5, retries=4)
    assert sum(depth_schedule(5, epochs=10)["task_phases"]) == 9
    assert depth_schedule(2, phase_epochs=2, epochs=9) == {"task_phases": (2, 2, 2), "distill_epochs": (1, 1, 1)}
    assert depth_schedule(5, epochs=6) == depth_schedule(5, retries=0)
    with pytest.raises(OptionError, match=r"epochs=5\).*at least \(depth \+ 1\) \* phase_epochs"):
        depth_schedule(5, epochs=5)


def test_a_schedule_that_cannot_reach_every_depth_warns_and_a_depth_schedule_does_not():
    """The frontier goes down one depth per phase: with fewer phases run than depths, the deepest
    depths can never merge, which the run says at its start."""
    net = toy_net(0)
    short = MTSL(MTSLConfig(task_phases=(1, 1), distill_epochs=(1, 1), similarity_samples=16))
    with pytest.warns(UserWarning, match=rf"runs 2 structural phase.* depths 3-{net.depth} stay split.* at least "
                      rf"{net.depth + 1} epochs and MTSLConfig\(\*\*depth_schedule\({net.depth}, epochs={net.depth + 1}\)\)"):
        short.on_start(make_trainer(net, short, epochs=2))
    # enough phases in the schedule, but the run ends before the last ones
    cut = MTSL(MTSLConfig(**depth_schedule(net.depth), similarity_samples=16))
    with pytest.warns(UserWarning, match=rf"runs 3 structural phase\(s\) \({net.depth + RETRY_PHASES} in task_phases"):
        cut.on_start(make_trainer(net, cut, epochs=3))
    full = MTSL(MTSLConfig(**depth_schedule(net.depth), similarity_samples=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full.on_start(make_trainer(net, full, epochs=net.depth + RETRY_PHASES))
