"""GradientMethod on a real MultiTaskNetwork through the Trainer: what each parameter's gradient is."""
import json

import pytest
import torch
from test_mtsl import Spec, Toy
from torch import nn
from torch.utils.data import Subset

import graphsurgeon as gs
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.core.tree import TaskTree
from graphsurgeon.methods.aggregation.base import split_parameters
from graphsurgeon.methods.aggregation.registry import AGGREGATORS
from graphsurgeon.methods.base import Method, Step
from graphsurgeon.methods.gradient_method import GradientMethod
from graphsurgeon.training.trainer import TrainConfig, Trainer

TASKS = ("a", "twin", "other")


def make_net(sharing="shared", seed=0):
    """Hard sharing, a tree branching at depth 3 ({a, twin} | {other}), or separate networks."""
    torch.manual_seed(seed)
    depth = 5  # small_resnet: stem + 4 stages
    tree = {
        "shared": TaskTree.shared(TASKS, depth),
        "branched": TaskTree.branched(TASKS, depth, [["a", "twin"], ["other"]], split_at=3),
        "separate": TaskTree.separate(TASKS, depth),
    }[sharing]
    heads = {t: nn.Linear(8, 2) for t in TASKS}
    return gs.multitask(small_resnet(1, (4, 8, 8, 8)), heads, sharing=tree, example_input=torch.rand(2, 1, 12, 12))


def make_trainer(net, method, epochs=1, samples=16):
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, progress=False)
    return Trainer(net, {t: Spec for t in TASKS}, Subset(Toy(), range(samples)), None, cfg, method)


def one_backward(trainer):
    """The loop body of `Trainer.train_epoch` up to the optimizer step, on a fixed batch."""
    x, targets = trainer.to_device(next(iter(trainer.loader(trainer.train_data, shuffle=False))))
    outputs = trainer.net(x)
    losses = trainer.method.task_losses(trainer, outputs, targets)
    extra = trainer.method.extra_loss(trainer, x, outputs)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.method.backward(trainer, Step(x, targets, outputs, losses, extra))
    return x, targets


def grads(net):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}


def assert_same_grads(got, expected, **tol):
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] is None) == (expected[name] is None), name
        if expected[name] is not None:
            torch.testing.assert_close(got[name], expected[name], msg=name, **tol)


def backward_grads(sharing, method):
    trainer = make_trainer(make_net(sharing), method)
    trainer.method.on_start(trainer)
    one_backward(trainer)
    return grads(trainer.net), trainer


@pytest.mark.parametrize("sharing", ["shared", "branched", "separate"])
def test_ew_gives_the_gradient_of_the_summed_loss(sharing):
    expected, _ = backward_grads(sharing, Method())
    got, _ = backward_grads(sharing, GradientMethod("ew", TASKS))
    assert_same_grads(got, expected)


def test_ew_training_step_matches_the_default_method():
    nets = []
    for method in (Method(), GradientMethod("ew", TASKS)):
        trainer = make_trainer(make_net("branched"), method, samples=8)  # one step
        trainer.fit()
        nets.append(trainer.net)
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, msg=name)


def _task_params(net, task):
    """Parameters of the nodes serving only ``task``, and its head."""
    params = [p for n in net.tree.path(task)[1:] if len(n.tasks) == 1 for p in net.node_module(n).parameters()]
    return params + list(net.heads[task].parameters())


@pytest.mark.parametrize("aggregator", ["pcgrad", "mgda"])
def test_task_specific_parameters_get_exactly_their_tasks_gradient(aggregator):
    trainer = make_trainer(make_net("branched"), GradientMethod(aggregator, TASKS))
    x, targets = one_backward(trainer)
    net = trainer.net
    shared, specific = split_parameters(net)
    assert specific and shared
    outputs = net(x)
    for task in TASKS:
        own = [p for p in specific if any(p is q for q in _task_params(net, task))]
        loss = Spec.loss(outputs[task], targets[task])
        for p, g in zip(own, torch.autograd.grad(loss, own, retain_graph=True)):
            torch.testing.assert_close(p.grad, g)
    # the shared parameters follow the aggregator: not the plain sum of the gradients
    total = sum(Spec.loss(outputs[t], targets[t]) for t in TASKS)
    plain = torch.autograd.grad(total, shared)
    assert any(not torch.allclose(p.grad, g) for p, g in zip(shared, plain))


@pytest.mark.parametrize("aggregator", ["mgda", "uw", "dwa", "ew"])
def test_shared_gradient_is_the_aggregated_direction(aggregator):
    # loss weightings (uw, dwa, ew) take one backward of the weighted loss: the same direction
    from graphsurgeon.methods.aggregation.base import per_task_gradients

    method = GradientMethod(aggregator, TASKS)
    if aggregator == "dwa":  # weights other than 1 need two finished epochs
        method.aggregator.epoch_end([1.0, 2.0, 3.0][: len(TASKS)])
        method.aggregator.epoch_end([0.5, 1.9, 3.0][: len(TASKS)])
    trainer = make_trainer(make_net("branched"), method)
    x, targets = one_backward(trainer)
    shared, _ = split_parameters(trainer.net)
    outputs = trainer.net(x)
    rows = per_task_gradients([Spec.loss(outputs[t], targets[t]) for t in TASKS], shared)
    direction = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(direction, method.aggregator.last_weights.float() @ rows)
    if aggregator == "mgda":
        assert method.aggregator.last_weights.sum().item() == pytest.approx(1.0)  # convex
    elif aggregator == "dwa":
        assert not torch.allclose(method.aggregator.last_weights, torch.ones_like(method.aggregator.last_weights))


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_every_aggregator_trains_a_branched_network(aggregator):
    net = make_net("branched")
    before = [p.detach().clone() for p in net.parameters()]
    method = GradientMethod(aggregator, TASKS)
    trainer = make_trainer(net, method, epochs=2)
    history = trainer.fit()
    after = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    weights = history[-1]["grad_weights"]
    assert set(weights) == set(TASKS) and all(map(lambda w: w == w, weights.values()))


