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
    """Validation score and training loss per epoch of each training run a recipe did, the runs placed one
    after another on one epoch axis. Epochs that could not be chosen as the best (a gradual pruning ramp)
    are open markers; a star marks the first epoch that could (the target sparsity reached)."""
    fig = figure(7.2, 5.0)
    score_ax, loss_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    offset = 0
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i % 10}"
        xs = [offset + r["epoch"] + 1 for r in history]
        scores = [r["val_score"] for r in history]
        ramp = [r.get("eligible", True) is False for r in history]
        score_ax.plot(xs, scores, "-", color=color, label=name)
        score_ax.scatter([x for x, r in zip(xs, ramp) if not r], [v for v, r in zip(scores, ramp) if not r],
                         color=color, s=14, zorder=3)
        if any(ramp):
            score_ax.scatter([x for x, r in zip(xs, ramp) if r], [v for v, r in zip(scores, ramp) if r],
                             facecolors="none", edgecolors=color, s=14, zorder=3)
            reached = next((j for j, r in enumerate(ramp) if not r), None)
            if reached is not None:
                score_ax.scatter([xs[reached]], [scores[reached]], marker="*", s=140, color=color, zorder=4,
                                 edgecolors="black", linewidths=0.5)
        loss_ax.plot(xs, [r["train_loss"] for r in history], "-", color=color, marker="o", markersize=2)
        offset = xs[-1]
        if i < len(runs) - 1:
            for ax in (score_ax, loss_ax):
                ax.axvline(offset + 0.5, color="#cbd2d9", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch (the recipe's training runs, one after another)")
    score_ax.set_ylabel(f"validation {metric}")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    score_ax.set_title("Training during the recipe")
    for ax in (score_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    score_ax.legend(fontsize=7)
    return to_png(fig)


def bit_map(mixed: dict[str, Any]) -> bytes:
    """Mixed precision: each layer's weight bits, its weight count, and the validation drop measured with that
    layer alone at the low width (the order layers moved to it: least harmful per byte first)."""
    rows = mixed["sensitivity"]
    bits = mixed["layer_bits"]
    fig = figure(7.0, max(2.4, 0.3 * len(rows) + 1.3))
    ax = fig.add_subplot()
    palette = {4: "#f0b429", 8: "#2f7ed8"}
    ys = range(len(rows))
    ax.barh(list(ys), [r["weights"] for r in rows], color=[palette.get(bits[r["layer"]], "#9aa5b1") for r in rows])
    for y, r in zip(ys, rows):
        ax.annotate(f"{bits[r['layer']]} bits, drop at 4: {100 * r['drop']:+.2f} pts", (r["weights"], y),
                    textcoords="offset points", xytext=(4, -3), fontsize=7)
    ax.set_yticks(list(ys), [r["layer"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(r["weights"] for r in rows) * 12)  # room for the labels
    ax.set_xlabel("weights in the layer (log scale)")
    ax.set_title(f"Weight bits per layer: {100 * mixed['weight_fraction']:.1f}% of the fp32 weight bytes")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=f"{b} bits") for b, c in palette.items()], fontsize=8, loc="lower right")
    return to_png(fig)


def bench_latency(rows: list[dict[str, Any]], batches: list[int]) -> bytes:
    """Median latency of every model in every runtime, one panel per batch size (log scale)."""
    measured = [r for r in rows if "latency_ms" in r]
    runtimes = list(dict.fromkeys(r["runtime"] for r in measured))
    models = list(dict.fromkeys(r["model"] for r in measured))
    fig = figure(3.2 * len(batches) + 1.5, 3.8)
    width = 0.8 / max(1, len(models))
    for k, batch in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), k + 1)
        for j, model in enumerate(models):
            xs, ys = [], []
            for i, runtime in enumerate(runtimes):
                row = next((r for r in measured if r["model"] == model and r["runtime"] == runtime), None)
                if row is not None:
                    xs.append(i + (j - (len(models) - 1) / 2) * width)
                    ys.append(row["latency_ms"][f"b{batch}"]["median"])
            ax.bar(xs, ys, width=width, label=model)
        ax.set_xticks(range(len(runtimes)), runtimes, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("median latency (ms, log scale)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.axes[-1].legend(fontsize=8)
    return to_png(fig)


def accuracy_vs_latency(rows: list[dict[str, Any]], batch: int) -> bytes:
    """Each model in each runtime: test accuracy against median latency at one batch size (colour: runtime,
    marker: model)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig = figure(6.4, 4.0)
    ax = fig.add_subplot()
    measured = [r for r in rows if "latency_ms" in r and "accuracy" in r]
    runtimes = list(dict.fromkeys(r["runtime"] for r in measured))
    models = list(dict.fromkeys(r["model"] for r in measured))
    markers = "os^Dv<>ph*"
    for row in measured:
        ax.scatter([row["latency_ms"][f"b{batch}"]["median"]], [100 * row["accuracy"]], s=55, alpha=0.85,
                   color=f"C{runtimes.index(row['runtime'])}", marker=markers[models.index(row["model"]) % 10],
                   label=f"{row['model']} / {row['runtime']}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"median latency at batch {batch} (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs latency, every model in every runtime")
    ax.grid(True, alpha=0.3)
    if measured:
        ax.legend(fontsize=7, ncol=2, loc="best")
    return to_png(fig)
