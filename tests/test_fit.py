"""`gs.fit` is the public training API: a user's backbone and `Dataset`, any method, the
optimizer/schedule/precision settings, best-on-validation selection and exact resumes.

Everything the library is given here is defined in this file (no package model or data), so
these tests are what a user's code does.
"""
from __future__ import annotations

import csv
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import graphsurgeon as gs
from graphsurgeon.core.checkpoint import load_weights
from graphsurgeon.methods.gradient_method import GradientMethod
from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig
from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig

SETTINGS = {"optimizer": "adamw", "weight_decay": 1e-2, "schedule": "cosine", "autocast": "bf16",
            "grad_clip": 5.0, "batch_size": 16, "lr": 1e-2, "progress": False}


class Backbone(nn.Module):
    """A user's model: two conv blocks and a classifier (which `multitask` cuts off)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


class Quadrants(Dataset):
    """Is the top half brighter than average? The left half? (two learnable binary tasks)"""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.top = (self.x[:, 0, :4].mean((1, 2)) > 0).long()
        self.left = (self.x[:, 0, :, :4].mean((1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"top": self.top[i], "left": self.left[i]}


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (pred.argmax(1) == target).float().mean().item()


def network(sharing: str = "separate", seed: int = 0) -> gs.MultiTaskNetwork:
    torch.manual_seed(seed)
    tasks = {t: gs.Task(lambda shape: nn.Linear(shape[0], 2), F.cross_entropy, {"accuracy": accuracy}, {"accuracy": True})
             for t in ("top", "left")}
    return gs.multitask(Backbone(), tasks, sharing=sharing, example_input=torch.randn(2, 1, 8, 8))


def mtsl() -> MTSL:
    return MTSL(MTSLConfig(task_phases=(1, 1), distill_epochs=(1, 1), threshold=0.0, similarity_samples=32))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def best_weights(trainer: gs.Trainer) -> gs.MultiTaskNetwork:
    """A copy of the trained network with ``best.safetensors`` loaded into it."""
    import copy

    net = copy.deepcopy(trainer.net)
    load_weights(net, trainer.best_path)
    return net


@pytest.mark.parametrize(
    "make_method, sharing, monitor",
    [
        (mtsl, "separate", "val_loss"),
        (lambda: GradientMethod("pcgrad", ("top", "left")), "shared", "top/accuracy"),
        (lambda: DMTG(DMTGConfig(branches=2, search_epochs=1, logits_lr=0.05)), "shared", "left/loss"),
    ],
    ids=["mtsl", "hps-pcgrad", "dmtg"],
)
def test_methods_train_through_fit_and_restore_the_best_epoch(tmp_path, make_method, sharing, monitor):
    trainer = gs.fit(network(sharing), Quadrants(64, 0), DataLoader(Quadrants(48, 1)), method=make_method(),
                     epochs=3, monitor=monitor, restore_best=True, checkpoint_dir=str(tmp_path), **SETTINGS)
    history = trainer.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    lrs = [r["lr"] for r in history]
    # cosine over 3 epochs, stepped per epoch: one curve also across DMTG's new optimizer after pruning
    assert lrs == pytest.approx([1e-2, 7.5e-3, 2.5e-3])
    # the best epoch is the extreme of the epochs with the final structure (weights of an
    # earlier structure could not be loaded into this network)
    final = [r for r in history if r["tree"] == history[-1]["tree"]]
    pick = max if monitor.endswith("accuracy") else min
    best = trainer.best_record
    assert best is pick(final, key=lambda r: r["monitor"])
    if monitor == "val_loss":
        assert best["monitor"] == sum(best["val"][t]["loss"] for t in ("top", "left")) / 2
    else:
        task, metric = monitor.split("/")
        assert best["monitor"] == best["val"][task][metric]
    assert_same_weights(trainer.net, best_weights(trainer))  # restored = what best.safetensors holds
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[-1]["monitor"]) == history[-1]["monitor"]


def test_best_epoch_is_the_extreme_of_the_history_and_restoring_changes_the_weights(tmp_path):
    """Without a structural method every epoch competes; the last epoch is not the best here
    (a large learning rate makes the loss jump), so restoring really loads other weights."""
    cfg = {**SETTINGS, "lr": 0.5, "schedule": "none", "epochs": 4, "checkpoint_dir": str(tmp_path)}
    last = gs.fit(network("shared"), Quadrants(64, 0), Quadrants(48, 1), **cfg)
    values = [r["monitor"] for r in last.history]
    assert last.best_record["monitor"] == min(values)
    assert last.best_record is not last.history[-1], "pick a setting whose last epoch is not the best"
    restored = gs.fit(network("shared"), Quadrants(64, 0), Quadrants(48, 1), **{**cfg, "checkpoint_dir": str(tmp_path / "b")},
                      restore_best=True)
    assert [r["monitor"] for r in restored.history] == values  # same run
    assert_same_weights(restored.net, best_weights(restored))
    assert not all(torch.equal(a, b) for a, b in zip(restored.net.state_dict().values(), last.net.state_dict().values()))
    # without a checkpoint folder the best weights are kept in memory
    memory = gs.fit(network("shared"), Quadrants(64, 0), Quadrants(48, 1), **{**cfg, "checkpoint_dir": None},
                    restore_best=True)
    assert_same_weights(memory.net, restored.net)


class StopAfter(gs.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch, self.ends = epoch, 0

    def on_epoch_end(self, trainer: gs.Trainer, record: dict) -> None:
        if record["epoch"] == self.epoch:
            trainer.request_stop()

    def on_fit_end(self, trainer: gs.Trainer) -> None:
        self.ends += 1


@pytest.mark.parametrize("make_method", [lambda: GradientMethod("pcgrad", ("top", "left")), mtsl], ids=["pcgrad", "mtsl"])
def test_resume_after_a_stop_matches_the_uninterrupted_run(tmp_path, make_method):
    cfg = {**SETTINGS, "schedule": "step", "step_size": 1, "gamma": 0.5, "epochs": 3}
    sharing = "shared" if make_method is not mtsl else "separate"
    straight = gs.fit(network(sharing), Quadrants(64, 0), Quadrants(32, 1), method=make_method(),
                      checkpoint_dir=str(tmp_path / "a"), **cfg)

    stop = StopAfter(1)
    with pytest.raises(KeyboardInterrupt):
        gs.fit(network(sharing), Quadrants(64, 0), Quadrants(32, 1), method=make_method(),
               checkpoint_dir=str(tmp_path / "b"), callbacks=[stop], **cfg)
    assert stop.ends == 0  # a stopped fit has not ended
    torch.manual_seed(123)  # the resume restores every RNG itself
    start = network(sharing, seed=9)  # other weights: the checkpoint's must be the ones that count
    if make_method is mtsl:
        # MTSL's group nodes copy the pristine templates (group_init="pristine"), an input of the
        # run like the backbone's weights: the same backbone, every node's weights re-drawn
        start = network(sharing)
        gs.surgery.reinitialise(start, [n.id for n in start.tree.nodes if n.depth], from_="random")
    resumed = gs.fit(start, Quadrants(64, 0), Quadrants(32, 1), method=make_method(),
                     checkpoint_dir=str(tmp_path / "b"), resume=True, **cfg)

    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history] == [1e-2, 5e-3, 2.5e-3]
    assert resumed.net.tree == straight.net.tree
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    if make_method is mtsl:  # on another backbone's templates the resume would build other group nodes
        with pytest.raises(gs.CheckpointError, match="pristine segment weights"):
            gs.fit(network(sharing, seed=9), Quadrants(64, 0), Quadrants(32, 1), method=make_method(),
                   checkpoint_dir=str(tmp_path / "b"), resume=True, **cfg)


def test_sgd_callable_factories_and_one_log_line_per_epoch(caplog):
    made = {}

    def optimizer(groups, lr, weight_decay):
        made["optimizer"] = torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
        return made["optimizer"]

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (epoch + 1))

    with caplog.at_level(logging.INFO, logger="graphsurgeon"):
        trainer = gs.fit(network("shared"), Quadrants(32, 0), epochs=2, batch_size=16, progress=False, lr=0.1,
                         optimizer=optimizer, schedule=schedule)
    assert trainer.optimizer is made["optimizer"]
    assert [r["lr"] for r in trainer.history] == [0.1, 0.05]
    lines = [r.getMessage() for r in caplog.records if r.name == "graphsurgeon"]
    assert len(lines) == 2 and lines[1].startswith("rank 0 epoch 2/2 train_loss=")
    sgd = gs.fit(network("shared"), Quadrants(32, 0), epochs=1, progress=False, optimizer="sgd", momentum=0.5)
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.optimizer.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optimizer", "adagrad", r"TrainConfig.optimizer='adagrad' is not valid; use one of \['adam', 'adamw', 'sgd'\]"),
        ("schedule", "linear", r"TrainConfig.schedule='linear' is not valid; use one of \['none', 'step'"),
        ("autocast", "fp8", r"TrainConfig.autocast='fp8' is not valid; use None or one of \['bf16', 'fp16'\]"),
        ("grad_clip", 0, r"TrainConfig.grad_clip=0 is not valid; use a finite number > 0"),
        ("grad_clip", float("nan"), r"TrainConfig.grad_clip=nan"),
        ("weight_decay", -1e-4, r"TrainConfig.weight_decay=-0.0001 is not valid; use a finite number >= 0"),
        ("momentum", "0.9", r"TrainConfig.momentum='0.9' is not valid"),
        ("gamma", 0.0, r"TrainConfig.gamma=0.0 is not valid; use a finite number > 0"),
        ("lr", 0, r"TrainConfig.lr=0 is not valid"),
        ("epochs", 0, r"TrainConfig.epochs=0 is not valid; use a positive int"),
        ("monitor", "accuracy", r"TrainConfig.monitor='accuracy' is not valid; use 'val_loss' or 'task/metric'"),
        ("monitor", "top/f1", r"TrainConfig.monitor='top/f1' is not valid; use one of \['val_loss', 'top/loss', 'top/accuracy'"),
        ("callbacks", [print], r"TrainConfig.callbacks=<built-in function print> is not valid; use instances of graphsurgeon.training.Callback"),
        ("callbacks", gs.Callback(), r"TrainConfig.callbacks=<.*> is not valid; use a list of graphsurgeon.training.Callback"),
        ("restore_best", "yes", r"TrainConfig.restore_best='yes' is not valid; use True or False"),
        ("tensorboard", "yes", r"TrainConfig.tensorboard='yes' is not valid"),
        ("tensorboard", True, r"TrainConfig.tensorboard=True is not valid; use False, or set checkpoint_dir"),
        ("restore_best", True, r"restore_best=True needs validation data"),
        ("steps", 3, r"fit\(\) got unknown setting\(s\) \['steps'\]"),
        ("resume", True, r"fit\(resume=True\) needs checkpoint_dir"),
    ],
)
def test_bad_settings_name_the_field_and_a_valid_value(field, value, message):
    with pytest.raises(gs.ConfigError, match=message):
        gs.fit(network("shared"), Quadrants(16, 0), progress=False, **{field: value})


def test_schedule_parameters_are_checked_for_their_schedule():
    for settings, message in [
        ({"schedule": "step"}, r"TrainConfig.step_size=None is not valid; use a positive int, e.g. step_size=10"),
        ({"schedule": "multistep", "milestones": (3, 2)}, r"TrainConfig.milestones=\(3, 2\) is not valid; use increasing"),
        ({"schedule": "multistep"}, r"TrainConfig.milestones=\(\) is not valid"),
    ]:
        with pytest.raises(gs.ConfigError, match=message):
            gs.fit(network("shared"), Quadrants(16, 0), progress=False, **settings)


def test_tasks_without_a_loss_and_a_missing_tensorboard_are_explained(tmp_path):
    net = gs.multitask(Backbone(), {"top": nn.Linear(8, 2), "left": nn.Linear(8, 2)})
    with pytest.raises(gs.ConfigError, match=r"task 'top' has no loss; give it one .*graphsurgeon.Task\(head, loss="):
        gs.fit(net, Quadrants(16, 0), progress=False)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(gs.ConfigError, match="tensorboard=True needs the tensorboard package"):
            gs.fit(network("shared"), Quadrants(16, 0), progress=False, tensorboard=True, checkpoint_dir=str(tmp_path))
    else:
        gs.fit(network("shared"), Quadrants(16, 0), epochs=1, progress=False, tensorboard=True, checkpoint_dir=str(tmp_path))
        assert any((tmp_path / "tensorboard").iterdir())


def test_grad_clip_bounds_every_step_and_multistep_decays_at_its_milestones():
    def moved(**settings) -> float:
        net = network("shared")
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        trainer = gs.fit(net, Quadrants(32, 0), epochs=3, batch_size=16, progress=False, optimizer="sgd", momentum=0.0,
                         lr=1.0, schedule="multistep", milestones=(1, 2), gamma=0.5, **settings)
        assert [r["lr"] for r in trainer.history] == [1.0, 0.5, 0.25]
        return float((torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm())

    # SGD without momentum moves by lr * (clipped gradient) per step: 2 steps at each lr
    assert moved(grad_clip=1e-3) <= 2 * (1.0 + 0.5 + 0.25) * 1e-3 * (1 + 1e-4)
    assert moved() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling runs on CUDA")
def test_fp16_on_cuda_scales_the_loss_for_plain_training_and_refuses_own_gradients():
    trainer = gs.fit(network("shared"), Quadrants(32, 0), Quadrants(16, 1), epochs=1, progress=False, device="cuda",
                     autocast="fp16")
    assert trainer._scaler is not None and torch.isfinite(torch.tensor(trainer.history[-1]["val_loss"]))
    with pytest.raises(gs.ConfigError, match="autocast='fp16' on CUDA scales the losses"):
        gs.fit(network("shared"), Quadrants(32, 0), progress=False, device="cuda", autocast="fp16",
               method=GradientMethod("pcgrad", ("top", "left")))


def test_tensorboard_scalars_when_the_package_is_there(tmp_path, monkeypatch):
    """The optional dependency is imported in one place; a stand-in module shows what is written."""
    import sys
    import types

    written: list[tuple[str, float, int]] = []

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, key: str, value: float, step: int) -> None:
            written.append((key, value, step))

        def flush(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    trainer = gs.fit(network("shared"), Quadrants(32, 0), Quadrants(16, 1), epochs=2, progress=False,
                     checkpoint_dir=str(tmp_path))  # tensorboard=None: written because it is installed
    assert trainer._tensorboard.log_dir == str(tmp_path / "tensorboard")
    for record in trainer.history:
        scalars = {k: v for k, v, step in written if step == record["epoch"]}
        assert scalars["val/top/accuracy"] == record["val"]["top"]["accuracy"] and scalars["lr"] == record["lr"]
    off = gs.fit(network("shared"), Quadrants(32, 0), epochs=1, progress=False, checkpoint_dir=str(tmp_path / "off"),
                 tensorboard=False)
    assert off._tensorboard is None and len(written) == 2 * len(scalars)


# ---------------------------------------------------------------- the step's host syncs, non-finite losses, signals
def test_fit_with_a_progress_bar_emits_no_user_warning(tmp_path):
    """The progress bar's loss used to be ``float`` of a loss that requires grad: a UserWarning
    every ten steps of every demo run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in (None, GradientMethod("pcgrad", ("top", "left"))):
            gs.fit(network("shared"), Quadrants(96, 0), Quadrants(16, 1), method=method, epochs=2, batch_size=4,
                   progress=True, checkpoint_dir=str(tmp_path / str(method)))
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