@pytest.mark.parametrize("sharing", ["shared", "branched"])
@pytest.mark.parametrize("aggregator", ["ew", "uw"])
def test_rep_grad_equals_parameter_gradient_for_linear_weightings(sharing, aggregator):
    # Weights that do not look at the gradients give sum_t w_t g_t, and back-propagation is linear.
    expected, _ = backward_grads(sharing, GradientMethod(aggregator, TASKS))
    got, _ = backward_grads(sharing, GradientMethod(aggregator, TASKS, rep_grad=True))
    assert_same_grads(got, expected, rtol=1e-4, atol=1e-6)


def test_rep_grad_aggregates_the_representation_gradient():
    # MGDA on the representation gives different weights than MGDA on the parameters
    method = GradientMethod("mgda", TASKS, rep_grad=True)
    _, trainer = backward_grads("branched", method)
    assert method.aggregator.last_weights.sum().item() == pytest.approx(1.0)
    assert all(torch.isfinite(p.grad).all() for p in trainer.net.parameters() if p.grad is not None)
    trainer.fit()  # the hook keeps capturing through the loop; evaluation passes are not captured
    assert method._rep is None


def test_rep_grad_needs_a_node_shared_by_all_tasks():
    trainer = make_trainer(make_net("separate"), GradientMethod("ew", TASKS, rep_grad=True))
    with pytest.raises(gs.MethodError, match="shared by all tasks"):
        trainer.fit()


@pytest.mark.parametrize("aggregator, attribute", [("uw", "log_vars"), ("gradnorm", "weights")])
def test_learnable_aggregator_weights_are_optimised(aggregator, attribute):
    method = GradientMethod(aggregator, TASKS)
    trainer = make_trainer(make_net("shared"), method, epochs=2)
    weights = getattr(method.aggregator, attribute)
    assert any(weights is p for group in trainer.optimizer.param_groups for p in group["params"])
    trainer.config.weight_decay = 0.1
    decay = {id(p): g["weight_decay"] for g in trainer.make_optimizer().param_groups for p in g["params"]}
    assert decay[id(weights)] == 0.0 and all(decay[id(p)] == 0.1 for p in trainer.net.parameters())
    trainer.config.weight_decay = 0.0
    start = weights.detach().clone()
    trainer.fit()
    assert not torch.equal(weights.detach(), start)
    # the state survives the JSON checkpoint metadata
    state = json.loads(json.dumps(method.state_dict()))
    fresh = GradientMethod(aggregator, TASKS)
    fresh.load_state_dict(state)
    torch.testing.assert_close(getattr(fresh.aggregator, attribute), weights)


def test_dwa_gets_each_tasks_mean_training_loss_per_epoch():
    method = GradientMethod("dwa", TASKS)
    trainer = make_trainer(make_net("shared"), method, epochs=2)
    history = trainer.fit()
    for saved, epoch in ((method.aggregator.previous_epoch_losses, 0), (method.aggregator.last_epoch_losses, 1)):
        expected = torch.tensor([history[epoch]["train_loss"][t] for t in TASKS], dtype=torch.float64)
        torch.testing.assert_close(saved, expected)
    trainer.fit(3)  # the third epoch used the loss ratios of the first two
    ratios = history[1]["train_loss"], history[0]["train_loss"]
    r = torch.tensor([ratios[0][t] / ratios[1][t] for t in TASKS], dtype=torch.float64)
    expected = 3 * torch.softmax(r / 2.0, 0)
    weights = torch.tensor([history[2]["grad_weights"][t] for t in TASKS], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)


class WithExtra(GradientMethod):
    """An extra loss 0.5 * ||w||^2 on the first shared weight: its gradient is w itself."""

    def extra_loss(self, trainer, x, outputs):
        return 0.5 * (next(trainer.net.parameters()) ** 2).sum()


@pytest.mark.parametrize("rep_grad", [False, True])
def test_extra_loss_gradient_is_added_on_top(rep_grad):
    plain, _ = backward_grads("shared", GradientMethod("pcgrad", TASKS, rep_grad=rep_grad))
    got, trainer = backward_grads("shared", WithExtra("pcgrad", TASKS, rep_grad=rep_grad))
    first = next(iter(got))
    torch.testing.assert_close(got[first] - plain[first], next(trainer.net.parameters()).detach())
    assert_same_grads({k: v for k, v in got.items() if k != first}, {k: v for k, v in plain.items() if k != first})


def test_bad_names_and_mismatched_tasks_are_explained():
    with pytest.raises(gs.OptionError, match="unknown aggregator 'sgd'; use one of"):
        GradientMethod("sgd", TASKS)
    with pytest.raises(gs.OptionError, match="valid options: c"):
        GradientMethod("cagrad", TASKS, alpha=1.0)
    with pytest.raises(gs.TaskSpecError, match="net.tasks"):
        GradientMethod("ew", "abc")
    trainer = make_trainer(make_net("shared"), GradientMethod("ew", ("a", "other")))
    with pytest.raises(gs.TaskSpecError, match="pass tasks=net.tasks"):
        trainer.fit()

