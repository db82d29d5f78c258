"""Merging separately trained single-task models (`graphsurgeon.merge_trained`) on a task family
with a known answer.

A ``small_resnet`` is pretrained (hard sharing) on another data set's tasks, as users start
from pretrained weights; one single-task model per task is fine-tuned from it, each a whole
model with its own classifier, and saved as a safetensors file, as a user would hold them. The files are merged as ``graphsurgeon merge`` merges them
(`graphsurgeon.apps.experiment.run_merge`): MTSL's rule from the first depth down, knowledge
amalgamation into each group node, a 1 % relative validation budget per task, then a short joint
fine-tune. Writes benchmarks/results/merge_trained.{json,md} and the trade-off curve
merge_trained_curve.png (needs matplotlib), with the machine and the torch build.

    python benchmarks/merge_trained.py                      # gt_twins, one seed, one torch thread
    python benchmarks/merge_trained.py --seeds 3 4 0 1 2 --jobs 2 --tolerance 0.02   # the committed report
    python benchmarks/merge_trained.py --data multimnist --tasks left,left_parity,right,right_ge5 \\
        --groups left,left_parity right,right_ge5
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import graphsurgeon as gs
from graphsurgeon.apps.experiment import DATASETS, ExperimentConfig, make_backbone, run_merge
from graphsurgeon.data.ground_truth import GROUND_TRUTH, score_partitions
from graphsurgeon.training.trainer import TrainConfig, seed_everything


def task_info_of(data) -> dict:
    return data.task_info if hasattr(data, "task_info") else data.dataset.task_info


def pretrain(args, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The common starting point, as users fine-tune from pretrained weights: a hard-shared
    backbone trained on another data set's tasks (``--pretrain-data``); its weights by name."""
    cfg = ExperimentConfig(data=args.pretrain_data, tasks=args.pretrain_tasks.split(","), train=TrainConfig(seed=args.seed))
    data = DATASETS[args.pretrain_data](cfg, "train", args.train_size)
    info = task_info_of(data)
    seed_everything(args.seed)
    backbone = make_backbone("small_resnet", example.shape[1], example.shape[-1])
    heads = {t: info[t].task(lambda shape, n=info[t].num_outputs: nn.Linear(shape[0], n)) for t in cfg.tasks}
    net = gs.multitask(backbone, heads, sharing="shared", example_input=example)
    gs.fit(net, data, epochs=args.pretrain_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=False)
    state: dict[str, torch.Tensor] = {}
    for node in net.tree.path(cfg.tasks[0])[1:]:
        state.update(net.node_module(node).state_dict())
    return state


