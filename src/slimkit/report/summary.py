"""The baseline-vs-final summary, as rows whose last column says what the change is ("4.0x smaller",
"1.3x faster", "+0.28 pts"), shared by the command line and the HTML report.

Latency rows name the runtime that ran. A quantized model's torch-eager time is its fake-quantization
simulation, not a deployable artifact: those rows say so, and its ONNX Runtime rows are the int8 model.
"""

from __future__ import annotations

from typing import Any

RUNTIMES = {"torch": "torch eager", "ort": "ONNX Runtime"}


def _worded(ratio: float, word: str, opposite: str) -> str:
    """A ratio above 1 (better) or below (worse) in words: "4.00x smaller"; small changes as percentages."""
    if ratio == 1:
        return "same"
    larger = ratio if ratio > 1 else 1 / ratio
    amount = f"{larger:.2f}x" if larger >= 1.1 else f"{100 * (larger - 1):.1f}%"
    return f"{amount} {word if ratio > 1 else opposite}"


def fewer(before: float, after: float, word: str = "smaller") -> str:
    """``before / after`` worded: "4.00x smaller", "3.5% fewer", "1.25x larger", "same"."""
    if after == before:
        return "same"
    opposite = {"smaller": "larger", "fewer": "more"}[word]
    return _worded(before / after if after else float("inf"), word, opposite)


def speed(speedup: float) -> str:
    return _worded(speedup, "faster", "slower")


def latency_label(key: str, simulated: bool) -> str:
    """``ort_b64`` -> "latency ONNX Runtime, batch 64 (ms)"; a simulated torch timing is marked as such."""
    runtime, _, batch = key.partition("_b")
    label = f"latency {RUNTIMES.get(runtime, runtime)}, batch {batch} (ms)"
    return label + (" [final: fake-quant simulation, not deployed]" if simulated and runtime == "torch" else "")


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    b, f, s = report["baseline"], report["final"], report["summary"]
    metric = report["data"]["metric"]
    if metric == "accuracy":
        rows = [["test accuracy", f"{100 * b['accuracy']:.2f}%", f"{100 * f['accuracy']:.2f}%",
                 f"{100 * s['accuracy_delta']:+.2f} pts"]]
    else:
        rows = [[f"test {metric}", f"{b['accuracy']:.4g}", f"{f['accuracy']:.4g}", f"{s['accuracy_delta']:+.4g}"]]
    rows += [
        ["params", f"{b['params']:,}", f"{f['params']:,}", fewer(b["params"], f["params"], "fewer")],
        ["non-zero params", f"{b['nonzero_params']:,}", f"{f['nonzero_params']:,}",
         fewer(b["nonzero_params"], f["nonzero_params"], "fewer")],
        ["MACs per sample", f"{b['macs']:,}", f"{f['macs']:,}", fewer(b["macs"], f["macs"], "fewer")],
        ["file bytes (model directory)", f"{b['file_bytes']:,}", f"{f['file_bytes']:,}",
         fewer(b["file_bytes"], f["file_bytes"])],
    ]
    if "packed" in report:
        packed = report["packed"]
        rows.append([f"file bytes ({packed['file']})", f"{b['file_bytes']:,}", f"{packed['file_bytes']:,}",
                     fewer(b["file_bytes"], packed["file_bytes"])])
    simulated = bool(f.get("simulated_in_torch"))
    for key, speedup in s.get("speedup", {}).items():
        rows.append([latency_label(key, simulated), f"{b['latency_ms'][key]:.3f}", f"{f['latency_ms'][key]:.3f}",
                     speed(speedup)])
    return rows


SLOWER_NOISE = 0.05  # timing jitter: a model within 5% of the baseline's time is not called slower


def report_warnings(report: dict[str, Any], max_drop: float) -> list[str]:
    """What a reader must not miss: a stage that lost more than ``max_drop`` of the metric against the baseline,
    and a final model slower than the baseline in a runtime that runs it as deployed (for a quantized model,
    ONNX Runtime: its torch time is the simulation)."""
    metric = report["data"]["metric"]
    base = report["baseline"]["accuracy"]
    unit, scale = (" points", 100) if metric == "accuracy" else ("", 1)
    out = [f"stage {stage['name']} {metric} is {scale * (base - stage['accuracy']):.2f}{unit} below the baseline "
           f"(allowed: {scale * max_drop:g}{unit}; evaluate.max_metric_drop)"
           for stage in report["stages"][1:] if base - stage["accuracy"] > max_drop]
    simulated = bool(report["final"].get("simulated_in_torch"))
    for key, speedup in report["summary"].get("speedup", {}).items():
        runtime, _, batch = key.partition("_b")
        if speedup < 1 - SLOWER_NOISE and not (simulated and runtime == "torch"):
            out.append(f"the final model is {1 / speedup:.2f}x slower than the baseline in {RUNTIMES[runtime]} at "
                       f"batch {batch}; {_likely_cause(report, runtime)}")
    return out


OVERHEAD_BOUND_MACS = 10_000_000  # below this many MACs per sample, per-operator overhead sets a model's speed


def _likely_cause(report: dict[str, Any], runtime: str) -> str:
    macs = report["final"]["macs"]
    if macs < OVERHEAD_BOUND_MACS:
        return (f"likely cause: at {macs:,} MACs per sample the model is bound by per-operator overhead, not "
                "arithmetic, so fewer or cheaper operations do not show (real-size models do)")
    if report["final"].get("simulated_in_torch") and runtime == "ort":
        return ("likely cause: quantize/dequantize steps around operators that stay float (LayerNorm, Softmax, "
                "GELU, small convolutions) cost more than the int8 arithmetic saves; try keeping such layers float")
    return "likely cause: operators the runtime does not fuse, or layout changes between them; profile the model"
