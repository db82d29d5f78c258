"""`merge_trained`: separately trained models of one architecture merged where they agree."""
import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import graphsurgeon as gs
from graphsurgeon.apps.models import SmallResNet


def error(p, t):
    return float(F.mse_loss(p, t))


# each task's target is its own model's output: every original scores 0 and any change a merge
# makes to a task's function is a drop
SPEC = gs.Task(head=None, loss=F.mse_loss, metrics={"error": error}, higher_is_better={"error": False})


def tiny(seed: int, widths=(4, 8, 8, 8)) -> nn.Module:
    """A random small model whose BatchNorm statistics are those of its inputs, as a trained one's."""
    torch.manual_seed(seed)
    model = SmallResNet(1, widths, num_classes=3)
    with torch.no_grad():
        for _ in range(20):
            model(torch.rand(16, 1, 12, 12))
    return model.eval()


class OwnOutputs(Dataset):
    """Inputs, and for each task its own model's output on them."""

    def __init__(self, models, n=48, seed=0):
        self.x = torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.y = {t: m(self.x) for t, m in models.items()}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {t: y[i] for t, y in self.y.items()}


def config(**kw):
    return gs.MergeConfig(similarity_samples=48, train=gs.TrainConfig(batch_size=16, progress=False), **kw)


def test_copies_of_one_model_merge_into_hard_sharing_with_the_original_outputs():
    model = tiny(0)
    models = {t: copy.deepcopy(model) for t in ("a", "b", "c")}
    data = OwnOutputs(models)
    result = gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, config=config())
    net = result.net
    assert all(len(net.tree.at_depth(d)) == 1 for d in range(1, net.depth + 1))  # hard sharing
    merges = [p for p in result.curve if p["kind"] == "merge"]
    assert len(merges) == net.depth and all(p["accepted"] and not p["distilled"] for p in merges)
    gs.check(net)
    with torch.no_grad(), gs.core.eval_mode(net):
        out = net(data.x)
        expected = model(data.x)
    for t in models:
        assert torch.equal(out[t], expected)
    assert result.curve[-1]["parameters"] < result.curve[0]["parameters"]
    assert result.curve[-1]["flops"] < result.curve[0]["flops"]


def test_the_separate_start_reproduces_every_model():
    models = {"a": tiny(0), "b": tiny(1)}
    data = OwnOutputs(models)
    result = gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, config=config(threshold=2.0))
    assert result.net.tree.same_structure(gs.TaskTree.separate(["a", "b"], result.net.depth))
    assert result.original["a"]["error"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad(), gs.core.eval_mode(result.net):
        out = result.net(data.x)
        for t, m in models.items():
            torch.testing.assert_close(out[t], m(data.x))


def test_models_of_different_architectures_are_refused():
    models = {"a": tiny(0), "b": tiny(1, widths=(4, 8, 16, 8))}
    data = OwnOutputs(models)
    with pytest.raises(gs.MergeError, match=r"segment \d+ .* task 'b' differs from the model of task 'a'.*one architecture"):
        gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, config=config())


def test_the_budget_undoes_a_merge_that_drops_a_task_past_its_tolerance():
    models = {"a": tiny(0), "b": tiny(1)}
    data = OwnOutputs(models)
    # a threshold below any CKA: MTSL's rule merges the two at the first depth; only the budget stops it
    strict = gs.merge_trained(
        models, data=data, tasks={t: SPEC for t in models}, budget=gs.MergeBudget(tolerance=0.0), config=config(threshold=-2.0)
    )
    tried = [p for p in strict.curve if p["kind"] == "merge"]
    assert len(tried) == 1 and not tried[0]["accepted"] and tried[0]["violations"]
    assert all(tried[0]["drops"][t] > 0 for t in tried[0]["violations"])
    assert strict.net.tree.same_structure(gs.TaskTree.separate(["a", "b"], strict.net.depth))
    assert strict.final == strict.original  # undone: the originals, exactly
    with torch.no_grad(), gs.core.eval_mode(strict.net):
        out = strict.net(data.x)
        for t, m in models.items():  # every node as it was, those below the merge too (adapt_below trained them)
            assert torch.equal(out[t], m(data.x))
    gs.check(strict.net)
    loose = gs.merge_trained(
        models, data=data, tasks={t: SPEC for t in models}, budget=gs.MergeBudget(tolerance=math.inf), config=config(threshold=-2.0, finetune_epochs=1)
    )
    assert len(loose.net.tree.at_depth(1)) == 1 and all(p["accepted"] for p in loose.curve if p["kind"] == "merge")
    assert loose.curve[-1]["kind"] == "finetune"
    kept = [p for p in loose.curve if p.get("accepted")][-1]  # the fine-tune epoch if it helped, else the merge
    assert loose.final == kept["results"]


