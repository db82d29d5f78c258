"""Tables and plots of finished runs: what a user reads after `graphsurgeon demo`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["levels", "metrics_table", "plot_cka", "plot_losses", "plot_merge_curve", "plot_tree", "segment_labels"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], metric_of: Mapping[str, str]) -> str:
    """Markdown: one row per method, the primary metric per task, Δm %, parameters, FLOPs."""
    head = ["method", *[f"{t} ({metric_of[t]})" for t in tasks], "Δm % vs single", "params", "MFLOPs", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *[r["metrics"][t] for t in tasks], r["delta_m"], f"{r['parameters']:,}", f"{r['flops'] / 1e6:.1f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def levels(partitions: Sequence[Sequence[Sequence[str]]]) -> str:
    """A tree's partition per depth (`TaskTree.partitions`, depth 1 first) on one line, runs of
    equal depths merged: ``d1–4: {all} · d5: {a, b} {c}``; what a table cell can hold."""
    spans: list[tuple[int, int, str]] = []
    for depth, partition in enumerate(partitions, start=1):
        blocks = "{all}" if len(partition) == 1 else " ".join("{" + ", ".join(g) + "}" for g in sorted(partition))
        if spans and spans[-1][2] == blocks:
            spans[-1] = (spans[-1][0], depth, blocks)
        else:
            spans.append((depth, depth, blocks))
    return " · ".join(f"d{a}: {b}" if a == e else f"d{a}–{e}: {b}" for a, e, b in spans)


def plot_tree(tree, path: Path, title: str = "", depth_labels: Sequence[str] | None = None) -> None:
    """The task tree as a node-link drawing: depth downwards, one column per leaf task.

    ``depth_labels`` names the segment at each depth 1..L (`segment_labels`: ``layer2.1.relu_1``,
    ``decoder.0.relu``), so a branch point reads as a place in the backbone; default ``seg1``, ...
    """
    plt = _pyplot()
    tasks = list(tree.tasks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.2 + 0.7 * tree.depth))
    xpos = {}
    for n in tree.nodes:
        xpos[n.id] = sum(tasks.index(t) for t in n.tasks) / len(n.tasks)
    for n in tree.nodes:
        if n.parent is not None:
            ax.plot([xpos[n.parent], xpos[n.id]], [n.depth - 1, n.depth], color="0.6", lw=1.5, zorder=1)
    for n in tree.nodes:
        shared = len(n.tasks) > 1
        ax.scatter([xpos[n.id]], [n.depth], s=180 if shared else 90, color="tab:orange" if shared else "tab:blue", zorder=2)
    for i, t in enumerate(tasks):
        ax.text(i, tree.depth + 0.45, t, ha="center", va="top", rotation=30, fontsize=8)
    ax.set_ylim(tree.depth + 0.9, -0.5)
    labels = list(depth_labels) if depth_labels is not None else [f"seg{d}" for d in range(1, tree.depth + 1)]
    ax.set_yticks(range(tree.depth + 1), ["input", *labels], fontsize=7 if tree.depth > 10 else None)
    ax.set_xticks([])
    ax.set_title(title or "learned task tree (orange: shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def segment_labels(net) -> list[str]:
    """Per depth, the qualified name of the node a segment ends at (``layer2.1.relu_1``,
    ``decoder.0.relu``): where in the backbone a branch at that depth happens."""
    from graphsurgeon.core.trace import qualified_name

    labels = []
    for s in net.segments:
        last = next((n for n in s.module.graph.nodes if n.name == s.output_name), None)
        labels.append(qualified_name(last) if last is not None else f"seg{s.index}")
    return labels


def plot_cka(decisions: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One heatmap per structural decision: the CKA matrix between sibling task nodes."""
    if not decisions:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(decisions), figsize=(3.2 * len(decisions), 3.2), squeeze=False)
    for ax, d in zip(axes[0], decisions):
        labels = ["+".join(t) for t in d["tasks"]]
        im = ax.imshow(d["similarity"], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(f"phase {d['phase']}, depth {d['depth']}", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """Summed training loss per epoch for each method, with MTSL's structural phases marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, history in histories.items():
        epochs = [h["epoch"] for h in history]
        total = [sum(v for k, v in h["train_loss"].items() if not k.startswith("_")) for h in history]
        ax.plot(epochs, total, marker="o", label=method)
        for h in history:
            if h.get("structural_phase"):
                ax.axvline(h["epoch"], color="0.8", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Σ task losses (train)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_merge_curve(curve: Sequence[Mapping[str, Any]], metric: Mapping[str, str], path: Path, title: str = "") -> None:
    """`graphsurgeon.merge_trained`'s trade-off: every task's validation metric against the
    network's parameters and FLOPs at each merge kept (line), each merge undone by the budget
    (cross) and each fine-tune epoch (square: filled where it is the state kept, hollow where
    the budget or a better state set it aside)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    kept = [p for p in curve if p["kind"] == "start" or p.get("accepted")]
    undone = [p for p in curve if p["kind"] == "merge" and not p["accepted"]]
    tuned = [p for p in curve if p["kind"] == "finetune"]
    tuned_kept = [p for p in tuned if p.get("accepted")]
    tuned_not = [p for p in tuned if not p.get("accepted")]
    for ax, cost, unit in ((axes[0], "parameters", 1e3), (axes[1], "flops", 1e6)):
        for i, t in enumerate(metric):
            color = f"C{i}"
            ax.plot([p[cost] / unit for p in kept], [p["metrics"][t] for p in kept], marker="o", ms=3, color=color, label=t)
            ax.scatter([p[cost] / unit for p in undone], [p["metrics"][t] for p in undone], marker="x", color=color)
            ax.scatter([p[cost] / unit for p in tuned_kept], [p["metrics"][t] for p in tuned_kept], marker="s", color=color)
            ax.scatter([p[cost] / unit for p in tuned_not], [p["metrics"][t] for p in tuned_not], marker="s",
                       facecolors="none", edgecolors=color)
        ax.invert_xaxis()  # merging moves left: fewer parameters, fewer FLOPs
        ax.set_xlabel("parameters (thousands)" if cost == "parameters" else "forward MFLOPs per sample")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation " + "/".join(sorted(set(metric.values()))))
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle((title + ": " if title else "") + "o kept, x undone by the budget, ■ fine-tune epoch kept, □ set aside",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
