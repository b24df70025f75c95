"""``slimkit bench``: every model in every runtime it runs in, measured side by side in one process.

Each model is exported to each runtime's format (its int8 format where the model is quantized), verified as
every export is, and then run: accuracy on the test split (classification), file bytes, and latency at each
batch size, the median and 90th percentile after warm-up, with the thread count fixed. The cells are timed
round-robin over ``rounds`` rounds (each cell's median is the median of its rounds), so a machine that slows
down for a while slows every cell alike. The first model is the baseline: any other model slower than it in
the same runtime at the same batch is flagged. ``torch`` runs the model eagerly (a quantized model's torch
time is slimkit's simulation, not a deployment, and is marked so).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, rows_of
from ..task import Task
from .latency import time_call, torch_threads

RUNTIMES = {"torch": (None, None), "ort": ("onnx", "onnx-int8"), "openvino": ("openvino", "openvino-int8"),
            "tflite": ("tflite", "tflite-int8"), "executorch": ("executorch", "executorch-int8")}
ROUND_BUDGET_S = 0.2


def bench(models: dict[str, nn.Module], task: Task, runtimes: list[str], batches: list[int], threads: int = 1,
          rounds: int = 3, samples: int = 256) -> dict[str, Any]:
    """The measurements, as JSON-ready data: one row per model x runtime (a row says why it was skipped)."""
    from ..quant.ptq import is_quantized
    from .machine import machine_fingerprint

    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise SlimkitError(f"unknown runtime {', '.join(unknown)}; known: {', '.join(RUNTIMES)}")
    inputs = task.example_inputs[:samples]
    rows, cells = [], []
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        for name, model in models.items():
            model.eval()
            for runtime in runtimes:
                fmt = RUNTIMES[runtime][int(is_quantized(model))]
                row = {"model": name, "runtime": runtime, "format": fmt or "torch eager",
                       "simulation": runtime == "torch" and is_quantized(model)}
                try:
                    runners = _runners(model, fmt, inputs, batches, threads, Path(tmp) / f"{len(rows)}", row)
                except SlimkitError as exc:
                    rows.append({**row, "skipped": str(exc)})
                    continue
                row.update(_scores(task, runners[batches[-1]], inputs))
                rows.append(row)
                cells += [(row, b, runners[b], rows_of(inputs, b)) for b in batches]
        _time(cells, threads, rounds)
    _flag_slower(rows, batches)
    return {"rows": rows, "batches": batches, "threads": threads, "rounds": rounds, "samples": len(inputs),
            "data": task.name, "machine": machine_fingerprint(threads)}


def _runners(model: nn.Module, fmt: str | None, inputs: Inputs, batches: list[int], threads: int, folder: Path,
             row: dict[str, Any]) -> dict[int, Any]:
    """A callable per batch size: the torch model, or the file (one per batch for static-batch formats)."""
    if fmt is None:
        return {b: _TorchRunner(model, threads) for b in batches}
    from ..export.targets import export_to, get_target

    target = get_target(fmt)
    folder.mkdir(parents=True)
    runners = {}
    for b in batches if target.static_batch else batches[:1]:
        path = folder / f"b{b}{target.suffix}"
        result = export_to(model, fmt, path, inputs if len(inputs) >= b else rows_of(inputs, b), batch=b)
        row.setdefault("bytes", result["bytes"])
        row.setdefault("check", result["check"])
        runners[b] = target.open(path, threads)
    return runners if target.static_batch else {b: runners[batches[0]] for b in batches}


class _TorchRunner:
    batch = None

    def __init__(self, model: nn.Module, threads: int):
        self.model, self.threads = model, threads

    def run(self, x: Inputs) -> np.ndarray:
        import torch

        from ..export.onnx import run_torch

        with torch_threads(self.threads), torch.inference_mode():
            return run_torch(self.model, x).numpy()

    def __call__(self, x: Inputs) -> np.ndarray:
        return self.run(x)


def _scores(task: Task, runner, inputs: Inputs) -> dict[str, Any]:
    """Test accuracy of a classifier's outputs in this runtime (other tasks: the export check's agreement)."""
    if task.splits is None:
        return {}
    outputs = runner(task.splits.x_test)
    return {"accuracy": float((outputs.argmax(-1) == task.splits.y_test.numpy()).mean())}


def _time(cells: list, threads: int, rounds: int) -> None:
    """Round-robin timing: each round times every cell briefly; a cell's median and p90 are the medians of its
    rounds'."""
    results: dict[int, list] = {i: [] for i in range(len(cells))}
    for _ in range(rounds):
        for i, (_, batch, runner, x) in enumerate(cells):
            results[i].append(time_call(lambda r=runner, x=x: r.run(x), warmup=2, min_repeats=5, max_repeats=200,
                                        budget_s=ROUND_BUDGET_S))
    for i, (row, batch, _, _) in enumerate(cells):
        timings = results[i]
        row.setdefault("latency_ms", {})[f"b{batch}"] = {
            "median": statistics.median(t.median_ms for t in timings),
            "p90": statistics.median(t.p90_ms for t in timings),
            "rounds": [t.median_ms for t in timings]}


def _flag_slower(rows: list[dict[str, Any]], batches: list[int]) -> None:
    """Mark each cell slower than the baseline (the first model) in the same runtime at the same batch."""
    measured = [r for r in rows if "latency_ms" in r]
    if not measured:
        return
    baseline_name = measured[0]["model"]
    base = {r["runtime"]: r for r in measured if r["model"] == baseline_name}
    for row in measured:
        ref = base.get(row["runtime"])
        if ref is None or row is ref:
            continue
        row["vs_baseline"] = {f"b{b}": row["latency_ms"][f"b{b}"]["median"] / ref["latency_ms"][f"b{b}"]["median"]
                              for b in batches}
        row["slower_than_baseline"] = [b for b in batches if row["vs_baseline"][f"b{b}"] > 1.0]
