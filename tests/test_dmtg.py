"""DMTG on the engine: temperature schedule, Gumbel weights, weighted task losses, pruning to a
TaskTree (outputs kept, invariants, export), and search → prune → fine-tune in the one Trainer."""
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_mtsl import Spec, Toy
from torch import nn
from torch.nn import functional as F

import graphsurgeon as gs
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.core.network import MultiTaskNetwork, reinitialise
from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig, Supernet, group_weights, prune, temperature
from graphsurgeon.training.trainer import TrainConfig, Trainer

TASKS = ("a", "twin", "other")


def plain_net(seed=0):
    torch.manual_seed(seed)
    heads = {t: nn.Linear(8, 2) for t in TASKS}
    return gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing="shared", example_input=torch.rand(2, 1, 12, 12))


def distinct_supernet(branches=3, shared_depth=0, seed=0):
    """A supernet whose branches and heads all differ (they start as copies, training makes them differ)."""
    sup = Supernet.from_network(plain_net(seed), branches, shared_depth)
    torch.manual_seed(seed + 1)
    for d in range(1, sup.branches.depth + 1):
        for module in sup.branches.level(d).values():
            reinitialise(module)
    for heads in sup.branches.heads.values():
        for head in heads.values():
            reinitialise(head)
    return sup


def trainer_for(method, epochs, net=None, checkpoint_dir=None, weight_decay=0.0):
    cfg = TrainConfig(
        epochs=epochs, batch_size=32, lr=3e-3, progress=False, checkpoint_dir=checkpoint_dir, weight_decay=weight_decay
    )
    return Trainer(net or plain_net(), {t: Spec for t in TASKS}, Toy(), Toy(n=64, seed=1), cfg, method)


def test_temperature_anneals_exponentially_from_start_to_end_over_the_search():
    cfg = DMTGConfig(search_epochs=2, tau_start=4.0, tau_end=0.25)
    assert temperature(cfg, 0.0) == pytest.approx(4.0)
    assert temperature(cfg, 0.5) == pytest.approx(1.0)  # geometric mean of 4 and 0.25
    assert temperature(cfg, 1.0) == pytest.approx(0.25)
    assert temperature(cfg, 3.0) == pytest.approx(0.25)  # held after the search
    assert temperature(DMTGConfig(tau_start=2.5, tau_end=2.5), 0.7) == pytest.approx(2.5)  # the official constant
    official = DMTGConfig(tau_schedule="constant", tau_start=2.5, logits_lr=None)  # CelebA: constant 2.5, one Adam lr
    assert [temperature(official, p) for p in (0.0, 0.5, 1.0)] == [2.5, 2.5, 2.5]
    with pytest.raises(gs.TaskSpecError, match="tau_schedule"):
        DMTGConfig(tau_schedule="linear")  # type: ignore[arg-type]
    # in the trainer: tau_start at the first step, tau_end at the search's last step
    method = DMTG(cfg)
    trainer = trainer_for(method, epochs=3)
    method.on_start(trainer)
    steps = 2 * (96 // 32)
    trainer.step = 0
    assert method.tau(trainer) == pytest.approx(4.0)
    trainer.step = steps - 1
    assert method.tau(trainer) == pytest.approx(0.25)
    trainer.step = (steps - 1) / 2
    assert method.tau(trainer) == pytest.approx(1.0)


def test_group_weights_are_gumbel_softmax_draws_in_training_and_the_argmax_in_eval():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    torch.manual_seed(5)
    w = group_weights(logits, tau=0.7)
    torch.manual_seed(5)
    gumbel = -torch.empty_like(logits).exponential_().log()
    assert torch.allclose(w, F.softmax((logits + gumbel) / 0.7, -1))
    assert torch.allclose(w.sum(-1), torch.ones(2)) and (w > 0).all()
    hard = group_weights(logits, tau=0.7, hard=True)
    assert set(hard.flatten().tolist()) <= {0.0, 1.0} and torch.equal(hard.sum(-1), torch.ones(2))
    assert torch.equal(group_weights(logits, tau=0.7, training=False), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    # a cold temperature concentrates the draws on the most probable branch
    torch.manual_seed(0)
    cold = torch.stack([group_weights(torch.tensor([[3.0, 0.0]]), tau=0.05) for _ in range(200)])
    assert (cold.max(-1).values > 0.99).float().mean() > 0.9 and cold[..., 0].mean() > 0.9


def test_task_loss_is_the_gumbel_weighted_sum_of_the_task_heads_losses_on_every_branch():
    sup = distinct_supernet(branches=3)
    with torch.no_grad():
        sup.group_logits.copy_(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, -1.0]]))
    method = DMTG(DMTGConfig(branches=3, tau_start=2.0, tau_end=2.0))
    method._search_steps = 10
    trainer = SimpleNamespace(net=sup, tasks={t: Spec for t in TASKS}, step=0)
    x, targets = Toy(n=16).x, {t: torch.randint(0, 2, (16,)) for t in TASKS}
    sup.train()
    outputs = sup(x)
    assert all(len(outputs[t]) == 3 for t in TASKS)
    torch.manual_seed(11)
    losses = method.task_losses(trainer, outputs, targets)
    torch.manual_seed(11)
    w = F.gumbel_softmax(sup.group_logits.detach(), tau=2.0)
    for i, t in enumerate(TASKS):
        by_hand = sum(w[i, k] * F.cross_entropy(sup.branches(x)[f"branch{k}"][t], targets[t]) for k in range(3))
        assert torch.allclose(losses[t], by_hand, atol=1e-6), t
    sum(losses.values()).backward()
    assert sup.group_logits.grad is not None and sup.group_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("shared_depth", [0, 2])
