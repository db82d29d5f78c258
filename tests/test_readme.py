"""The README's usage example runs as written, and does what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import graphsurgeon as gs
from graphsurgeon.training import run_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_round_trips(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)  # the example saves net.safetensors in the working directory
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    net, net2, x = scope["net"].eval(), scope["net2"].eval(), scope["x"]
    assert (tmp_path / "net.safetensors").is_file()
    assert isinstance(scope["program"], torch.export.ExportedProgram)
    with torch.no_grad():
        expected, loaded = net(x), net2(x)
        exported = scope["program"].module()(x)
        scripted = scope["script"](x)
    assert set(expected) == {"age", "gender", "attrs"}
    for task, value in expected.items():
        assert torch.equal(loaded[task], value), task
        torch.testing.assert_close(exported[task], value)
        torch.testing.assert_close(scripted[task], value)
    assert not any(p is q for p, q in zip(net.parameters(), net2.parameters()))


def test_readme_fit_example_trains_and_keeps_the_best_epoch(tmp_path, monkeypatch):
    """The "Your model, your data, MTSL" block: MTSL on a user's backbone and Dataset via gs.fit."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "gs.fit(" in b]
    assert len(blocks) == 1, "README.md should have one ```python block that calls gs.fit"
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint folder runs/mine
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    trainer = scope["trainer"]
    assert [r["epoch"] for r in trainer.history] == [1, 2]
    gs.check(trainer.net)  # whatever MTSL decided, the network is a valid one
    folder = tmp_path / "runs" / "mine"
    assert (folder / "best.safetensors").is_file() and (run_folder.latest(folder) / "model.safetensors").is_file()
    assert len((folder / "metrics.csv").read_text().splitlines()) == 3
    assert trainer.best_record["monitor"] == trainer.best_record["val"]["top"]["accuracy"]
