"""Zoo benchmark: every built-in model trained with its defaults, then measured side by side.

For each model: test accuracy, params, MACs, file bytes, and latency in torch eager
vs ONNX Runtime at batch 1 and 64 (median of repeats after warm-up, fixed threads),
all in one process. Prints a Markdown table and writes benchmarks/results/zoo.json; exits 1 when a model
trained with its defaults misses its accuracy floor (the test suite checks lenet300's only: the other four
add about 70 s of training).

    python benchmarks/zoo.py [--models lenet5,vit] [--threads 1] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import slimkit
from slimkit import ZOO, Task, load, load_data, profile
from slimkit.io import write_json_atomic
from slimkit.train import build_seeded, default_train_config, train_model

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY_FLOORS = {"lenet300": 0.95, "vit": 0.95, "lenet5": 0.97, "resnet8": 0.97, "mobilenetv2": 0.97}  # test split


def trained(name: str, task: Task, retrain: bool) -> tuple[Path, float]:
    """Train ``name`` with its defaults into results/zoo/NAME (reused unless --retrain)."""
    run = RESULTS / "zoo" / name
    if retrain or not (run / "model" / "slimkit.json").is_file():
        train_model(build_seeded(name, 0, task), task, default_train_config(name, seed=0), run, progress=False,
                    overwrite=True)
    return run, json.loads((run / "metrics.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()

    task = Task.classification(load_data("digits"))
    rows = []
    for name in args.models.split(","):
        run, train_seconds = trained(name, task, args.retrain)
        model = load(run)
        result = profile(model, task.input_shape, model_path=run / "model", score_fn=task.test_score,
                         threads=args.threads)
        result.update(model=name, train_seconds=train_seconds)
        rows.append(result)
        print(f"measured {name}", flush=True)

    header = ("| model | test acc | params | MACs | file bytes | torch b1 ms | ORT b1 ms | ORT/torch b1 "
              "| torch b64 ms | ORT b64 ms | ORT/torch b64 | train s |")
    print("\n" + header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    for r in rows:
        lat = r["latency_ms"]
        print(f"| {r['model']} | {100 * r['accuracy']:.2f}% | {r['params']:,} | {r['macs']:,} | {r['file_bytes']:,} "
              f"| {lat['torch_b1']:.3f} | {lat['ort_b1']:.3f} | {lat['ort_b1'] / lat['torch_b1']:.2f}x "
              f"| {lat['torch_b64']:.3f} | {lat['ort_b64']:.3f} | {lat['ort_b64'] / lat['torch_b64']:.2f}x "
              f"| {r['train_seconds']:.1f} |")
    print(f"\nthreads: {args.threads}; latency = median of repeated runs after warm-up; "
          "ORT/torch < 1 means ONNX Runtime is faster")
    write_json_atomic(RESULTS / "zoo.json", {
        "slimkit_version": slimkit.__version__, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "threads": args.threads, "models": rows,
    })
    missed = [f"{r['model']} {r['accuracy']:.4f} < {ACCURACY_FLOORS[r['model']]}" for r in rows
              if r["accuracy"] < ACCURACY_FLOORS.get(r["model"], 0.0)]
    if missed:
        raise SystemExit("below the accuracy floor with default training: " + "; ".join(missed))


if __name__ == "__main__":
    main()