def test_pruning_keeps_each_tasks_argmax_branch_and_head_and_drops_empty_branches(shared_depth):
    sup = distinct_supernet(branches=3, shared_depth=shared_depth)
    with torch.no_grad():  # a, twin -> branch 2; other -> branch 0; branch 1 empty
        sup.group_logits.copy_(torch.tensor([[0.0, 0.0, 5.0], [0.0, 1.0, 2.0], [4.0, 0.0, 1.0]]))
    assert sup.assignment() == {"a": 2, "twin": 2, "other": 0}
    pruned = prune(sup)
    depth = pruned.depth
    groups = [["a", "twin"], ["other"]]
    expected = gs.TaskTree.from_partitions(TASKS, [[list(TASKS)]] * shared_depth + [groups] * (depth - shared_depth))
    assert pruned.tree.same_structure(expected)
    gs.check(pruned)
    sup.eval(), pruned.eval()
    x = torch.rand(5, 1, 12, 12)
    got, chosen, branches = pruned(x), sup(x), sup.branches(x)
    for t, k in {"a": 2, "twin": 2, "other": 0}.items():
        assert torch.equal(got[t], chosen[t])
        assert torch.equal(got[t], branches[f"branch{k}"][t])
    assert not torch.allclose(branches["branch1"]["a"], got["a"])  # the branches really differ
    exported = gs.to_export(pruned, x).module()(x)
    flat = gs.materialise(pruned)(x)
    for t in TASKS:
        assert torch.allclose(exported[t], got[t], atol=1e-6) and torch.allclose(flat[t], got[t], atol=1e-6)


def test_all_tasks_on_one_branch_prune_to_hard_sharing_and_bad_assignments_are_refused():
    sup = distinct_supernet(branches=2)
    pruned = prune(sup, {"a": 1, "twin": 1, "other": 1})
    assert pruned.tree.same_structure(gs.TaskTree.shared(TASKS, pruned.depth))
    with pytest.raises(gs.TaskSpecError, match="assignment"):
        prune(sup, {"a": 0, "twin": 2, "other": 0})
    with pytest.raises(gs.TaskSpecError, match="assignment"):
        prune(sup, {"a": 0})


