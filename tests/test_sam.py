"""Sharpness-aware MTL (FS-MTL): flat minima on a toy, exact gradients and restored state on a network."""
import copy

import pytest
import torch
from test_gradient_training import TASKS, assert_same_grads, grads, make_net, make_trainer, one_backward
from test_mtsl import Spec
from torch import nn
from torch.utils.data import Dataset

import graphsurgeon as gs
from graphsurgeon.methods.aggregation.base import per_task_gradients, split_parameters
from graphsurgeon.methods.aggregation.registry import AGGREGATORS
from graphsurgeon.methods.base import Step
from graphsurgeon.methods.gradient_method import GradientMethod
from graphsurgeon.methods.sam import SharpnessAware
from graphsurgeon.training.trainer import TrainConfig, Trainer

# --------------------------------------------------------------------------- toy landscape
#
# A shared point (x, y) and two tasks whose losses are
#     L_t = s_t (1 + curvature(x) (y - o_t)^2 / 2 + 0.14 (x^2 - 1)^2),  curvature(x) = 3 exp(-1.5 x).
# The double well has minima near x = -1 and x = +1; the curvature across the valley is 13.4 at
# x = -1 (sharp) and 0.67 at x = +1 (flat). The tasks want different y (o = +-0.1), so at any
# compromise each task's gradient points across the valley, and SAM's per-task perturbation probes
# that curvature: the perturbed gradients push x toward the flat end, strongly enough to cross the
# barrier. Gradient descent from x = -0.3 slides into the nearer, sharp well. (In one dimension
# normalised SAM cannot do this: a point at distance rho past a sharp minimum is a stable fixed point
# of its update, so the toy needs the second, transverse direction.)


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([-0.3, 0.0]))

    def forward(self, x):
        return x * 0 + self.theta


def curvature(x):
    return 3 * torch.exp(-1.5 * x)


class Valley(nn.Module):
    def __init__(self, scale: float, offset: float) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, z):
        x, y = z[:, 0], z[:, 1]
        return self.scale * (1 + 0.5 * curvature(x) * (y - self.offset) ** 2 + 0.14 * (x**2 - 1) ** 2)


class Landscape:
    loss = staticmethod(lambda pred, target: pred.mean())
    metrics: dict = {}
    higher_is_better: dict = {}


