"""Zoo sweep: every torchvision classifier and segmentation model through the whole graphsurgeon pipeline.

For each model in ``torchvision.models.list_models(module=torchvision.models)`` and
``list_models(module=torchvision.models.segmentation)`` (random init, eval mode, batch 2, the
smallest input the model accepts; a segmentation model's default trunk is the input of its
final classifier conv, and its encoder skips, if any, are cut at multi-value boundaries):

    build        `graphsurgeon.multitask` with three tasks (``a``, ``b``, ``c``) whose Linear heads
                 are sized from the trunk output, on a mixed task tree: the first half of the
                 segments shared by all tasks, then two branches (``{a}`` and ``{b, c}``), so
                 that both shared and task-specific segment copies are exercised;
    forward      ``net(x)``; every task's output must equal, bit for bit, its head applied to the
                 trunk value of the *original* eager backbone (the input of its final
                 classifier, captured with a forward pre-hook): every chain of segment copies
                 reproduces the backbone exactly;
    materialise  `graphsurgeon.materialise(net)(x)` == ``net(x)``;
    torchscript  `graphsurgeon.to_torchscript(net, method="script")`, saved with
                 ``torch.jit.save`` to a file, loaded back, run: == ``net(x)``;
    export       `graphsurgeon.to_export(net, x).module()(x)` == ``net(x)``;
    invariants   `graphsurgeon.check(net)`;
    modes        the backbone built in train mode and in eval mode, each switched
                 train → eval → train: a one-task network's trunk equals the eager model's,
                 bit for bit, in every mode (train-mode draws from the same seed), so no
                 mode's path is frozen into the graph. Dropout stays on, which is what checks
                 that no ``training=`` flag is frozen into the graph, except for the
                 `OUTSIDE_THE_TREE_IN_TRAINING` models, whose train-mode forward also runs
                 branches the network leaves out: their random draws shift the main dropout's
                 mask, so these compare with every ``nn.Dropout`` at ``p = 0`` (the issue's
                 "in train mode (with dropout off)"). It runs last, after the other steps'
                 network and outputs are released, and builds one backbone at a time, so that
                 it fits beside nothing else (`MODES_IMAGE_SIZE`: where it needs a larger
                 input than the other steps).

Comparisons run in float64 (outputs must agree to 1e-10; the maximum difference is recorded,
and is usually exactly 0). Backbones above `FLOAT32_ABOVE` parameters run in float32 (to
1e-5) because float64 copies of them do not fit next to their TorchScript round trip in the
24 GiB of the CI machine; the dtype is listed in the results.

Usage::

    python benchmarks/zoo.py [--models a,b,c] [--out benchmarks/results] [--jobs 2] [--resume]

Every model runs in its own subprocess (a crash, an out-of-memory kill or a hang in one model
never stops the sweep) with one torch thread by default; ``--jobs`` runs several at once. The
worker's peak resident memory in each step is recorded (``peak_rss_mib``; Linux).
Results go to ``<out>/zoo.json`` and ``<out>/zoo.md`` (rerunning a few models updates them).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import fx, nn

import graphsurgeon as gs
from graphsurgeon.core.export import output_scale

STEPS = ("build", "forward", "materialise", "torchscript", "export", "invariants", "modes")
TASK_OUTPUTS = {"a": 3, "b": 5, "c": 7}
BRANCHES = (("a",), ("b", "c"))
BATCH = 2
DEFAULT_IMAGE_SIZE = 32
# Smallest inputs, found by trying sizes on the eager models. 32 is the floor for every other
# model (many run on less), so that each stage of a stride-32 network has a pixel of its own.
IMAGE_SIZE = {
    "alexnet": 64,  # its feature extractor's three max-pools need >= 63 pixels
    "inception_v3": 75,  # torchvision documents 75x75 as the minimum
    "maxvit_t": 224,  # every stage's grid (H/4 ... H/32) must be a multiple of the 7x7 partition
    "vit_h_14": 28,  # ViTs are built for the input (image_size=...): 2x2 patches of 14
}
MODES_IMAGE_SIZE = {
    # in train mode its auxiliary classifier also runs, whose 5x5 conv needs Mixed_6e's 17x17 map
    # (the 5x5 pool of stride 3 makes it 5x5): 299 is the smallest input the eager model takes
    # in train mode (298 fails), found by trying sizes
    "inception_v3": 299,
}
"""Inputs of the modes step where it needs more than `IMAGE_SIZE` (a train-mode-only branch)."""
OUTSIDE_THE_TREE_IN_TRAINING = frozenset({"googlenet", "inception_v3"})
"""Models whose train-mode forward runs branches the multi-task network leaves out (their
auxiliary classifiers: `graphsurgeon.UnusedNodesWarning` names them). GoogLeNet's ``aux1`` and
``aux2`` apply ``nn.Dropout`` before the main dropout, so the eager model's main mask comes from
other random numbers than the network's; the modes step compares these with dropout off."""
FLOAT32_ABOVE = 400_000_000
"""Backbones with more parameters than this run in float32 (vit_h_14, regnet_y_128gf)."""
SEED = 0
HEAVY = frozenset({"convnext_large", "regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"})
"""Backbones above 150 M parameters: their TorchScript round trip needs several GiB, so a sweep
runs them one at a time, after the others."""


