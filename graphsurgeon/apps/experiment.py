"""One experiment: a backbone, a dataset's tasks, a method → trained network, metrics, artefacts.

The CLI (`python -m graphsurgeon`) and the benchmark scripts call `run`; it is the only place
that wires data, network, method and trainer together.
"""
from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from graphsurgeon.apps.models import make_head, small_resnet
from graphsurgeon.core.build import multitask
from graphsurgeon.core.modes import eval_mode
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.errors import TaskSpecError
from graphsurgeon.training.trainer import TrainConfig, Trainer, seed_everything

__all__ = ["METHODS", "ExperimentConfig", "build_network", "count_flops", "delta_m", "run"]

METHODS = ("single", "separate", "hps", "mtsl", "tag", "itmtl", "dmtg")
# where each method starts: one network per task, or one shared network (TAG measures its
# affinities on the shared network; DMTG builds its branches from the first copy)
START_SHARED = {"hps", "tag", "itmtl", "dmtg"}


@dataclass
class ExperimentConfig:
    method: str = "mtsl"
    backbone: str = "small_resnet"
    data: str = "multimnist"
    data_root: str | None = None
    tasks: Sequence[str] | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    trunk: str | None = None
    granularity: str = "block"
    epochs: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    mtsl: dict[str, Any] = field(default_factory=dict)
    tag: dict[str, Any] = field(default_factory=dict)
    itmtl: dict[str, Any] = field(default_factory=dict)
    dmtg: dict[str, Any] = field(default_factory=dict)
    grad: str | None = None  # a gradient method (AGGREGATORS) for hps/separate/single
    grad_options: dict[str, Any] = field(default_factory=dict)
    rep_grad: bool = False
    sam: float = 0.0  # sharpness-aware radius rho; 0 = off
    corruptions: Sequence[str] = ("gaussian_noise", "gaussian_blur", "contrast")
    severities: Sequence[int] = (1, 3, 5)
    out_dir: str | None = None
    export: bool = True


