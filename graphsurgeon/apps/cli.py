"""Command line: ``python -m graphsurgeon demo``, ``python -m graphsurgeon train ...`` and
``python -m graphsurgeon merge --models a.safetensors b.safetensors ...``."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one method on one dataset")
    p.error = types.MethodType(_Parser.error, p)  # type: ignore[method-assign]  # one-line errors here too
    from graphsurgeon.apps.experiment import DATASETS, METHODS
    from graphsurgeon.data.corruptions import BACKENDS, CORRUPTIONS, DEFAULT_CORRUPTIONS
    from graphsurgeon.methods.aggregation.registry import AGGREGATORS
    from graphsurgeon.training.config import AUTOCAST, OPTIMIZERS, SCHEDULES

    p.add_argument("--method", default="mtsl", choices=list(METHODS),
                   help="mtsl (learn the tree), tag / itmtl (lookahead affinity), dmtg (differentiable grouping), "
                   "hps (hard sharing), single / separate (one network per task)")
    p.add_argument("--grad", default=None, choices=sorted(AGGREGATORS),
                   help="gradient method for hps/single/separate (ew = plain sum)")
    p.add_argument("--grad-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the gradient method, e.g. c=0.4 for cagrad (repeatable)")
    p.add_argument("--rep-grad", action="store_true", help="aggregate gradients w.r.t. the shared representation")
    p.add_argument("--sam", type=float, default=0.0, metavar="RHO", help="sharpness-aware radius (e.g. 0.05); 0 = off")
    p.add_argument("--groups", type=int, default=2, help="TAG: number of task groups")
    p.add_argument("--branches", type=int, default=2, help="DMTG: number of branches K")
    p.add_argument("--search-epochs", type=int, default=None, help="TAG affinity / DMTG search epochs (default: about half)")
    p.add_argument("--backbone", default="small_resnet",
                   help="small_resnet, unet or resnet18_decoder (encoder-decoders: pass --trunk up0 / decoder.3), or a torchvision model name")
    p.add_argument("--data", default="multimnist", choices=list(DATASETS))
    p.add_argument("--data-root", default=None, help="folder of a downloaded dataset (not needed for the embedded multimnist, gt_twins, gt_branching)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed an embedded dataset is generated from (default: --seed); fix it to compare seeds on one split")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all of the dataset's)")
    p.add_argument("--trunk", default=None, help="node where the backbone ends (default: the classifier's input; with dense tasks 'spatial', "
                   "its last feature map)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="backbone state dict to start from: a .safetensors file, or a .pth/.pt read with "
                        "torch.load(weights_only=True); keys as --backbone's own state_dict()")
    p.add_argument("--equal-final-budget", action="store_true",
                   help="tag/dmtg: add the search epochs on top of --epochs, so the chosen network trains "
                        "for --epochs like every other method's (default: the search shares the budget)")
    p.add_argument("--independent-init", action="store_true",
                   help="mtsl/single/separate: give every task's copy its own random init "
                        "(default: identical copies of one backbone, as the MTSL paper)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64, help="per process under torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-size", type=int, default=None, help="training samples (default: the dataset's)")
    p.add_argument("--val-size", type=int, default=None, help="validation samples, evaluated every epoch")
    p.add_argument("--test-size", type=int, default=None, help="test samples, evaluated clean and per corruption")
    p.add_argument("--corruptions", default=",".join(DEFAULT_CORRUPTIONS), type=_names,
                   help=f"comma-separated corruptions of the test split, 'all' (ImageNet-C's 15) or 'none'; "
                   f"any of {', '.join(CORRUPTIONS)}")
    p.add_argument("--severities", default=(1, 3, 5), type=_severities,
                   help="comma-separated corruption severities, 1 (mild) to 5 (default 1,3,5; 1,2,3,4,5 for the full suite)")
    p.add_argument("--corruption-backend", default="torch", choices=list(BACKENDS),
                   help="torch (built in) or imagecorruptions (the reference NumPy code; pip install imagecorruptions)")
    train = p.add_argument_group("training", "the settings of graphsurgeon.TrainConfig")
    train.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS))
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum")
    train.add_argument("--schedule", default="none", choices=list(SCHEDULES), help="learning-rate schedule, stepped per epoch")
    train.add_argument("--step-size", type=int, default=None, help="--schedule step: epochs between decays")
    train.add_argument("--milestones", default=(), type=_epochs, help="--schedule multistep: comma-separated epochs, e.g. 30,60")
    train.add_argument("--gamma", type=float, default=0.1, help="decay factor of step and multistep")
    train.add_argument("--autocast", default=None, choices=list(AUTOCAST), help="mixed precision (default: off)")
    train.add_argument("--grad-clip", type=float, default=None, metavar="NORM", help="clip the global gradient norm")
    train.add_argument("--monitor", default="val_loss",
                       help="selects the best epoch (written as checkpoint/best.safetensors): val_loss or TASK/METRIC")
    p.add_argument("--schedule-scale", type=float, default=1.0, help="MTSL: scale the phase lengths")
    p.add_argument("--threshold", type=float, default=0.8, help="MTSL: CKA threshold for merging")
    p.add_argument("--align-weight", type=float, default=0.2, help="MTSL: weight of the alignment loss")
    p.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run that --out already holds")
    p.add_argument("--no-progress", action="store_true")
    return p


def _merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge separately trained single-task models into one multi-task network")
    p.error = types.MethodType(_Parser.error, p)  # type: ignore[method-assign]  # one-line errors here too
    from graphsurgeon.apps.experiment import DATASETS

    p.add_argument("--models", nargs="+", required=True, metavar="PATH",
                   help="one state dict per task (.safetensors, or .pth/.pt read with weights_only=True): a whole "
                        "--backbone with its own classifier for that task")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task of each model, in --models order (default: the files' names without suffix)")
    p.add_argument("--backbone", default="small_resnet", help="small_resnet or a torchvision model name")
    p.add_argument("--data", default="multimnist", choices=list(DATASETS))
    p.add_argument("--data-root", default=None, help="folder of a downloaded dataset (not needed for embedded data)")
    p.add_argument("--trunk", default=None, help="node where the backbone ends (default: the classifier's input)")
    p.add_argument("--train-size", type=int, default=None, help="samples for the CKA, the amalgamation and the fine-tune")
    p.add_argument("--val-size", type=int, default=None, help="samples the budget is measured on")
    p.add_argument("--test-size", type=int, default=None, help="samples the originals and the merged network are scored on")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest drop of any task's validation metric vs its model that a merge may cause (0.01: 1 %%)")
    p.add_argument("--absolute", action="store_true", help="--tolerance is in the metric's units, not relative")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="a merge is kept when its drop is within --tolerance at this one-sided confidence (a paired "
                        "test on the validation samples); 0: the measured drop as it is")
    p.add_argument("--group-by-source", action="store_true",
                   help="count validation images made of one source (a digit of the embedded data sets) as one sample "
                        "in the budget's bound (MergeBudget.groups)")
    p.add_argument("--max-params", type=int, default=None, help="stop merging at this many parameters")
    p.add_argument("--max-flops", type=int, default=None, help="stop merging at this many forward FLOPs per sample")
    p.add_argument("--threshold", type=float, default=0.8, help="MTSL's CKA threshold for a group to merge")
    p.add_argument("--similarity-samples", type=int, default=800, help="training samples the CKA is measured on")
    p.add_argument("--distill-epochs", type=int, default=1, help="amalgamation epochs per merge")
    p.add_argument("--finetune-epochs", type=int, default=0, help="joint training of the merged network afterwards")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the fine-tune (and of the amalgamation without --distill-lr)")
    p.add_argument("--distill-lr", type=float, default=None, help="learning rate of the amalgamation (default: --lr)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="run folder (default runs/merge-<data>-<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run that --out already holds")
    return p


def _merge(args) -> int:
    from graphsurgeon.apps.experiment import ExperimentConfig, run_merge
    from graphsurgeon.errors import ConfigError
    from graphsurgeon.methods.structure.merge_trained import MergeBudget, MergeConfig
    from graphsurgeon.training.trainer import TrainConfig

    names = args.tasks.split(",") if args.tasks else [Path(m).name.split(".")[0] for m in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise ConfigError(
            f"--tasks names {len(names)} tasks {names} for {len(args.models)} --models; give one distinct task per "
            "model, in the same order (e.g. --tasks left,right)."
        )
    for path in args.models:
        if not Path(path).is_file():
            raise ConfigError(f"--models {path!r}: no such file; pass the state dict file of each trained model.")
    for flag, value in {"--train-size": args.train_size, "--val-size": args.val_size, "--test-size": args.test_size,
                        "--similarity-samples": args.similarity_samples, "--distill-epochs": args.distill_epochs,
                        "--batch-size": args.batch_size}.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} is not valid; use a positive int.")
    if args.finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs {args.finetune_epochs} is not valid; use 0 (no fine-tune) or more.")
    if args.distill_lr is not None and not args.distill_lr > 0:
        raise ConfigError(f"--distill-lr {args.distill_lr} is not valid; use a positive learning rate such as 5e-4.")
    if not 0 <= args.confidence < 1:
        raise ConfigError(f"--confidence {args.confidence} is not valid; use a level in (0, 1) such as 0.95, or 0 for the measured drop.")
    out = args.out or f"runs/merge-{args.data}-{args.seed}"
    _check_out(Path(out), resume=False, overwrite=args.overwrite)
    train = TrainConfig(epochs=max(args.finetune_epochs, 1), lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        device=args.device, progress=False)
    train.validate()
    cfg = ExperimentConfig(backbone=args.backbone, data=args.data, data_root=args.data_root, tasks=names, trunk=args.trunk,
                           train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, train=train,
                           out_dir=out)
    budget = MergeBudget(tolerance=args.tolerance, relative=not args.absolute, confidence=args.confidence or None,
                         max_parameters=args.max_params, max_flops=args.max_flops)
    merge = MergeConfig(threshold=args.threshold, similarity_samples=args.similarity_samples, distill_epochs=args.distill_epochs,
                        distill_lr=args.distill_lr or args.lr, finetune_epochs=args.finetune_epochs, train=train)
    results = run_merge(cfg, dict(zip(names, args.models)), budget, merge, group_by_source=args.group_by_source)
    print(results["tree"])
    print(json.dumps({k: results[k] for k in ("test", "parameters", "flops", "stopped")}, indent=1))
    return 0


def _config(args):
    from graphsurgeon.apps.experiment import ExperimentConfig
    from graphsurgeon.methods.structure.mtsl import MTSLConfig
    from graphsurgeon.training.trainer import TrainConfig

    mtsl = MTSLConfig(schedule_scale=args.schedule_scale, threshold=args.threshold, align_weight=args.align_weight)
    epochs = args.epochs if args.epochs is not None else sum(mtsl.scaled(mtsl.task_phases)) + 2
    search = args.search_epochs or max(1, epochs // 2)
    return ExperimentConfig(
        method=args.method,
        backbone=args.backbone,
        data=args.data,
        data_root=args.data_root,
        data_seed=args.data_seed,
        tasks=args.tasks.split(",") if args.tasks else None,
        trunk=args.trunk,
        weights=args.weights,
        independent_init=args.independent_init,
        equal_final_budget=args.equal_final_budget,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        corruptions=args.corruptions,
        severities=args.severities,
        corruption_backend=args.corruption_backend,
        epochs=epochs,
        train=TrainConfig(
            epochs=epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
            progress=not args.no_progress, optimizer=args.optimizer, weight_decay=args.weight_decay,
            momentum=args.momentum, schedule=args.schedule, step_size=args.step_size, milestones=args.milestones,
            gamma=args.gamma, autocast=args.autocast, grad_clip=args.grad_clip, monitor=args.monitor,
        ),
        mtsl={"schedule_scale": args.schedule_scale, "threshold": args.threshold, "align_weight": args.align_weight},
        tag={"num_groups": args.groups, "affinity_epochs": search},
        dmtg={"branches": args.branches, "search_epochs": search, "logits_lr": 0.05},
        grad=args.grad,
        grad_options=dict(_option(o) for o in args.grad_option),
        rep_grad=args.rep_grad,
        sam=args.sam,
        out_dir=args.out or f"runs/{args.method}-{args.data}-{args.seed}",
    )


def _names(text: str) -> tuple[str, ...]:
    """``a,b`` as ``("a", "b")``; ``all`` as every corruption; ``none`` (or nothing) as ``()``."""
    from graphsurgeon.data.corruptions import resolve_corruptions
    from graphsurgeon.data.errors import DataError

    try:
        return resolve_corruptions(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _severities(text: str) -> tuple[int, ...]:
    """``1,3,5`` as ``(1, 3, 5)``, each from 1 to 5."""
    try:
        levels = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        levels = ()
    if not levels or any(not 1 <= s <= 5 for s in levels):
        raise argparse.ArgumentTypeError(f"severities are comma-separated ints from 1 to 5, e.g. 1,3,5; got {text!r}")
    return levels


def _epochs(text: str) -> tuple[int, ...]:
    """``30,60`` as ``(30, 60)``."""
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"milestones are comma-separated epochs, e.g. 30,60; got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a number or bool where it is one."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--grad-option wants KEY=VALUE, got {text!r} (e.g. --grad-option c=0.4).")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# TrainConfig fields and the flags that set them: a field's error is reported as its flag's
_FLAG_OF = {
    "epochs": "--epochs", "lr": "--lr", "weight_decay": "--weight-decay", "batch_size": "--batch-size",
    "seed": "--seed", "device": "--device", "optimizer": "--optimizer", "momentum": "--momentum",
    "schedule": "--schedule", "step_size": "--step-size", "milestones": "--milestones", "gamma": "--gamma",
    "autocast": "--autocast", "grad_clip": "--grad-clip", "monitor": "--monitor",
}


def _as_flags(message: str) -> str:
    """A `TrainConfig` error as the command line's user needs it: ``--lr nan``, not ``lr=nan``."""
    for field_name, flag in _FLAG_OF.items():
        message = message.replace(f"TrainConfig.{field_name}=", f"{flag} ").replace(f" {field_name}=", f" {flag} ")
    return message


