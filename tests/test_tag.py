"""TAG and IT-MTL: lookahead affinity, group selection, the grouped tree, the lookahead choice."""
import copy

import pytest
import torch
from test_mtsl import Spec, Toy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import graphsurgeon as gs
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.methods.aggregation.base import split_parameters
from graphsurgeon.methods.aggregation.pcgrad import PCGrad
from graphsurgeon.methods.base import Method, Step
from graphsurgeon.methods.structure.itmtl import ITMTL, select_candidate
from graphsurgeon.methods.structure.lookahead import affinity, lookahead_losses, optimizer_displacements
from graphsurgeon.methods.structure.partition import tag_groups
from graphsurgeon.methods.structure.tag import TAG, TAGConfig
from graphsurgeon.training.trainer import TrainConfig, Trainer


class Regression:
    loss = staticmethod(F.mse_loss)
    metrics = {}
    higher_is_better = {}


class TwinsAndRival(Dataset):
    """Tasks `a` and `b` have the same target; `c` has its negation (an adversarial task)."""

    def __init__(self, n=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.sin(self.x[:, :3].sum(1, keepdim=True)) + self.x[:, 3:4]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.y[i], "b": self.y[i], "c": -self.y[i]}


def rival_net(seed=0):
    """A hard-shared MLP whose three heads start equal, so only the targets tell the tasks apart."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    head = nn.Linear(16, 1)
    heads = {t: copy.deepcopy(head) for t in "abc"}
    return gs.multitask(mlp, heads, sharing="shared", example_input=torch.rand(2, 6))


def toy_shared_net(seed=0):
    torch.manual_seed(seed)
    heads = {t: nn.Linear(8, 2) for t in ("a", "twin", "other")}
    return gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing="shared", example_input=torch.rand(2, 1, 12, 12))


def trainer_for(net, method, epochs, data, spec, folder=None, lr=3e-3):
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr, progress=False, checkpoint_dir=folder)
    return Trainer(net, {t: spec for t in net.tasks}, data, None, cfg, method)


def one_step(trainer, batch):
    """The loop's step, stopping before optimizer.step() so that the gradients can be read."""
    x, targets = trainer.to_device(batch)
    outputs = trainer.net(x)
    losses = trainer.method.task_losses(trainer, outputs, targets)
    extra = trainer.method.extra_loss(trainer, x, outputs)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.method.backward(trainer, Step(x, targets, outputs, losses, extra))
    return x, targets, losses


def first_batch(data, n=32):
    items = [data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), {t: torch.stack([y[t] for _, y in items]) for t in items[0][1]}


# --- lookahead -------------------------------------------------------------------------------


def test_lookahead_matches_a_manual_step_and_restores_parameters_and_bn_buffers_exactly():
    net = toy_shared_net()
    net.train()
    x, targets = first_batch(Toy())
    shared, _ = split_parameters(net)
    params = copy.deepcopy({k: v.detach() for k, v in net.state_dict().items()})
    total = sum(p.numel() for p in shared)
    directions = torch.randn(3, total, generator=torch.Generator().manual_seed(0))
    directions[0] = 0

    def evaluate():
        out = net(x)
        return torch.stack([F.cross_entropy(out[t], targets[t]) for t in net.tasks])

    after = lookahead_losses(net, shared, directions, 0.05, evaluate)
    for k, v in net.state_dict().items():  # weights and BN running stats / counters untouched
        assert torch.equal(v, params[k]), k
    for k, (row, d) in enumerate(zip(after, directions)):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            offset = 0
            for p in split_parameters(moved)[0]:
                p -= 0.05 * d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        out = moved(x)
        expected = torch.stack([F.cross_entropy(out[t], targets[t]) for t in net.tasks])
        torch.testing.assert_close(row, expected.detach(), rtol=1e-5 if k else 0, atol=1e-6 if k else 0)
    assert not torch.allclose(after[1], after[0])

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lookahead_losses(net, shared, directions, 0.05, failing)
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_the_optimizers_own_update_is_adams_step_and_leaves_params_grads_and_state_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    shared = list(model[0].parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()  # some state to start from
    model(torch.randn(8, 4)).square().mean().backward()  # the training step's gradient, to be kept
    grads_before = [p.grad.clone() for p in model.parameters()]
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy({i: optimizer.state[p] for i, p in enumerate(model.parameters())})
    rows = torch.randn(2, sum(p.numel() for p in shared))
    moved = optimizer_displacements(optimizer, shared, rows)
    for p, g, w in zip(model.parameters(), grads_before, params_before):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), w)
    for i, p in enumerate(model.parameters()):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state_before[i].items())
    beta1, beta2 = optimizer.defaults["betas"]
    for row, got in zip(rows, moved):  # Adam's step 2 from the saved moments, by hand
        offset, expected = 0, []
        for i, p in enumerate(shared):
            g = row[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            m = beta1 * state_before[i]["exp_avg"] + (1 - beta1) * g
            v = beta2 * state_before[i]["exp_avg_sq"] + (1 - beta2) * g * g
            expected.append((1e-3 * (m / (1 - beta1**2)) / ((v / (1 - beta2**2)).sqrt() + 1e-8)).reshape(-1))
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-9)


