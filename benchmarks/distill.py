"""Distillation benchmark: small students from scratch vs with KD, KD + feature hints, KD + attention maps.

Teachers are the zoo's lenet5 and vit (trained with their defaults, cached in
benchmarks/results/zoo). Students: lenet5 at quarter width, and a 2-block vit (which also
distils the attention maps of teacher blocks 1 and 3 into its blocks 0 and 1). Every
method trains a student with the same settings (listed in CASES: the zoo's, without
augmentation and label smoothing, which cost the quarter-width lenet5 two points from
scratch), three times (seeds 0, 1, 2);
accuracy is on the 360-image test split, reported as mean and standard deviation, with
the share of the teacher-student gap that distillation closes. Then training throughput
and accuracy with bf16 autocast against fp32 (resnet8, vit; same seed and settings), and
`slimkit train` in one process against two under torchrun (resnet8). Last, distillation as
the recovery step of a recipe: lenet5 pruned to 90% (one shot), and pruned then quantized to
int8, recovered with nothing, with label fine-tuning or with distillation from the unpruned
model (the same epochs and learning rate; three seeds). Prints Markdown tables and writes
benchmarks/results/distill.json.

    python benchmarks/distill.py [--seeds 3] [--sections kd,precision,ddp,recovery]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slimkit import Task, count_params, fit, load, load_data, parse_recipe, run_recipe
from slimkit.distillation import DistillConfig, build_student, distill
from slimkit.io import write_json_atomic
from slimkit.train import TrainConfig, build_seeded, default_train_config, train_model

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [  # teacher, student spec, feature hints and attention pairs (student -> teacher), students' training
    ("lenet5", "lenet5:width=0.25", {"conv2": "conv2"}, {}, {"epochs": 60, "lr": 3e-3}),
    ("vit", "vit:depth=2", {"blocks.1": "blocks.3"}, {"blocks.0.attn": "blocks.1.attn", "blocks.1.attn": "blocks.3.attn"},
     {"epochs": 100, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 5}),
]


def trained(name: str, task: Task):
    run = RESULTS / "zoo" / name
    if not (run / "model" / "slimkit.json").is_file():
        train_model(build_seeded(name, 0, task), task, default_train_config(name, seed=0), run, progress=False,
                    overwrite=True)
    return load(run)


def methods(attention: dict) -> list[str]:
    return ["scratch", "kd", "kd+features"] + (["kd+attention", "kd+features+attention"] if attention else [])


def run_student(task: Task, teacher, spec: str, method: str, hints: dict, attention: dict, train: dict,
                seed: int) -> dict:
    cfg = TrainConfig(**train, seed=seed)
    student = build_student(spec, task, seed)
    started = time.perf_counter()
    if method == "scratch":
        fit(student, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
    else:
        kd = DistillConfig(features=hints if "features" in method else {},
                           attention=attention if "attention" in method else {})
        student, _ = distill(student, teacher, task, kd, cfg, progress=False)
    return {"accuracy": task.test_score(student), "seconds": time.perf_counter() - started,
            "params": count_params(student)[0]}


def precision_rows(task: Task, epochs: int) -> list[dict]:
    """Training throughput (samples/s) and accuracy, fp32 vs bf16 autocast, same seed and settings."""
    rows = []
    for name in ("resnet8", "vit"):
        for precision in ("fp32", "bf16"):
            cfg = default_train_config(name, seed=0).model_copy(update={"epochs": epochs, "precision": precision})
            model = build_seeded(name, 0, task)
            started = time.perf_counter()
            fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
            seconds = time.perf_counter() - started
            rows.append({"model": name, "precision": precision, "epochs": epochs, "seconds": seconds,
                         "samples_per_s": epochs * len(task.splits.y_train) / seconds,
                         "accuracy": task.test_score(model)})
    return rows


def ddp_rows(epochs: int) -> list[dict]:
    """`slimkit train` in one process (2 threads) vs `torchrun` with 2 processes (1 thread each) on this CPU."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, launcher, threads in (("1 process", [sys.executable, "-m", "slimkit"], "2"),
                                         ("2 processes (torchrun, gloo)", [sys.executable, "-m",
                                          "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                          "-m", "slimkit"], "1")):
            out = Path(tmp) / label.split()[0]
            subprocess.run([*launcher, "train", "--model", "resnet8", "--epochs", str(epochs), "--seed", "0",
                            "--no-progress", "--out", str(out)], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": threads})
            metrics = json.loads((out / "metrics.json").read_text())
            rows.append({"setup": label, "epochs": epochs, "train_seconds": metrics["train_seconds"],
                         "samples_per_s": epochs * 1078 / metrics["train_seconds"],
                         "accuracy": metrics["test_accuracy"]})
    return rows


def recovery_rows(seeds: int) -> list[dict]:
    """A compressed lenet5 recovered by nothing, label fine-tuning or distillation, through recipes."""
    import tempfile

    compressions = {"pruned 90%": [{"type": "prune", "sparsity": 0.9, "scope": "global"}],
                    "pruned 90% + int8": [{"type": "prune", "sparsity": 0.9, "scope": "global"},
                                          {"type": "quantize", "scheme": "int8-static"}]}
    recoveries = {"none": lambda seed: [],
                  "finetune": lambda seed: [{"type": "finetune", "epochs": 10, "lr": 1e-3, "seed": seed}],
                  "distill": lambda seed: [{"type": "distill", "train": {"epochs": 10, "lr": 1e-3, "seed": seed}}]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for compression, stages in compressions.items():
            for recovery, extra in recoveries.items():
                runs = []
                for seed in range(seeds if recovery != "none" else 1):
                    recipe = parse_recipe({"name": "recovery", "model": {"path": str(RESULTS / "zoo" / "lenet5")},
                                           "evaluate": {"latency": False}, "stages": [*stages, *extra(seed)]})
                    runs.append(run_recipe(recipe, Path(tmp) / f"{compression}-{recovery}-{seed}", progress=False))
                accs = [r["final"]["accuracy"] for r in runs]
                rows.append({"compression": compression, "recovery": recovery, "accuracies": accs,
                             "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "baseline": runs[0]["baseline"]["accuracy"],
                             "nonzero_params": runs[0]["final"]["nonzero_params"],
                             "file_bytes": runs[0]["final"]["file_bytes"]})
    return rows


def print_table(title: str, columns: list[str], rows: list[list[str]], text: int = 1) -> None:
    """A Markdown table under a heading: the first ``text`` columns left-aligned, the numbers right-aligned."""
    if not rows:  # a section not measured in this run
        return
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if i < text else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--precision-epochs", type=int, default=20)
    parser.add_argument("--sections", default="kd,precision,ddp,recovery", help="which tables to measure")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    task = Task.classification(load_data("digits"))
    rows = []
    for teacher_name, spec, hints, attention, train in CASES if "kd" in sections else []:
        teacher = trained(teacher_name, task)
        teacher_acc = task.test_score(teacher)
        results = {method: [run_student(task, teacher, spec, method, hints, attention, train, seed)
                            for seed in range(args.seeds)] for method in methods(attention)}
        scratch = statistics.mean(r["accuracy"] for r in results["scratch"])
        for method, runs in results.items():
            accs = [r["accuracy"] for r in runs]
            mean = statistics.mean(accs)
            rows.append({"teacher": teacher_name, "teacher_accuracy": teacher_acc,
                         "teacher_params": count_params(teacher)[0], "student": spec, "method": method,
                         "student_params": runs[0]["params"], "accuracies": accs, "mean": mean,
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "gap_closed": (mean - scratch) / (teacher_acc - scratch) if teacher_acc != scratch else 0.0,
                         "seconds": statistics.mean(r["seconds"] for r in runs)})
        print(f"measured {spec}", flush=True)
    precision = precision_rows(task, args.precision_epochs) if "precision" in sections else []
    print_table(f"Distillation ({args.seeds} seeds; test accuracy mean +/- std; same training for every method)",
                ["teacher (params, acc)", "student (params)", "method", "test acc", "gap to teacher closed"],
                [[f"{r['teacher']} ({r['teacher_params']:,}, {100 * r['teacher_accuracy']:.2f}%)",
                  f"{r['student']} ({r['student_params']:,})", r["method"],
                  f"{100 * r['mean']:.2f}% +/- {100 * r['std']:.2f}", f"{100 * r['gap_closed']:.0f}%"] for r in rows],
                text=3)
    fp32 = {r["model"]: r["samples_per_s"] for r in precision if r["precision"] == "fp32"}
    print_table(f"bf16 autocast vs fp32 training on this CPU ({args.precision_epochs} epochs, zoo settings, "
                f"{torch.get_num_threads()} threads)", ["model", "precision", "samples/s", "vs fp32", "test acc"],
                [[r["model"], r["precision"], f"{r['samples_per_s']:,.0f}", f"{r['samples_per_s'] / fp32[r['model']]:.2f}x",
                  f"{100 * r['accuracy']:.2f}%"] for r in precision], text=2)
    ddp = ddp_rows(args.precision_epochs) if "ddp" in sections else []
    print_table(f"Data-parallel training on this CPU (resnet8, {args.precision_epochs} epochs, the same global batches)",
                ["setup", "samples/s", "vs 1 process", "test acc"],
                [[r["setup"], f"{r['samples_per_s']:,.0f}", f"{r['samples_per_s'] / ddp[0]['samples_per_s']:.2f}x",
                  f"{100 * r['accuracy']:.2f}%"] for r in ddp])
    recovery = recovery_rows(args.seeds) if "recovery" in sections else []
    print_table(f"Recovery of a compressed lenet5 (10 epochs, lr 1e-3; {args.seeds} seeds; teacher: the unpruned model)",
                ["compression", "recovery", "test acc", "vs unpruned", "non-zero params", "model dir bytes"],
                [[r["compression"], r["recovery"], f"{100 * r['mean']:.2f}% +/- {100 * r['std']:.2f}",
                  f"{100 * (r['mean'] - r['baseline']):+.2f} pts", f"{r['nonzero_params']:,}", f"{r['file_bytes']:,}"]
                 for r in recovery], text=2)
    name = "distill" if sections == {"kd", "precision", "ddp", "recovery"} else "distill-" + "-".join(sorted(sections))
    write_json_atomic(RESULTS / f"{name}.json", {"distillation": rows, "precision": precision, "ddp": ddp,
                                                 "recovery": recovery})


if __name__ == "__main__":
    main()