def _check_args(args: argparse.Namespace, cfg: Any) -> None:
    """Every flag checked once, before any data, network or file is made: a `ConfigError` whose
    message names the flag and a valid value. The TrainConfig fields go through
    `TrainConfig.validate` (the one set of rules the Python API uses too)."""
    from graphsurgeon.errors import CheckpointError, ConfigError

    cfg.train.validate()  # its messages name fields; main() reports them as flags (`_as_flags`)
    counts = {"--train-size": args.train_size, "--val-size": args.val_size, "--test-size": args.test_size,
              "--groups": args.groups, "--branches": args.branches, "--search-epochs": args.search_epochs}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} is not valid; use a positive int.")
    numbers = {"--schedule-scale": (args.schedule_scale, True), "--sam": (args.sam, False),
               "--align-weight": (args.align_weight, False)}
    for flag, (value, strict) in numbers.items():
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ConfigError(f"{flag} {value} is not valid; use a finite number {'>' if strict else '>='} 0.")
    if not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold {args.threshold} is not valid; use a finite number, e.g. 0.8.")
    if args.weights is not None and not Path(args.weights).is_file():
        raise CheckpointError(f"--weights {args.weights!r}: no such file; pass the path of a saved backbone state dict.")
    _check_out(Path(cfg.out_dir), resume=args.resume, overwrite=args.overwrite)


