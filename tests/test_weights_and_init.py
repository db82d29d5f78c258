"""Where an experiment's network starts: identical task copies of one backbone (the MTSL
paper's deep copies), independent init only on request, ``--weights`` loaded into the
backbone before it is cut, and the pristine (loaded) segments restored by MTSL's group init."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import graphsurgeon as gs
from graphsurgeon.__main__ import main
from graphsurgeon.apps.experiment import ExperimentConfig, build_network, load_backbone_weights
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.data import get_dataset
from graphsurgeon.errors import CheckpointError
from graphsurgeon.methods.structure.mtsl import MTSLConfig

TASKS = ("left", "right", "left_parity")


def _network(**options):
    data = get_dataset("multimnist", "train", tasks=TASKS, size=4, seed=0)
    cfg = ExperimentConfig(method="mtsl", tasks=TASKS, **options)
    return build_network(cfg, data.task_info, data[0][0][None])


def _copies_equal(net) -> list[bool]:
    """Per depth: whether every task's copy holds the same tensors as the first task's."""
    equal = []
    for d in range(1, net.depth + 1):
        states = [net.level(d)[n.name].state_dict() for n in net.tree.at_depth(d)]
        equal.append(all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in states[0]))
    return equal


def test_the_experiment_starts_mtsl_from_identical_copies_unless_asked_otherwise():
    assert all(_copies_equal(_network()))
    assert not any(_copies_equal(_network(independent_init=True)))


def test_a_separate_multitask_network_starts_from_identical_copies():
    net = gs.multitask(small_resnet(1), {t: torch.nn.LazyLinear(2) for t in TASKS}, sharing="separate",
                       example_input=torch.rand(2, 1, 12, 12))
    assert all(_copies_equal(net))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_are_the_pristine_segments_and_mtsls_group_init_restores_them(tmp_path, suffix):
    torch.manual_seed(123)
    state = {k: v.clone() for k, v in small_resnet(1).state_dict().items()}
    path = tmp_path / f"backbone{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    net = _network(weights=str(path))
    loaded = list(state.values())
    for d in range(1, net.depth + 1):
        for tensor in net.pristine(d).state_dict().values():
            assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in loaded)
    with torch.no_grad():  # as training would: every copy moves away from the loaded weights
        for p in net.parameters():
            p.add_(1.0)
    assert MTSLConfig().group_init == "pristine"
    gs.surgery.fuse(net, 1, [[n.id for n in net.tree.at_depth(1)]], init=MTSLConfig().group_init)
    group = net.level(1)[net.tree.at_depth(1)[0].name].state_dict()
    pristine = net.pristine(1).state_dict()
    assert group.keys() == pristine.keys() and all(torch.equal(group[k], pristine[k]) for k in group)


def test_weights_that_do_not_fit_name_the_first_missing_and_unexpected_keys(tmp_path):
    state = small_resnet(1).state_dict()
    first = next(iter(state))
    state = {("module." + k if k == first else k): v for k, v in state.items()}
    path = tmp_path / "prefixed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"missing key\(s\) \['{first}'\].*unexpected key\(s\) \['module.{first}'\]"):
        load_backbone_weights(small_resnet(1), path)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # a pickled module, refused by weights_only
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_backbone_weights(small_resnet(1), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone_weights(small_resnet(1), tmp_path / "nowhere.safetensors")


def test_the_cli_refuses_a_missing_weights_file_before_anything_runs(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "mtsl", "--weights", str(tmp_path / "nowhere.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "no such file" in err
    assert not out.exists()


def test_the_cli_trains_from_weights_and_names_the_keys_of_weights_that_do_not_fit(capsys, tmp_path):
    from test_cli_methods import TINY

    state = small_resnet(1).state_dict()
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file(state, str(good))
    save_file({k: v for k, v in state.items() if k != next(iter(state))}, str(bad))
    assert main(["train", "--method", "mtsl", *TINY, "--epochs", "1", "--weights", str(good), "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--method", "hps", *TINY, "--weights", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"missing key(s) ['{next(iter(state))}']" in err and "0 unexpected key(s)" in err
