"""Report plots, rendered with matplotlib's Agg backend to PNG bytes (imported lazily)."""

from __future__ import annotations

import io
from typing import Any

MAX_HISTOGRAMS = 12


def figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def accuracy_vs_size(stages: list[dict[str, Any]]) -> bytes:
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot()
    sizes = [s["file_bytes"] / 1024 for s in stages]
    accs = [100 * s["accuracy"] for s in stages]
    ax.plot(sizes, accs, "-", color="#9aa5b1", zorder=1)
    ax.scatter(sizes, accs, c=range(len(stages)), cmap="viridis", s=60, zorder=2)
    labels: dict[tuple[float, float], list[str]] = {}
    for size, acc, stage in zip(sizes, accs, stages):
        labels.setdefault((size, acc), []).append(stage["name"])
    for (size, acc), names in labels.items():
        ax.annotate(", ".join(names), (size, acc), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model file size on disk (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs size, after each stage")
    ax.grid(True, alpha=0.3)
    return to_png(fig)


def layer_params(baseline: list[dict[str, Any]], final: list[dict[str, Any]]) -> bytes:
    names = [row["name"] for row in baseline] + [r["name"] for r in final if r["name"] not in {b["name"] for b in baseline}]
    base = {r["name"]: r for r in baseline}
    fin = {r["name"]: r for r in final}
    fig = figure(7.0, max(2.5, 0.28 * len(names) + 1.2))
    ax = fig.add_subplot()
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [base.get(n, {}).get("params", 0) for n in names], height=0.4,
            label="baseline", color="#9aa5b1")
    ax.barh([y + 0.2 for y in ys], [fin.get(n, {}).get("nonzero_params", 0) for n in names], height=0.4,
            label="final (non-zero)", color="#2f7ed8")
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Parameters per layer")
    ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def weight_histograms(histograms: list[dict[str, Any]]) -> bytes:
    shown = histograms[:MAX_HISTOGRAMS]
    cols = 3
    rows = max(1, -(-len(shown) // cols))
    fig = figure(9.0, 2.0 * rows + 0.4)
    for i, hist in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = hist["edges"]
        ax.stairs(hist["counts"], edges, fill=True, color="#2f7ed8")
        zeros = f", {hist['zeros']} zeros" if hist["zeros"] else ""
        ax.set_title(f"{hist['name']}{zeros}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("Weight distributions of the final model (non-zero weights)", fontsize=10)
    return to_png(fig)


def sensitivity_curves(sens: dict[str, Any]) -> bytes:
    """Validation score vs sparsity of each layer (or channel group) pruned alone."""
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    xs = [100 * s for s in sens["sparsities"]]
    for name, info in sens["layers"].items():
        ax.plot(xs, info["scores"], marker="o", markersize=3, label=name)
    ax.axhline(sens["baseline"], color="#9aa5b1", linestyle="--", label="unpruned")
    kind = "channels removed" if sens["structured"] else "weights pruned"
    ax.set_xlabel(f"{kind} in that layer alone (%)")
    ax.set_ylabel(f"validation {sens['metric']}")
    ax.set_title(f"Per-layer sensitivity ({sens['method']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return to_png(fig)


def training_curves(runs: dict[str, list[dict[str, Any]]], metric: str) -> bytes:
    """Validation score per epoch of each training run a recipe did (fine-tuning, distillation...)."""
    fig = figure(6.4, 3.8)
    ax = fig.add_subplot()
    for name, history in runs.items():
        ax.plot([r["epoch"] + 1 for r in history], [r["val_score"] for r in history], marker="o", markersize=2,
                label=name)
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Training during the recipe")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return to_png(fig)