def train_single(task: str, info, splits, args, path: Path, pretrained: dict[str, torch.Tensor] | None) -> dict:
    """One whole model (backbone + its classifier) trained on ``task`` alone, saved to ``path``.

    Every task's model starts from the same weights: the pretrained backbone (else one seed's
    init) and a classifier drawn from one seed. It trains as a one-task network whose trunk is
    the model's own output (an identity head), so every parameter, the classifier's too, lies in
    its segments, which are written back into the model by name."""
    example = splits["train"][0][0][None]
    seed_everything(args.seed)
    model = make_backbone("small_resnet", example.shape[1], example.shape[-1], num_classes=info.num_outputs)
    if pretrained is not None:
        missing, unexpected = model.load_state_dict(pretrained, strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    net = gs.multitask(model, {task: info.task(nn.Identity())}, trunk="fc", sharing="shared", example_input=example)
    start = time.perf_counter()
    trainer = gs.fit(net, splits["train"], splits["val"], epochs=args.epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                     seed=args.seed, progress=False, schedule=args.schedule, restore_best=True)
    seconds = time.perf_counter() - start
    state = {}
    for node in net.tree.path(task)[1:]:
        state.update(net.node_module(node).state_dict())
    model.load_state_dict(state)
    save_file(model.state_dict(), str(path))
    return {"val": trainer.best_record["val"][task], "best_epoch": trainer.best_record["epoch"],
            "val_per_epoch": [r["val"][task] for r in trainer.history], "seconds": seconds}


# the arguments a single-task model's weights depend on: models trained with the same ones are reused
TRAINING_ARGS = ("data", "tasks", "train_size", "val_size", "epochs", "schedule", "pretrain_data", "pretrain_tasks",
                 "pretrain_epochs", "lr", "finetune_lr", "batch_size", "seed")


def trained_models(args, tasks: list[str], info, splits, folder: Path) -> tuple[dict, bool]:
    """Each task's single-task model file in ``folder``, trained unless a previous run with the same
    training arguments left them there (its ``manifest.json``); the training records, and whether
    they were reused."""
    manifest = folder / "manifest.json"
    wanted = {k: getattr(args, k) for k in TRAINING_ARGS}
    if manifest.exists() and not args.retrain:
        saved = json.loads(manifest.read_text())
        if saved["args"] == wanted and all((folder / f"{t}.safetensors").exists() and t in saved["single"] for t in tasks):
            return {t: saved["single"][t] for t in tasks}, True
    pretrained = pretrain(args, splits["train"][0][0][None]) if args.pretrain_epochs else None
    single = {t: train_single(t, info[t], splits, args, folder / f"{t}.safetensors", pretrained) for t in tasks}
    manifest.write_text(json.dumps({"args": wanted, "single": single}, indent=1))
    return single, False


def similarity_of_originals(separate: gs.MultiTaskNetwork, data, samples: int, seed: int) -> list[dict]:
    """Debiased linear CKA between the original models' segment outputs at every depth (the
    separate network holds one path per model), on ``samples`` training inputs: what MTSL's rule
    would see at each depth if nothing had been merged above it."""
    from graphsurgeon.methods.structure.mtsl import node_similarity
    from graphsurgeon.training.trainer import Trainer

    trainer = Trainer(separate, None, data, None, TrainConfig(seed=seed, progress=False))
    out = []
    for depth in range(1, separate.depth + 1):
        ids = [node.id for node in separate.tree.at_depth(depth)]
        out.append({"depth": depth, "tasks": [list(separate.tree.node(i).tasks) for i in ids],
                    "samples": min(samples, len(data)), "similarity": node_similarity(trainer, depth, ids, samples).tolist()})
    return out


def shared_depth(tree: gs.TaskTree, a: str, b: str) -> int:
    """The deepest segment two tasks still share (0: only the input)."""
    return max(d for d, (x, y) in enumerate(zip(tree.path(a), tree.path(b))) if x.id == y.id)


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load": round(os.getloadavg()[0], 1),
    }


