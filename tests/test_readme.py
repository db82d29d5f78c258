"""The README's usage example runs as written, and does what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

import torch

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
