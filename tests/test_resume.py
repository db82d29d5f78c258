"""Checkpoint + resume across a structural edit reproduces the uninterrupted run."""
import os
import signal

import pytest
import torch
from test_mtsl import Spec, Toy, toy_net

from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig
from graphsurgeon.training.trainer import TrainConfig, Trainer


def mtsl():
    return MTSL(MTSLConfig(task_phases=(1, 1), distill_epochs=(1, 1), threshold=0.0, similarity_samples=64))


def trainer(net, method, folder, epochs):
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, progress=False, checkpoint_dir=str(folder), seed=5)
    return Trainer(net, {t: Spec for t in net.tasks}, Toy(), None, cfg, method)


def test_resume_after_a_structural_edit_matches_the_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    straight = trainer(toy_net(7), mtsl(), tmp_path / "a", epochs=3)
    straight.fit()

    torch.manual_seed(0)
    first = trainer(toy_net(7), mtsl(), tmp_path / "b", epochs=3)
    first.fit(epochs=1)  # stops right after the first structural phase (depth 1 merged)
    assert len(first.net.tree.at_depth(1)) == 1

    torch.manual_seed(123)  # resuming must restore the RNG state itself
    resumed = trainer(toy_net(7), mtsl(), tmp_path / "b", epochs=3)
    assert len(resumed.net.tree.at_depth(1)) == 3  # fresh separate network before resume
    assert resumed.resume()
    assert resumed.net.tree == first.net.tree and resumed.epoch == 1
    resumed.fit()

    assert resumed.net.tree == straight.net.tree
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sigterm_mid_epoch_after_a_structural_edit_resumes_exactly(tmp_path):
    """The signal lands in the middle of epoch 2: the checkpoint holds the position in the
    epoch, and resuming replays the same order from there (no batch trained twice or skipped)."""
    torch.manual_seed(0)
    straight = trainer(toy_net(7), mtsl(), tmp_path / "a", epochs=3)
    straight.fit()

    torch.manual_seed(0)
    method = mtsl()
    original = method.extra_loss

    def extra_loss(tr, x, outputs):  # as a scheduler would, during step 5 (the 2nd batch of epoch 2)
        if tr.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(tr, x, outputs)

    method.extra_loss = extra_loss
    first = trainer(toy_net(7), method, tmp_path / "b", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert (first.epoch, first.step) == (1, 5) and len(first.net.tree.at_depth(1)) == 1

    torch.manual_seed(123)
    resumed = trainer(toy_net(7), mtsl(), tmp_path / "b", epochs=3)
    assert resumed.resume()
    assert (resumed.epoch, resumed.step) == (1, 5)
    resumed.fit()
    assert resumed.net.tree == straight.net.tree and resumed.step == straight.step
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for ours, theirs in zip(resumed.history, straight.history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"])