def markdown(record: dict) -> str:
    r, a = record["merge"], record["args"]
    tasks, metric = r["tasks"], r["metric"]
    lines = [
        f"# Merging separately trained models: {a['data']} (seed {a['seed']}; CPU, {record['machine']['threads']} thread)",
        "",
        f"Machine: {record['machine']['processor']}, {record['machine']['cpus']} CPUs; torch {record['machine']['torch']} "
        f"(git {record['machine']['torch_git'][:10]}, CUDA {record['machine']['cuda']}), Python {record['machine']['python']}.",
        "",
        f"Command: `python benchmarks/merge_trained.py {record['command']}`",
        "",
        (f"A small_resnet pretrained {a['pretrain_epochs']} epochs (hard sharing, lr {a['lr']}) on {a['pretrain_data']}'s "
         f"{a['pretrain_tasks']} ({a['train_size']} samples), then " if a["pretrain_epochs"] else "")
        + f"one single-task model per task fine-tuned from it {a['epochs']} epochs (lr {a['finetune_lr']}"
        + (f", {a['schedule']} schedule, the best validation epoch kept" if a.get("schedule", "none") != "none" else "")
        + f") on {a['train_size']} samples, "
        f"saved as safetensors and merged as `graphsurgeon merge` does: CKA on {a['similarity_samples']} training samples, "
        f"MTSL's partition rule (threshold {a['threshold']}), amalgamation {a['distill_epochs']} epoch(s) per merge "
        f"(lr {a.get('distill_lr', a['lr'])}) "
        "(each task's output through its unchanged path fitted to its model's), "
        f"budget: any task's validation {'/'.join(sorted(set(metric.values())))} may drop at most {a['tolerance']:.0%} "
        f"(relative) vs its model ({a['val_size']} validation samples"
        + (f"; a merge is kept when the one-sided {a['confidence']:.0%} upper bound of every task's drop, a paired test on "
           "those samples, is within it" if a.get("confidence") else "; the measured drop")
        + ("" if a.get("independent_samples", True) else
           ", its standard error taken over the digits the images are made of (cluster-robust, the larger over the digit "
           f"positions: the validation images hold {' and '.join(map(str, record.get('val_sources', [])))} distinct digits)")
        + f"), then {a['finetune_epochs']} fine-tune epoch(s) (lr {a.get('joint_lr', a['lr'])}), each checked against the budget (the best state within it is kept, "
        "the merged network before the fine-tune included). "
        f"Test: {a['test_size']} samples. Merging stopped: {r['stopped']}. Wall time: training "
        + (f"{sum(m['seconds'] for m in record['single_task_training'].values()):.0f} s (the single-task models' training, in the "
           "run that trained them; this run reused them)" if record.get("models_reused") else f"{record['train_seconds']:.0f} s")
        + ", "
        + f"merging (with fine-tune) {r['merge_seconds']:.0f} s"
        + (f"; the whole run {record['cpu_seconds']:.0f} s of CPU time (the machine was shared: load average "
           f"{record['machine']['load']} at the end)." if "cpu_seconds" in record else
           " (not CPU time: the machine was shared with other jobs, load average about 7 on its 2 cores)."),
        "",
        "| task | metric | original val | merged val | drop (upper bound) | original test | merged test |",
        "|---|---|---|---|---|---|---|",
    ]
    final = kept_point(r["curve"])
    for t in tasks:
        m = metric[t]
        v, s = r["validation"], r["test"]
        lines.append(f"| {t} | {m} | {v['original'][t][m]:.4f} | {v['merged'][t][m]:.4f} | {drop_cell(final, t)} | "
                     f"{s['original'][t][m]:.4f} | {s['merged'][t][m]:.4f} |")
    lines += ["", "Single-task models, validation " + "/".join(sorted(set(metric.values()))) + " after each training epoch"
              + (" (reused from a previous run with the same training arguments)" if record.get("models_reused") else "") + ":", ""]
    for t in tasks:
        history = record["single_task_training"][t].get("val_per_epoch")
        if history:
            lines.append(f"- {t}: " + ", ".join(f"{h[metric[t]]:.3f}" for h in history))
    p, f = r["parameters"], r["flops"]
    lines += [
        "",
        f"Parameters: {p['original']:,} → {p['merged']:,} ({p['merged'] / p['original']:.1%}); "
        f"forward FLOPs per sample: {f['original'] / 1e6:.2f} M → {f['merged'] / 1e6:.2f} M ({f['merged'] / f['original']:.1%}).",
        "",
        "Merged tree:",
        "```",
        r["tree"],
        "```",
    ]
    if record.get("sharing"):
        s = record["sharing"]
        lines += [
            "",
            "Deepest segment shared by each pair of tasks (of "
            f"{len(r['tree_partitions'])}): same ground-truth group {s['within']}; different groups {s['across']}.",
            "",
            f"Tasks of one ground-truth group share deeper than tasks of different groups: **{s['verdict']}** "
            f"(shallowest within a group: {s['min_within']}, deepest across groups: {s['max_across']}).",
        ]
    if record.get("ground_truth"):
        g = record["ground_truth"]
        last = g["per_depth"][-1]
        lines += [
            "",
            f"Against the ground truth (graphsurgeon.data.ground_truth, scored at the last depth): exact {g['exact']}, "
            f"ARI {g['ari']:.2f}; last-depth partition of the scored tasks {[list(b) for b in last['partition']]}; "
            f"the control shares its last node with {g['controls']}.",
        ]
    lines += [
        "",
        "Trade-off curve (validation; every merge tried and every fine-tune epoch, in order; past tolerance: the task's "
        "drop and its upper bound; ![curve](merge_trained_curve.png)):",
        "",
        "| step | kind | depth | tasks merged | kept | params | MFLOPs | " + " | ".join(tasks) + " | past tolerance |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for i, pt in enumerate(r["curve"]):
        kept = "" if pt["kind"] == "start" else "yes" if pt.get("accepted") else "no"
        what = "+".join(pt.get("tasks", [])) or (f"epoch {pt['epoch']}" if "epoch" in pt else "")
        cells = [str(i), pt["kind"], str(pt.get("depth", "")), what, kept, f"{pt['parameters']:,}",
                 f"{pt['flops'] / 1e6:.2f}", *[f"{pt['metrics'][t]:.4f}" for t in tasks],
                 ", ".join(f"{t} {drop_cell(pt, t)}" for t in pt["violations"])]
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("originals_similarity", "on the CKA's training samples"),
                       ("originals_similarity_all_training", "on the whole training split")):
        if record.get(key):
            lines += ["", similarity_table(record[key], record.get("sharing", {}).get("groups"), label)]
    lines += ["", "CKA between sibling nodes at each decision (a retry: after the budget undid a merge, the CKA of the "
              "members' tasks at the deepest depth, which splits the group):", ""]
    for d in r["decisions"]:
        labels = ["+".join(t) for t in d["tasks"]]
        sim = "; ".join(f"{labels[i]}~{labels[j]} {d['similarity'][i][j]:.2f}" for i, j in itertools.combinations(range(len(labels)), 2))
        merged = " | ".join("{" + ", ".join("+".join(t) for t in g) + "}" for g in d["merged"]) or "none"
        where = f"depth {d['depth']}, retry (CKA at depth {d['measured_at']})" if d.get("retry") else f"depth {d['depth']}"
        lines.append(f"- {where}: {sim}; MTSL merges {merged}")
    if record.get("seeds"):
        lines[lines.index("") + 1:lines.index("") + 1] = [
            f"Every seed ({len(record['seeds'])}; each its own pretraining, models and merge; the detail below is seed "
            f"{a['seed']}'s, every seed's report is in `{SEEDS_FOLDER}/`):", "", *seeds_table(record["seeds"]), ""]
    return "\n".join(lines) + "\n"


