"""Deployment benchmark: each model fp32 and int8 (slimkit's static int8) in every runtime slimkit exports to,
in one run: ONNX Runtime, OpenVINO, LiteRT (TFLite) and ExecuTorch (XNNPACK), with torch eager for reference.

For every file: its parity with slimkit's model (top-1 agreement and SQNR on the test inputs: the fp32 files
against the torch model, the int8 files against slimkit's int8 simulation), test accuracy, bytes, and latency
at batch 1 and 8 (median of interleaved rounds, fixed threads) as a ratio to the fp32 model in ONNX Runtime.

* zoo: lenet5 and resnet8 trained on digits (8x8), accuracy on real labels.
* torchvision at 224x224 (resnet18, mobilenet_v2, efficientnet_b0; random initialisation, nothing can be
  downloaded here): trained 10 epochs on digits at 32 px and 3 channels (cheap), then fine-tuned 2 epochs
  at 224 px (``digits:size=224,channels=3``), where they are run, quantized (128 calibration images) and
  timed; accuracy on real labels at the deployment size. Trained models are cached in
  benchmarks/results/deploy/.

    python benchmarks/deploy.py [--models lenet5,resnet8,resnet18] [--threads 2] [--rounds 3]
                                [--runtimes ort,executorch --out deploy-subset.json]

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
TORCHVISION_EPOCHS = 10  # 3 left mobilenet_v2 and efficientnet_b0 at chance (10%) at lr 1e-3: untrained weights
FINETUNE_224_EPOCHS = 2
MIN_ACCURACY = 0.5  # a benchmark model below this on its own test split did not learn


def trained(name: str, task: Task, epochs: int, lr: float, start: Any = None, batch_size: int = 64) -> Any:
    """The model (``start``, else freshly built) trained on ``task`` (cached); refused if it did not learn, so
    that no result rests on untrained weights (whose activations can vanish to scales no real model has)."""
    data = task.name.replace(":", "_").replace("=", "").replace(",", "_")
    run = RESULTS / "deploy" / f"{name}-{data}-{epochs}ep{'-finetuned' if start is not None else ''}"
    if not (run / "model" / "slimkit.json").is_file():
        arch = name if name in ZOO else {"torchvision": name, "args": {"num_classes": 10}}
        model = start if start is not None else build_seeded(arch, 0, task)
        train_model(model, task, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size), run, progress=False,
                    overwrite=True)
    accuracy = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"{name} reached {accuracy:.1%} test accuracy on {task.name} after {epochs} epochs: it did "
                         f"not learn; train longer (--epochs) or delete {run} to retrain")
    return load(run).eval()


def at_224(name: str, small: Task, large: Task, epochs: int) -> Any:
    """A torchvision model trained at 32 px, then fine-tuned at 224 px. Trained at 32 px only, they scored
    10-14% at 224 even with BatchNorm statistics re-estimated there (and efficientnet_b0's logits reached 2e5
    without): int8 parity measured on a model that does not work at its deployment size says little."""
    return trained(name, large, FINETUNE_224_EPOCHS, 3e-4, start=trained(name, small, epochs, 1e-3), batch_size=32)


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
    base = next((r for r in rows if r["model"] == "fp32" and r["runtime"] == "ort" and "latency_ms" in r), None)
    if base is None:
        return f"#### {entry['model']}: the fp32 ONNX Runtime reference failed: " + "; ".join(
            f"{r['model']} {r['runtime']}: {r['skipped'][:200]}" for r in rows if "skipped" in r)
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
    parser.add_argument("--epochs", type=int, default=TORCHVISION_EPOCHS,
                        help="training epochs of the torchvision models")
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
            model, task = at_224(name, small, large, args.epochs), large
        entries.append(measure(name, model, task, args, sorted({"ort", *args.runtimes.split(",")},
                                                                  key=RUNTIMES.index)))
        print(table(entries[-1]), "\n", flush=True)
    machine = entries[0]["machine"] if entries else {}
    print(f"measured on {describe_machine(machine)}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out  # a subset of models rerun replaces their entries, keeps the others
    kept = json.loads(out.read_text())["entries"] if out.is_file() else []
    measured = {e["model"] for e in entries}
    entries = [e for e in kept if e["model"] not in measured] + entries
    entries.sort(key=lambda e: (ZOO + TORCHVISION).index(e["model"]) if e["model"] in ZOO + TORCHVISION else 99)
    out.write_text(json.dumps({"entries": entries, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