# what a run folder holds (apps.experiment.run): its checkpoint folder or its results
_RUN_MARKERS = ("checkpoint", "results.json")


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The run folder: writable, and not a finished or half-finished run that would be
    overwritten by accident (``--resume`` continues it, ``--overwrite`` replaces it)."""
    from graphsurgeon.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; name a folder for the run.")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / marker).exists() for marker in _RUN_MARKERS):
            raise ConfigError(f"--out {out} holds files that are not a graphsurgeon run; name an empty or new folder.")
        if not (resume or overwrite):
            raise ConfigError(
                f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or name another folder."
            )
        if overwrite and not resume:
            shutil.rmtree(out)
    if resume and not (out / "checkpoint").is_dir():
        raise ConfigError(f"--resume: {out} holds no checkpoint folder to resume; drop --resume to start a run there.")
    try:  # the last check before the run starts: the folder it will write to, and a file in it
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be written ({error.strerror}); name a folder you can write to.") from None


def main(argv: list[str] | None = None) -> int:
    from graphsurgeon.errors import GraphSurgeonError

    parser = _Parser(prog="graphsurgeon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MTSL vs single-task vs hard sharing on the embedded MultiMNIST")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--quick", action="store_true", help="tiny data and schedule: a smoke run in seconds")
    _train_parser(sub)
    _merge_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except GraphSurgeonError as error:  # bad input: the message says what to fix; no traceback
        print(f"[graphsurgeon] error: {_as_flags(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"\n[graphsurgeon] interrupted: {stop or 'no checkpoint directory was set'}", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "demo":
        from graphsurgeon.apps.demo import run_demo

        run_demo(Path(args.out), seed=args.seed, progress=not args.no_progress, quick=args.quick)
        return 0
    if args.command == "merge":
        return _merge(args)
    from graphsurgeon.apps.experiment import run
    from graphsurgeon.training import distributed

    cfg = _config(args)
    _check_args(args, cfg)
    # under torchrun (WORLD_SIZE > 1) join the process group; a plain run is left alone
    cfg.train.device = distributed.setup(cfg.train.device)
    try:
        results = run(cfg, resume=args.resume)
        main = distributed.is_main()
    finally:
        distributed.teardown()
    if main:
        summary = {k: results[k] for k in ("method", "test", "parameters", "flops", "train_seconds")}
        print(results["tree"])
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