def kept_point(curve: list[dict]) -> dict:
    """The curve point of the returned network: the last one kept (the start when none was)."""
    return next(pt for pt in reversed(curve) if pt["kind"] == "start" or pt.get("accepted"))


def drop_cell(point: dict, task: str) -> str:
    """A task's relative drop at a curve point and, where the budget had one, its upper bound."""
    drop, bound = point["drops"][task], point.get("bounds", {}).get(task)
    return f"{drop:+.1%}" + (f" ({bound:+.1%})" if bound is not None else "")


def similarity_table(per_depth: list[dict], groups: list[list[str]] | None, label: str) -> str:
    """The originals' CKA at every depth: each pair of tasks, and the mean within and across the
    ground-truth groups."""
    tasks = [t[0] for t in per_depth[0]["tasks"]]
    pairs = list(itertools.combinations(range(len(tasks)), 2))
    group_of = {t: i for i, g in enumerate(groups or []) for t in g}

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.2f}" if values else ""

    head = ["depth", *[f"{tasks[i]}~{tasks[j]}" for i, j in pairs]] + (["within groups", "across groups"] if groups else [])
    rows = [f"CKA between the original models' segment outputs at every depth ({label}, {per_depth[0]['samples']} samples):",
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in per_depth:
        sim = d["similarity"]
        cells = [str(d["depth"]), *[f"{sim[i][j]:.2f}" for i, j in pairs]]
        if groups:
            scored = [(i, j) for i, j in pairs if tasks[i] in group_of and tasks[j] in group_of]
            cells += [mean([sim[i][j] for i, j in scored if group_of[tasks[i]] == group_of[tasks[j]]]),
                      mean([sim[i][j] for i, j in scored if group_of[tasks[i]] != group_of[tasks[j]]])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="gt_twins", choices=sorted(DATASETS))
    parser.add_argument("--tasks", default=None, help="comma-separated (default: all of the dataset's)")
    parser.add_argument("--groups", nargs="*", default=None, help="ground-truth groups, each comma-separated")
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--val-size", type=int, default=5000,
                        help="the budget's validation samples: a 1 %% drop of 0.8 accuracy is 0.6 standard errors on 1000")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-data", default="multimnist", choices=sorted(DATASETS))
    parser.add_argument("--pretrain-tasks", default="left,right")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="0: every model starts from one random init")
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="training of each single-task model")
    parser.add_argument("--schedule", default="cosine", choices=["none", "cosine"],
                        help="of each single-task model's training, whose best validation epoch is kept (a converged model, as users hold)")
    # the group node starts from the members' mean and the models are converged: steps smaller than training's
    parser.add_argument("--distill-lr", type=float, default=5e-4, help="the amalgamation's")
    parser.add_argument("--joint-lr", type=float, default=1e-4, help="the joint fine-tune of the merged network's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--confidence", type=float, default=0.95, help="the budget's one-sided confidence (MergeBudget.confidence)")
    parser.add_argument("--independent-samples", action="store_true",
                        help="take the validation images as independent in the budget's bound (default: those that share "
                             "a digit count as one source, MergeBudget.groups)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--similarity-samples", type=int, default=800)
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="runs/merge_trained")
    parser.add_argument("--retrain", action="store_true", help="train the single-task models even if a previous run left them")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown and the curve from the JSON")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every step for each seed (its own models and folders), in this order; the report details "
                             "the smallest and tabulates them all")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (with --seeds)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        record = json.loads((out / "merge_trained.json").read_text())
        write(record, out)
        return
    if args.seeds is None:
        record = run_seed(args)
    else:
        import multiprocessing

        per_seed = [argparse.Namespace(**{**vars(args), "seed": s, "runs": str(Path(args.runs) / f"seed{s}"),
                                          "out": str(out / SEEDS_FOLDER / f"seed{s}")}) for s in args.seeds]
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            records = sorted(pool.map(run_seed, per_seed), key=lambda r: r["args"]["seed"])  # (run in the order given)
        record = {**records[0], "seeds": [seed_summary(r) for r in records]}
        record["command"] = record["command"].replace(f"--seed {records[0]['args']['seed']}",
                                                      f"--seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_trained.json").write_text(json.dumps(record, indent=1, default=str))
    write(record, out)


