"""The main job end to end on tiny data: every artefact the README promises is written."""
import json

from graphsurgeon.__main__ import main


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