def test_a_fine_tune_that_breaks_the_budget_is_undone():
    model = tiny(0)
    models = {t: copy.deepcopy(model) for t in ("a", "b")}
    data = OwnOutputs(models)
    # copies merge exactly (within a zero tolerance); a fine-tune at a huge learning rate cannot stay within it
    train = gs.TrainConfig(batch_size=16, lr=0.5, progress=False)
    result = gs.merge_trained(
        models, data=data, tasks={t: SPEC for t in models}, budget=gs.MergeBudget(tolerance=0.0),
        config=gs.MergeConfig(similarity_samples=48, finetune_epochs=2, train=train),
    )
    tuned = [p for p in result.curve if p["kind"] == "finetune"]
    assert [p["epoch"] for p in tuned] == [1, 2]
    assert all(p["violations"] and not p["accepted"] for p in tuned)
    merged = [p for p in result.curve if p["kind"] == "merge"][-1]
    assert merged["accepted"] and result.final == merged["results"]
    with torch.no_grad(), gs.core.eval_mode(result.net):
        out = result.net(data.x)
        expected = model(data.x)
    for t in models:  # rolled back: what the budget accepted, exactly
        assert torch.equal(out[t], expected)


def test_the_budget_is_a_paired_test_whose_bound_shrinks_with_the_samples():
    budget = gs.MergeBudget(tolerance=0.01, relative=False)
    original = torch.tensor([1.0, 0.0] * 500)  # per-sample accuracy of an original on 1000 samples
    assert budget.drop(original, original.clone(), higher_is_better=True) == (0.0, 0.0)
    now = original.clone()
    now[0:100:2] = 0.0  # 50 samples it got right become wrong, 45 it got wrong become right: 0.5 % worse
    now[1:91:2] = 1.0
    drop, bound = budget.drop(original, now, higher_is_better=True)
    assert drop == pytest.approx(0.005)
    assert drop < budget.tolerance < bound  # within the tolerance as measured, not within it at 95 %
    _, more = budget.drop(original.repeat(10), now.repeat(10), higher_is_better=True)
    assert drop < more < bound
    assert gs.MergeBudget(tolerance=0.01, relative=False, confidence=None).drop(original, now, True) == (drop, drop)
    # a lower-is-better metric: the same change reads as an improvement
    assert budget.drop(original, now, higher_is_better=False)[0] == pytest.approx(-0.005)
    # a merge that changes few samples is within the tolerance at 95 % though it drops the same on average
    few = original.clone()
    few[0:10:2] = 0.0
    assert budget.drop(original, few, higher_is_better=True)[1] < 0.01


def test_samples_of_one_source_count_once_in_the_bound():
    """Ten copies of 1000 samples are 1000 independent samples, not 10,000: with their sources
    named the bound is the 1000 samples' own; one source per sample changes nothing."""
    original = torch.tensor([1.0, 0.0] * 500)
    now = original.clone()
    now[0:100:2] = 0.0
    now[1:91:2] = 1.0
    alone = gs.MergeBudget(tolerance=0.01, relative=False)
    _, bound = alone.drop(original, now, True)
    source = torch.arange(1000).repeat(10)
    grouped = gs.MergeBudget(tolerance=0.01, relative=False, groups=source)
    _, copies = grouped.drop(original.repeat(10), now.repeat(10), True)
    assert copies == pytest.approx(bound, rel=1e-3)  # (G/(G-1) against the samples' n-1: equal to 1e-3)
    assert alone.drop(original.repeat(10), now.repeat(10), True)[1] < bound  # unnamed: too narrow
    each = gs.MergeBudget(tolerance=0.01, relative=False, groups=torch.arange(1000))
    assert each.drop(original, now, True)[1] == pytest.approx(bound)
    # two groupings (the two digits of a canvas): the wider bound of the two
    both = torch.stack([source, torch.arange(10_000)], 1)
    assert gs.MergeBudget(tolerance=0.01, relative=False, groups=both).drop(original.repeat(10), now.repeat(10), True)[1] == (
        pytest.approx(copies))
    with pytest.raises(gs.MergeError, match=r"groups has 1000 rows for 48 validation samples"):
        models = {"a": tiny(0), "b": tiny(1)}
        gs.merge_trained(models, data=OwnOutputs(models), tasks={t: SPEC for t in models},
                         budget=gs.MergeBudget(groups=torch.arange(1000)), config=config())
    with pytest.raises(gs.MergeError, match=r"MergeBudget.groups must be an integer tensor"):
        gs.MergeBudget(groups=torch.rand(10)).check(["a"])
    with pytest.raises(gs.MergeError, match=r"every validation sample in one source"):
        gs.MergeBudget(groups=torch.zeros(1000, dtype=torch.long)).drop(original, now, True)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, True])