class Mismatch(AssertionError):
    """An output differs from the reference it must reproduce."""


def classifiers() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def segmentation_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models.segmentation)


def all_models() -> list[str]:
    return classifiers() + segmentation_models()


def image_size_for(name: str) -> int:
    return IMAGE_SIZE.get(name, DEFAULT_IMAGE_SIZE)


def dropout_off(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Dropout`` at ``p = 0`` (see `OUTSIDE_THE_TREE_IN_TRAINING`)."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not dropouts:
        raise Mismatch(f"{type(model).__name__} has no nn.Dropout to turn off; drop it from OUTSIDE_THE_TREE_IN_TRAINING")
    for m in dropouts:
        m.p = 0.0
    return model


def peak_rss_reset() -> bool:
    """Reset the process's peak resident memory (Linux: ``/proc/self/clear_refs``), so that the
    peak read after a step is that step's; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """The process's peak resident memory since the last `peak_rss_reset`, in MiB."""
    import resource  # Unix only, as the reset is

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def build_backbone(name: str, image_size: int) -> nn.Module:
    """The randomly initialised torchvision model, built for ``image_size`` where it must be."""
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    if name in segmentation_models():
        kwargs["weights_backbone"] = None  # the default would download ImageNet weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception warn about their default init
        return torchvision.models.get_model(name, weights=None, **kwargs)


def make_tree(sharing: str, depth: int) -> gs.TaskTree | str:
    """``branched``: first ``depth // 2`` segments shared, then one branch per group."""
    if sharing in ("separate", "shared"):
        return sharing
    if sharing != "branched":
        raise ValueError(f"sharing must be 'branched', 'separate' or 'shared', got {sharing!r}")
    return gs.TaskTree.branched(list(TASK_OUTPUTS), depth, [list(g) for g in BRANCHES], split_at=depth // 2 + 1)


def make_head(trunk_shape: Sequence[int], outputs: int) -> nn.Module:
    """A Linear head on the (flattened) trunk output."""
    features = math.prod(trunk_shape[1:])
    if len(trunk_shape) == 2:
        return nn.Linear(features, outputs)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, outputs))  # squeezenet's trunk is a feature map


def probe_trunk(model: nn.Module, x: torch.Tensor) -> tuple[int, tuple[int, ...], str]:
    """Number of segments, trunk output shape, and the classifier module that consumes the trunk."""
    gm = gs.trace(model)
    segments = gs.segment(gm, example_input=x)
    trunk = next(n for n in gm.graph.nodes if n.name == segments[-1].output_name)
    shape = tuple(trunk.meta["tensor_meta"].shape)
    classifier = classifier_of(gm, trunk)
    return len(segments), shape, classifier


def classifier_of(gm: fx.GraphModule, trunk: fx.Node) -> str:
    """Qualified name of the parametrised module that reads the trunk (the final classifier)."""
    for user in trunk.users:
        if user.op == "call_module" and any(True for _ in gm.get_submodule(user.target).parameters()):
            return user.target
    raise Mismatch(f"no parametrised module consumes the trunk node {trunk.name!r}")