def test_tag_looking_ahead_with_plain_sgd_as_optimizer_measures_the_same_affinity():
    affinities = []
    for lookahead in ("sgd", "optimizer"):
        net = rival_net()
        method = TAG(TAGConfig(every=1, affinity_epochs=1, lookahead=lookahead))
        cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, progress=False, optimizer="sgd", momentum=0.0)
        trainer = Trainer(net, {t: Regression for t in net.tasks}, TwinsAndRival(), None, cfg, method)
        method.on_start(trainer)
        one_step(trainer, first_batch(TwinsAndRival()))
        affinities.append(method.affinity_matrix())
    assert affinities[0].abs().min() > 1e-4  # a real signal, not two zero matrices
    torch.testing.assert_close(affinities[0], affinities[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(gs.OptionError, match="lookahead"):
        trainer_for(rival_net(), TAG(TAGConfig(lookahead="adam")), 1, TwinsAndRival(), Regression).fit()


def test_affinity_is_the_relative_loss_drop_with_the_right_sign_for_negative_losses():
    before = torch.tensor([2.0, -4.0, 0.0])
    after = torch.tensor([[1.0, -5.0, 0.3], [3.0, -2.0, 0.0]])
    torch.testing.assert_close(affinity(before, after), torch.tensor([[0.5, 0.25, 0.0], [-0.5, -0.5, 0.0]]))


# --- TAG ---------------------------------------------------------------------------------------


def test_identical_tasks_have_more_affinity_than_an_adversarial_one_and_tag_separates_them():
    net = rival_net()
    method = TAG(TAGConfig(num_groups=2, every=1, affinity_epochs=1, restart=False))
    trainer = trainer_for(net, method, 1, TwinsAndRival(), Regression, lr=1e-2)
    trainer.fit()
    decision = method.decisions[0]
    z = torch.tensor(decision["affinity"])
    assert decision["measurements"] == 4 and decision["tasks"] == ["a", "b", "c"]
    assert z[0, 1] > 0 and z[1, 0] > 0
    assert z[0, 1] > z[0, 2] and z[1, 0] > z[1, 2] and z[2, 0] < 0 and z[2, 1] < 0
    assert tag_groups(z.numpy(), 2).groups == ((0, 1), (2,))
    assert decision["groups"] == [["a", "b"], ["c"]]
    assert {n.tasks for n in net.tree.at_depth(1)} == {("a", "b"), ("c",)}
    gs.check(net)


@pytest.mark.parametrize("restart", [True, False])
def test_tag_end_to_end_builds_the_grouped_tree_and_keeps_training(restart):
    net = toy_shared_net()
    method = TAG(TAGConfig(num_groups=2, every=2, affinity_epochs=1, restart=restart))
    trainer = trainer_for(net, method, 3, Toy(), Spec)
    history = trainer.fit()
    decision = method.decisions[0]
    assert method.grouped and decision["epoch"] == 1 and decision["measurements"] == 2
    partition = {tuple(g) for g in decision["groups"]}
    assert sorted(t for g in partition for t in g) == sorted(net.tasks)
    for d in range(1, net.depth + 1):  # split at the input: one network per group
        assert {n.tasks for n in net.tree.at_depth(d)} == partition
    gs.check(net)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.parameters()}
    assert decision["parameters_after"] == sum(p.numel() for p in net.parameters())
    assert all(torch.isfinite(torch.tensor(list(h["train_loss"].values()))).all() for h in history)
    assert history[0]["tag"] is decision and history[-1]["tree"] == net.tree.partitions()


def test_tag_without_restart_starts_each_branch_as_the_shared_network_with_its_adam_state():
    net = toy_shared_net()
    method = TAG(TAGConfig(num_groups=3, every=1, affinity_epochs=2, split_depth=1, restart=False))
    trainer = trainer_for(net, method, 2, Toy(), Spec)
    trainer.fit(1)
    x, _ = first_batch(Toy())
    net.eval()
    before = {t: v.detach().clone() for t, v in net(x).items()}
    method.group(trainer)
    assert len(net.tree.at_depth(1)) == 1  # split_depth=1: the first segment stays shared
    assert len(net.tree.at_depth(2)) == len(method.decisions[0]["groups"]) > 1
    gs.check(net)
    for t, v in net(x).items():
        torch.testing.assert_close(v, before[t], rtol=0, atol=0)
    assert all(p in trainer.optimizer.state for p in net.parameters())


def test_tag_resumed_in_the_affinity_stage_matches_the_uninterrupted_run(tmp_path):
    config = TAGConfig(num_groups=2, every=1, affinity_epochs=2)
    straight = toy_shared_net()
    reference = TAG(config)
    trainer_for(straight, reference, 3, Toy(), Spec).fit()

    first = TAG(config)
    trainer_for(toy_shared_net(), first, 3, Toy(), Spec, folder=str(tmp_path)).fit(1)
    resumed_net, resumed = toy_shared_net(seed=5), TAG(config)
    trainer = trainer_for(resumed_net, resumed, 3, Toy(), Spec, folder=str(tmp_path))
    assert trainer.resume() and resumed.measurements == 3 and not resumed.grouped
    trainer.fit()
    assert resumed.decisions == reference.decisions
    assert resumed_net.tree == straight.tree
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed_net.state_dict().items()):
        assert torch.equal(a, b), k