def test_a_confidence_outside_0_and_1_is_refused(confidence):
    with pytest.raises(gs.MergeError, match="MergeBudget.confidence"):
        gs.MergeBudget(confidence=confidence).check(["a"])


def test_a_parameter_target_stops_merging_once_reached():
    model = tiny(0)
    models = {t: copy.deepcopy(model) for t in ("a", "b")}
    data = OwnOutputs(models)
    full = sum(p.numel() for p in gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, config=config(threshold=2.0)).net.parameters())
    first_segment = sum(p.numel() for p in gs.segment(gs.trace(model))[0].module.parameters())
    budget = gs.MergeBudget(max_parameters=full - first_segment)
    result = gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, budget=budget, config=config())
    assert "parameter target" in result.stopped
    assert len([p for p in result.curve if p["kind"] == "merge"]) == 1
    assert len(result.net.tree.at_depth(1)) == 1 and len(result.net.tree.at_depth(2)) == 2


def test_without_losses_for_the_tasks_the_error_says_what_to_pass():
    models = {"a": tiny(0), "b": tiny(1)}
    with pytest.raises(gs.MergeError, match="tasks="):
        gs.merge_trained(models, data=OwnOutputs(models))



def test_the_command_line_merges_model_files_and_saves_a_loadable_network(tmp_path, capsys):
    from safetensors.torch import save_file

    from graphsurgeon.__main__ import main
    from graphsurgeon.apps.models import small_resnet

    torch.manual_seed(0)
    model = small_resnet(1)  # --backbone small_resnet; MultiMNIST's left and right have 10 classes
    files = []
    for t in ("left", "right"):
        files.append(str(tmp_path / f"{t}.safetensors"))
        save_file(model.state_dict(), files[-1])
    sizes = ["--train-size", "32", "--val-size", "16", "--test-size", "16", "--similarity-samples", "32"]
    assert main(["merge", "--models", *files, "--tasks", "left", "--out", str(tmp_path / "bad")]) == 2
    assert "--tasks names 1 tasks ['left'] for 2 --models" in capsys.readouterr().err
    assert main(["merge", "--models", *files, "--confidence", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--confidence 1.5 is not valid" in capsys.readouterr().err
    assert main(["merge", "--models", *files, "--distill-lr", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--distill-lr 0.0 is not valid" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["merge", "--models", *files, "--data", "multimnist", *sizes, "--group-by-source", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(len(p) == 1 for p in results["tree_partitions"])  # one model twice: hard sharing
    assert results["test"]["merged"] == results["test"]["original"]
    assert results["parameters"]["merged"] < results["parameters"]["original"]
    heads = {t: nn.Linear(32, 10) for t in ("left", "right")}
    loaded = gs.load(out / "merged.safetensors", small_resnet(1), heads)
    assert loaded.tree.partitions() == tuple(tuple(tuple(b) for b in p) for p in results["tree_partitions"])


def test_outputs_from_a_depth_continue_each_task_path_as_the_network_does():
    torch.manual_seed(0)
    net = gs.multitask(SmallResNet(1, (4, 8, 8, 8)), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)}, sharing="separate")
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad(), gs.core.eval_mode(net):
        expected = net(x)
        for t in ("a", "b"):
            node = net.tree.path(t)[2]
            out = net.outputs_from(2, net.features(x, depth=2)[node.id], [t])
            assert torch.equal(out[t], expected[t])


def test_output_amalgamation_brings_each_task_output_closer_than_the_mean_of_the_members():
    from graphsurgeon.core.network import init_group
    from graphsurgeon.methods.structure.amalgamation import Amalgamation

    models = {"a": tiny(0), "b": tiny(1)}
    data = OwnOutputs(models)
    start = gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, config=config(threshold=2.0)).net
    members = [start.node_module(n) for n in start.tree.at_depth(1)]
    x = data.x

    def output_error(group):
        with torch.no_grad(), gs.core.eval_mode(start, group):
            inp = start.features(x, depth=0)[0]
            return sum(
                float(F.mse_loss(start.outputs_from(1, group(inp), [t])[t], data.y[t])) for t in ("a", "b")
            )

    mean = init_group(members, "mean")
    distilled = init_group(members, "mean")
    batches = lambda: (x[i : i + 16] for i in range(0, len(x), 16))
    Amalgamation(batches, epochs=20, lr=1e-2, target="outputs")(start, 1, 0, members, distilled)
    assert output_error(distilled) < 0.5 * output_error(mean), (output_error(distilled), output_error(mean))


def test_an_undone_merge_is_retried_split_where_the_models_disagree_deepest():
    a = tiny(0)
    c = copy.deepcopy(a)  # a's stem, slightly moved, over another model's last stage
    with torch.no_grad():
        c.stages[3].load_state_dict(tiny(7).stages[3].state_dict())
        for p in c.stem.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    models = {"a": a, "b": copy.deepcopy(a), "c": c}
    data = OwnOutputs(models)
    result = gs.merge_trained(models, data=data, tasks={t: SPEC for t in models}, budget=gs.MergeBudget(tolerance=0.0),
                              config=config(threshold=0.9))
    first, retry = result.decisions[:2]
    assert first["merged"] == [[["a"], ["b"], ["c"]]] and not first.get("retry")  # the stems are alike in all three
    tried = [p for p in result.curve if p["kind"] == "merge"]
    assert not tried[0]["accepted"] and set(tried[0]["violations"]) == {"a", "b", "c"}  # dropping them would leave none
    assert retry["retry"] and retry["measured_at"] == result.net.depth and retry["merged"] == [[["a"], ["b"]]]
    tree = result.net.tree
    assert all(tree.path("a")[d].id == tree.path("b")[d].id for d in range(result.net.depth + 1))
    assert tree.path("c")[1].id != tree.path("a")[1].id
    assert result.final == result.original  # a and b are one function: merged exactly; c as it was


def test_adapting_the_nodes_below_a_shallow_merge_keeps_each_task_closer_to_its_model():
    """A shallow group node feeds deep layers trained on other features: fitted alone it cannot
    give every task back its model's outputs, and with the paths below trained towards them
    (from a frozen copy) it comes closer; the user's models are not touched."""
    models = {"a": tiny(0), "b": tiny(1)}
    before = {t: copy.deepcopy(m.state_dict()) for t, m in models.items()}
    data = OwnOutputs(models)
    errors = {}
    for adapt in (False, True):
        result = gs.merge_trained(
            models, data=data, tasks={t: SPEC for t in models}, budget=gs.MergeBudget(tolerance=math.inf),
            config=config(threshold=-2.0, distill_epochs=3, distill_lr=3e-3, adapt_below=adapt),
        )
        first = result.curve[1]  # the merge at the first depth (every depth merges after it)
        assert first["kind"] == "merge" and first["depth"] == 1 and first["accepted"]
        errors[adapt] = sum(first["metrics"].values())
    assert errors[True] < 0.8 * errors[False]
    for t, m in models.items():
        assert all(torch.equal(v, before[t][k]) for k, v in m.state_dict().items())


def test_the_committed_merge_report_is_what_its_committed_record_gives(tmp_path):
    """`benchmarks/results/merge_trained.md` is rendered from its JSON alone (`--render`): every
    figure in it, the across-seeds table and its count included, comes from a committed run."""
    from benchmark_modules import ROOT, load_benchmark

    benchmark = load_benchmark("merge_trained")
    results = ROOT / "benchmarks" / "results"
    record = json.loads((results / "merge_trained.json").read_text())
    assert benchmark.markdown(record) == (results / "merge_trained.md").read_text()
    for s in record.get("seeds", []):  # each seed's row is its own report's verdict
        own = json.loads((results / benchmark.SEEDS_FOLDER / f"seed{s['seed']}" / "merge_trained.json").read_text())
        assert s == benchmark.seed_summary(own)
