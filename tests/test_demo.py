"""The main job end to end on tiny data: every artefact the README promises is written."""
import json

from benchmark_modules import load_benchmark

from graphsurgeon.__main__ import main
from graphsurgeon.apps.demo import DEMO_DEPTH, demo_config
from graphsurgeon.apps.experiment import build_network
from graphsurgeon.data import get_dataset


def test_quick_demo_writes_table_tree_plots_and_exported_model(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Δm % vs single" in printed and "| mtsl |" in printed and "| hps |" in printed
    # the learned tree is printed next to the true one, with its score
    assert "True tree (the last depth): {left, left_relabel} {right, right_relabel} {texture}" in printed
    assert "MTSL learned:   d1" in printed and "adjusted Rand index" in printed
    for name in ("results.md", "results.json", "mtsl_tree.png", "mtsl_cka.png", "losses.png", "mtsl/model.pt2", "mtsl/tree.txt"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"single", "hps", "mtsl"}
    assert results["mtsl"]["decisions"], "MTSL took no structural decision"
    assert set(results["mtsl"]["ground_truth_score"]) == {"exact", "ari", "per_depth", "controls"}
    # single-task = one copy per task per depth; hard sharing = one per depth
    assert results["hps"]["parameters"] < results["mtsl"]["parameters"] <= results["single"]["parameters"]


def test_demo_and_benchmark_run_mtsl_with_a_phase_per_depth_of_the_backbone_plus_retries(tmp_path):
    """The schedule is derived from the demo's backbone (not typed for it), every phase fits in
    the run, and the ground-truth benchmark's `mtsl` row is the demo's; `mtsl-per-depth` drops the retries."""
    cfg = demo_config("mtsl", tmp_path, 0, progress=False)
    data = get_dataset(cfg.data, "val", size=2, seed=0)
    net = build_network(cfg, data.task_info, data.batch(slice(None))[0])
    assert net.depth == DEMO_DEPTH
    phases = cfg.mtsl["task_phases"]
    assert len(phases) == len(cfg.mtsl["distill_epochs"]) > net.depth  # every depth, then retries
    assert sum(phases) == cfg.train.epochs - 1  # every structural phase runs, the last epoch trains the final tree
    benchmark = load_benchmark("ground_truth")
    assert benchmark.config("gt_twins", "mtsl", 0, tmp_path / "mtsl").mtsl == cfg.mtsl
    assert len(benchmark.config("gt_twins", "mtsl-per-depth", 0, tmp_path / "per_depth").mtsl["task_phases"]) == net.depth
    assert len(benchmark.config("gt_twins", "mtsl-2-retries", 0, tmp_path / "two").mtsl["task_phases"]) == net.depth + 2
