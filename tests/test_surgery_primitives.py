"""Every edit goes through `graphsurgeon.core.surgery`, and optimizer state follows parameter identity.

DMTG's pruning, `load`, `Trainer.resume` and TAG's restart use the primitives (`relayout`,
`derive`, `reinitialise`, `carry_optimizer`); the network keeps pristine templates outside its
parameters; `eval_mode` restores every submodule's own mode; `rebuild` is transactional. A static
check pins that nothing outside ``graphsurgeon/core`` writes network slots, fabricates segments
or rewrites optimizer groups.
"""
import re
from pathlib import Path

import pytest
import torch
from test_mtsl import Spec, Toy
from torch import nn

import graphsurgeon as gs
from graphsurgeon.apps.experiment import count_flops
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.core import eval_mode, surgery
from graphsurgeon.core.network import init_group
from graphsurgeon.core.network import reinitialise as reinitialise_module
from graphsurgeon.methods.structure import dmtg
from graphsurgeon.methods.structure.amalgamation import Amalgamation, feature_mse
from graphsurgeon.methods.structure.dmtg import Supernet, prune
from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig
from graphsurgeon.methods.structure.tag import TAG, TAGConfig
from graphsurgeon.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("a", "twin", "other")
X = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(3))


def toy(sharing="separate", seed=0, heads=None):
    torch.manual_seed(seed)
    heads = heads or {t: nn.Linear(8, 2) for t in TASKS}
    return gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing=sharing, example_input=torch.rand(2, 1, 12, 12))