def test_tag_rejects_a_network_without_shared_parameters_and_a_bad_split_depth():
    torch.manual_seed(0)
    heads = {t: nn.Linear(8, 2) for t in ("a", "twin", "other")}
    separate = gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing="separate", example_input=torch.rand(2, 1, 12, 12))
    with pytest.raises(gs.MethodError, match="hard-sharing"):
        trainer_for(separate, TAG(), 1, Toy(), Spec).fit()
    with pytest.raises(gs.OptionError, match="split_depth"):
        trainer_for(toy_shared_net(), TAG(TAGConfig(split_depth=99)), 1, Toy(), Spec).fit()


# --- IT-MTL -------------------------------------------------------------------------------------


def test_itmtl_with_the_sum_as_only_candidate_is_the_plain_step():
    plain_net = toy_shared_net()
    itmtl_net = copy.deepcopy(plain_net)
    trainer_for(plain_net, Method(), 2, Toy(), Spec).fit()
    method = ITMTL(3, candidates=["ew"])
    trainer_for(itmtl_net, method, 2, Toy(), Spec).fit()
    for (k, a), (_, b) in zip(plain_net.state_dict().items(), itmtl_net.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert method.chosen == {"ew": 6} and method.decisions[-1]["chosen"] == {"ew": 3}


def test_itmtl_total_criterion_takes_the_candidate_with_the_lowest_lookahead_total_loss():
    lr = 0.05  # at this step the sum wins on seed 0 and PCGrad on seeds 1 and 2
    data = TwinsAndRival()
    picked = set()
    for seed in range(3):
        net = rival_net(seed)
        method = ITMTL(3, candidates=("ew", "pcgrad"), lookahead_lr=lr, criterion="total")
        trainer = trainer_for(net, method, 1, data, Regression)
        reference = copy.deepcopy(net)
        x, targets, losses = one_step(trainer, first_batch(data))

        shared = split_parameters(reference)[0]
        out = reference(x)
        rows = [torch.autograd.grad(F.mse_loss(out[t], targets[t]), shared, retain_graph=True) for t in "abc"]
        grads = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
        loss_values = torch.stack([losses[t].detach() for t in "abc"])
        directions = [grads.sum(0), PCGrad(3).aggregate(grads, loss_values)]
        totals = []
        for d in directions:
            moved = copy.deepcopy(reference)
            with torch.no_grad():
                offset = 0
                for p in split_parameters(moved)[0]:
                    p -= lr * d[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
            totals.append(float(sum(F.mse_loss(v, targets[t]) for t, v in moved(x).items()).detach()))
        assert abs(totals[0] - totals[1]) > 1e-3
        assert method.last_lookahead == pytest.approx(totals, rel=1e-4)
        best = min(range(2), key=totals.__getitem__)
        assert method.choice == best and method.chosen[method.candidates[best]] == 1
        picked.add(best)
        got = torch.cat([p.grad.reshape(-1) for p in split_parameters(net)[0]])
        torch.testing.assert_close(got, directions[best], rtol=1e-4, atol=1e-6)
        for t in "abc":  # heads keep their own task's ordinary gradient
            (expected,) = torch.autograd.grad(F.mse_loss(out[t], targets[t]), reference.heads[t].weight, retain_graph=True)
            torch.testing.assert_close(net.heads[t].weight.grad, expected, rtol=1e-5, atol=1e-7)
    assert picked == {0, 1}


def test_itmtl_ranks_by_total_transference_so_a_high_loss_task_does_not_decide_alone():
    """Fifty et al. choose the step of highest total transference Σ_j 1 − L_j'/L_j: candidate A
    gains 1 % on a task of loss 100 but costs 50 % on a task of loss 1; B the reverse trade.
    The raw sum prefers A (100.5 < 101.3), the relative changes B."""
    before = torch.tensor([100.0, 1.0])
    after = torch.tensor([[99.0, 1.5], [100.8, 0.5]])
    assert select_candidate(before, after, "total") == 0
    assert select_candidate(before, after, "relative") == 1
    assert select_candidate(before, torch.tensor([[99.0, 0.0], [98.0, 0.0]]), "relative") == 1  # a zero loss is left out
    with pytest.raises(gs.OptionError, match="criterion"):
        ITMTL(3, criterion="sum")


def test_itmtl_chooses_by_relative_change_by_default(monkeypatch):
    import graphsurgeon.methods.structure.itmtl as itmtl

    factors = torch.tensor([[0.99, 1.5, 1.0], [1.008, 0.5, 1.0]])  # relative: 3.49 vs 2.508, B wins
    monkeypatch.setattr(itmtl, "lookahead_losses", lambda net, shared, d, lr, evaluate: evaluate()[None] * factors)
    method = ITMTL(3, candidates=("ew", "pcgrad"))
    one_step(trainer_for(rival_net(), method, 1, TwinsAndRival(), Regression), first_batch(TwinsAndRival()))
    assert method.criterion == "relative" and method.choice == 1


def test_itmtl_reuses_its_choice_between_choosing_steps_and_checks_its_options():
    method = ITMTL(3, candidates=("ew", "pcgrad"), every=4)
    trainer = trainer_for(toy_shared_net(), method, 1, Toy(), Spec)
    calls = []
    original = method.aggregators["pcgrad"].aggregate
    method.aggregators["pcgrad"].aggregate = lambda *a: calls.append(1) or original(*a)
    trainer.fit()
    assert sum(method.chosen.values()) == 3  # one choice at step 0, reused at steps 1 and 2
    assert method.chosen[method.candidates[method.choice]] == 3
    assert len(calls) == (3 if method.choice == 1 else 1)  # between choices only the chosen one aggregates
    with pytest.raises(gs.OptionError, match="not candidates"):
        ITMTL(3, candidates=("ew",), options={"cagrad": {"c": 0.4}})
    with pytest.raises(gs.OptionError, match="unknown aggregator"):
        ITMTL(3, candidates=("ew", "nope"))


@pytest.mark.parametrize(("second", "expected"), [(1.0 - 1e-8, 0), (0.99, 1)])
def test_itmtl_treats_rounding_level_differences_as_ties_won_by_the_first_candidate(monkeypatch, second, expected):
    import graphsurgeon.methods.structure.itmtl as itmtl

    monkeypatch.setattr(itmtl, "lookahead_losses", lambda *a: torch.tensor([[0.5, 0.5], [second / 2, second / 2]]))
    net = rival_net()
    method = ITMTL(3, candidates=("ew", "pcgrad"), criterion="total")  # the patched rows are raw totals
    one_step(trainer_for(net, method, 1, TwinsAndRival(), Regression), first_batch(TwinsAndRival()))
    assert method.choice == expected and method.last_lookahead == pytest.approx([1.0, second])
    # the same tie rule under the relative criterion
    before = torch.tensor([0.3, 2.0])
    rows = torch.stack([before, before * second])
    assert select_candidate(before, rows, "relative", tolerance=1e-6) == expected


def test_itmtl_hands_each_epochs_mean_losses_to_a_dwa_candidate():
    method = ITMTL(3, candidates=("dwa", "ew"))
    trainer = trainer_for(toy_shared_net(), method, 3, Toy(), Spec)
    means = []
    original = method.aggregators["dwa"].epoch_end
    method.aggregators["dwa"].epoch_end = lambda m: means.append(torch.as_tensor(m).clone()) or original(m)
    trainer.fit()
    assert len(means) == 3 and all(m.shape == (3,) and (m > 0).all() for m in means)
    dwa = method.aggregators["dwa"]
    torch.testing.assert_close(dwa.last_epoch_losses, means[-1].to(dwa.last_epoch_losses))
    assert not torch.allclose(dwa.current_weights(), torch.ones(3, dtype=torch.float64))  # no longer equal weights


def test_tag_affinity_of_a_vanishing_step_is_zero_even_with_dropout():
    # before and after are evaluated with the same dropout masks, so a step of ~0 changes nothing
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 16), nn.Tanh())
    net = gs.multitask(trunk, {t: nn.Linear(16, 1) for t in "abc"}, sharing="shared", example_input=torch.rand(2, 6))
    method = TAG(TAGConfig(num_groups=2, every=1, affinity_epochs=1, lookahead_lr=1e-12))
    trainer = trainer_for(net, method, 1, TwinsAndRival(), Regression)
    method.on_start(trainer)
    one_step(trainer, first_batch(TwinsAndRival()))
    assert method.measurements == 1
    torch.testing.assert_close(method.affinity_matrix(), torch.zeros(3, 3, dtype=torch.float64), atol=1e-6, rtol=0)