def run_seed(args: argparse.Namespace) -> dict:
    """Pretrain, train the single-task models (or reuse them), merge and score one seed; its
    record, also written to ``args.out``."""
    out = Path(args.out)
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    train = TrainConfig(epochs=max(args.finetune_epochs, 1), lr=args.joint_lr, batch_size=args.batch_size, seed=args.seed,
                        progress=False)
    cfg = ExperimentConfig(backbone="small_resnet", data=args.data, tasks=args.tasks.split(",") if args.tasks else None,
                           train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, train=train,
                           out_dir=str(Path(args.runs) / "merged"))
    splits = {s: DATASETS[args.data](cfg, s, n) for s, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size))}
    info = task_info_of(splits["train"])
    tasks = list(cfg.tasks or info)
    models = Path(args.runs) / "models"
    models.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    single, reused = trained_models(args, tasks, info, splits, models)
    train_seconds = time.perf_counter() - start
    budget = gs.MergeBudget(tolerance=args.tolerance, confidence=args.confidence)
    merge = gs.MergeConfig(threshold=args.threshold, similarity_samples=args.similarity_samples, distill_epochs=args.distill_epochs,
                           distill_lr=args.distill_lr, finetune_epochs=args.finetune_epochs, train=train)
    results = run_merge(cfg, {t: models / f"{t}.safetensors" for t in tasks}, budget, merge,
                        group_by_source=not args.independent_samples)
    result = results.pop("merge")
    net = result.net
    variant = args.data.removeprefix("gt_") if args.data.startswith("gt_") else None
    truth = GROUND_TRUTH.get(variant) if variant else None
    groups = [g.split(",") for g in args.groups] if args.groups is not None else [list(g) for g in truth.groups] if truth else None
    record = {
        "args": vars(args),
        "command": " ".join(f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(v)}"
                            for k, v in vars(args).items() if v is not None and k not in ("runs", "out", "retrain", "render", "seeds", "jobs")),
        "machine": machine(),
        "single_task_training": single,
        "val_sources": [int(c.unique().numel()) for c in getattr(splits["val"], "source_indices", torch.empty(0, 0)).T],
        "models_reused": reused,
        "train_seconds": train_seconds,
        "originals_similarity": similarity_of_originals(result.separate, splits["train"], args.similarity_samples, args.seed),
        "originals_similarity_all_training": similarity_of_originals(result.separate, splits["train"], args.train_size, args.seed),
        "merge": results,
    }
    if truth is not None and set(truth.tasks) <= set(tasks):
        record["ground_truth"] = score_partitions(net.tree.partitions(), variant)
    if groups:
        group_of = {t: i for i, g in enumerate(groups) for t in g}
        pairs = [(a, b) for a, b in itertools.combinations(tasks, 2) if a in group_of and b in group_of]
        within = {f"{a}+{b}": shared_depth(net.tree, a, b) for a, b in pairs if group_of[a] == group_of[b]}
        across = {f"{a}+{b}": shared_depth(net.tree, a, b) for a, b in pairs if group_of[a] != group_of[b]}
        if within and across:
            record["sharing"] = {
                "groups": groups, "within": within, "across": across,
                "min_within": min(within.values()), "max_across": max(across.values()),
                "verdict": "yes" if min(within.values()) > max(across.values()) else "no",
            }
    record["cpu_seconds"] = time.process_time() - cpu_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_trained.json").write_text(json.dumps(record, indent=1, default=str))
    write(record, out)
    return record