def adam_after_a_step(net):
    """An Adam with state for every parameter (one step on a loss touching all of them)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sum(v.square().mean() for v in net(X).values()).backward()
    opt.step()
    opt.zero_grad()
    return opt


# ------------------------------------------------------------------ optimizer state by identity
def test_relayout_keeps_survivors_state_objects_and_gives_a_copy_its_sources_state():
    net = toy("shared")
    opt = adam_after_a_step(net)
    before = {p: opt.state[p] for p in net.parameters()}
    exp_avg = {p: s["exp_avg"] for p, s in before.items()}
    old = {d: dict(net.node_module(net.tree.at_depth(d)[0]).named_parameters()) for d in range(1, net.depth + 1)}
    node = net.tree.at_depth(3)[0]
    origin = surgery.split(net, node.id, [["a", "twin"], ["other"]], optimizer=opt)
    gs.check(net)
    params = list(net.parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == params
    survivors = [p for p in params if p in before]
    assert len(survivors) < len(params)  # the split made new copies
    for p in survivors:  # the very state objects, not copies
        assert opt.state[p] is before[p] and opt.state[p]["exp_avg"] is exp_avg[p]
    copies = [n for n in net.tree.nodes if n.depth and origin[n.id] != (n.id,)]
    assert {n.depth for n in copies} == {3, 4, 5}
    for n in copies:
        for name, p in net.node_module(n).named_parameters():
            src = old[n.depth][name]
            assert p is not src
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], before[src][key])
                assert opt.state[p][key] is not before[src][key]  # a copy must not share its moments


def test_a_group_nodes_state_is_the_mean_of_its_members_state_paired_by_relative_name():
    net = toy("separate")
    opt = adam_after_a_step(net)
    a, b, _ = net.tree.at_depth(1)
    members = [dict(net.node_module(n).named_parameters()) for n in (a, b)]
    states = [{k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in m.items()} for m in members]
    surgery.fuse(net, 1, [[a.id, b.id]], init="mean", optimizer=opt)
    (group,) = [n for n in net.tree.at_depth(1) if len(n.tasks) == 2]
    for name, p in net.node_module(group).named_parameters():
        want = (states[0][name]["exp_avg"] + states[1][name]["exp_avg"]) / 2
        torch.testing.assert_close(opt.state[p]["exp_avg"], want)
    assert not any(p in opt.state for m in members for p in m.values())  # the members left it


def test_carry_optimizer_works_on_bare_parameters_by_identity_alone():
    """No network and no names: what is carried is decided by the tensors themselves."""
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.full((2,), 2.0))
    opt = torch.optim.Adam([p, q], lr=0.1)
    (p.sum() + 3 * q.sum()).backward()
    opt.step()
    r = nn.Parameter(q.detach().clone())
    kept = opt.state[p]
    surgery.carry_optimizer(opt, [p, q], [r, p], {r: (q,)})
    assert opt.param_groups[0]["params"] == [r, p] and opt.state[p] is kept and q not in opt.state
    assert torch.equal(opt.state[r]["exp_avg"], torch.full((2,), 0.3)) and opt.state[r]["step"] == 1


def test_a_method_parameter_stays_in_its_group_with_its_state():
    net = toy("shared")
    weight = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([{"params": list(net.parameters())}, {"params": [weight], "weight_decay": 0.0}])
    sum(v.square().mean() for v in net(X).values()).mul(weight.sum()).backward()
    opt.step()
    kept = opt.state[weight]
    surgery.split(net, net.tree.at_depth(1)[0].id, [["a"], ["twin", "other"]], optimizer=opt)
    assert opt.param_groups[1]["params"] == [weight] and opt.state[weight] is kept
    assert opt.param_groups[0]["params"] == list(net.parameters())


# ------------------------------------------------------------------ DMTG through derive
def test_dmtg_prune_derives_the_pruned_network_and_set_network_carries_the_search_state(monkeypatch):
    plain = toy("shared")
    sup = Supernet.from_network(plain, branches=2)
    for module in sup.branches.level(2).values():  # make the branches differ
        reinitialise_module(module)
    trainer = Trainer(sup.branches, {t: Spec for t in sup.branches.tasks}, Toy(), None, TrainConfig(progress=False))
    body = sup.branches
    sum(o.square().mean() for heads in body(X).values() for o in heads.values()).backward()
    trainer.optimizer.step()
    calls = []
    monkeypatch.setattr(dmtg, "derive", lambda *a, **k: calls.append(a[2]) or surgery.derive(*a, **k))
    pruned = prune(sup, {"a": 1, "twin": 1, "other": 0})
    gs.check(pruned)
    # through derive, each node from its branch's node; the templates stay the backbone's as cut
    assert len(calls) == 1 and all(len(v) == 1 for v in calls[0].values())
    for s, t in zip(pruned.segments, plain.segments):
        assert s.module is not t.module
        for k, v in s.module.state_dict().items():
            assert torch.equal(v, t.module.state_dict()[k]), k
    assert not {id(p) for p in pruned.parameters()} & {id(p) for p in body.parameters()}
    # set_network with the pairing derive returns keeps the search's Adam moments
    first = {d: body.tree.path("branch1")[d].id for d in range(1, body.depth + 1)}
    tree = gs.TaskTree.shared(["branch1"], body.depth)
    derived, sources = surgery.derive(
        body, tree, {n.id: (first[n.depth],) for n in tree.nodes if n.depth}, {"branch1": gs.Task(head=body.heads["branch1"])}
    )
    old_state = {p: {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in body.parameters()}
    trainer.set_network(derived, sources=sources)
    assert trainer.net is derived
    assert [p for g in trainer.optimizer.param_groups for p in g["params"]] == list(derived.parameters())
    for p in derived.parameters():
        (src,) = sources[p]
        assert src in old_state and torch.equal(trainer.optimizer.state[p]["exp_avg"], old_state[src]["exp_avg"])


# ------------------------------------------------------------------ load and resume
def test_load_lays_the_saved_tree_out_from_the_pristine_segments(tmp_path, monkeypatch):
    net = toy("separate")
    surgery.fuse(net, 1, [[n.id for n in net.tree.at_depth(1)]], init="mean")
    gs.save(net, tmp_path / "m.safetensors")
    calls = []
    original = surgery.relayout
    monkeypatch.setattr(gs.core.checkpoint, "relayout", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    loaded = gs.load(tmp_path / "m.safetensors", small_resnet(1, (4, 8, 8, 8)), {t: nn.Linear(8, 2) for t in TASKS})
    assert calls and all(v == () for v in calls[0].values())
    assert loaded.tree == net.tree
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_resume_restores_each_parameters_optimizer_state_through_the_relayout(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=32, lr=3e-3, progress=False, checkpoint_dir=str(tmp_path))
    net = toy("separate")
    first = Trainer(net, {t: Spec for t in TASKS}, Toy(), None, cfg)
    first.fit()
    surgery.fuse(net, 1, [[n.id for n in net.tree.at_depth(1)]], init="mean", optimizer=first.optimizer)
    first.fit(epochs=2)
    again = Trainer(toy("separate", seed=4), {t: Spec for t in TASKS}, Toy(), None, cfg)
    assert again.resume() and again.net.tree == net.tree
    ours = dict(again.net.named_parameters())
    for name, p in net.named_parameters():
        q = ours[name]
        assert torch.equal(p, q), name
        for key, value in first.optimizer.state[p].items():
            assert torch.equal(again.optimizer.state[q][key], value), (name, key)


# ------------------------------------------------------------------ pristine templates, reinitialise
def test_templates_are_neither_parameters_nor_state_and_pristine_means_the_backbones_weights():
    net = toy("separate")
    n_params, keys = len(list(net.parameters())), set(net.state_dict())
    templates = {id(p) for s in net.segments for p in s.module.parameters()}
    assert templates.isdisjoint(id(p) for p in net.parameters())
    opt = adam_after_a_step(net)  # the copies move away from the backbone's weights
    a, b, c = net.tree.at_depth(1)
    surgery.fuse(net, 1, [[a.id, b.id]], init="pristine", optimizer=opt)
    (group,) = [n for n in net.tree.at_depth(1) if len(n.tasks) == 2]
    for k, v in net.node_module(group).state_dict().items():
        assert torch.equal(v, net.pristine(1).state_dict()[k]), k
    assert not torch.equal(next(net.node_module(c).parameters()), next(net.pristine(1).parameters()))
    assert len(list(net.parameters())) < n_params and set(net.state_dict()) != keys  # one copy less
    assert all(p in opt.state for p in net.parameters() if p not in set(net.node_module(group).parameters()))


def test_reinitialise_from_pristine_keeps_parameter_identity_and_drops_their_state():
    net = toy("shared", heads={t: nn.Linear(8, 2) for t in TASKS})
    built = {k: v.clone() for k, v in net.state_dict().items()}
    opt = adam_after_a_step(net)
    params = list(net.parameters())
    node = net.tree.at_depth(4)[0]
    surgery.reinitialise(net, [node.id], heads=["a"], optimizer=opt)
    assert list(net.parameters()) == params  # same objects: the optimizer still holds them
    reset = set(net.node_module(node).parameters()) | set(net.heads["a"].parameters())
    for name, v in net.state_dict().items():
        if name.startswith(("seg4.", "heads.a.")):
            assert torch.equal(v, built[name]), name
        elif name.endswith("weight") and not name.startswith("heads."):
            assert not torch.equal(v, built[name]), name
    assert all((p in opt.state) == (p not in reset) for p in params)
    with pytest.raises(gs.TreeEditError, match=r"nodes \[99\]"):
        surgery.reinitialise(net, [99])


@pytest.mark.parametrize("restart_from", ["pristine", "random"])
def test_tags_restart_reinitialises_through_surgery_and_the_optimizer_forgets_the_old_moments(restart_from):
    net = toy("shared")
    built = {k: v.clone() for k, v in net.state_dict().items()}
    method = TAG(TAGConfig(num_groups=2, every=1, affinity_epochs=1, restart=True, restart_from=restart_from))
    trainer = Trainer(net, {t: Spec for t in TASKS}, Toy(), None, TrainConfig(epochs=2, batch_size=32, progress=False), method)
    optimizer = trainer.optimizer
    trainer.fit(1)  # stage 1, then the grouping and the restart
    assert method.grouped and trainer.optimizer is optimizer  # the same optimizer, carried
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(net.parameters())
    assert not any(p in optimizer.state for p in net.parameters())
    for n in net.tree.nodes:
        if n.depth:
            template = net.pristine(n.depth).state_dict()
            same = [torch.equal(v, template[k]) for k, v in net.node_module(n).state_dict().items()]
            assert all(same) if restart_from == "pristine" else not all(same), n
    for t in TASKS:
        assert torch.equal(net.heads[t].weight, built[f"heads.{t}.weight"]) == (restart_from == "pristine")


# ------------------------------------------------------------------ eval_mode
def test_eval_mode_restores_each_submodules_mode_also_on_an_exception():
    net = toy("shared")
    net.train()
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    bn.eval()  # the user froze it
    modes = {name: m.training for name, m in net.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert not bn.training


def test_a_frozen_batchnorm_in_a_head_stays_frozen_through_the_build():
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    head[1].eval()
    stats = head[1].running_mean.clone()
    net = toy("shared", heads={"a": head, "twin": nn.Linear(8, 2), "other": nn.Linear(8, 2)})
    assert net.training and not net.heads["a"][1].training
    assert torch.equal(net.heads["a"][1].running_mean, stats)


def test_a_frozen_batchnorm_stays_frozen_through_an_mtsl_similarity_pass_and_a_fuse():
    net = toy("separate")
    net.train()
    a, b, c = net.tree.at_depth(1)
    frozen = next(name for name, m in net.node_module(a).named_modules() if isinstance(m, nn.BatchNorm2d))
    net.node_module(a).get_submodule(frozen).eval()
    method = MTSL(MTSLConfig(similarity_samples=32))
    trainer = Trainer(net, {t: Spec for t in TASKS}, Toy(), None, TrainConfig(progress=False, eval_batch_size=16))
    method.similarity(trainer, 1, [a.id, b.id, c.id])
    assert not net.node_module(a).get_submodule(frozen).training
    assert sum(not m.training for m in net.modules()) == 1
    surgery.fuse(net, 1, [[a.id, b.id]], init="copy")  # the group takes its first member's modes
    (group,) = [n for n in net.tree.at_depth(1) if len(n.tasks) == 2]
    assert not net.node_module(group).get_submodule(frozen).training
    assert sum(not m.training for m in net.modules()) == 1


def test_a_frozen_batchnorm_stays_frozen_through_amalgamation_feature_mse_and_flop_counting():
    net = toy("separate")
    net.train()
    a = net.tree.at_depth(2)[0]
    frozen = next(name for name, m in net.node_module(a).named_modules() if isinstance(m, nn.BatchNorm2d))
    net.node_module(a).get_submodule(frozen).eval()
    members = [net.node_module(a)]
    group = init_group(members, "copy")
    amalgamation = Amalgamation(batches=lambda: [X], epochs=1)
    amalgamation(net, 2, a.parent, members, group)
    feature_mse(net, 2, a.parent, members, group, None, [X])
    count_flops(net, X)
    assert not net.node_module(a).get_submodule(frozen).training
    assert sum(not m.training for m in net.modules()) == 1


# ------------------------------------------------------------------ transactional rebuild
@pytest.mark.parametrize("bad", ["missing", "unknown", "other_depth"])
def test_a_bad_origin_raises_naming_the_entry_and_leaves_the_network_as_it_was(bad):
    net = toy("separate")
    tree, origin = net.tree.merge(1, [n.id for n in net.tree.at_depth(1)[:2]])
    victim = tree.at_depth(4)[0].id
    if bad == "missing":
        origin.pop(victim)
        message = f"no entry for node {victim}"
    elif bad == "unknown":
        origin[victim] = (999,)
        message = r"names \[999\]"
    else:
        origin[victim] = (net.tree.at_depth(1)[0].id,)
        message = "not nodes at depth 4"
    before_tree, modules = net.tree, {name: m for name, m in net.named_children()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(gs.TreeEditError, match=message):
        net.rebuild(tree, origin, init="mean")
    assert net.tree is before_tree and dict(net.named_children()) == modules
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    gs.check(net)
    with pytest.raises(gs.TreeEditError, match="depth 2"):
        net.rebuild(gs.TaskTree.shared(list(TASKS), 2), {})


# ------------------------------------------------------------------ static: only core edits
SLOT_WRITE = re.compile(r"setattr\([^)]*[\"']seg|\.level\([^)]*\)\[[^\]]*\]\s*=(?!=)")
RULES = {
    "writes a network slot": SLOT_WRITE,
    "fabricates a Segment": re.compile(r"\bSegment\("),
    "calls rebuild (use surgery.relayout)": re.compile(r"\.rebuild\("),
    "rewrites optimizer param groups": re.compile(r"\[[\"']params[\"']\]\s*=(?!=)"),
}


def test_no_module_outside_core_edits_network_slots_segments_or_optimizer_groups():
    files = [*(ROOT / "graphsurgeon").rglob("*.py"), *(ROOT / "methods").rglob("*.py")]
    # graphsurgeon/methods is the methods/ folder (a symlink): read it once, from methods/
    files = [p for p in files if p.relative_to(ROOT).parts[:2] not in {("graphsurgeon", "core"), ("graphsurgeon", "methods")}]
    assert any(p.name == "dmtg.py" for p in files) and any(p.name == "trainer.py" for p in files)
    offences = [
        f"{p.relative_to(ROOT)}:{i}: {why}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        for why, rule in RULES.items()
        if rule.search(line)
    ]
    assert not offences, "\n".join(offences)
    # and the rules do catch what they forbid
    assert SLOT_WRITE.search('setattr(net, f"seg{d}", level)') and SLOT_WRITE.search("net.level(d)[name] = m")
    assert not SLOT_WRITE.search("m = net.level(d)[name]")
