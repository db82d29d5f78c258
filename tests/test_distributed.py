"""Training on 2 ranks (gloo, CPU) agrees across ranks and with one process; kill + resume.

The scenarios live in `distributed_worker` (run in 2 forked processes here, and under
``torchrun`` for the kill test); the same functions called in this process give the
single-process reference. Global batch 32 everywhere (16 per rank on 2 ranks).
"""
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
import torch.distributed as dist

from graphsurgeon.core.tree import TaskTree
from graphsurgeon.errors import CheckpointError
from graphsurgeon.methods.structure.similarity import CKAAccumulator
from graphsurgeon.training import distributed, run_folder
from graphsurgeon.training.trainer import TrainConfig, Trainer

WORLD = 2
WORKER = Path(worker.__file__)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, argv: list[str]) -> None:
    # what torchrun puts in each worker's environment; `distributed.setup` reads it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os._exit(worker.main(argv))


def start_ranks(argv: list[str]) -> list:
    """The worker on WORLD forked processes (no re-import of torch: seconds, not tens)."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, argv)) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def join_ranks(procs: list) -> list[int | None]:
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def run_ranks(argv: list[str]) -> None:
    assert join_ranks(start_ranks(argv)) == [0] * WORLD


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(["all", str(out)])
    return {name: [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in range(WORLD)] for name in worker.SCENARIOS}


def single(name: str) -> dict:
    torch.manual_seed(0)
    return worker.SCENARIOS[name](None)


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def assert_ranks_agree(results: list[dict]) -> None:
    first = results[0]
    for other in results[1:]:
        assert other["tree"] == first["tree"]
        assert_same_weights(first["state"], other["state"])
        torch.testing.assert_close(other["optimizer"]["state"], first["optimizer"]["state"])
        assert [h["train_loss"] for h in other["history"]] == [h["train_loss"] for h in first["history"]]


def test_mtsl_ranks_end_identical_and_build_the_single_process_tree(ranks):
    results = ranks["mtsl"]
    assert_ranks_agree(results)  # weights, BatchNorm buffers, Adam state (surgery-transferred too)
    decisions = results[0]["decisions"]
    assert [d["merged"] for d in decisions if d["merged"]], "no structural edit happened"
    assert "_extra" in results[0]["history"][0]["train_loss"]  # the alignment hooks fired under DDP
    tree = TaskTree.from_json(results[0]["tree"])
    assert tree == TaskTree.from_json(single("mtsl")["tree"])
    assert {n.tasks for n in tree.at_depth(1)} == {("a", "twin"), ("other",)}


def test_without_batchnorm_two_ranks_reproduce_the_single_process_weights(ranks):
    # the ranks' k-th batches together are one process's k-th batch, and gradients, CKA
    # statistics and distillation gradients are averaged/summed: only float rounding differs
    results, reference = ranks["plain"], single("plain")
    assert_ranks_agree(results)
    assert results[0]["tree"] == reference["tree"]
    for ours, theirs in zip(results[0]["decisions"], reference["decisions"], strict=True):
        # a and twin are exact copies: which comes first is a tie broken by float rounding
        assert sorted(map(sorted, ours["merged"])) == sorted(map(sorted, theirs["merged"]))
        torch.testing.assert_close(torch.tensor(ours["similarity"]), torch.tensor(theirs["similarity"]), atol=1e-6, rtol=1e-6)
    assert_same_weights(results[0]["state"], reference["state"], atol=1e-5, rtol=1e-4)


def test_a_method_that_reduces_its_own_gradients_matches_one_process(ranks):
    # NormalisedSum aggregates nonlinearly: averaging after aggregating would not match
    results, reference = ranks["grads"], single("grads")
    assert_ranks_agree(results)
    assert_same_weights(results[0]["state"], reference["state"], atol=1e-5, rtol=1e-4)


def test_cka_statistics_summed_over_ranks_equal_one_accumulator(ranks):
    acc = CKAAccumulator()
    acc.update(worker.cka_features())
    for result in ranks["cka"]:
        assert result["samples"] == 101
        torch.testing.assert_close(result["matrix"], acc.matrix(), atol=1e-12, rtol=1e-12)


def test_ranks_batches_together_are_the_single_process_batches(monkeypatch):
    data = torch.utils.data.TensorDataset(torch.arange(100))
    trainer = Trainer.__new__(Trainer)
    trainer.config = TrainConfig(batch_size=8)
    trainer.generator = torch.Generator().manual_seed(1)
    whole = [b[0].tolist() for b in trainer.loader(data, shuffle=True)]
    per_rank = []
    for r in range(WORLD):
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: WORLD)
        trainer.config = TrainConfig(batch_size=8 // WORLD)
        trainer.generator = torch.Generator().manual_seed(1)
        per_rank.append([b[0].tolist() for b in trainer.loader(data, shuffle=True)])
    assert len(per_rank[0]) == len(per_rank[1]) == len(whole)
    for k, batch in enumerate(whole):
        assert sorted(per_rank[0][k] + per_rank[1][k]) == sorted(batch)


def _trainer_state(folder: Path) -> dict:
    return run_folder.read_state(folder)


def _signal_after_first_structural_edit(checkpoint: Path, alive, send) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and alive():
        if (checkpoint / "LATEST").is_file():
            try:  # the run may replace the checkpoint while it is read
                history = _trainer_state(checkpoint)["history"]
            except CheckpointError:
                continue
            if any(r.get("structural_phase") for r in history):
                time.sleep(0.3)  # most likely lands inside the next epoch (either way must resume exactly)
                send()
                return
        time.sleep(0.05)


def _check_resumed(out: Path, reference: dict) -> None:
    for r in range(WORLD):
        result = torch.load(out / "mtsl" / f"rank{r}.pt", weights_only=False)
        assert result["tree"] == reference["tree"]
        assert_same_weights(result["state"], reference["state"])
        assert len(result["history"]) == len(reference["history"])
        for ours, theirs in zip(result["history"], reference["history"]):
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"])


def _check_interrupted(out: Path, log: str = "") -> None:
    state = _trainer_state(out / "mtsl" / "checkpoint")
    assert state["epoch"] < worker.EPOCHS, f"the run finished before it was signalled\n{log[-2000:]}"
    assert any(r.get("structural_phase") for r in state["history"])
    assert not (out / "mtsl" / "rank0.pt").exists()


def test_sigterm_to_one_rank_after_a_structural_edit_then_resume_matches_the_uninterrupted_run(ranks, tmp_path):
    procs = start_ranks(["mtsl", str(tmp_path), "--delay", "0.01"])
    # only rank 1 gets the signal: the ranks must still agree on the step to stop at
    _signal_after_first_structural_edit(
        tmp_path / "mtsl" / "checkpoint", lambda: all(p.is_alive() for p in procs), lambda: os.kill(procs[1].pid, signal.SIGTERM)
    )
    assert join_ranks(procs) == [130] * WORLD  # both stopped through KeyboardInterrupt after the checkpoint
    _check_interrupted(tmp_path)
    run_ranks(["mtsl", str(tmp_path), "--resume"])
    _check_resumed(tmp_path, ranks["mtsl"][0])


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_then_resume_under_torchrun_matches_the_uninterrupted_run(ranks, tmp_path):
    """The same through the real launcher (each launch re-imports torch: tens of seconds)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(WORKER), "mtsl", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.Popen([*command, "--delay", "0.01"], env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # as a scheduler does: every process of the job gets it, and torchrun forwards it again
        _signal_after_first_structural_edit(
            tmp_path / "mtsl" / "checkpoint", lambda: run.poll() is None, lambda: os.killpg(run.pid, signal.SIGTERM)
        )
        log = run.communicate(timeout=120)[0].decode()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    _check_interrupted(tmp_path, log)
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    _check_resumed(tmp_path, ranks["mtsl"][0])
