"""Float or int8 per layer by measured latency (``latency_placement``), at 224x224 in ONNX Runtime.

For each torchvision model (random weights, BatchNorm statistics re-estimated on random batches at 224 px:
latency does not depend on the weight values): the fp32 file, slimkit's static int8 with every conv and linear
layer quantized, slimkit's static int8 with the layers chosen by ``latency_placement`` at that batch kept in
float, and ONNX Runtime's ``quantize_static`` on the same 16 calibration images. Every file runs in ONNX Runtime
with the same thread count in one process, interleaved rounds, ratios to fp32 in each round (median and range).
Which layers run slower as int8 depends on the CPU (VNNI or not), so the CPU fingerprint is printed and stored.
Writes benchmarks/results/placement.json.

    python benchmarks/placement.py [--models mobilenet_v2,efficientnet_b0,resnet18] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from quant import ort_static
from vision import RESULTS, arch, batchnorm_at

from slimkit.analyze.latency import ort_latency
from slimkit.analyze.machine import describe_machine, machine_fingerprint
from slimkit.export import export_onnx, ort_session, run_ort
from slimkit.export.qdq import export_qdq, sqnr_db
from slimkit.io import write_json_atomic
from slimkit.models.vision import build_torchvision
from slimkit.quant.placement import LatencyPlacement, choose_float_layers
from slimkit.quant.ptq import StaticQuantConfig, quantize_static

SIZE = 224
CALIBRATION = 16


def model_at_224(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_torchvision(name, arch(name, SIZE)["args"])
    return batchnorm_at(model, torch.randn(32, 3, SIZE, SIZE))


def ratios(sessions: dict[str, Any], x: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Per file: fp32 ms (median of rounds) and the median, min and max of its per-round ratio to fp32."""
    per_round: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            per_round[label].append(ort_latency(session, x, warmup=1, min_repeats=5, budget_s=1.0).median_ms)
    fp32 = per_round["fp32"]
    return {
        label: {
            "median_ms": statistics.median(values),
            "ratio": statistics.median(v / f for v, f in zip(values, fp32)),
            "ratio_min": min(v / f for v, f in zip(values, fp32)),
            "ratio_max": max(v / f for v, f in zip(values, fp32)),
        }
        for label, values in per_round.items()
    }


def row(name: str, batches: list[int], threads: int, rounds: int) -> dict[str, Any]:
    model = model_at_224(name)
    gen = torch.Generator().manual_seed(1)
    calib, test = torch.randn(CALIBRATION, 3, SIZE, SIZE, generator=gen), torch.randn(8, 3, SIZE, SIZE, generator=gen)
    out: dict[str, Any] = {"model": name, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(model, tmp / "fp32.onnx", test[:2], verify_on=test[:4])
        quantized, _ = quantize_static(model, calib, StaticQuantConfig())
        export_qdq(quantized, tmp / "int8.onnx", test[:2])
        ort_static(tmp / "fp32.onnx", calib, tmp / "ort.onnx")
        reference = run_ort(ort_session(tmp / "fp32.onnx", threads), test)
        for batch in batches:
            start = time.perf_counter()
            settings = LatencyPlacement(threads=threads, batch=batch)
            placement = choose_float_layers(model, calib, StaticQuantConfig(), settings)
            seconds = time.perf_counter() - start
            placed, _ = quantize_static(model, calib, StaticQuantConfig(exclude=placement["exclude"]))
            export_qdq(placed, tmp / f"placed-b{batch}.onnx", test[:2])
            files = {
                "fp32": tmp / "fp32.onnx",
                "slimkit int8": tmp / "int8.onnx",
                "slimkit int8 placed": tmp / f"placed-b{batch}.onnx",
                "ORT int8": tmp / "ort.onnx",
            }
            sessions = {label: ort_session(path, threads) for label, path in files.items()}
            x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
            out["batches"][f"b{batch}"] = {
                "latency": ratios(sessions, x, rounds),
                "float_layers": placement["exclude"],
                "candidates": len(
                    [
                        r
                        for r in placement["layers"]
                        if r["int8_ms"] is not None and r["int8_ms"] > (1 + settings.margin) * r["float_ms"]
                    ]
                ),
                "layers": len(placement["layers"]),
                "trials": placement["trials"],
                "placement_seconds": seconds,
                "sqnr_db_vs_fp32": {
                    label: sqnr_db(reference, run_ort(session, test))
                    for label, session in sessions.items()
                    if label != "fp32"
                },
            }
            print(f"{name} b{batch}: {out['batches'][f'b{batch}']['latency']}", flush=True)
    return out


def print_table(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    print(f"\n### Float or int8 by measured latency at {SIZE}x{SIZE} ({describe_machine(machine)})\n")
    print(
        "| model | batch | fp32 ms | slimkit int8 | slimkit int8 + latency placement | ORT int8 "
        "| layers in float (candidates / layers) | placement s | SQNR to fp32: int8 / placed / ORT |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        for batch, b in r["batches"].items():
            lat, sq = b["latency"], b["sqnr_db_vs_fp32"]

            def cell(label: str) -> str:
                x = lat[label]
                return f"{x['ratio']:.2f}x ({x['ratio_min']:.2f}-{x['ratio_max']:.2f})"

            print(
                f"| {r['model']} | {batch[1:]} | {lat['fp32']['median_ms']:.1f} | {cell('slimkit int8')} "
                f"| {cell('slimkit int8 placed')} | {cell('ORT int8')} "
                f"| {len(b['float_layers'])} ({b['candidates']} / {b['layers']}) | {b['placement_seconds']:.0f} "
                f"| {sq['slimkit int8']:.1f} / {sq['slimkit int8 placed']:.1f} / {sq['ORT int8']:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_b0,resnet18")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    machine = machine_fingerprint(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row(name, batches, args.threads, args.rounds) for name in args.models.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "placement.json", {"machine": machine, "rows": rows})
    print_table(rows, machine)


if __name__ == "__main__":
    sys.exit(main())