class Steps(Dataset):
    """One epoch of ``n`` steps of a constant batch (the toy's losses ignore the input)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(2), {"a": torch.zeros(()), "b": torch.zeros(())}


def descend(method_for, steps: int = 150) -> torch.Tensor:
    net = gs.multitask(
        Point(), {"a": Valley(1.0, 0.1), "b": Valley(2.0, -0.1)}, sharing="shared", trunk="add", example_input=torch.zeros(2, 2)
    )
    method = method_for(net.tasks)
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.04, progress=False)
    Trainer(net, {"a": Landscape, "b": Landscape}, Steps(steps), None, cfg, method).fit()
    return net.seg1.n1.theta.detach()


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_sam_ends_in_the_flat_minimum_where_the_plain_method_ends_in_the_sharp_one(aggregator):
    # DWA's weights stay 1 within the first two epochs, so here it coincides with EW: still a
    # real run of its code path. Every other aggregator weighs the two tasks its own way.
    plain = descend(lambda tasks: GradientMethod(aggregator, tasks))
    flat = descend(lambda tasks: SharpnessAware(aggregator, tasks, rho=0.3))
    assert plain[0] < -0.8 and curvature(plain[0]) > 10  # the sharp well
    assert flat[0] > 0.8 and curvature(flat[0]) < 1  # the flat well
    assert abs(plain[1]) < 0.15 and abs(flat[1]) < 0.15  # both settled between the tasks' optima


# --------------------------------------------------------------------------- on a network


def sam_backward(sharing, method):
    trainer = make_trainer(make_net(sharing), method)
    trainer.method.on_start(trainer)
    batch = one_backward(trainer)
    return grads(trainer.net), trainer, batch


@pytest.mark.parametrize("aggregator", ["ew", "pcgrad", "mgda"])
def test_rho_zero_is_the_plain_gradient_method(aggregator):
    expected, *_ = sam_backward("branched", GradientMethod(aggregator, TASKS))
    got, *_ = sam_backward("branched", SharpnessAware(aggregator, TASKS, rho=0.0))
    # float32; loss weightings take one backward of the weighted sum, SAM sums per-task rows
    assert_same_grads(got, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("sharing", ["shared", "branched"])
def test_ew_gradients_are_each_tasks_gradient_at_its_perturbed_point(sharing):
    # With EW, agg({g_i}) + agg({h_i}) = sum_i g_i'. Recompute each g_i' on a copy perturbed by hand:
    # eps = rho g / ||g|| on the shared parameters and, separately, on the task's own parameters.
    rho = 0.05
    net0 = make_net(sharing)
    trainer = make_trainer(copy.deepcopy(net0), SharpnessAware("ew", TASKS, rho=rho))
    x, targets = one_backward(trainer)
    got = grads(trainer.net)

    shared, specific = split_parameters(net0)
    outputs = net0(x)
    losses = [Spec.loss(outputs[t], targets[t]) for t in TASKS]
    plain = per_task_gradients(losses, shared + specific)
    n = sum(p.numel() for p in shared)
    expected = {name: torch.zeros_like(p) for name, p in net0.named_parameters()}
    for task, g in zip(TASKS, plain):
        probe = copy.deepcopy(net0)
        p_shared, p_specific = split_parameters(probe)
        with torch.no_grad():
            for params, part in ((p_shared, g[:n]), (p_specific, g[n:])):
                eps = rho * part / part.norm()
                offset = 0
                for p in params:
                    p += eps[offset : offset + p.numel()].reshape(p.shape)
                    offset += p.numel()
        loss = Spec.loss(probe(x, tasks=[task])[task], targets[task])
        loss.backward()
        for name, p in probe.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad
    assert_same_grads(got, expected, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(got[k], v) for k, v in grads_plain(sharing).items())  # rho matters


def grads_plain(sharing):
    got, *_ = sam_backward(sharing, GradientMethod("ew", TASKS))
    return got


def test_perturbed_passes_leave_parameters_and_batchnorm_statistics_untouched():
    method = SharpnessAware("pcgrad", TASKS, rho=0.5)
    trainer = make_trainer(make_net("branched"), method)
    net = trainer.net
    x, targets = trainer.to_device(next(iter(trainer.loader(trainer.train_data, shuffle=False))))
    outputs = net(x)  # the step's own forward pass updates the running statistics once
    losses = method.task_losses(trainer, outputs, targets)
    extra = method.extra_loss(trainer, x, outputs)
    params = [p.detach().clone() for p in net.parameters()]
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    assert any("running_mean" in name for name in buffers)
    method.backward(trainer, Step(x, targets, outputs, losses, extra))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(torch.equal(b, buffers[name]) for name, b in net.named_buffers())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("aggregator", ["uw", "gradnorm"])
def test_learnable_weights_learn_from_the_loss_part_only(aggregator):
    # The flatness part is aggregated with the same weights but must not add a second update.
    plain, sam = GradientMethod(aggregator, TASKS), SharpnessAware(aggregator, TASKS, rho=0.05)
    for method in (plain, sam):
        trainer = make_trainer(make_net("shared"), method)
        one_backward(trainer)
    for p, q in zip(plain.parameters(), sam.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    torch.testing.assert_close(sam.aggregator.last_weights, plain.aggregator.last_weights)
    if aggregator == "gradnorm":  # the logged GradNorm loss is the loss part's too
        assert sam.aggregator.last_gradnorm_loss == pytest.approx(plain.aggregator.last_gradnorm_loss)


def test_sam_trains_separate_networks_with_plain_sam():
    # No shared parameters: every parameter takes its own task's SAM gradient, nothing is aggregated.
    method = SharpnessAware("mgda", TASKS, rho=0.05)
    trainer = make_trainer(make_net("separate"), method, epochs=1)
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    assert method.aggregator.last_weights is None  # MGDA was never consulted


def test_bad_settings_are_explained():
    with pytest.raises(gs.MethodError, match="drop rep_grad"):
        SharpnessAware("ew", TASKS, rho=0.05, rep_grad=True)
    for rho in (-0.1, float("nan"), "0.05"):
        with pytest.raises(gs.OptionError, match="rho must be"):
            SharpnessAware("ew", TASKS, rho=rho)
    with pytest.raises(gs.OptionError, match="unknown aggregator"):
        SharpnessAware("adam", TASKS, rho=0.05)


@pytest.mark.parametrize("make_method", [
    lambda: GradientMethod("pcgrad", TASKS), lambda: GradientMethod("nash_mtl", TASKS),
    lambda: SharpnessAware("ew", TASKS, rho=0.05), lambda: SharpnessAware("mgda", TASKS, rho=0.05),
], ids=["pcgrad", "nash_mtl", "sam-ew", "sam-mgda"])
def test_the_cpu_loop_of_backwards_gives_the_batched_backwards_gradients(monkeypatch, make_method):
    """On a CPU the methods take one backward per task (`batched_backward_pays`); every gradient
    they write stays the batched backward's, to 1e-6."""
    import graphsurgeon.methods.gradient_method as gradient_module
    import graphsurgeon.methods.sam as sam_module

    looped, *_ = sam_backward("branched", make_method())
    for module in (gradient_module, sam_module):
        monkeypatch.setattr(module, "batched_backward_pays", lambda device: True)
    batched, *_ = sam_backward("branched", make_method())
    assert_same_grads(looped, batched, rtol=1e-6, atol=1e-6)