HOST_SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.mark.parametrize("log_every", [1, 5, 64])
def test_the_loop_synchronises_with_the_host_once_per_logging_interval(monkeypatch, log_every):
    """Every way a floating-point tensor reaches the host is counted during one epoch of 16
    steps: one per ``log_every`` steps (the loss sums, the progress bar and the non-finite check
    share it). The data order's int64 indices are drawn on the host and are not counted."""
    trainer = gs.Trainer(network("shared"), None, Quadrants(64, 0), None,
                         gs.TrainConfig(batch_size=4, optimizer="sgd", progress=False, log_every=log_every))
    calls: list[str] = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if self.is_floating_point():  # not the sampler's int64 indices, which live on the host
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    losses = trainer.train_epoch()
    monkeypatch.undo()
    assert trainer._epoch_batches == 16
    assert len(calls) == -(-16 // log_every), calls
    assert set(losses) == {"top", "left"} and all(0 < v < 5 for v in losses.values())


def test_the_logged_losses_are_the_step_losses_summed_as_before():
    """Deferring the sync changes no number: the epoch's losses are the float64 means of the
    steps' losses, however many steps an interval holds."""
    seen: list[float] = []

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(pred, target)
        seen.append(value.item())
        return value

    tasks = {t: gs.Task(None, loss) for t in ("top", "left")}
    trainer = gs.Trainer(network("shared"), tasks, Quadrants(64, 0), None,
                         gs.TrainConfig(batch_size=4, progress=False, log_every=3))
    losses = trainer.train_epoch()
    total = 0.0
    for v in seen[0::2]:  # the losses are computed task by task, "top" first
        total += v
    assert losses["top"] == total / 16


def test_nan_inputs_raise_a_non_finite_loss_error_naming_the_tasks_and_the_step(tmp_path):
    data = Quadrants(32, 0)
    data.x[:] = float("nan")
    with pytest.raises(gs.NonFiniteLossError, match=r"'top', 'left' became non-finite .*epoch 1, step 1 \(batch 1") as error:
        gs.fit(network("shared"), data, epochs=2, batch_size=4, progress=False, checkpoint_dir=str(tmp_path))
    assert "no checkpoint of this run was written" in str(error.value)
    assert not (tmp_path / "model.safetensors").exists()  # the NaN weights were not saved


def test_one_task_turning_non_finite_mid_interval_is_named_with_its_step(tmp_path):
    """The check runs at the interval's sync (step 10 here), and still names step 7 of epoch 2."""
    calls = {"n": 0}

    def left_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = F.cross_entropy(pred, target)
        return value * float("inf") if calls["n"] == 16 + 7 else value  # 16 steps an epoch

    tasks = {"top": gs.Task(None, F.cross_entropy), "left": gs.Task(None, left_loss)}
    with pytest.raises(gs.NonFiniteLossError, match=r"the loss of 'left' became non-finite \(left=inf\) at epoch 2, step 23 "
                                                    r"\(batch 7 of the epoch\).*last checkpoint \(epoch 1, step 16\)"):
        gs.fit(network("shared"), Quadrants(64, 0), tasks=tasks, epochs=3, batch_size=4, progress=False, log_every=10,
               checkpoint_dir=str(tmp_path))


class SignalAt(gs.Callback):
    """Sends the process ``signal`` at the end of ``epoch`` (during the loop's epoch-end work)."""

    def __init__(self, epoch: int, signum: int) -> None:
        self.epoch, self.signum, self.ends = epoch, signum, 0

    def on_epoch_end(self, trainer: gs.Trainer, record: dict) -> None:
        import os

        if record["epoch"] == self.epoch:
            os.kill(os.getpid(), self.signum)

    def on_fit_end(self, trainer: gs.Trainer) -> None:
        self.ends += 1


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_last_epoch_stops_with_a_checkpoint(tmp_path, signame):
    import signal

    stop = SignalAt(2, getattr(signal, signame))
    with pytest.raises(KeyboardInterrupt, match="stopped at epoch 2"):
        gs.fit(network("shared"), Quadrants(32, 0), epochs=2, batch_size=16, progress=False,
               checkpoint_dir=str(tmp_path), callbacks=[stop])
    assert stop.ends == 0  # it stopped: the fit did not end normally
    resumed = gs.Trainer(network("shared"), None, Quadrants(32, 0), None,
                         gs.TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint_dir=str(tmp_path)))
    assert resumed.resume() and (resumed.epoch, resumed.step) == (2, 4)


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_second_ctrl_c_says_what_happened_and_where_the_checkpoint_is(tmp_path, epoch):
    import os
    import signal

    calls = {"n": 0}

    def top_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2 * (epoch - 1) + 2:  # the 2nd step of ``epoch`` (2 steps an epoch)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C ...
            os.kill(os.getpid(), signal.SIGINT)  # ... and again, impatiently, within the step
        return F.cross_entropy(pred, target)

    tasks = {"top": gs.Task(None, top_loss), "left": gs.Task(None, F.cross_entropy)}
    with pytest.raises(KeyboardInterrupt) as stop:
        gs.fit(network("shared"), Quadrants(32, 0), tasks=tasks, epochs=3, batch_size=16, progress=False,
               checkpoint_dir=str(tmp_path))
    message = str(stop.value)
    assert message.startswith(f"a second SIGINT stopped training at once (in epoch {epoch}, after step {2 * epoch - 1})")
    if epoch == 1:
        assert "this run wrote no checkpoint yet" in message
        assert not (tmp_path / "model.safetensors").exists()
    else:
        assert f"the last checkpoint, in {tmp_path}, is from epoch 1, step 2: rerun with --resume" in message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers were restored
