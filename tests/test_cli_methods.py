"""Every method the CLI offers trains end to end on a sliver of the embedded data.

`graphsurgeon train --method ...` is the user's entry point to every method; each run here
must finish, write its results and leave a valid tree (invariants checked on the network).
"""
from __future__ import annotations

import json

import pytest
import torch

from graphsurgeon.__main__ import main
from graphsurgeon.apps.experiment import ExperimentConfig, make_method
from graphsurgeon.errors import TaskSpecError
from graphsurgeon.optional import available

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


@pytest.mark.parametrize("method", ["tag", "dmtg"])
def test_an_equal_final_budget_adds_the_search_epochs_on_top(tmp_path, method):
    """With --equal-final-budget the chosen network trains for --epochs (2) after a 1-epoch search."""
    assert main(["train", "--method", method, "--search-epochs", "1", *TINY, "--equal-final-budget", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["train"]["epochs"] == 3
    if method == "tag":
        assert results["decisions"][0]["epoch"] == 1  # grouped after the 1-epoch search, two epochs left
    assert len((tmp_path / "checkpoint" / "metrics.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--monitor", "left/f1"], "--monitor 'left/f1' is not valid; use one of ['val_loss', 'left/loss', 'left/accuracy'"),
        (["--schedule", "step"], "--step-size None is not valid; use a positive int"),
        (["--grad-clip", "-1"], "--grad-clip -1.0 is not valid"),
        (["--batch-size", "0"], "--batch-size 0 is not valid; use a positive int"),
        (["--batch-size", "-4"], "--batch-size -4 is not valid"),
        (["--lr", "-1"], "--lr -1.0 is not valid; use a finite number > 0"),
        (["--lr", "nan"], "--lr nan is not valid"),
        (["--seed", "-1"], "--seed -1 is not valid; use an int in [0, 2**32)"),
        (["--seed", str(2**40)], f"--seed {2**40} is not valid"),
        (["--device", "bogus"], "--device 'bogus' is not valid; use 'cpu', 'cuda' or 'cuda:N'"),
        (["--schedule-scale", "nan"], "--schedule-scale nan is not valid; use a finite number > 0"),
        (["--epochs", "-1"], "--epochs -1 is not valid; use a positive int"),
        (["--epochs", "0"], "--epochs 0 is not valid"),  # 0 silently meant the default of 50
        (["--train-size", "0"], "--train-size 0 is not valid"),
        *([] if available("imagecorruptions") else [
            (["--corruption-backend", "imagecorruptions"], "needs the optional package 'imagecorruptions'")]),
    ],
)
def test_bad_training_settings_are_explained(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    assert main(["train", "--method", "hps", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "contrast,gaussian_blur"], "corruption(s) ['gaussian_blur'] are unknown; use any of ['gaussian_noise'"),
    (["--severities", "1,6"], "severities are comma-separated ints from 1 to 5, e.g. 1,3,5; got '1,6'"),
])
def test_bad_corruption_flags_are_refused_while_parsing(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as info:
        main(["train", "--method", "hps", *TINY, *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_refused_before_anything_runs(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--method", "hps", *TINY, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "--device 'cuda' is not valid; use 'cpu': torch finds no CUDA device" in capsys.readouterr().err


def test_the_run_folder_is_checked_first(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["train", "--method", "hps", *TINY, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["train", "--method", "hps", *TINY, "--out", str(other), "--overwrite"]) == 2
    assert "holds files that are not a graphsurgeon run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    assert main(["train", "--method", "hps", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "hps", *TINY, "--epochs", "1", "--out", str(run)]) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert main(["train", "--method", "hps", *TINY, "--epochs", "1", "--out", str(run), "--overwrite"]) == 0


def test_resume_on_a_saved_network_says_what_it_is(capsys, tmp_path):
    import graphsurgeon as gs

    run = tmp_path / "run"
    net = gs.multitask(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), {"a": torch.nn.Identity()})
    gs.save(net, run / "checkpoint" / "model.safetensors")  # a network, not a training checkpoint
    assert main(["train", "--method", "hps", *TINY, "--epochs", "1", "--out", str(run), "--resume"]) == 2
    assert "saved with gs.save, not a training checkpoint" in capsys.readouterr().err


def test_gradient_options_belong_to_the_methods_that_use_them(capsys):
    assert main(["train", "--method", "tag", "--grad", "pcgrad", *TINY]) == 2
    assert "--grad/--sam/--rep-grad apply to hps" in capsys.readouterr().err
    for method, options in [("dmtg", {"branchez": 2}), ("itmtl", {"candidate": ["ew"]}), ("mtsl", {"treshold": 0.5})]:
        with pytest.raises(TaskSpecError, match=rf"{method} has no option\(s\) \['{next(iter(options))}'\]"):
            make_method(ExperimentConfig(method=method, **{method: options}), ("a", "b"))
    assert make_method(ExperimentConfig(method="itmtl", itmtl={"every": 3}), ("a", "b")).every == 3
    with pytest.raises(TaskSpecError, match="unknown method"):
        make_method(ExperimentConfig(method="bmn"), ("a", "b"))
