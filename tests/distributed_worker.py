"""Training scenarios that tests/test_distributed.py runs under ``torchrun`` (and in one process).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py
SCENARIO OUT [--resume] [--delay SECONDS]`` runs SCENARIO (``mtsl``, ``plain``, ``grads``,
``cka`` or ``all``) on gloo and writes each rank's result to ``OUT/SCENARIO/rank{r}.pt``; the
tests call the same functions in their own process for the single-process reference. The
global batch is 32 whatever the number of ranks (per-rank batch 32 / world size).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

import graphsurgeon as gs
from graphsurgeon.apps.models import small_resnet
from graphsurgeon.core.network import reinitialise
from graphsurgeon.methods.aggregation.base import assign_gradient, per_task_gradients, split_parameters
from graphsurgeon.methods.base import Method
from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig
from graphsurgeon.methods.structure.similarity import CKAAccumulator
from graphsurgeon.training import distributed
from graphsurgeon.training.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_mtsl import Spec, Toy, toy_net

GLOBAL_BATCH = 32
EPOCHS = 4


class SlowToy(Toy):
    """`Toy` that takes ``delay`` seconds per sample: leaves time to signal a run mid-way."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


def plain_net(seed: int = 0, sharing: str = "separate") -> gs.MultiTaskNetwork:
    """`toy_net` without BatchNorm: per-rank batch statistics are the one thing that makes a
    W-rank run differ from one process, so without them the weights must match."""
    torch.manual_seed(seed)
    backbone = small_resnet(1, (4, 8, 8, 8))
    for module in list(backbone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    heads = {t: nn.Linear(8, 2) for t in ("a", "twin", "other")}
    heads["twin"].load_state_dict(heads["a"].state_dict())
    net = gs.multitask(backbone, heads, sharing=sharing, example_input=torch.rand(2, 1, 12, 12))
    if sharing == "separate":  # `a` and `twin` stay identical copies, `other` gets its own init
        for d in range(1, net.depth + 1):
            reinitialise(net.level(d)[f"n{net.tree.path('other')[d].id}"])
    return net


class NormalisedSum(Method):
    """Shared parameters follow Σ_t g_t / ‖g_t‖: nonlinear in the per-task gradients, so only
    averaging them across ranks *before* aggregating gives the single-process direction."""

    name = "normalised-sum"
    reduces_gradients = True

    def backward(self, trainer, step):
        losses = step.losses
        shared, specific = split_parameters(trainer.net)
        rows = distributed.all_reduce_mean(per_task_gradients(list(losses.values()), shared, retain_graph=True))
        assign_gradient(shared, (rows / rows.norm(dim=1, keepdim=True)).sum(0))
        torch.autograd.backward(sum(losses.values()), inputs=specific)
        distributed.all_reduce_gradients(specific)


def mtsl_config(align_weight: float) -> MTSLConfig:
    # `a` and `twin` are identical tasks (CKA 1), `other` is not: {a, twin} | {other} scores 2/3
    return MTSLConfig(
        task_phases=(1, 1), distill_epochs=(1, 1), threshold=0.6, align_weight=align_weight, similarity_samples=96
    )


def train(net, method, out: Path | None, *, delay: float = 0.0, resume: bool = False) -> Trainer:
    cfg = TrainConfig(
        epochs=EPOCHS,
        batch_size=GLOBAL_BATCH // distributed.world_size(),
        lr=3e-3,
        progress=False,
        seed=5,
        checkpoint_dir=str(out / "checkpoint") if out is not None else None,
    )
    trainer = Trainer(net, {t: Spec for t in net.tasks}, SlowToy(delay), None, cfg, method)
    if resume:
        assert trainer.resume()
    trainer.fit()
    return trainer


def summary(trainer: Trainer) -> dict:
    return {
        "tree": trainer.net.tree.to_json(),
        "state": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "history": trainer.history,
        "decisions": getattr(trainer.method, "decisions", []),
    }


def run_mtsl(out: Path | None = None, *, delay: float = 0.0, resume: bool = False) -> dict:
    """BatchNorm network, alignment loss on: the tree must match one process, ranks must agree."""
    return summary(train(toy_net(7), MTSL(mtsl_config(align_weight=0.2)), out, delay=delay, resume=resume))


def run_plain(out: Path | None = None) -> dict:
    """No BatchNorm, no alignment loss: the weights must match one process as well."""
    return summary(train(plain_net(3), MTSL(mtsl_config(align_weight=0.0)), None))


def run_grads(out: Path | None = None) -> dict:
    """A method that computes its own gradients (``reduces_gradients = True``)."""
    return summary(train(plain_net(4, sharing="shared"), NormalisedSum(), None))


def cka_features() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 6, generator=g) + 20.0  # a large mean: shifts matter numerically
    y = x @ torch.randn(6, 5, generator=g) + torch.randn(101, 5, generator=g) - 7.0
    return [x, y, torch.randn(101, 3, generator=g)]


def run_cka(out: Path | None = None) -> dict:
    """Each rank accumulates its share of the samples (its own first-batch shift), then sums."""
    features = cka_features()
    rows = distributed.shard(range(len(features[0])))
    acc = CKAAccumulator()
    for i in range(0, len(rows), 10):
        idx = list(rows[i : i + 10])
        acc.update([f[idx] for f in features])
    acc.all_reduce()
    return {"matrix": acc.matrix(), "samples": acc.num_samples}


def flag_cost() -> float:
    """Microseconds per `distributed.any_rank` call (the per-step stop-flag agreement)."""
    distributed.any_rank(False)
    start = time.perf_counter()
    for _ in range(200):
        distributed.any_rank(False)
    return (time.perf_counter() - start) / 200 * 1e6


SCENARIOS = {"mtsl": run_mtsl, "plain": run_plain, "grads": run_grads, "cka": run_cka}


def main(argv: list[str]) -> int:
    scenario, out = argv[0], Path(argv[1])
    delay = float(argv[argv.index("--delay") + 1]) if "--delay" in argv else 0.0
    distributed.setup("cpu")
    torch.use_deterministic_algorithms(True)
    try:
        names = list(SCENARIOS) if scenario == "all" else [scenario]
        for name in names:
            torch.manual_seed(0)
            folder = out / name
            kwargs = {"delay": delay, "resume": "--resume" in argv} if name == "mtsl" else {}
            result = SCENARIOS[name](folder, **kwargs)
            result["flag_us"] = flag_cost()
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(result, folder / f"rank{distributed.rank()}.pt")
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
