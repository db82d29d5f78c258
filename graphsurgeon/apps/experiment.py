"""One experiment: a backbone, a dataset's tasks, a method → trained network, metrics, artefacts.

The CLI (`python -m graphsurgeon`) and the benchmark scripts call `run`; it is the only place
that wires data, network, method and trainer together.
"""
from __future__ import annotations

import inspect
import json
import math
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, Subset

from graphsurgeon.apps.models import ResNetEncoderDecoder, UNet, make_head, small_resnet
from graphsurgeon.core.build import multitask
from graphsurgeon.core.invariants import count_flops
from graphsurgeon.core.network import MultiTaskNetwork
from graphsurgeon.data.corruptions import DEFAULT_CORRUPTIONS
from graphsurgeon.data.tasks import TaskInfo
from graphsurgeon.errors import CheckpointError, ConfigError, TaskSpecError
from graphsurgeon.methods.base import Method
from graphsurgeon.methods.structure.merge_trained import MergeBudget, MergeConfig, merge_trained
from graphsurgeon.training.trainer import TrainConfig, Trainer, seed_everything

__all__ = [
    "DATASETS", "METHODS", "METHOD_REGISTRY", "ExperimentConfig", "MethodEntry", "build_network", "count_flops", "delta_m",
    "run", "run_merge",
]



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
    # the seed an embedded dataset is generated from; None: the training seed. A fixed one keeps
    # the same split across training seeds, so methods and seeds compare paired
    data_seed: int | None = None
    trunk: str | None = None
    # a local state dict for the backbone (safetensors, or a .pth/.pt read with weights_only=True),
    # loaded before the network is built: the pristine segments (MTSL's "pristine" group init) are it
    weights: str | None = None
    # a separate start (mtsl, single, separate) copies the one backbone for every task, so the
    # copies start identical, as the MTSL paper's deep copies do (and a "mean" group init averages
    # aligned neurons); True re-initialises every task's copy but the first at random instead, as
    # T independently initialised networks would be
    independent_init: bool = False
    granularity: str = "block"
    epochs: int | None = None
    # TAG and DMTG spend the run's first epochs searching (affinities, the supernet), so their
    # final network trains for fewer epochs than the other methods' networks; True adds the
    # search epochs on top of ``epochs``, so every method's final network gets ``epochs``
    equal_final_budget: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    mtsl: dict[str, Any] = field(default_factory=dict)
    tag: dict[str, Any] = field(default_factory=dict)
    itmtl: dict[str, Any] = field(default_factory=dict)
    dmtg: dict[str, Any] = field(default_factory=dict)
    grad: str | None = None  # a gradient method (AGGREGATORS) for hps/separate/single
    grad_options: dict[str, Any] = field(default_factory=dict)
    rep_grad: bool = False
    sam: float = 0.0  # sharpness-aware radius rho; 0 = off
    # test-split corruptions: names, "all" (ImageNet-C's 15) or () for clean only; the default is
    # three cheap ones (noise, blur, digital) at three severities, so a run adds 9 evaluations, not 75
    corruptions: Sequence[str] | str = DEFAULT_CORRUPTIONS
    severities: Sequence[int] = (1, 3, 5)
    corruption_backend: str = "torch"  # or "imagecorruptions" (the reference NumPy code, if installed)
    out_dir: str | None = None
    export: bool = True


