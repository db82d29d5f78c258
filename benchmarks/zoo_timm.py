"""timm and transformers coverage: one small variant of every timm architecture family, and tiny
configs of Hugging Face transformers models (`tiny_transformers`), through the whole pipeline.

A family is one of timm's model modules (``timm.models.resnet``, ``.vision_transformer``, ...);
its variant is the one with the fewest parameters (counted on the meta device, so choosing costs
no memory). Each model (random init, batch 2, 32x32 unless it does not run on that: then the
smallest multiple of its patch size above 32, else its ``pretrained_cfg`` input size; float64,
or float32 above `zoo.FLOAT32_ABOVE` parameters, as in the torchvision sweep) runs in its own
subprocess through:

    build       `graphsurgeon.multitask` with three Linear heads on a branched tree (first half of
                the segments shared, then ``{a}`` | ``{b, c}``), the default trunk (timm models are
                built with ``num_classes=0``, so the trunk is the pooled features), captured with
                ``capture="auto"``: torch.fx, and torch.export where fx cannot trace the model
                (the table marks those "export");
    modes       built in train mode and in eval mode, switched train → eval → train: a one-task
                network equals the eager model bit for bit in every mode (train-mode draws from
                the same seed);
    train_step  one small SGD step on the summed task losses: finite, and the parameters move;
    merge       MTSL's edit: the two branches' first nodes fused (`surgery.fuse`, init "mean",
                with the optimizer), invariants checked, outputs finite;
    torchscript `to_torchscript(method="script")` == eager (``"trace"`` for transformers models,
                whose TorchScript support is tracing); export `to_export` == eager (see
                `EXPORT_TOLERANCE`);
    onnx        `to_onnx` of the network as built (float32, checked in ONNX Runtime at 1e-5 of the
                output's scale);
    save_load   `gs.save` → `gs.load` on a fresh backbone == eager.

Outputs are compared at `TOLERANCE` times their scale (their largest magnitude, at least 1: see
`zoo.compare`). Every failing step is recorded with its error (type and first line), so the table
says which step fails for which family and why. Usage::

    python benchmarks/zoo_timm.py [--families a,b] [--transformers bert,gpt2 | all] [--jobs 2] [--timeout 600] [--resume]

The transformers models (``--transformers bert,gpt2`` or ``all``; named ``hf-<name>``) run the
same steps on their tiny configs (float64, trunk ``pooler_output`` or ``last_hidden_state``).

Results: ``benchmarks/results/zoo_timm.json`` and ``zoo_timm.md``; a run of some models updates
their rows and keeps the others'.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_transformers
import zoo

import graphsurgeon as gs

STEPS = ("build", "modes", "train_step", "merge", "torchscript", "export", "onnx", "save_load")
TASK_OUTPUTS = {"a": 3, "b": 5, "c": 7}
BATCH = 2
IMAGE_SIZE = 32
SEED = 0
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
EXPORT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5}
"""The export step's: timm takes export-only paths (``timm.layers.is_exporting()``):
``resample_abs_pos_embed`` skips its same-size early-out and resamples the position embedding in
float32, so a float64 ViT's own exported program differs from its eager self (``test_vit``:
1.1e-9 for the bare backbone with float64 weights, 3.4e-10 in the network) by float32 rounding."""
CAPTURE = "auto"
NOTES = {
    "naflexvit_base_patch16_parfac_gap": "the backbone itself is not scriptable: `torch.jit.script(model)` fails in "
    "timm's code too (naflexvit.py: `self.forward_head(**features)`, keyword-arg expansion is not supported); the "
    "network's patch embedding is a leaf module, compiled from timm's source",
}
"""What was found about a model's failure beyond its error message, listed with it."""
HF_PREFIX = "hf-"
RESULTS = Path(__file__).resolve().parent / "results"


