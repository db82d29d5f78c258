"""Every method the CLI offers trains end to end on a sliver of the embedded data.

`graphsurgeon train --method ...` is the user's entry point to every method; each run here
must finish, write its results and leave a valid tree (invariants checked on the network).
"""
from __future__ import annotations

import json

import pytest

from graphsurgeon.__main__ import main
from graphsurgeon.apps.experiment import ExperimentConfig, make_method
from graphsurgeon.errors import TaskSpecError

# small validation and test splits (and one corruption): evaluation, not training, would
# otherwise dominate these runs (1,000 validation samples per epoch, 2,000 test samples x 10)
TINY = ["--tasks", "left,right,left_parity", "--train-size", "96", "--val-size", "32", "--test-size", "32",
        "--corruptions", "contrast", "--epochs", "2", "--batch-size", "32", "--schedule-scale", "0.1", "--no-progress"]


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "single"],
        ["--method", "separate"],
        ["--method", "hps"],
        ["--method", "hps", "--grad", "cagrad", "--grad-option", "c=0.4"],
        ["--method", "hps", "--grad", "mgda", "--rep-grad"],
        ["--method", "hps", "--grad", "pcgrad", "--sam", "0.05"],
        ["--method", "hps", "--grad", "pcgrad", "--optimizer", "adamw", "--weight-decay", "1e-4", "--schedule", "cosine",
         "--autocast", "bf16", "--grad-clip", "1", "--monitor", "left/accuracy"],
        ["--method", "mtsl"],
        ["--method", "tag", "--search-epochs", "1"],
        ["--method", "itmtl"],
        ["--method", "dmtg", "--search-epochs", "1"],
    ],
    ids=lambda a: "-".join(x.lstrip("-") for x in a[1:]),
)
def test_every_method_trains_from_the_command_line(tmp_path, args):
    assert main(["train", *args, *TINY, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test"]) == {"left", "right", "left_parity"}
    assert all(m["loss"] == m["loss"] for m in results["test"].values())  # not NaN
    partitions = results["tree_partitions"]
    assert len(partitions) == 5 and all(sorted(t for b in p for t in b) == ["left", "left_parity", "right"] for p in partitions)
    assert (tmp_path / "model.pt2").is_file()
    assert (tmp_path / "tree.txt").read_text().strip() == results["tree"].strip()
    assert set(results["corrupted"]) == {"contrast@1", "contrast@3", "contrast@5"}
    assert (tmp_path / "checkpoint" / "best.safetensors").is_file() and results["best_epoch"] in (1, 2)
    assert len((tmp_path / "checkpoint" / "metrics.csv").read_text().splitlines()) == 1 + 2  # header, 2 epochs
    train = results["config"]["train"]
    for flag, key in [("--optimizer", "optimizer"), ("--schedule", "schedule"), ("--autocast", "autocast"), ("--monitor", "monitor")]:
        if flag in args:
            assert train[key] == args[args.index(flag) + 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--monitor", "left/f1"], "TrainConfig.monitor='left/f1' is not valid; use one of ['val_loss', 'left/loss', 'left/accuracy'"),
        (["--schedule", "step"], "TrainConfig.step_size=None is not valid; use a positive int"),
        (["--grad-clip", "-1"], "TrainConfig.grad_clip=-1.0 is not valid"),
    ],
)
def test_bad_training_settings_are_explained(capsys, args, message):
    assert main(["train", "--method", "hps", *args, *TINY]) == 2
    assert message in capsys.readouterr().err


def test_gradient_options_belong_to_the_methods_that_use_them(capsys):
    assert main(["train", "--method", "tag", "--grad", "pcgrad", *TINY]) == 2
    assert "--grad/--sam/--rep-grad apply to hps" in capsys.readouterr().err
    for method, options in [("dmtg", {"branchez": 2}), ("itmtl", {"candidate": ["ew"]}), ("mtsl", {"treshold": 0.5})]:
        with pytest.raises(TaskSpecError, match=rf"{method} has no option\(s\) \['{next(iter(options))}'\]"):
            make_method(ExperimentConfig(method=method, **{method: options}), ("a", "b"))
    assert make_method(ExperimentConfig(method="itmtl", itmtl={"every": 3}), ("a", "b")).every == 3
    with pytest.raises(TaskSpecError, match="unknown method"):
        make_method(ExperimentConfig(method="bmn"), ("a", "b"))
