"""The trainer's checkpoint folder: nothing in it runs code, and a checkpoint is one atomic unit.

A run folder may come from someone else (``--resume`` on a folder you were handed), so loading
it must execute nothing: a pickle where a state file belongs is refused, never unpickled. And
a save may die at any point (disk full, SIGKILL): whatever point that is, the folder still
holds a complete checkpoint, and resuming from it gives the run an uninterrupted fit gives.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_mtsl import Spec, Toy, toy_net

import graphsurgeon as gs
from graphsurgeon.errors import CheckpointError
from graphsurgeon.methods.base import Method
from graphsurgeon.training import run_folder
from graphsurgeon.training.trainer import TrainConfig, Trainer

EPOCHS = 2


def trainer(folder: Path, epochs: int = EPOCHS) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, progress=False, checkpoint_dir=str(folder), seed=5,
                      schedule="multistep", milestones=(1,), tensorboard=False)
    net = toy_net(7)
    return Trainer(net, {t: Spec for t in net.tasks}, Toy(64), None, cfg, Method())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """An uninterrupted run, and a folder checkpointed after its first epoch."""
    root = tmp_path_factory.mktemp("runs")
    straight = trainer(root / "straight")
    straight.fit()
    first = trainer(root / "first")
    first.fit(epochs=1)
    return {"state": {k: v.clone() for k, v in straight.net.state_dict().items()}, "history": straight.history,
            "first": root / "first", "straight": root / "straight"}


def copy_of_first(runs: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(runs["first"], folder, symlinks=True)
    return folder


def assert_resumes_to_the_uninterrupted_run(runs: dict, folder: Path) -> Trainer:
    resumed = trainer(folder)
    assert resumed.resume()
    resumed.fit()
    want, got = runs["state"], resumed.net.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in runs["history"]]
    return resumed


class Payload:
    """A pickle that creates ``marker`` when it is loaded (as ``torch.load(weights_only=False)`` would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---------------------------------------------------------------------------------- no pickle
def test_a_pickled_optimizer_file_of_the_old_format_is_refused_and_never_unpickled(tmp_path) -> None:
    """Before versioned checkpoints, ``optimizer.pt`` was loaded with ``weights_only=False``:
    a folder like this one ran the payload on ``resume``."""
    folder, marker = tmp_path / "run", tmp_path / "pwned"
    net = trainer(folder).net
    state = {"epoch": 1, "step": 2, "history": [], "method": {}}
    gs.save(net, folder / "model.safetensors", extra={"trainer": json.dumps(state)})
    torch.save({"optimizer": Payload(marker)}, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt.*older graphsurgeon.*fresh run"):
        trainer(folder).resume()
    assert not marker.exists()


@pytest.mark.parametrize("manifest", ["kept", "updated"])
def test_a_pickle_in_place_of_the_optimizer_file_is_refused_naming_it(runs, tmp_path, manifest: str) -> None:
    folder, marker = copy_of_first(runs, tmp_path), tmp_path / "pwned"
    version = run_folder.latest(folder)
    evil = pickle.dumps({"optimizer": Payload(marker)})
    (version / "optimizer.safetensors").write_bytes(evil)
    if manifest == "updated":  # the manifest agrees: the file itself must still be refused
        listing = json.loads((version / "manifest.json").read_text())
        listing["files"]["optimizer.safetensors"] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
        (version / "manifest.json").write_text(json.dumps(listing))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors") as info:
        trainer(folder).resume()
    assert str(version / "optimizer.safetensors") in str(info.value)
    assert not marker.exists()


def test_every_file_of_a_checkpoint_is_safetensors_or_json(runs) -> None:
    from safetensors import safe_open

    version = run_folder.latest(runs["first"])
    assert sorted(os.listdir(version)) == ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(str(version / name), framework="pt") as f:
            assert list(f.keys())
    for name in ("manifest.json", "state.json"):
        assert isinstance(json.loads((version / name).read_text()), dict)


def test_training_state_round_trips_exactly_through_json_and_tensors() -> None:
    import random

    import numpy as np

    state = {"numpy": np.random.get_state(), "python": random.getstate(), "rng": torch.get_rng_state(),
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, dtype=torch.bfloat16)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3, "foreach": None}]},
             "milestones": collections.Counter({1: 1, 3: 2}), "nan": float("nan"), "big": 2**80}
    tensors: dict = {}
    back = run_folder.decode(json.loads(json.dumps(run_folder.encode(state, tensors))), tensors, "test")
    assert back["python"] == state["python"] and isinstance(back["python"], tuple)
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["rng"], state["rng"]) and back["milestones"] == state["milestones"]
    assert back["milestones"][7] == 0  # still a Counter: MultiStepLR looks up epochs that are not milestones
    inner, want = back["optimizer"]["state"][0], state["optimizer"]["state"][0]
    assert torch.equal(inner["exp_avg"], want["exp_avg"]) and inner["exp_avg"].dtype == torch.bfloat16
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["big"] == 2**80 and back["nan"] != back["nan"]
    with pytest.raises(CheckpointError, match=r"cannot checkpoint object at 'x.y' without pickle"):
        run_folder.encode({"x": {"y": object()}}, {})