class GreyToRGB(nn.Module):
    """Feeds 1-channel images to a 3-channel backbone: the repeat is the first traced op."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


# the project's own backbones, by name: a classifier and two encoder-decoders for dense tasks
# (pass trunk="up0" / trunk="decoder.3": their last decoder stage; they have no classifier)
LOCAL_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_resnet": small_resnet,
    "unet": UNet,
    "resnet18_decoder": ResNetEncoderDecoder,
}


def make_backbone(name: str, in_channels: int, image_size: int, num_classes: int | None = None) -> nn.Module:
    """One of `LOCAL_BACKBONES` or any torchvision classification model name (random init), with
    its own classifier of ``num_classes`` outputs (default: the model's default; the
    encoder-decoders have none)."""
    if name in LOCAL_BACKBONES:
        if num_classes is None:
            return LOCAL_BACKBONES[name](in_channels)
        if name != "small_resnet":
            raise TaskSpecError(
                f"backbone {name!r} is an encoder-decoder without a classifier, so it cannot be built with "
                f"num_classes={num_classes}; use 'small_resnet' or a torchvision classifier for classification models."
            )
        return small_resnet(in_channels, num_classes=num_classes)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise TaskSpecError(
            f"unknown backbone {name!r}; use one of {sorted(LOCAL_BACKBONES)} or of torchvision's: {available[:8]}..."
        )
    kwargs: dict[str, Any] = {"image_size": image_size} if name.startswith("vit") else {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return GreyToRGB(model) if in_channels == 1 else model


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict from a local file into ``backbone`` (the model inside `GreyToRGB`).

    Safetensors files are read as such; anything else with ``torch.load(weights_only=True)``, so
    loading runs no pickled code. The keys must match exactly: a partial load would silently
    leave layers at their random init, so the first missing and unexpected keys are named.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {str(path)!r}: no such file; pass the path of a saved backbone state dict.")
    target = backbone.model if isinstance(backbone, GreyToRGB) else backbone
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses pickled modules and other code
        raise CheckpointError(
            f"--weights {str(path)!r} cannot be read: it pickles objects other than tensors, which "
            "torch.load(weights_only=True) refuses; save model.state_dict(), not the model."
        ) from exc
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"--weights {str(path)!r} cannot be read ({str(exc).splitlines()[0]}); save it with safetensors.torch.save_file or "
            "torch.save(model.state_dict(), path)."
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"--weights {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors; "
            "save model.state_dict() (not the model, nor a training checkpoint around it)."
        )
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"--weights {str(path)!r} does not fit the {type(target).__name__} backbone: "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}. "
            "Use a state dict of the same architecture as --backbone (without a wrapper prefix such as 'module.')."
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(
            f"--weights {str(path)!r}: {len(wrong)} tensor(s) have other shapes than the backbone's, e.g. {wrong[:3]}; "
            "use weights of the same architecture and number of classes as --backbone."
        )
    target.load_state_dict(state)


def build_network(cfg: ExperimentConfig, task_info: Mapping[str, TaskInfo], example: torch.Tensor) -> MultiTaskNetwork:
    """The network ``cfg`` starts from; its task specs carry the datasets' losses and metrics,
    which is where the trainer reads them."""
    entry = _entry(cfg)
    image_size = tuple(example.shape[-2:])
    heads = {
        t: info.task(lambda shape, info=info: make_head(info.kind, shape, info.num_outputs, image_size))
        for t, info in task_info.items()
    }
    backbone = make_backbone(cfg.backbone, example.shape[1], example.shape[-1])
    if cfg.weights is not None:
        load_backbone_weights(backbone, cfg.weights)
    # dense tasks need a feature map: by default the backbone's last one (classification only:
    # the classifier's input)
    dense = any(info.kind != "classification" for info in task_info.values())
    trunk = cfg.trunk or ("spatial" if dense else None)
    net = multitask(backbone, heads, trunk=trunk, sharing=entry.sharing, granularity=cfg.granularity, example_input=example)
    if cfg.independent_init and entry.sharing == "separate":
        # every task's copy but the first gets its own random init, as independent networks would
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


def _hard_sharing(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    """The summed losses, or the gradient method ``--grad``/``--sam``/``--rep-grad`` ask for.

    ``single`` and ``separate`` are the same training: with no parameter shared, the summed
    loss gives every task's network exactly its own gradient (and Adam is per parameter), so
    one joint run equals T single-task runs on the same batches at a fraction of the overhead.
    """
    if not (cfg.grad is not None or cfg.sam or cfg.rep_grad):
        return Method()
    from graphsurgeon.methods.gradient_method import GradientMethod
    from graphsurgeon.methods.sam import SharpnessAware

    grad = cfg.grad or "ew"
    if cfg.sam:
        return SharpnessAware(grad, tasks, rho=cfg.sam, rep_grad=cfg.rep_grad, **cfg.grad_options)
    return GradientMethod(grad, tasks, rep_grad=cfg.rep_grad, **cfg.grad_options)


def _mtsl(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    from graphsurgeon.methods.structure.mtsl import MTSL, MTSLConfig

    return MTSL(_options(MTSLConfig, cfg.mtsl, "mtsl"))


def _tag(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    from graphsurgeon.methods.structure.tag import TAG, TAGConfig

    return TAG(_options(TAGConfig, cfg.tag, "tag"))


def _itmtl(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    from graphsurgeon.methods.structure.itmtl import ITMTL

    return _options(ITMTL, cfg.itmtl, "itmtl", len(tasks))


def _dmtg(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    from graphsurgeon.methods.structure.dmtg import DMTG, DMTGConfig

    return DMTG(_options(DMTGConfig, cfg.dmtg, "dmtg"))


@dataclass(frozen=True)
class MethodEntry:
    """How the wiring runs a method: its builder, the network it starts from (one network per
    task, or one shared network: TAG measures its affinities on it, DMTG builds its branches
    from it), and whether a gradient method may replace its plain sum of losses."""

    build: Callable[[ExperimentConfig, Sequence[str]], Method]
    sharing: Literal["separate", "shared"]
    gradient: bool = False


# method name -> entry; the CLI offers exactly these
METHOD_REGISTRY: dict[str, MethodEntry] = {
    "hps": MethodEntry(_hard_sharing, "shared", gradient=True),
    "single": MethodEntry(_hard_sharing, "separate", gradient=True),
    "separate": MethodEntry(_hard_sharing, "separate", gradient=True),
    "mtsl": MethodEntry(_mtsl, "separate"),
    "tag": MethodEntry(_tag, "shared"),
    "itmtl": MethodEntry(_itmtl, "shared"),
    "dmtg": MethodEntry(_dmtg, "shared"),
}
METHODS = tuple(METHOD_REGISTRY)


def _entry(cfg: ExperimentConfig) -> MethodEntry:
    if cfg.method not in METHOD_REGISTRY:
        raise TaskSpecError(f"unknown method {cfg.method!r}; use one of {list(METHODS)}.")
    return METHOD_REGISTRY[cfg.method]


def make_method(cfg: ExperimentConfig, tasks: Sequence[str]) -> Method:
    """The training strategy ``cfg`` names, for a network over ``tasks``."""
    entry = _entry(cfg)
    if (cfg.grad is not None or cfg.sam or cfg.rep_grad) and not entry.gradient:
        bases = [name for name, e in METHOD_REGISTRY.items() if e.gradient]
        raise TaskSpecError(
            f"--grad/--sam/--rep-grad apply to {', '.join(bases[:-1])} and {bases[-1]}, not to {cfg.method!r} "
            f"(which balances its tasks its own way); drop them or use --method hps."
        )
    return entry.build(cfg, tasks)


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


def _embedded(name: str) -> Callable[[ExperimentConfig, str, int | None], Dataset]:
    """An embedded dataset, generated at the requested size from ``data_seed`` (or the run's seed)."""

    def build(cfg: ExperimentConfig, split: str, size: int | None) -> Dataset:
        from graphsurgeon.data import get_dataset

        seed = cfg.train.seed if cfg.data_seed is None else cfg.data_seed
        return get_dataset(name, split, tasks=cfg.tasks, size=size, seed=seed)

    return build


def _released(test_split: str) -> Callable[[ExperimentConfig, str, int | None], Dataset]:
    """A downloaded dataset, whose test split is ``test_split`` (the preprocessed NYUv2 and
    Cityscapes releases have train and val only; papers report on val); ``size`` keeps the
    first samples."""

    def build(cfg: ExperimentConfig, split: str, size: int | None) -> Dataset:
        from graphsurgeon.data import get_dataset

        kw = {"tasks": cfg.tasks} if cfg.tasks else {}
        data = get_dataset(cfg.data, test_split if split == "test" else split, cfg.data_root, **kw)
        return data if size is None else Subset(data, range(min(size, len(data))))

    return build


# dataset name -> builder(cfg, split, size); each returns a Dataset of (image, {task: target})
DATASETS: dict[str, Callable[[ExperimentConfig, str, int | None], Dataset]] = {
    "multimnist": _embedded("multimnist"),
    "gt_twins": _embedded("gt_twins"),
    "gt_branching": _embedded("gt_branching"),
    "nyuv2": _released("val"),
    "cityscapes": _released("val"),
    "celeba": _released("test"),
}


def _datasets(cfg: ExperimentConfig) -> tuple[dict[str, Dataset], dict[str, TaskInfo]]:
    """The train, val and test splits at the configured sizes, and the tasks' descriptions."""
    if cfg.data not in DATASETS:
        raise TaskSpecError(f"unknown dataset {cfg.data!r}; use one of {sorted(DATASETS)}.")
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {split: DATASETS[cfg.data](cfg, split, size) for split, size in sizes.items()}
    full = splits["train"].dataset if isinstance(splits["train"], Subset) else splits["train"]
    return splits, full.task_info


def _with_search_on_top(cfg: ExperimentConfig, train_cfg: TrainConfig) -> ExperimentConfig:
    """``cfg`` with TAG's or DMTG's search epochs pinned and added to ``train_cfg.epochs``, so the
    network they choose trains for the original number of epochs (``equal_final_budget``).
    TAG's affinity stage is pinned at its default length (a quarter of the original epochs), as
    it would otherwise grow with the longer run. Other methods are returned unchanged: their
    final network is trained for the whole run (MTSL's structure is learnt during it)."""
    from dataclasses import replace

    if cfg.method == "tag":
        search = cfg.tag.get("affinity_epochs") or max(1, math.ceil(train_cfg.epochs / 4))
        cfg = replace(cfg, tag={**cfg.tag, "affinity_epochs": search})
    elif cfg.method == "dmtg":
        from graphsurgeon.methods.structure.dmtg import DMTGConfig

        search = cfg.dmtg.get("search_epochs", DMTGConfig.search_epochs)
    else:
        return cfg
    train_cfg.epochs += search
    return cfg


def run(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one method; write artefacts to ``cfg.out_dir``; return the results.

    Under torchrun (after `graphsurgeon.training.distributed.setup`) every rank runs this; every rank
    returns the same results and rank 0 alone writes the artefacts."""
    from graphsurgeon.data.corruptions import corrupt, corruption_plan
    from graphsurgeon.training import distributed

    plan = corruption_plan(cfg.corruptions, cfg.severities, cfg.corruption_backend)
    seed_everything(cfg.train.seed)
    data, task_info = _datasets(cfg)
    example = data["train"][0][0][None]
    net = build_network(cfg, task_info, example)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    train_cfg = cfg.train
    if out is not None:
        train_cfg.checkpoint_dir = str(out / "checkpoint")
    if cfg.epochs:
        train_cfg.epochs = cfg.epochs
    if cfg.equal_final_budget:
        cfg = _with_search_on_top(cfg, train_cfg)
    trainer = Trainer(net, None, data["train"], data["val"], train_cfg, make_method(cfg, net.tasks))
    if resume and out is not None:
        trainer.resume()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    net = trainer.net  # a method may have replaced it (DMTG prunes its search network)
    test = trainer.evaluate(data["test"])
    corrupted = {}
    for name, severity in plan:
        g = torch.Generator().manual_seed(cfg.train.seed)
        corrupted[f"{name}@{severity}"] = trainer.evaluate(
            data["test"],
            transform=lambda x, n=name, s=severity, g=g: corrupt(x, n, s, generator=g, backend=cfg.corruption_backend),
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
        # processes, so runs made side by side compare (benchmarks/ground_truth.py)
        "train_cpu_seconds": cpu_seconds,
        "tree": str(net.tree),
        "tree_partitions": net.tree.partitions(),
        "history": trainer.history,
        # the best epoch on cfg.train.monitor (its weights: checkpoint/best.safetensors)
        "best_epoch": None if trainer.best_record is None else trainer.best_record["epoch"],
        "decisions": trainer.method.decisions,
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


def _source_indices(data: Dataset) -> torch.Tensor | None:
    """The embedded digits each sample of ``data`` is made of (``source_indices``), through subsets."""
    if isinstance(data, Subset):
        base = _source_indices(data.dataset)
        return None if base is None else base[torch.as_tensor(data.indices)]
    return getattr(data, "source_indices", None)


def run_merge(
    cfg: ExperimentConfig,
    model_files: Mapping[str, str | Path],
    budget: MergeBudget | None = None,
    merge: MergeConfig | None = None,
    group_by_source: bool = False,
) -> dict[str, Any]:
    """Merge trained single-task models (``{task: state dict file}``, each a whole ``cfg.backbone``
    with its own classifier for that task of ``cfg.data``) into one multi-task network.

    ``group_by_source``: the budget's bound counts the validation images that share a source
    (a digit of the embedded data, the dataset's ``source_indices``) as one sample
    (`MergeBudget.groups`): the embedded data sets compose their images from a few hundred
    digits per split.

    The budget is measured on the validation split, the CKA, amalgamation and fine-tune use the
    training split, and the test split scores the originals and the merged network. Writes
    ``results.json``, ``tree.txt`` and the merged network (``merged.safetensors``, `graphsurgeon.load`
    reads it) to ``cfg.out_dir``; returns the results with the `MergeResult` under ``"merge"``.
    """
    from graphsurgeon.core.checkpoint import save

    seed_everything(cfg.train.seed)
    data, task_info = _datasets(cfg)
    unknown = [t for t in model_files if t not in task_info]
    if unknown:
        raise TaskSpecError(f"models are given for tasks {unknown}, which {cfg.data!r} does not have; name them after its tasks {sorted(task_info)}.")
    dense = [t for t in model_files if task_info[t].kind != "classification"]
    if dense:
        raise TaskSpecError(
            f"tasks {dense} are not classification tasks: a model file holds a backbone and its classifier, so "
            "merging from files takes classification tasks; call graphsurgeon.merge_trained with heads= for others."
        )
    if group_by_source:
        sources = _source_indices(data["val"])
        if sources is None:
            raise ConfigError(f"group_by_source: the {cfg.data!r} validation set records no source_indices; "
                              "leave it off (the samples are then taken as independent).")
        budget = replace(budget or MergeBudget(), groups=sources)
    example = data["train"][0][0][None]
    models = {}
    for t, path in model_files.items():
        models[t] = make_backbone(cfg.backbone, example.shape[1], example.shape[-1], num_classes=task_info[t].num_outputs)
        load_backbone_weights(models[t], path)
    start = time.perf_counter()
    result = merge_trained(
        models, data=data["train"], val=data["val"], tasks={t: task_info[t] for t in models}, budget=budget,
        config=merge, trunk=cfg.trunk, granularity=cfg.granularity,
    )
    seconds = time.perf_counter() - start
    device = cfg.train.device if merge is None else merge.train.device
    test = {
        name: Trainer(net, None, data["train"], None, TrainConfig(progress=False, device=device)).evaluate(data["test"])
        for name, net in (("original", result.separate), ("merged", result.net))
    }
    results = {
        "tasks": list(models),
        "metric": result.metric,
        "validation": {"original": result.original, "merged": result.final},
        "test": test,
        "parameters": {"original": result.curve[0]["parameters"], "merged": sum(p.numel() for p in result.net.parameters())},
        "flops": {"original": result.curve[0]["flops"], "merged": count_flops(result.net, example.to(device))},
        "tree": str(result.net.tree),
        "tree_partitions": result.net.tree.partitions(),
        "curve": [{k: v for k, v in point.items() if k != "results"} for point in result.curve],
        "decisions": result.decisions,
        "stopped": result.stopped,
        "merge_seconds": seconds,
    }
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "tree.txt").write_text(str(result.net.tree) + "\n")
        save(result.net, out / "merged.safetensors")
    results["merge"] = result
    return results
