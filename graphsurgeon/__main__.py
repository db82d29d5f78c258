"""Command line: ``python -m graphsurgeon demo`` and ``python -m graphsurgeon train ...``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one method on one dataset")
    p.add_argument("--method", default="mtsl", choices=["mtsl", "hps", "single"])
    p.add_argument("--backbone", default="small_resnet", help="small_resnet or a torchvision model name")
    p.add_argument("--data", default="multimnist", choices=["multimnist", "nyuv2", "cityscapes", "celeba"])
    p.add_argument("--data-root", default=None, help="folder of a downloaded dataset (not needed for multimnist)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all of the dataset's)")
    p.add_argument("--trunk", default=None, help="node where the backbone ends (default: the classifier's input)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64, help="per process under torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--schedule-scale", type=float, default=1.0, help="MTSL: scale the phase lengths")
    p.add_argument("--threshold", type=float, default=0.8, help="MTSL: CKA threshold for merging")
    p.add_argument("--align-weight", type=float, default=0.2, help="MTSL: weight of the alignment loss")
    p.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args):
    from graphsurgeon.experiment import ExperimentConfig
    from graphsurgeon.methods.mtsl import MTSLConfig
    from graphsurgeon.train import TrainConfig

    mtsl = MTSLConfig(schedule_scale=args.schedule_scale, threshold=args.threshold, align_weight=args.align_weight)
    epochs = args.epochs or (sum(mtsl.scaled(mtsl.task_phases)) + 2)
    return ExperimentConfig(
        method=args.method,
        backbone=args.backbone,
        data=args.data,
        data_root=args.data_root,
        tasks=args.tasks.split(",") if args.tasks else None,
        trunk=args.trunk,
        train_size=args.train_size,
        epochs=epochs,
        train=TrainConfig(
            epochs=epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
            progress=not args.no_progress,
        ),
        mtsl={"schedule_scale": args.schedule_scale, "threshold": args.threshold, "align_weight": args.align_weight},
        out_dir=args.out or f"runs/{args.method}-{args.data}-{args.seed}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphsurgeon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MTSL vs single-task vs hard sharing on the embedded MultiMNIST")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--quick", action="store_true", help="tiny data and schedule: a smoke run in seconds")
    _train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt as stop:
        print(f"\n[graphsurgeon] interrupted: {stop or 'no checkpoint directory was set'}", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "demo":
        from graphsurgeon.demo import run_demo

        run_demo(Path(args.out), seed=args.seed, progress=not args.no_progress, quick=args.quick)
        return 0
    from graphsurgeon import distributed
    from graphsurgeon.experiment import run

    cfg = _config(args)
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
