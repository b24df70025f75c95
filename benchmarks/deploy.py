"""Deployment benchmark: each model fp32 and int8 (slimkit's static int8) in every runtime slimkit exports to,
in one run: ONNX Runtime, OpenVINO, LiteRT (TFLite) and ExecuTorch (XNNPACK), with torch eager for reference.

For every file: its parity with slimkit's model (top-1 agreement and SQNR on the test inputs: the fp32 files
against the torch model, the int8 files against slimkit's int8 simulation), test accuracy, bytes, and latency
at batch 1 and 8 (median of interleaved rounds, fixed threads) as a ratio to the fp32 model in ONNX Runtime.

* zoo: lenet5 and resnet8 trained on digits (8x8), accuracy on real labels.
* torchvision at 224x224 (resnet18, mobilenet_v2, efficientnet_b0; random initialisation, nothing can be
  downloaded here): trained 3 epochs on digits at 32 px and 3 channels, then run, quantized (128 calibration
  images) and timed at 224 px (``digits:size=224,channels=3``); their accuracy at 224 says little (trained at
  32 px), their parity and speed are the point. Trained models are cached in benchmarks/results/deploy/.

    python benchmarks/deploy.py [--models lenet5,resnet8,resnet18] [--threads 2] [--rounds 3]
                                [--runtimes ort,executorch --out deploy-executorch.json]

Prints Markdown tables and writes benchmarks/results/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import slimkit
from slimkit import Task, TrainConfig, load, load_data, train_model
from slimkit.analyze.bench import bench
from slimkit.analyze.machine import describe_machine
from slimkit.train import build_seeded

RESULTS = Path(__file__).parent / "results"
ZOO = ("lenet5", "resnet8")
TORCHVISION = ("resnet18", "mobilenet_v2", "efficientnet_b0")
RUNTIMES = ["torch", "ort", "openvino", "tflite", "executorch"]


def trained(name: str, task: Task, epochs: int, lr: float) -> Any:
    run = RESULTS / "deploy" / f"{name}-{task.name.replace(':', '_').replace('=', '').replace(',', '_')}-{epochs}ep"
    if not (run / "model" / "slimkit.json").is_file():
        arch = name if name in ZOO else {"torchvision": name, "args": {"num_classes": 10}}
        model = build_seeded(arch, 0, task)
        train_model(model, task, TrainConfig(epochs=epochs, lr=lr), run, progress=False, overwrite=True)
    return load(run).eval()


def measure(name: str, model, task: Task, args, runtimes: list[str]) -> dict[str, Any]:
    calibration = slimkit.Task.from_inputs(task.example_inputs[:128]) if name in TORCHVISION else task
    started = time.perf_counter()
    quantized = slimkit.quantize(model, {"scheme": "int8-static", "calib": 128}, calibration)
    quantize_s = time.perf_counter() - started
    result = bench({"fp32": model, "int8": quantized}, task, runtimes, [1, 8], threads=args.threads,
                   rounds=args.rounds, samples=64)
    return {"model": name, "data": task.name, "quantize_s": quantize_s, **result}


def table(entry: dict[str, Any]) -> str:
    rows = entry["rows"]
    base = next(r for r in rows if r["model"] == "fp32" and r["runtime"] == "ort" and "latency_ms" in r)
    lines = [f"#### {entry['model']} ({entry['data']})", "",
             "| precision | runtime | format | bytes | top-1 agreement | SQNR dB | accuracy | b1 ms | b1 vs fp32 ORT "
             "| b8 ms | b8 vs fp32 ORT |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['format']} | skipped: {r['skipped'][:80]} "
                         "| | | | | | | |")
            continue
        check = r.get("check", {})
        cells = [r["model"], r["runtime"] + (" (simulation)" if r.get("simulation") else ""), r["format"],
                 f"{r['bytes']:,}" if "bytes" in r else "",
                 f"{check['top1_agreement']:.4f}" if check else "", f"{check['sqnr_db']:.1f}" if check else "",
                 f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else ""]
        for b in (1, 8):
            ms = r["latency_ms"][f"b{b}"]["median"]
            cells += [f"{ms:.3f}", f"{ms / base['latency_ms'][f'b{b}']['median']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ZOO + TORCHVISION))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the torchvision models")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="a subset (ort is the reference, always run)")
    parser.add_argument("--out", default="deploy.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    digits = Task.classification(load_data("digits"))
    small, large = (Task.classification(load_data(f"digits:size={s},channels=3")) for s in (32, 224))
    entries = []
    for name in args.models.split(","):
        if name in ZOO:
            model, task = trained(name, digits, 15, 3e-3), digits
        else:
            model, task = trained(name, small, args.epochs, 1e-3), large
        entries.append(measure(name, model, task, args, sorted({"ort", *args.runtimes.split(",")},
                                                                  key=RUNTIMES.index)))
        print(table(entries[-1]), "\n", flush=True)
    machine = entries[0]["machine"] if entries else {}
    print(f"measured on {describe_machine(machine)}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps({"entries": entries, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