def trunk_of(model: nn.Module, classifier: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model.<classifier>`` when the eager model runs on ``x``."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(classifier).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise Mismatch(f"{classifier} ran {len(seen)} times in one forward; expected once")
    return seen[0]


def compare(got: Any, want: dict[str, torch.Tensor], tol: float) -> float:
    """Max |got - want| over tasks; raises `Mismatch` beyond ``tol`` times the output's scale
    (`output_scale`; timm's test_vit in float64 differs by 3e-10 near zero with nothing wrong)."""
    if not isinstance(got, dict) or set(got) != set(want):
        keys = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise Mismatch(f"outputs {keys} differ from the tasks {sorted(want)}")
    worst = 0.0
    for task, w in want.items():
        g = got[task]
        if g.shape != w.shape or g.dtype != w.dtype:
            raise Mismatch(f"task {task!r}: got {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}")
        diff = (g - w).abs().max().item() if w.numel() else 0.0
        scale = output_scale(w)
        worst = max(worst, diff)
        if not diff <= tol * scale:  # a NaN fails too
            raise Mismatch(f"task {task!r}: max |difference| {diff:.3g} exceeds {tol:g} x {scale:.3g} (the output's scale)")
    return worst


def describe(exc: BaseException) -> str:
    """``ErrorType: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def run_model(
    name: str,
    image_size: int | None = None,
    sharing: str = "branched",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one model through every step; never raises for a failing step.

    ``progress(result)`` is called before each step, with ``result["running"]`` naming it (so
    that a process that dies in a step can be reported with the step).

    Returns a dict with ``model, image_size, dtype, segments, params, backbone_params, steps``
    (step -> ``"ok"`` or ``"ErrorType: message"`` or ``"skipped: ..."``), ``max_diff``
    (step -> largest difference from ``net(x)``), ``step_seconds`` and ``seconds``.
    """
    start = time.perf_counter()
    size = image_size or image_size_for(name)
    result: dict[str, Any] = {
        "model": name,
        "image_size": size,
        "sharing": sharing,
        "threads": torch.get_num_threads(),
        "dtype": None,
        "segments": None,
        "multi_value_cuts": None,
        "params": None,
        "backbone_params": None,
        "steps": {},
        "max_diff": {},
        "step_seconds": {},
    }
    state: dict[str, Any] = {}

    def build() -> None:
        torch.manual_seed(SEED)
        model = build_backbone(name, size).eval()
        n_params = sum(p.numel() for p in model.parameters())
        dtype = torch.float32 if n_params > FLOAT32_ABOVE else torch.float64
        model.to(dtype)
        x = torch.randn(BATCH, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(SEED))
        depth, trunk_shape, classifier = probe_trunk(model, x)
        result.update(dtype=str(dtype).removeprefix("torch."), backbone_params=n_params)
        heads = {t: make_head(trunk_shape, k).to(dtype) for t, k in TASK_OUTPUTS.items()}
        state["trunk"] = trunk_of(model, classifier, x)
        net = gs.multitask(model, heads, sharing=make_tree(sharing, depth), example_input=x)
        net.eval()
        multi = sum(len(seg.output_names) > 1 for seg in net.segments)
        result.update(segments=net.depth, multi_value_cuts=multi, params=gs.count_parameters(net))
        state.update(net=net, x=x, classifier=classifier, tol=1e-10 if dtype == torch.float64 else 1e-5)

    def forward() -> None:
        net, x = state["net"], state["x"]
        with torch.no_grad():
            out = net(x)
            state["out"] = out  # the reference of the later steps, even if the check below fails
            trunk = state.pop("trunk")
            want = {t: net.heads[t](trunk) for t in net.tasks}
        for task, k in TASK_OUTPUTS.items():
            if tuple(out[task].shape) != (BATCH, k):
                raise Mismatch(f"task {task!r} output has shape {tuple(out[task].shape)}, expected {(BATCH, k)}")
        result["max_diff"]["forward"] = compare(out, want, 0.0)  # bit for bit

    def modes() -> None:
        # the other steps' network and outputs are done with: free them before two more builds
        x, classifier, worst = state.pop("x"), state.pop("classifier"), 0.0
        state.clear()
        gc.collect()
        modes_size = MODES_IMAGE_SIZE.get(name, size)
        if modes_size != size:
            result["modes_image_size"] = modes_size
            x = torch.randn(BATCH, 3, modes_size, modes_size, dtype=x.dtype, generator=torch.Generator().manual_seed(SEED))
        for built_in_train in (True, False):
            torch.manual_seed(SEED)
            model = build_backbone(name, size).to(x.dtype).train(built_in_train)
            if name in OUTSIDE_THE_TREE_IN_TRAINING:
                dropout_off(model)
            net = gs.multitask(model, {"z": nn.Identity()}, sharing="shared")  # no shapes needed: Identity head
            for training in (True, False, True):
                model.train(training)
                net.train(training)
                torch.manual_seed(SEED)
                want = {"z": trunk_of(model, classifier, x)}
                torch.manual_seed(SEED)
                with torch.no_grad():
                    mode = "train" if training else "eval"
                    try:
                        worst = max(worst, compare(net(x), want, 0.0))
                    except Mismatch as exc:
                        built = "train" if built_in_train else "eval"
                        raise Mismatch(f"built in {built} mode, run in {mode} mode: {exc}") from None
            del model, net, want  # one backbone at a time
            gc.collect()
        result["max_diff"]["modes"] = worst

    def materialise() -> None:
        gm = gs.materialise(state["net"])
        with torch.no_grad():
            result["max_diff"]["materialise"] = compare(gm(state["x"]), state["out"], state["tol"])

    def torchscript() -> None:
        scripted = gs.to_torchscript(state["net"], method="script")
        # a file, not a BytesIO: saving to and loading from memory holds up to three extra copies
        # of the weights at once, which the largest backbones cannot afford
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; the issue asks for it
            torch.jit.save(scripted, Path(tmp) / "net.pt")
            del scripted
            loaded = torch.jit.load(Path(tmp) / "net.pt")
        with torch.no_grad():
            result["max_diff"]["torchscript"] = compare(loaded(state["x"]), state["out"], state["tol"])

    def export() -> None:
        program = gs.to_export(state["net"], state["x"])
        with torch.no_grad():
            result["max_diff"]["export"] = compare(program.module()(state["x"]), state["out"], state["tol"])

    def invariants() -> None:
        gs.check(state["net"])

    needs: dict[str, tuple[str, ...]] = {
        "build": (),
        "forward": ("net",),
        "materialise": ("out",),
        "torchscript": ("out",),
        "export": ("out",),
        "invariants": ("net",),
        "modes": ("net",),
    }
    steps: dict[str, Callable[[], None]] = {
        "build": build,
        "forward": forward,
        "materialise": materialise,
        "torchscript": torchscript,
        "export": export,
        "invariants": invariants,
        "modes": modes,
    }
    run_steps(steps, needs, state, result, progress)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_steps(
    steps: dict[str, Callable[[], None]],
    needs: dict[str, tuple[str, ...]],
    state: dict[str, Any],
    result: dict[str, Any],
    progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Run ``steps`` in order into ``result`` (``steps``, ``step_seconds``, ``ok``): a step whose
    ``needs`` are missing from ``state`` is skipped, a failing step records its error and the
    next ones still run; each step's peak resident memory goes to ``peak_rss_mib`` where the
    peak can be reset between steps. Shared by the torchvision and timm sweeps."""
    peaks: dict[str, float] = {}
    for step, run in steps.items():
        missing = [k for k in needs.get(step, ()) if k not in state]
        if missing:
            result["steps"][step] = "skipped: " + ("build failed" if "net" in missing else "forward failed")
            continue
        if progress is not None:
            progress({**result, "running": step})
        measured = peak_rss_reset()
        t0 = time.perf_counter()
        try:
            run()
            result["steps"][step] = "ok"
        except Exception as exc:  # a failing step is a result, not a crash
            result["steps"][step] = describe(exc)
        result["step_seconds"][step] = round(time.perf_counter() - t0, 2)
        if measured:
            peaks[step] = peak_rss_mib()
            result["peak_rss_mib"] = peaks
        gc.collect()
    state.clear()
    gc.collect()
    result["ok"] = all(v == "ok" for v in result["steps"].values())


# ---------------------------------------------------------------------------------- sweep
def _failed_result(
    partial: dict[str, Any] | None, name: str, sharing: str, reason: str, seconds: float, steps: Sequence[str] = STEPS
) -> dict[str, Any]:
    """The result of a worker that gave none: ``reason`` in the step it died in."""
    r = partial or {
        "model": name,
        "image_size": image_size_for(name),
        "sharing": sharing,
        "dtype": None,
        "segments": None,
        "params": None,
        "backbone_params": None,
        "steps": {},
        "max_diff": {},
        "step_seconds": {},
    }
    running = r.pop("running", steps[0])
    after = steps[steps.index(running) + 1 :]
    r["steps"] = {**r["steps"], running: reason, **{s: "skipped: worker died" for s in after}}
    r.update(ok=False, seconds=round(seconds, 1))
    return r


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the parent never reads half a file


def run_isolated(
    name: str,
    image_size: int | None,
    sharing: str,
    timeout: float,
    threads: int = 1,
    script: Path | None = None,
    steps: Sequence[str] = STEPS,
) -> dict[str, Any]:
    """`run_model` in a fresh Python process, so a crash, a kill or a hang stays with its model.
    ``script`` (default: this file) is a sweep whose ``--worker NAME --result PATH`` runs one
    model, and ``steps`` its steps (`benchmarks/zoo_timm.py` reuses this for timm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, str((script or Path(__file__)).resolve()), "--worker", name, "--result", str(path)]
        cmd += ["--sharing", sharing, "--threads", str(threads)]
        if image_size:
            cmd += ["--image-size", str(image_size)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            returncode, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            returncode, stderr = None, ""
        partial = json.loads(path.read_text()) if path.exists() else None
        if returncode == 0 and partial is not None and "running" not in partial:
            return partial
        if returncode is None:
            reason = f"Timeout: killed after {timeout:.0f} s"
        elif returncode < 0:
            sig = -returncode
            reason = f"WorkerDied: signal {sig}" + (" (killed: out of memory?)" if sig == 9 else "")
        else:
            tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            reason = f"WorkerDied: exit {returncode}: {tail[-1] if tail else 'no message'}"
        return _failed_result(partial, name, sharing, reason, time.perf_counter() - start, steps)


def _cell(status: str) -> str:
    if status == "ok":
        return "ok"
    if status.startswith("skipped"):
        return "–"
    return "**" + status.split(":", 1)[0] + "**"


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _threads(results: Sequence[dict[str, Any]]) -> str:
    counts = sorted({r.get("threads") for r in results if r.get("threads")})
    return "/".join(map(str, counts)) or "?"


def markdown(results: Sequence[dict[str, Any]]) -> str:
    header = ["model", "input", "dtype", "segments", "multi-value cuts", "params (M)", *STEPS, "seconds", "peak RSS (GiB)"]
    lines = [
        "# Zoo coverage",
        "",
        "Every classifier of `torchvision.models.list_models(module=torchvision.models)` and every model of "
        f"`torchvision.models.segmentation` (torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, random init, eval mode, batch {BATCH}) through "
        "`multitask` with three tasks on a branched tree (first half of the segments shared, then "
        "branches `{a}` and `{b, c}`), then forward, `materialise`, TorchScript (script, save, load), "
        "`torch.export` and `check`. Every output is compared with the eager multi-task network; the "
        "forward step also checks every branch against the original backbone's trunk bit for bit. "
        "*modes*: the backbone built in train and in eval mode, each run train → eval → train, gives the "
        "eager model's trunk bit for bit in every mode (dropout on, except for "
        + ", ".join(f"`{m}`" for m in sorted(OUTSIDE_THE_TREE_IN_TRAINING))
        + ", whose train-mode auxiliary classifiers draw random numbers the network does not; inputs "
        + ", ".join(f"`{m}` {k}²" for m, k in MODES_IMAGE_SIZE.items())
        + " where train mode needs more). *peak RSS*: the worker's largest resident memory in any step; "
        "– where not measured. "
        "*multi-value cuts*: segments whose end boundary carries several tensors (encoder skips; "
        "`max_boundary_values`, default 8); – where the row predates them. "
        "Generated by `python benchmarks/zoo.py`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in results:
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "–"
        row = [
            f"`{r['model']}`",
            f"{r['image_size']}²",
            r.get("dtype") or "–",
            str(r["segments"]) if r.get("segments") else "–",
            str(r["multi_value_cuts"]) if r.get("multi_value_cuts") is not None else "–",
            params,
            *(_cell(r["steps"].get(s, "skipped")) for s in STEPS),
            f"{r['seconds']:.0f}",
            f"{max(r['peak_rss_mib'].values()) / 1024:.1f}" if r.get("peak_rss_mib") else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    n = len(results)
    ok = sum(r["ok"] for r in results)
    failures = [r for r in results if not r["ok"]]
    exact = {s: sum(1 for r in results if r["max_diff"].get(s) == 0.0) for s in ("materialise", "torchscript", "export")}
    passed = {s: sum(1 for r in results if r["steps"].get(s) == "ok") for s in exact}
    lines += [
        "",
        "## Summary",
        "",
        f"- models: {n} of the {len(all_models())} torchvision models ({len(classifiers())} classifiers, "
        f"{len(segmentation_models())} segmentation models)",
        f"- all steps ok: {ok} / {n} ({100 * ok / n:.1f} %)" if n else "- all steps ok: 0 / 0",
        "- bit-identical to the eager network (of those ok): "
        + ", ".join(f"{s} {exact[s]} / {passed[s]}" for s in exact),
        "- one segment only (block granularity found no cut inside the trunk, so the branched tree has "
        "no shared part): " + (", ".join(f"`{r['model']}`" for r in results if r.get("segments") == 1) or "none"),
        f"- float32 (more than {FLOAT32_ABOVE / 1e6:.0f} M parameters): "
        + (", ".join(f"`{r['model']}`" for r in results if r.get("dtype") == "float32") or "none"),
        f"- time: {sum(r['seconds'] for r in results) / 60:.0f} min summed over models, each run with "
        f"{_threads(results)} torch thread(s) on a {os.cpu_count()}-core {platform.machine()} machine with "
        f"{_memory_gib():.0f} GiB of memory",
        "",
        "## Failures",
        "",
    ]
    if not failures:
        lines.append("None.")
    for r in failures:
        for step in STEPS:
            status = r["steps"].get(step, "")
            if status != "ok" and not status.startswith("skipped"):
                lines.append(f"- `{r['model']}` {step}: {status}")
    return "\n".join(lines) + "\n"


def _order(name: str) -> tuple[int, str]:
    names = all_models()
    return (names.index(name) if name in names else len(names), name)


def save(results: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Write ``zoo.json`` and ``zoo.md`` for ``{model: result}``, in torchvision's order."""
    ordered = sorted(results.values(), key=lambda r: _order(r["model"]))
    payload = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "memory_gib": round(_memory_gib(), 1)},
        "steps": list(STEPS),
        "models": len(ordered),
        "all_ok": sum(r["ok"] for r in ordered),
        "results": ordered,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "zoo.md").write_text(markdown(ordered))
    return ordered


def load(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "zoo.json"
    if not path.exists():
        return {}
    return {r["model"]: r for r in json.loads(path.read_text())["results"]}


def sweep(
    models: Sequence[str],
    out: Path,
    *,
    sharing: str = "branched",
    timeout: float = 1800,
    resume: bool = False,
    jobs: int = 1,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run ``models`` one subprocess each and update ``<out>/zoo.json`` and ``zoo.md``.

    Results of models outside ``models`` already in ``zoo.json`` are kept, so that a rerun of a
    few models updates the full sweep; ``resume`` also skips the listed models that have one.
    Both files are rewritten after every model, so a long sweep can be watched and resumed.
    ``jobs`` models run at once, except the `HEAVY` ones, which run alone at the end.
    """
    from tqdm import tqdm

    results = load(out)
    todo = [m for m in models if not (resume and m in results)]
    light = [m for m in todo if m not in HEAVY]
    heavy = [m for m in todo if m in HEAVY]
    bar = tqdm(total=len(todo), unit="model")

    def record(name: str, r: dict[str, Any]) -> None:
        results[name] = r
        bar.update()
        bar.set_postfix_str(f"{name} {'ok' if r['ok'] else 'FAILED'}")
        save(results, out)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_isolated, m, None, sharing, timeout, threads): m for m in light}
        for future in as_completed(futures):
            record(futures[future], future.result())
    for name in heavy:
        bar.set_postfix_str(f"{name} (alone)")
        record(name, run_isolated(name, None, sharing, timeout, threads))
    bar.close()
    return save(results, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: every torchvision classifier)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    parser.add_argument("--sharing", default="branched", choices=("branched", "separate", "shared"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--resume", action="store_true", help="skip models that have a result in <out>/zoo.json")
    parser.add_argument("--report", action="store_true", help="only rewrite zoo.md from zoo.json and print it")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (heavy ones always alone)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per model (more than the free cores slows OpenMP down badly)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        path = Path(args.result)
        r = run_model(args.worker, args.image_size, args.sharing, progress=lambda partial: _write_json(path, partial))
        _write_json(path, r)
        return 0
    if args.report:
        results = save(load(Path(args.out)), Path(args.out))
        print(markdown(results))
        return 0 if all(r["ok"] for r in results) else 1
    models = args.models.split(",") if args.models else all_models()
    unknown = sorted(set(models) - set(all_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; see torchvision.models.list_models()")
    results = sweep(
        models,
        Path(args.out),
        sharing=args.sharing,
        timeout=args.timeout,
        resume=args.resume,
        jobs=args.jobs,
        threads=args.threads,
    )
    print(markdown(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
