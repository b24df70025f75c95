"""TensorRT-ready ONNX benchmark: what TensorRT's symmetric int8 activations cost, whether the files follow
TensorRT's rules, and how the same files run in ONNX Runtime, in one run.

For each model, static int8 with slimkit's scales twice: uint8 activations with zero points (ONNX Runtime's
preference, ``onnx-int8``) and int8 activations with zero point 0 (``symmetric_activations``, exported as
``onnx-tensorrt``). Reported:

* accuracy and SQNR against the fp32 model of both simulations (the price of symmetric activations);
* ``check-onnx`` findings of each file for tensorrt / ort / openvino, its bytes, how ONNX Runtime's optimized
  run of it compares with the model it came from (SQNR), and the TensorRT-ready file's parity with the
  simulation run operator by operator as ONNX defines them (the export's own check; no TensorRT runs on this
  CPU machine: building an engine needs an NVIDIA GPU);
* ONNX Runtime latency at batch 1 and 8 of fp32, the uint8 file, the symmetric model's ONNX Runtime file and
  the TensorRT-ready file (median of interleaved rounds, fixed threads), as ratios to fp32.

Models: lenet5, resnet8 (zoo, trained on digits) and resnet18, mobilenet_v2, efficientnet_b0
(torchvision at 224 px, trained 10 epochs at 32 px and fine-tuned 2 epochs at 224 px, as in ``deploy.py``).

    python benchmarks/tensorrt_ready.py [--models lenet5,resnet18] [--threads 2] [--rounds 3]

Prints Markdown tables and writes benchmarks/results/tensorrt_ready.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slimkit
from slimkit import Task, load_data
from slimkit.analyze.latency import time_call
from slimkit.analyze.machine import describe_machine, machine_fingerprint
from slimkit.export.onnx import export_onnx, run_torch
from slimkit.export.onnx_rules import check_onnx
from slimkit.export.qdq import agreement, export_qdq, sqnr_db
from slimkit.export.targets import export_to, get_target

from deploy import TORCHVISION, TORCHVISION_EPOCHS, at_224, trained

RESULTS = Path(__file__).parent / "results"
ZOO = ("lenet5", "resnet8")  # trained and cached by deploy.py
TARGET_RULES = ("tensorrt", "ort", "openvino")


def _task(name: str) -> tuple[Task, Any]:
    if name in TORCHVISION:
        small, large = (Task.classification(load_data(f"digits:size={s},channels=3")) for s in (32, 224))
        return large, at_224(name, small, large, TORCHVISION_EPOCHS)
    task = Task.classification(load_data("digits"))
    return task, trained(name, task, 15, 3e-3)


def measure(name: str, threads: int, rounds: int) -> dict[str, Any]:
    task, model = _task(name)
    x = task.splits.x_test[:64] if name in TORCHVISION else task.splits.x_test
    y = None if name in TORCHVISION else task.splits.y_test.numpy()
    calibration = Task.from_inputs(task.example_inputs[:128]) if name in TORCHVISION else task
    models = {"fp32": model}
    for label, symmetric in (("uint8", False), ("int8 symmetric", True)):
        models[label] = slimkit.quantize(model, {"scheme": "int8-static", "calib": 128,
                                                 "symmetric_activations": symmetric}, calibration)
    reference = run_torch(model, x).numpy()
    entry: dict[str, Any] = {"model": name, "data": task.name, "simulation": {}, "files": {}, "latency_ms": {}}
    for label, m in models.items():
        out = run_torch(m, x).numpy()
        entry["simulation"][label] = {"sqnr_db_vs_fp32": sqnr_db(reference, out) if label != "fp32" else None,
                                      "top1_vs_fp32": agreement(reference, out),
                                      "accuracy": float((out.argmax(1) == y).mean()) if y is not None else None}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": Path(tmp) / "fp32.onnx", "uint8 onnx-int8": Path(tmp) / "uint8.onnx",
                 "symmetric onnx-int8": Path(tmp) / "sym.onnx", "symmetric onnx-tensorrt": Path(tmp) / "trt.onnx"}
        export_onnx(model, files["fp32"], x[:2], verify_on=x[:16])
        export_qdq(models["uint8"], files["uint8 onnx-int8"], x[:2])
        export_qdq(models["int8 symmetric"], files["symmetric onnx-int8"], x[:2])
        trt = export_to(models["int8 symmetric"], "onnx-tensorrt", files["symmetric onnx-tensorrt"], x)
        simulations = {"fp32": model, "uint8 onnx-int8": models["uint8"],
                       "symmetric onnx-int8": models["int8 symmetric"],
                       "symmetric onnx-tensorrt": models["int8 symmetric"]}
        for label, path in files.items():
            expected, got = run_torch(simulations[label], x).numpy(), get_target("onnx").open(path, 1)(x)
            entry["files"][label] = {"bytes": path.stat().st_size,
                                     "ort_vs_model": {"sqnr_db": sqnr_db(expected, got),
                                                      "top1_agreement": agreement(expected, got)},
                                     **{t: _findings(check_onnx(path, t)) for t in TARGET_RULES}}
        entry["files"]["symmetric onnx-tensorrt"]["check"] = trt["check"]
        entry["latency_ms"] = _latencies(files, x, threads, rounds)
    return entry


def _findings(findings) -> dict[str, Any]:
    """Counts, and the first few findings as examples (a uint8 file breaks TensorRT's rules hundreds of times)."""
    errors = sum(f.severity == "error" for f in findings)
    return {"errors": errors, "warnings": len(findings) - errors, "first": [str(f) for f in findings[:5]]}


def _latencies(files: dict[str, Path], x, threads: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Median of interleaved rounds per file and batch, with the rounds' spread."""
    runners = {label: get_target("onnx").open(path, threads) for label, path in files.items()}
    medians: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for batch in (1, 8):
            part = x[:batch]
            for label, runner in runners.items():
                timing = time_call(lambda: runner.run(part), budget_s=0.3)
                medians.setdefault((label, batch), []).append(timing.median_ms)
    return {label: {f"b{b}": {"median": statistics.median(medians[label, b]), "min": min(medians[label, b]),
                              "max": max(medians[label, b])} for b in (1, 8)} for label in files}


def tables(results: list[dict[str, Any]]) -> str:
    lines = ["#### Symmetric int8 activations (TensorRT's) against uint8 (ONNX Runtime's): the simulations", "",
             "| model | data | fp32 accuracy | uint8 accuracy | int8 sym. accuracy | uint8 SQNR dB | int8 sym. SQNR dB "
             "| int8 sym. top-1 vs fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        s = e["simulation"]
        acc = [f"{100 * s[k]['accuracy']:.2f}%" if s[k]["accuracy"] is not None else "" for k in s]
        lines.append(f"| {e['model']} | {e['data']} | {' | '.join(acc)} | {s['uint8']['sqnr_db_vs_fp32']:.1f} | "
                     f"{s['int8 symmetric']['sqnr_db_vs_fp32']:.1f} | {s['int8 symmetric']['top1_vs_fp32']:.4f} |")
    lines += ["", "#### The files: `check-onnx` errors (E) and warnings (W) per target, parity, ONNX Runtime latency",
              "", "| model | file | bytes | tensorrt | ort | openvino | ORT vs its model: SQNR dB | b1 ms | b1 vs fp32 "
              "| b8 ms | b8 vs fp32 |", "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for e in results:
        base = e["latency_ms"]["fp32"]
        for label, f in e["files"].items():
            counts = [f"{f[t]['errors']}E / {f[t]['warnings']}W" for t in TARGET_RULES]
            lat = e["latency_ms"][label]
            cells = [e["model"], label, f"{f['bytes']:,}", *counts, f"{f['ort_vs_model']['sqnr_db']:.1f}"]
            for b in ("b1", "b8"):
                cells += [f"{lat[b]['median']:.3f}", f"{lat[b]['median'] / base[b]['median']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "TensorRT-ready files vs slimkit's simulation, run as ONNX defines them (the export's check): "
              + "; ".join(f"{e['model']} top-1 {e['files']['symmetric onnx-tensorrt']['check']['top1_agreement']:.4f}"
                          f", SQNR {e['files']['symmetric onnx-tensorrt']['check']['sqnr_db']:.1f} dB"
                          for e in results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO + TORCHVISION))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    results = [measure(name, args.threads, args.rounds) for name in args.models.split(",")]
    RESULTS.mkdir(exist_ok=True)
    machine = machine_fingerprint(args.threads)
    out = {"machine": machine, "threads": args.threads, "rounds": args.rounds, "results": results}
    (RESULTS / "tensorrt_ready.json").write_text(json.dumps(out, indent=1))
    print(f"measured on {describe_machine(machine)}, {args.rounds} interleaved rounds\n")
    print(tables(results))


if __name__ == "__main__":
    main()