class GreyToRGB(nn.Module):
    """Feeds 1-channel images to a 3-channel backbone: the repeat is the first traced op."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def make_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """``small_resnet`` or any torchvision classification model name (random init)."""
    if name == "small_resnet":
        return small_resnet(in_channels)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise TaskSpecError(f"unknown backbone {name!r}; use 'small_resnet' or one of torchvision's: {available[:8]}...")
    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return GreyToRGB(model) if in_channels == 1 else model


def build_network(cfg: ExperimentConfig, task_info: Mapping[str, Any], example: torch.Tensor) -> MultiTaskNetwork:
    sharing = "shared" if cfg.method in START_SHARED else "separate"
    image_size = tuple(example.shape[-2:])
    heads = {
        t: (lambda shape, info=info: make_head(info.kind, shape, info.num_outputs, image_size))
        for t, info in task_info.items()
    }
    backbone = make_backbone(cfg.backbone, example.shape[1], example.shape[-1])
    net = multitask(backbone, heads, trunk=cfg.trunk, sharing=sharing, granularity=cfg.granularity, example_input=example)
    if cfg.method == "mtsl" and cfg.mtsl.get("independent_init", True):
        # from-scratch backbones: each task's copy gets its own random init, as separate networks would
        from graphsurgeon.core.surgery import reinitialise

        reinitialise(net, [n.id for d in range(1, net.depth + 1) for n in net.tree.at_depth(d)[1:]], from_="random")
    return net


def _options(factory, options: Mapping[str, Any], method: str, *args: Any):
    """``factory(*args, **options)``, naming the unknown keys instead of a bare TypeError."""
    known = list(inspect.signature(factory).parameters)[len(args) :]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TaskSpecError(f"{method} has no option(s) {unknown}; valid options: {sorted(known)}.")
    return factory(*args, **options)


def make_method(cfg: ExperimentConfig, tasks: Sequence[str]):
    """The training strategy ``cfg`` names, for a network over ``tasks``.

    ``single`` and ``separate`` are the same training: with no parameter shared, the summed
    loss gives every task's network exactly its own gradient (and Adam is per parameter), so
    one joint run equals T single-task runs on the same batches at a fraction of the overhead.
    """
    if cfg.method not in METHODS:
        raise TaskSpecError(f"unknown method {cfg.method!r}; use one of {list(METHODS)}.")
    wants_grad = cfg.grad is not None or cfg.sam or cfg.rep_grad
    if wants_grad and cfg.method not in ("hps", "single", "separate"):
        raise TaskSpecError(
            f"--grad/--sam/--rep-grad apply to hps, single and separate, not to {cfg.method!r} "
            "(which balances its tasks its own way); drop them or use --method hps."
        )
    if wants_grad:
        from graphsurgeon.methods.gradient_method import GradientMethod
        from graphsurgeon.methods.sam import SharpnessAware

        grad = cfg.grad or "ew"
        if cfg.sam:
            return SharpnessAware(grad, tasks, rho=cfg.sam, rep_grad=cfg.rep_grad, **cfg.grad_options)
        return GradientMethod(grad, tasks, rep_grad=cfg.rep_grad, **cfg.grad_options)
    if cfg.method in ("single", "separate", "hps"):
        from graphsurgeon.methods.base import Method

        return Method()
    if cfg.method == "mtsl":
        from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig

        options = {k: v for k, v in cfg.mtsl.items() if k != "independent_init"}  # read by build_network
        return MTSL(_options(MTSLConfig, options, "mtsl"))
    if cfg.method == "tag":
        from graphsurgeon.methods.structure.tag import TAG, TAGConfig

        return TAG(_options(TAGConfig, cfg.tag, "tag"))
    if cfg.method == "itmtl":
        from graphsurgeon.methods.structure.itmtl import ITMTL

        return _options(ITMTL, cfg.itmtl, "itmtl", len(tasks))
    from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig

    return DMTG(_options(DMTGConfig, cfg.dmtg, "dmtg"))


def delta_m(results: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]], task_info) -> float:
    """Δm % (Maninis et al.): mean over tasks and metrics of the signed relative change vs ``baseline``."""
    per_task = []
    for t, metrics in results.items():
        info = task_info[t]
        changes = []
        for m, better_high in info.higher_is_better.items():
            base = baseline[t][m]
            if base == 0:
                continue
            sign = 1.0 if better_high else -1.0
            changes.append(sign * (metrics[m] - base) / abs(base))
        if changes:
            per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / max(len(per_task), 1)


def count_flops(net: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs for one sample (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with eval_mode(net), counter, torch.no_grad():
        net(example[:1])
    return int(counter.get_total_flops())


def _datasets(cfg: ExperimentConfig):
    from graphsurgeon.data import get_dataset

    kw = {"tasks": cfg.tasks} if cfg.tasks else {}
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    out = {}
    for split, size in sizes.items():
        extra = {"size": size} if size and cfg.data == "multimnist" else {}
        seed = {"seed": cfg.train.seed} if cfg.data == "multimnist" else {}
        # the preprocessed NYUv2/Cityscapes releases have train and val only; papers report on val
        source = "val" if split == "test" and cfg.data in ("nyuv2", "cityscapes") else split
        out[split] = get_dataset(cfg.data, source, cfg.data_root, **kw, **extra, **seed)
    return out


def run(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one method; write artefacts to ``cfg.out_dir``; return the results.

    Under torchrun (after `graphsurgeon.training.distributed.setup`) every rank runs this; every rank
    returns the same results and rank 0 alone writes the artefacts."""
    from graphsurgeon.data.corruptions import corrupt
    from graphsurgeon.training import distributed

    seed_everything(cfg.train.seed)
    data = _datasets(cfg)
    task_info = data["train"].task_info
    example = data["train"][0][0][None]
    net = build_network(cfg, task_info, example)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    train_cfg = cfg.train
    if out is not None:
        train_cfg.checkpoint_dir = str(out / "checkpoint")
    if cfg.epochs:
        train_cfg.epochs = cfg.epochs
    trainer = Trainer(net, task_info, data["train"], data["val"], train_cfg, make_method(cfg, net.tasks))
    if resume and out is not None:
        trainer.resume()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    net = trainer.net  # a method may have replaced it (DMTG prunes its search network)
    test = trainer.evaluate(data["test"])
    corrupted = {}
    for name in cfg.corruptions:
        for severity in cfg.severities:
            g = torch.Generator().manual_seed(cfg.train.seed)
            corrupted[f"{name}@{severity}"] = trainer.evaluate(
                data["test"], transform=lambda x, n=name, s=severity, g=g: corrupt(x, n, s, generator=g)
            )
    results = {
        "config": _plain(asdict(cfg)),
        "method": cfg.method,
        "test": test,
        "corrupted": corrupted,
        "parameters": sum(p.numel() for p in net.parameters()),
        "flops": count_flops(net, example.to(trainer.device)),
        "train_seconds": seconds,
        # the process's CPU time (all its threads): unlike wall time, not inflated by other
        # processes, so runs made side by side compare (benchmarks/methods_multimnist.py)
        "train_cpu_seconds": cpu_seconds,
        "tree": str(net.tree),
        "tree_partitions": net.tree.partitions(),
        "history": trainer.history,
        "decisions": getattr(trainer.method, "decisions", []),
    }
    if out is not None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "tree.txt").write_text(str(net.tree) + "\n")
        if cfg.export:
            from graphsurgeon.core.export import to_export

            net.eval()
            program = to_export(net, example.to(trainer.device))
            torch.export.save(program, out / "model.pt2")
    results["net"] = net
    return results


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