# ---------------------------------------------------------------------------------- atomicity
class Killed(BaseException):
    """The process dying mid-save: nothing after this point runs (no clean-up either)."""


def _faults() -> list[tuple[str, int, str]]:
    writes = len(run_folder.FILES) + 2  # the files, the manifest, then LATEST
    points = [("write", k, how) for k in range(writes) for how in ("nothing", "half", "killed")]
    fsyncs = len(run_folder.FILES) + 1 + 2 + 2  # the files and manifest, the staging folder, the folder, LATEST, the folder
    return [*points, *(("fsync", k, "error") for k in range(fsyncs)), ("rename", 0, "error"), ("replace", 0, "error")]


@pytest.mark.parametrize(("where", "k", "how"), _faults(), ids=[f"{w}{k}-{h}" for w, k, h in _faults()])
def test_a_save_dying_at_any_point_keeps_a_checkpoint_that_resumes_exactly(runs, tmp_path, monkeypatch, where, k, how) -> None:
    folder = copy_of_first(runs, tmp_path)
    calls = {"n": 0}

    def fail() -> BaseException:
        return Killed() if how == "killed" else OSError(errno.ENOSPC, "No space left on device")

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] - 1 == k

    real_write, real = run_folder._write_all, {"fsync": os.fsync, "rename": os.rename, "replace": os.replace}

    def write_all(fd: int, data: bytes) -> None:
        if due():
            real_write(fd, data[: len(data) // 2] if how in ("half", "killed") else b"")
            raise fail()
        real_write(fd, data)

    def wrapped(*args):
        if due():
            raise fail()
        return real[where](*args)

    interrupted = trainer(folder)
    assert interrupted.resume() and interrupted.epoch == 1
    if where == "write":
        monkeypatch.setattr(run_folder, "_write_all", write_all)
    else:
        monkeypatch.setattr(run_folder.os, where, wrapped)
    with pytest.raises(Killed if how == "killed" else CheckpointError) as info:
        interrupted.fit()
    monkeypatch.undo()
    assert calls["n"] > k, "the fault was never reached"
    if how != "killed":
        assert "No space left on device" in str(info.value) and "is kept" in str(info.value)
        assert not [n for n in os.listdir(folder) if n.startswith(".")]  # an error cleans up after itself
    switched = where == "fsync" and k == 7  # LATEST was replaced; only its folder's fsync failed
    assert run_folder.latest(folder).name == ("v000002" if switched else "v000001")
    assert run_folder.read_state(folder)["epoch"] == (2 if switched else 1)
    resumed = assert_resumes_to_the_uninterrupted_run(runs, folder)
    assert resumed.config.checkpoint_dir == str(folder)
    leftovers = sorted(n for n in os.listdir(folder) if n.startswith(".") or n.startswith("v"))
    if switched:  # the run was complete: resuming saved nothing, so the old version waits for the next save
        assert leftovers == ["v000001", "v000002"]
    else:
        assert leftovers == [run_folder.latest(folder).name]  # the dead save's temporaries are gone


def test_orphan_temporaries_and_unreferenced_versions_are_removed_on_the_next_save(runs, tmp_path) -> None:
    folder = copy_of_first(runs, tmp_path)
    (folder / ".tmp-dead").mkdir()
    (folder / ".tmp-dead" / "model.safetensors").write_bytes(b"half")
    (folder / ".LATEST-dead").write_text("v000009\n")
    (folder / "v000009").mkdir()  # renamed into place, but LATEST never switched to it
    (folder / ".metrics.csv.dead.tmp").write_text("epoch\n")  # write_csv's temporary
    (folder / "notes.txt").write_text("mine")  # not the checkpoint's: left alone
    assert run_folder.latest(folder).name == "v000001"
    assert_resumes_to_the_uninterrupted_run(runs, folder)
    assert sorted(os.listdir(folder)) == ["LATEST", "metrics.csv", "notes.txt", run_folder.latest(folder).name]


def test_a_symlink_planted_at_a_temporary_or_pointer_path_is_never_followed(runs, tmp_path, monkeypatch) -> None:
    folder = copy_of_first(runs, tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text("precious")
    (folder / ".optimizer.pt.tmp").symlink_to(victim)  # the fixed temporaries of the old format
    (folder / ".metrics.csv.tmp").symlink_to(victim)
    (folder / "v000002").symlink_to(victim_dir)  # the next version's name
    resumed = trainer(folder)
    assert resumed.resume()
    # a race: the staging folder is found and filled with links before the files are written
    real_mkdtemp = run_folder.tempfile.mkdtemp

    def raced_mkdtemp(*args, **kwargs):
        staging = real_mkdtemp(*args, **kwargs)
        for name in run_folder.FILES:
            os.symlink(victim, os.path.join(staging, name))
        return staging

    monkeypatch.setattr(run_folder.tempfile, "mkdtemp", raced_mkdtemp)
    with pytest.raises(CheckpointError, match="File exists"):
        resumed.fit()
    monkeypatch.undo()
    assert victim.read_text() == "precious" and (victim_dir / "keep").read_text() == "precious"
    (folder / "LATEST").unlink()
    (folder / "LATEST").symlink_to(victim)  # os.replace swaps the link itself
    (folder / "v000001").rename(folder / "v000003")
    with pytest.raises(CheckpointError, match="LATEST.*cannot be read"):  # a link is not a pointer: O_NOFOLLOW
        trainer(folder).resume()
    (folder / "LATEST").unlink()
    (folder / "LATEST").write_text("v000003\n")
    (folder / "LATEST.bak").symlink_to(victim)
    assert_resumes_to_the_uninterrupted_run(runs, folder)
    assert victim.read_text() == "precious" and (victim_dir / "keep").read_text() == "precious"
    assert not (folder / "LATEST").is_symlink() and run_folder.latest(folder).name == "v000004"


# ---------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
@pytest.mark.parametrize("damage", ["truncated", "flipped", "swapped", "missing"])
def test_a_damaged_or_swapped_file_is_a_checkpoint_error_naming_it(runs, tmp_path, name: str, damage: str) -> None:
    folder = copy_of_first(runs, tmp_path)
    path = run_folder.latest(folder) / name
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-1])
    elif damage == "flipped":  # in the tensor data / the JSON, past any header
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
    elif damage == "swapped":  # the same file of a later checkpoint of the run: a mismatched pair
        shutil.copy(run_folder.latest(runs["straight"]) / name, path)
        assert path.read_bytes() != data
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=r"Resume from an intact copy|fresh run") as info:
        trainer(folder).resume()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("pointer", ["../../etc", "v1", "", "v000001/../..", "\xff", "v000007", "v000008"])
