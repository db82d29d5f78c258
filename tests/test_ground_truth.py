"""The ground-truth task families: targets as constructed, splits as documented, trees scored right."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from benchmark_modules import ROOT, load_benchmark

from graphsurgeon.apps.experiment import DATASETS, ExperimentConfig
from graphsurgeon.data import get_dataset
from graphsurgeon.data.errors import DataError
from graphsurgeon.data.ground_truth import (
    GROUND_TRUTH,
    RELABEL,
    GroundTruthDigits,
    adjusted_rand_index,
    score_partitions,
)
from graphsurgeon.data.multimnist import MultiMNIST
from graphsurgeon.training.trainer import TrainConfig


def test_relabel_is_a_derangement_of_the_digits():
    assert sorted(RELABEL) == list(range(10))
    assert all(RELABEL[d] != d for d in range(10))


def test_twins_targets_follow_their_definition():
    data = GroundTruthDigits("twins", "val", size=200, seed=3)
    pair = MultiMNIST("val", 200, 3, tasks=["left", "right"])
    image, targets = data.batch(slice(None))
    _, digits = pair.batch(slice(None))
    torch.testing.assert_close(targets["left"], digits["left"], rtol=0, atol=0)
    torch.testing.assert_close(targets["right"], digits["right"], rtol=0, atol=0)
    torch.testing.assert_close(targets["left_relabel"], torch.tensor(RELABEL)[digits["left"]], rtol=0, atol=0)
    torch.testing.assert_close(targets["right_relabel"], torch.tensor(RELABEL)[digits["right"]], rtol=0, atol=0)
    torch.testing.assert_close(targets["left_parity"], digits["left"] % 2, rtol=0, atol=0)
    # the digits' ink is on top of the grating: the image is MultiMNIST's canvas or brighter
    canvas, _ = pair.batch(slice(None))
    assert bool((image >= canvas - 1e-6).all())
    assert set(targets["texture"].tolist()) == set(range(8))


def test_texture_is_visible_and_independent_of_the_digits():
    data = GroundTruthDigits("twins", "train", size=400, seed=0, tasks=["left", "texture"])
    image, targets = data.batch(slice(None))
    background = image[image < 0.36]
    assert background.max() > 0.3  # the grating reaches its amplitude where no digit is
    # independent draws: every texture class occurs with digits of both parities
    for texture in range(8):
        assert len(set((targets["left"][targets["texture"] == texture] % 2).tolist())) == 2


def test_branching_channels_hold_independent_digits():
    data = GroundTruthDigits("branching", "test", size=300, seed=1)
    image, targets = data.batch(slice(None))
    assert image.shape == (300, 2, 36, 36)
    assert not torch.equal(targets["first"], targets["second"])
    torch.testing.assert_close(targets["second_relabel"], torch.tensor(RELABEL)[targets["second"]], rtol=0, atol=0)
    # each channel is one whole 28 × 28 digit (some ink in every sample, none beyond its box)
    assert bool((image.flatten(2).amax(-1) > 0.5).all())


def test_same_seed_same_data_and_splits_use_disjoint_digits():
    a = GroundTruthDigits("twins", "train", size=64, seed=5)
    b = GroundTruthDigits("twins", "train", size=64, seed=5)
    torch.testing.assert_close(a.batch(slice(None))[0], b.batch(slice(None))[0], rtol=0, atol=0)
    c = GroundTruthDigits("twins", "train", size=64, seed=6)
    assert not torch.equal(a.batch(slice(None))[0], c.batch(slice(None))[0])


def test_registry_and_experiment_build_both_families_on_a_fixed_split():
    data = get_dataset("gt_branching", "val", size=16, seed=0, tasks=["first", "second"])
    assert list(data.task_info) == ["first", "second"]
    assert {"gt_twins", "gt_branching"} <= set(DATASETS)
    # data_seed pins the split: two training seeds see the same images
    images = []
    for seed in (0, 1):
        cfg = ExperimentConfig(data="gt_twins", data_seed=7, train=TrainConfig(seed=seed))
        images.append(DATASETS["gt_twins"](cfg, "val", 16).batch(slice(None))[0])
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"variant": "triplets"}, "variant='triplets'"),
        ({"split": "dev"}, "split='dev'"),
        ({"tasks": "left"}, "is a string"),
        ({"tasks": ["left", "first"]}, "must name distinct tasks"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        GroundTruthDigits(**{"size": 8, **kwargs})


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([["a", "b"], ["c", "d"]], [["d", "c"], ["b", "a"]]) == 1.0
    # the textbook 2 × 2 crossing: no pair agrees, below chance
    assert adjusted_rand_index([["a", "b"], ["c", "d"]], [["a", "c"], ["b", "d"]]) == pytest.approx(-0.5)
    a, b = [["a", "b", "c"], ["d"]], [["a", "b"], ["c", "d"]]
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_index(b, a))
    assert adjusted_rand_index([["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]]) == 1.0
    assert adjusted_rand_index([["a"], ["b"], ["c"]], [["a", "b", "c"]]) == 0.0
    with pytest.raises(DataError, match="different items"):
        adjusted_rand_index([["a"]], [["b"]])


def test_twins_score_the_last_depth_and_drop_the_control():
    truth = [["left", "left_relabel", "left_parity"], ["right", "right_relabel"], ["texture"]]
    everything = [["left", "left_parity", "left_relabel", "right", "right_relabel", "texture"]]
    score = score_partitions([everything, truth], "twins")
    assert score["exact"] and score["ari"] == 1.0
    assert not score["per_depth"][0]["exact"]  # shallower depths may share more: not scored
    assert score["controls"] == {"left_parity": ["left", "left_relabel"]}
    # the control's placement does not change the score
    moved = [["left", "left_relabel"], ["right", "right_relabel", "left_parity"], ["texture"]]
    moved_score = score_partitions([moved], "twins")
    assert moved_score["exact"] and moved_score["controls"] == {"left_parity": ["right", "right_relabel"]}
    wrong = score_partitions([[["left", "right"], ["left_relabel", "right_relabel"], ["texture", "left_parity"]]], "twins")
    assert not wrong["exact"] and wrong["ari"] < 0.5


def test_branching_must_hold_at_every_depth():
    truth = [list(g) for g in GROUND_TRUTH["branching"].groups]
    shared_first = [[t for g in truth for t in g]]
    assert score_partitions([truth, truth], "branching")["exact"]
    late = score_partitions([shared_first, truth], "branching")
    assert not late["exact"] and late["ari"] == pytest.approx(0.5)


def test_the_committed_report_is_what_its_committed_runs_give(tmp_path, monkeypatch):
    """`--reuse` rebuilds `benchmarks/results/ground_truth.md` from the runs in its JSON alone,
    without training: every figure of the committed table comes from a committed run."""
    benchmark = load_benchmark("ground_truth")
    results = ROOT / "benchmarks" / "results"
    committed = json.loads((results / "ground_truth.json").read_text())
    fresh = sorted({int(s) for runs in committed.get("fresh_runs", {}).values() for s in runs})
    monkeypatch.setattr(sys, "argv", ["ground_truth.py", "--reuse", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path),
                                      "--previous", str(results / "ground_truth.json"), "--fresh-seeds", *map(str, fresh)])
    benchmark.main()

    def body(path):  # the command and provenance lines say how the file was made, not what it holds
        return [line for line in path.read_text().splitlines() if not line.startswith(("Generated by", "Trained for this file"))]

    assert body(tmp_path / "ground_truth.md") == body(results / "ground_truth.md")


def test_a_missed_tree_is_explained_by_what_the_method_saw_where_it_departs():
    """The report's reason for a miss is computed from the run's own decisions: the CKA of the
    set compared at the first wrong depth and the official rule's score of its partition."""
    benchmark = load_benchmark("ground_truth")
    tasks = ["left", "left_relabel", "left_parity", "right", "right_relabel", "texture"]
    twins_apart = [[["left", "left_relabel", "left_parity", "right", "right_relabel", "texture"]]] * 4 + [
        [["left"], ["left_relabel"], ["left_parity"], ["right", "right_relabel"], ["texture"]]]
    run = {
        "score": score_partitions(twins_apart, "twins"),
        "decisions": [{"phase": 5, "depth": 5, "nodes": [25, 26, 27], "tasks": [["left"], ["left_relabel"], ["left_parity"]],
                       "similarity": [[1.0, 0.95, 0.55], [0.95, 1.0, 0.5], [0.55, 0.5, 1.0]], "merged": []}],
    }
    why = benchmark.why_missed(run, "gt_twins")
    # one block: (0.75 + 0.725 + 0.525) / 3; two blocks {left, left_relabel} {left_parity}: 0.633
    assert why.startswith("d5 (left the true group apart; phase 5, CKA left~left_relabel 0.95")
    assert "partition {left, left_relabel, left_parity} scores 0.67 against the threshold 0.8" in why
    assert benchmark.why_missed({**run, "score": score_partitions([[tasks[:3], tasks[3:5], tasks[5:]]] * 5, "twins")},
                                "gt_twins") is None
    shared = [[["first", "first_relabel", "second", "second_relabel"]]] + [[["first", "first_relabel"], ["second", "second_relabel"]]] * 4
    merged = {"score": score_partitions(shared, "branching"), "decisions": [{
        "phase": 1, "depth": 1, "nodes": [1, 2, 3, 4], "tasks": [["first"], ["first_relabel"], ["second"], ["second_relabel"]],
        "similarity": [[1.0 if i == j else 0.98 for j in range(4)] for i in range(4)], "merged": [[1, 2, 3, 4]]}]}
    assert benchmark.why_missed(merged, "gt_branching").startswith("d1 (merged across the true groups; phase 1")
    dmtg = {"score": score_partitions(shared, "branching"),
            "decisions": [{"tau": 0.5, "probabilities": {"first": [0.4, 0.6], "second": [0.8, 0.2]}}]}
    assert "largest 0.70 on average (uniform 0.50), at τ 0.5" in benchmark.why_missed(dmtg, "gt_branching")