def test_the_supernet_is_an_engine_network_of_branches_with_k_by_n_heads():
    sup = Supernet.from_network(plain_net(), branches=2, shared_depth=1)
    gs.check(sup.branches)
    assert [len(sup.tree.at_depth(d)) for d in range(1, sup.tree.depth + 1)] == [1, 2, 2, 2, 2]
    names = {n for n, _ in sup.named_parameters()}
    assert {"group_logits", "branches.heads.branch1.other.weight"} <= names
    assert torch.equal(sup.group_logits.detach(), torch.ones(3, 2))  # the official init (eps = 0)
    sup.eval()
    assert set(sup(torch.rand(2, 1, 12, 12))) == set(TASKS)


def test_search_prune_finetune_in_the_trainer():
    method = DMTG(DMTGConfig(branches=2, search_epochs=2, logits_lr=0.05))
    trainer = trainer_for(method, epochs=3, weight_decay=1e-4)  # the weights decay, the logits must not
    seen = {}
    original = method.after_epoch

    def spy(tr):  # inspect the search's optimizer before it is replaced
        if tr.epoch == 1:
            groups = tr.optimizer.param_groups
            seen["logits_group"] = [
                (g["lr"], g["weight_decay"]) for g in groups if any(p is tr.net.group_logits for p in g["params"])
            ]
            seen["search_params"] = {id(p) for g in groups for p in g["params"]} == {id(p) for p in tr.net.parameters()}
        return original(tr)

    method.after_epoch = spy
    history = trainer.fit()
    assert seen == {"logits_group": [(0.05, 0.0)], "search_params": True}
    assert all(math.isfinite(v) for r in history for v in r["train_loss"].values())
    assert [("dmtg" in r) for r in history] == [True, True, False]
    assert set(history[0]["dmtg"]["probabilities"]) == set(TASKS)
    net = trainer.net
    assert isinstance(net, MultiTaskNetwork) and method.pruned and len(method.decisions) == 1
    gs.check(net)
    assert [list(n.tasks) for n in net.tree.at_depth(net.depth)] == method.decisions[0]["groups"]
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.parameters()}
    assert set(history[-1]["val"]) == set(TASKS)


def test_resume_after_pruning_rebuilds_the_pruned_network(tmp_path):
    first = trainer_for(DMTG(DMTGConfig(branches=3, search_epochs=1)), epochs=2, checkpoint_dir=str(tmp_path))
    first.fit()
    method = DMTG(DMTGConfig(branches=3, search_epochs=1))
    again = trainer_for(method, epochs=3, checkpoint_dir=str(tmp_path))
    assert again.resume()
    assert method.pruned and method.decisions == first.method.decisions
    assert again.net.tree == first.net.tree
    for (name, p), q in zip(again.net.state_dict().items(), first.net.state_dict().values()):
        assert torch.equal(p, q), name
    again.fit()
    assert again.epoch == 3 and not isinstance(again.net, Supernet) and again.net.tree == first.net.tree


def test_resume_from_a_checkpoint_taken_during_the_search_is_refused(tmp_path):
    trainer_for(DMTG(DMTGConfig(search_epochs=2)), epochs=3, checkpoint_dir=str(tmp_path)).fit(epochs=1)
    again = trainer_for(DMTG(DMTGConfig(search_epochs=2)), epochs=3, checkpoint_dir=str(tmp_path))
    with pytest.raises(gs.CheckpointError, match="tasks \\['branch0'"):
        again.resume()


def test_a_search_longer_than_training_is_refused():
    trainer = trainer_for(DMTG(DMTGConfig(search_epochs=4)), epochs=3)
    with pytest.raises(gs.TaskSpecError, match="search_epochs"):
        trainer.fit()


@pytest.mark.slow
def test_recovery_benchmark_recovers_multimnist_groups_for_one_seed(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dmtg_recovery.py"
    spec = importlib.util.spec_from_file_location("dmtg_recovery", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = SimpleNamespace(
        branches=2, train_size=3000, val_size=200, search_epochs=4, finetune_epochs=1, tau_start=4.0, tau_end=0.5,
        logits_lr=0.05, lr=2e-3, batch_size=64, widths=[8, 16, 32, 32],
    )
    result = bench.run_seed(0, args)
    assert result["recovered"] and result["export_equals_eager"]