def test_a_pointer_that_names_no_version_is_refused(runs, tmp_path, pointer: str) -> None:
    folder = copy_of_first(runs, tmp_path)
    (folder / "v000008").symlink_to(run_folder.latest(folder))  # a version elsewhere is not followed
    (folder / "LATEST").write_bytes(pointer.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"LATEST"):
        trainer(folder).resume()


def test_best_weights_and_metrics_are_kept_next_to_the_checkpoints(tmp_path) -> None:
    folder = tmp_path / "run"
    torch.manual_seed(0)
    net = toy_net(7)
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False, checkpoint_dir=str(folder), tensorboard=False, restore_best=True)
    Trainer(net, {t: Spec for t in net.tasks}, Toy(64), Toy(32, 1), cfg, Method()).fit()
    assert sorted(os.listdir(folder)) == ["LATEST", "best.safetensors", "metrics.csv", "v000002"]
    assert len((folder / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize(("key", "value"), [("epoch", "1"), ("history", {}), ("method", None), ("step", True), ("epoch_sums", [])])
def test_a_trainer_state_of_the_wrong_shape_is_refused_even_with_a_matching_manifest(runs, tmp_path, key: str, value) -> None:
    folder = copy_of_first(runs, tmp_path)
    version = run_folder.latest(folder)
    document = json.loads((version / "state.json").read_text())
    document["trainer"][key] = value
    data = json.dumps(document).encode()
    (version / "state.json").write_bytes(data)
    listing = json.loads((version / "manifest.json").read_text())
    listing["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (version / "manifest.json").write_text(json.dumps(listing))
    with pytest.raises(CheckpointError, match=rf"lacks \[{key!r}\] or holds them with the wrong type"):
        trainer(folder).resume()