# where `--seeds` writes each seed's own report, under --out
SEEDS_FOLDER = "merge_trained_seeds"


def seed_summary(record: dict) -> dict:
    """What the across-seeds table shows of one seed's record."""
    r = record["merge"]
    final = kept_point(r["curve"])
    return {
        "seed": record["args"]["seed"],
        "sharing": record.get("sharing"),
        "parameters": r["parameters"]["merged"] / r["parameters"]["original"],
        "flops": r["flops"]["merged"] / r["flops"]["original"],
        "largest_bound": max(final["bounds"].values()),
        "test_change": {t: r["test"]["merged"][t][m] - r["test"]["original"][t][m] for t, m in r["metric"].items()},
        "merges": sum(pt["kind"] == "merge" and bool(pt.get("accepted")) for pt in r["curve"]),
        "tried": sum(pt["kind"] == "merge" for pt in r["curve"]),
    }


def seeds_table(seeds: list[dict]) -> list[str]:
    """One row per seed: whether the ground-truth groups share deeper, how deep, the cost saved
    and the budget's bound; then the count."""
    lines = ["| seed | twins share deeper | deepest shared within groups | across groups | merges kept / tried | params | FLOPs "
             "| largest drop bound (val) | largest test change |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        sh = s["sharing"] or {}
        worst = min(s["test_change"].items(), key=lambda kv: kv[1])
        lines.append(f"| {s['seed']} | {sh.get('verdict', '')} | {sh.get('within', '')} | max {sh.get('max_across', '')} | "
                     f"{s['merges']} / {s['tried']} | {s['parameters']:.1%} | {s['flops']:.1%} | {s['largest_bound']:+.1%} | "
                     f"{worst[0]} {worst[1]:+.3f} |")
    yes = sum((s["sharing"] or {}).get("verdict") == "yes" for s in seeds)
    lines += ["", f"Tasks of one ground-truth group share deeper than tasks of different groups in **{yes} of {len(seeds)}** seeds."]
    return lines


def write(record: dict, out: Path) -> None:
    """The markdown table and the trade-off curve of a run's record."""
    from graphsurgeon.apps.report import plot_merge_curve

    r = record["merge"]
    (out / "merge_trained.md").write_text(markdown(record))
    plot_merge_curve(r["curve"], r["metric"], out / "merge_trained_curve.png", title=f"merge_trained on {record['args']['data']}")
    print(markdown(record))


if __name__ == "__main__":
    main()