def families() -> dict[str, str]:
    """``{timm module: its smallest model}``; models that cannot be built on the meta device are
    skipped in the choice (they are usually the large ones)."""
    import timm
    from timm.models import _registry

    by_module: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_module.setdefault(_registry._model_to_module[name], []).append(name)
    chosen = {}
    for module, names in sorted(by_module.items()):
        sizes = {}
        for name in names:
            try:
                with torch.device("meta"):
                    sizes[name] = sum(p.numel() for p in timm.create_model(name, num_classes=0).parameters())
            except Exception:  # a variant that needs arguments or real tensors at build time
                continue
        chosen[module] = min(sizes, key=lambda n: (sizes[n], n)) if sizes else sorted(names)[0]
    return chosen


def build_model(name: str, size: int = IMAGE_SIZE) -> nn.Module:
    """The timm model for ``size`` x ``size`` inputs where it takes an image size (ViTs and kin)."""
    import timm

    try:
        return timm.create_model(name, num_classes=0, img_size=size)
    except TypeError:  # the family has no img_size argument: convolutional, any size
        return timm.create_model(name, num_classes=0)


def input_size(name: str) -> int:
    """32 where the eager model runs on 32x32 images; else the smallest multiple of its patch
    size above 32 (a ViT whose patches must tile the image: deepseek_vit's 14-pixel ones, which
    would otherwise run at its 546x546, beyond the memory of the machine in float32); else the
    size it was designed for (its ``pretrained_cfg``): a family that needs more pixels (window
    attention, two patch sizes) is measured at its own size rather than reported as failing."""
    model = build_model(name).eval()
    patch = next((m.patch_size for m in model.modules() if hasattr(m, "patch_size")), None)
    patch = patch[0] if isinstance(patch, tuple | list) else patch
    sizes = [IMAGE_SIZE] + ([-(-IMAGE_SIZE // patch) * patch] if isinstance(patch, int) and IMAGE_SIZE % patch else [])
    for size in sizes:
        try:
            with torch.no_grad():
                (model if size == IMAGE_SIZE else build_model(name, size).eval())(torch.randn(BATCH, 3, size, size))
            return size
        except Exception:  # whatever the model's own code raises on an input too small for it
            continue
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def dtype_for(name: str, size: int) -> torch.dtype:
    """float64, or float32 for a backbone above `zoo.FLOAT32_ABOVE` parameters (counted on the
    meta device)."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(name, size).parameters())
    return torch.float32 if n_params > zoo.FLOAT32_ABOVE else torch.float64


def backbone(name: str) -> tuple[Callable[[], nn.Module], torch.Tensor, torch.dtype]:
    """A factory of the model ``name`` (a timm model, or ``hf-<name>`` of `tiny_transformers`) in
    its dtype, its example input, and that dtype."""
    if name.startswith(HF_PREFIX):
        make, make_input = tiny_transformers.MODELS[name.removeprefix(HF_PREFIX)]
        return lambda: make().double(), make_input(), torch.float64
    size = input_size(name)
    dtype = dtype_for(name, size)
    x = torch.randn(BATCH, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(SEED))
    return lambda: build_model(name, size).to(dtype), x, dtype


def run_model(name: str, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every step for one model; never raises for a failing step."""
    start = time.perf_counter()
    result: dict[str, Any] = {"model": name, "steps": {}, "max_diff": {}, "step_seconds": {}, "segments": None,
                              "params": None, "threads": torch.get_num_threads()}
    state: dict[str, Any] = {}
    make, x, dtype = backbone(name)
    tol = TOLERANCE[dtype]
    size = x.shape[-1] if x.is_floating_point() else None  # token ids have no image size
    result.update(image_size=size, dtype=str(dtype).removeprefix("torch."), capture=None)

    def heads(shape: tuple[int, ...], dtype: torch.dtype = dtype) -> dict[str, nn.Module]:
        return {t: nn.Sequential(nn.Flatten(), nn.LazyLinear(k)).to(dtype) for t, k in TASK_OUTPUTS.items()}

    def build() -> None:
        torch.manual_seed(SEED)
        model = make().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # capture="auto"'s fallback warning: recorded as result["capture"]
            depth = len(gs.segment(gs.trace(model, capture=CAPTURE, example_input=x), example_input=x))
            tree = zoo.make_tree("branched", depth) if depth > 1 else "separate"
            net = gs.multitask(model, heads(()), sharing=tree, example_input=x, capture=CAPTURE).eval()
        result.update(segments=net.depth, params=gs.count_parameters(net), capture=net.config["capture"])
        with torch.no_grad():
            state.update(net=net, out=net(x), built=copy.deepcopy(net), tree=tree)

    def modes() -> None:
        worst = 0.0
        for built_in_train in (True, False):
            torch.manual_seed(SEED)
            model = make().train(built_in_train)
            # the trunk at the model's own output (a transformers model's: the field the default
            # trunk takes): the check is about modes, not the default trunk
            with torch.no_grad():
                own = model(x)
            field = ("pooler_output" if own.get("pooler_output") is not None else "last_hidden_state") if isinstance(own, dict) else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                capture = {"capture": CAPTURE, "example_input": x}
                output = field or gs.get_graph_node_names(model, **capture)[-1]
                net = gs.multitask(model, {"z": nn.Identity()}, sharing="shared", trunk=output, **capture)
            for training in (True, False, True):
                model.train(training)
                net.train(training)
                with torch.no_grad():
                    torch.manual_seed(SEED)
                    want = {"z": model(x) if field is None else model(x)[field]}
                    torch.manual_seed(SEED)
                    worst = max(worst, zoo.compare(net(x), want, 0.0))
        result["max_diff"]["modes"] = worst

    def train_step() -> None:
        net = state["net"].train()
        before = [p.detach().clone() for p in net.parameters()]
        # a small step: the point is that gradients flow and parameters move, not to train
        # (a large one on batch 2 blows some BatchNorm backbones up to 1e20, beyond float32)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-5)
        loss = sum(out.square().mean() for out in net(x).values())
        loss.backward()
        optimizer.step()
        net.eval()
        if not torch.isfinite(loss) or all(torch.equal(b, p) for b, p in zip(before, net.parameters())):
            raise zoo.Mismatch(f"the training step gave loss {loss.item()} and moved no parameter")
        state["optimizer"] = optimizer
        with torch.no_grad():
            state["out"] = net(x)  # the reference of the later steps

    def merge() -> None:
        net = state["net"]
        depth = next((d for d in range(1, net.depth + 1) if len(net.tree.at_depth(d)) > 1), None)
        if depth is None:
            raise zoo.Mismatch("the tree has no two siblings to merge (one segment)")
        gs.surgery.fuse(net, depth, [[n.id for n in net.tree.at_depth(depth)]], init="mean", optimizer=state["optimizer"])
        gs.check(net)
        with torch.no_grad():
            state["out"] = out = net(x)
        if not all(torch.isfinite(v).all() for v in out.values()):
            raise zoo.Mismatch("outputs are not finite after the merge")

    def torchscript() -> None:
        # transformers supports TorchScript by tracing only (its graphs call torch.finfo, build
        # ModelOutputs, ...): its models are traced on x, timm's compiled
        method = "trace" if name.startswith(HF_PREFIX) else "script"
        scripted = gs.to_torchscript(state["net"], x, method=method)
        with torch.no_grad():
            result["max_diff"]["torchscript"] = zoo.compare(scripted(x), state["out"], tol)

    def export() -> None:
        program = gs.to_export(state["net"], x)
        with torch.no_grad():
            result["max_diff"]["export"] = zoo.compare(program.module()(x), state["out"], EXPORT_TOLERANCE[dtype])

    def onnx() -> None:
        # the network as built, in float32 (what ONNX Runtime runs); the float64 one stays exact
        x32 = x.float() if x.is_floating_point() else x
        if name.startswith(HF_PREFIX):
            # a transformers graph bakes in the dtype it was traced in (ELECTRA's attention mask:
            # .to(dtype=self.dtype)), so its float32 network is built from the float32 model
            torch.manual_seed(SEED)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = gs.multitask(make().float().eval(), heads((), torch.float32), sharing=state["tree"], example_input=x32,
                                   capture=CAPTURE).eval()
        else:
            net = copy.deepcopy(state["built"]).float()
        with tempfile.TemporaryDirectory() as tmp:
            gs.to_onnx(net, x32, Path(tmp) / "net.onnx")

    def save_load() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            gs.save(state["net"], Path(tmp) / "net.safetensors")
            torch.manual_seed(SEED + 1)  # another init: the weights must come from the file
            loaded = gs.load(Path(tmp) / "net.safetensors", make(), heads(()), example_input=x)
        with torch.no_grad():
            result["max_diff"]["save_load"] = zoo.compare(loaded.eval()(x), state["out"], tol)

    steps = {"build": build, "modes": modes, "train_step": train_step, "merge": merge, "torchscript": torchscript,
             "export": export, "onnx": onnx, "save_load": save_load}
    zoo.run_steps(steps, {step: ("net",) for step in STEPS[1:]}, state, result, progress)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _table(results: Sequence[dict[str, Any]], first: str, label: Callable[[str], str]) -> list[str]:
    """One table row per model, then the summary and failures of these ``results``."""
    header = [first, "model", "input", "dtype", "capture", "segments", *STEPS, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        size = r.get("image_size", IMAGE_SIZE)
        # results from before the dtype and capture were recorded ran in float64 with torch.fx
        row = [label(r["model"]), f"`{r['model']}`", f"{size}²" if size else "tokens", r.get("dtype") or "float64",
               r.get("capture") or "fx", str(r.get("segments") or "–"),
               *(zoo._cell(r["steps"].get(s, "skipped")) for s in STEPS), f"{r.get('seconds', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    n, ok = len(results), sum(r["ok"] for r in results)
    per_step = {s: sum(r["steps"].get(s) == "ok" for r in results) for s in STEPS}
    failures = [(r["model"], s, v) for r in results for s, v in r["steps"].items() if v != "ok" and not v.startswith("skipped")]
    return [
        *lines,
        "",
        f"- every step ok: {ok} / {n}" + (f" ({100 * ok / n:.0f} %)" if n else ""),
        "- per step: " + ", ".join(f"{s} {per_step[s]} / {n}" for s in STEPS),
        "- failures:" if failures else "- failures: none",
        *(f"  - `{m}` {s}: {v}" + (f" — {NOTES[m]}" if m in NOTES else "") for m, s, v in failures),
    ]


def markdown(results: Sequence[dict[str, Any]], chosen: dict[str, str], hf: Sequence[dict[str, Any]] = ()) -> str:
    import timm
    import transformers

    family_of = {m: f for f, m in chosen.items()}
    lines = [
        "# timm and transformers coverage",
        "",
        f"timm {timm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
        f"machine: {os.cpu_count()}-core {platform.machine()}, {zoo._threads([*results, *hf])} torch thread(s) per model. "
        "Generated by `python benchmarks/zoo_timm.py` (steps: see its docstring). `capture` is the path "
        '`capture="auto"` took: `fx` (torch.fx), or `export` (torch.export, where fx cannot trace the model).',
        "",
        "## timm",
        "",
        f"One small variant of every timm architecture family: random init, `num_classes=0`, batch {BATCH}, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} or the size a family needs; float64, float32 above "
        f"{zoo.FLOAT32_ABOVE / 1e6:.0f} M parameters. Families run: {len(results)} of {len(chosen)}.",
        "",
        *_table(results, "family", lambda m: family_of.get(m, "?")),
        "",
        "Comparisons are relative to an output's scale (its largest magnitude, at least 1): a randomly initialised "
        "deep CNN's outputs reach 1e10 (inception_v3: 1e12 for the bare backbone, visformer: 1e3), where float32 "
        "rounds by more than an absolute 1e-5 (these two failed the ONNX check by 7e4 and 4e-4 that way; the bare "
        "backbones' own ONNX exports differ from eager as much). The ONNX export writes fused attention out as "
        "matmuls and a softmax: the exporter rejects `F.scaled_dot_product_attention` over 5-d inputs (hiera, nest, "
        "twins) or 3-d ones (samvit), and with a non-contiguous mask (beit, relative-position ViTs) its decomposition "
        "breaks a recorded `view` (the bare backbones fail `torch.onnx.export(..., dynamo=True)` the same way). The "
        f"export step allows {EXPORT_TOLERANCE[torch.float64]:g} in float64: timm's code takes export-only paths "
        "(`resample_abs_pos_embed` resamples the position embedding in float32 under `torch.export`), so test_vit's "
        "own exported program differs from eager by 1e-9 once its weights are genuinely float64.",
        "",
        "## Hugging Face transformers",
        "",
        "Tiny configs of `benchmarks/tiny_transformers.py` (two layers, width "
        f"{tiny_transformers.HIDDEN}, every dropout 0): random init, float64, batch 3 of 7 token ids or "
        f"{tiny_transformers.IMAGE}x{tiny_transformers.IMAGE} images; trunk: `pooler_output` where the model has one, "
        "else `last_hidden_state`.",
        "",
        *(_table(hf, "architecture", lambda m: m.removeprefix(HF_PREFIX)) if hf else ["Not run."]),
    ]
    return "\n".join(lines) + "\n"


def save(results: dict[str, dict[str, Any]], chosen: dict[str, str], out: Path) -> None:
    import timm

    ordered = [results[m] for m in chosen.values() if m in results]
    hf = [results[HF_PREFIX + m] for m in tiny_transformers.MODELS if HF_PREFIX + m in results]
    payload = {"timm": timm.__version__, "torch": torch.__version__, "steps": list(STEPS), "families": chosen,
               "all_ok": sum(r["ok"] for r in ordered), "results": ordered, "transformers": hf}
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_timm.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "zoo_timm.md").write_text(markdown(ordered, chosen, hf))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated timm modules (default: all, unless --transformers is given)")
    parser.add_argument("--transformers", help="comma-separated tiny_transformers models, or 'all' "
                        "(default: all, unless --families is given)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="skip models with a result in <out>/zoo_timm.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        path = Path(args.result)
        zoo._write_json(path, run_model(args.worker, progress=lambda partial: zoo._write_json(path, partial)))
        return 0
    out = Path(args.out)
    previous = json.loads((out / "zoo_timm.json").read_text()) if (out / "zoo_timm.json").exists() else {}
    chosen = previous.get("families") or families()
    # earlier results are kept: a run of a few models updates their rows only
    results = {r["model"]: r for r in [*previous.get("results", []), *previous.get("transformers", [])]}
    everything = not args.families and not args.transformers
    wanted = args.families.split(",") if args.families else list(chosen) if everything else []
    hf = list(tiny_transformers.MODELS) if everything or args.transformers == "all" else (args.transformers or "").split(",")
    unknown = sorted(set(wanted) - set(chosen)) + sorted(set(hf) - set(tiny_transformers.MODELS) - {""})
    if unknown:
        parser.error(f"unknown models {unknown}; timm families are timm.models' module names, "
                     f"transformers ones {list(tiny_transformers.MODELS)}")
    names = [chosen[f] for f in wanted] + [HF_PREFIX + m for m in hf if m]
    todo = [m for m in names if not (args.resume and m in results)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(zoo.run_isolated, m, None, "branched", args.timeout, args.threads, Path(__file__), STEPS): m
                   for m in todo}
        for future in as_completed(futures):
            name = futures[future]
            results[name] = {**future.result(), "model": name}
            print(f"{name}: {'ok' if results[name]['ok'] else results[name]['steps']}", flush=True)
            save(results, chosen, out)
    save(results, chosen, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
