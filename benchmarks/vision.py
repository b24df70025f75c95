"""Vision benchmark: torchvision architectures trained on real labels, then pruned (50% of channels), quantized
(static int8) and both; accuracy at 32 px, speed at 224 px; against Torch-Pruning 1.6 and ONNX Runtime's
``quantize_static``, in one run.

1. Accuracy. Each architecture (random initialisation: no pretrained weights can be downloaded here) is trained
   on digits resized to 32x32 and replicated to 3 channels (``digits:size=32,channels=3``: real labels,
   1078/359/360 train/val/test); cached in benchmarks/results/vision/NAME-EPOCHSep. Then: slimkit's
   structured pruning at ratio 0.5 and Torch-Pruning's MetaPruner (L1 magnitude, classifier ignored) at the
   same ratio, each fine-tuned for the same epochs; slimkit's static int8 (256 calibration images; where it
   loses more than 1 point of validation accuracy, 2 epochs of quantization-aware training) and ONNX
   Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, MinMax) on the same images;
   the pruned model quantized by both. Accuracy is on the test split, int8 accuracy from ONNX Runtime running
   the exported file.
2. Speed at 224x224, where these models are compute-bound: the trained weights (ViT's position embeddings
   interpolated to 224) pruned and quantized again at 224 with 64 calibration images of the same data at 224 (16 for ViT and Swin)
   (latency does not depend on the weight values, and a user quantizes at the size they deploy). Every file
   runs in ONNX Runtime with the same thread count in one process, batch 1 and 8, interleaved rounds: the
   median of the rounds' medians, and its spread. Achieved MAC/s is compared with the peak GEMM throughput of
   this CPU measured in the same run (ONNX Runtime MatMul fp32 and MatMulInteger u8 x s8, 2048x2048).

Prints Markdown tables and writes benchmarks/results/vision.json (rows of models a run does not measure are
kept from the previous file unless ``--fresh``; ``--tables`` prints them).

3. ``--sweep``: every torchvision classifier (or ``--models``), random weights, each in its own process: pruned
   at 0.5 by slimkit and Torch-Pruning, the dense and pruned models exported to fp32 and int8 ONNX, verified;
   writes benchmarks/results/vision-sweep.json.

    python benchmarks/vision.py [--models resnet18,resnet50] [--all] [--epochs 10] [--threads 2] [--sweep]
                                [--skip-speed | --skip-accuracy]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prune import finetune, torch_pruning_model
from quant import ort_dynamic, ort_static

import slimkit
from slimkit import Task, count_macs, count_params, load, load_data
from slimkit.analyze.latency import ort_latency
from slimkit.analyze.machine import describe_machine, machine_fingerprint
from slimkit.data import calibration_subset
from slimkit.export import export_onnx, ort_session, run_ort
from slimkit.export.qdq import export_int8_verified, export_qdq, sqnr_db
from slimkit.io import write_json_atomic
from slimkit.models.vision import classification_models, import_torchvision
from slimkit.pruning.structured import prune_channels
from slimkit.quant.ptq import StaticQuantConfig, quantize_static
from slimkit.quant.qat import convert_qat, prepare_qat
from slimkit.train import TrainConfig, build_seeded, fit, train_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
)
RATIO = 0.5
TP_MEMORY = 8 << 30  # bytes Torch-Pruning may allocate on top of what the process holds
QAT_WHEN_VAL_DROPS = 0.01  # static int8 losing more validation accuracy than this is recovered by QAT
SPEED_SIZE = 224
# calibration images at 224 px; 16 for the transformers, whose every intermediate output of every image ONNX
# Runtime's calibrator holds at once (64 images of vit_b_16: 22 GB)
SPEED_CALIBRATION = {"vit_": 16, "swin_": 16}
MIN_SIZE = {
    "inception_v3": 299,  # its auxiliary head (training mode) pools 5x5 over a 17x17 map
    "googlenet": 32,
}  # smallest inputs their stems and pools accept
FIXED_SIZE = ("vit_",)  # built for one image size (position embeddings): trained at it, interpolated for speed


def image_size(name: str) -> int:
    return max(32, MIN_SIZE.get(name, 32))


def arch(name: str, size: int) -> dict[str, Any]:
    args: dict[str, Any] = {"num_classes": 10}
    if name.startswith(FIXED_SIZE):
        args["image_size"] = size
    return {"torchvision": name, "args": args}


def train_config(name: str, epochs: int) -> TrainConfig:
    # transformers trained from scratch want a smaller step and a warm-up
    if name.startswith(("vit_", "swin_", "maxvit")):
        return TrainConfig(epochs=epochs, lr=3e-4, warmup_epochs=1, grad_clip=1.0)
    return TrainConfig(epochs=epochs, lr=1e-3)


def trained(name: str, task: Task, epochs: int) -> torch.nn.Module:
    run = RESULTS / "vision" / f"{name}-{epochs}ep"
    if not (run / "model" / "slimkit.json").is_file():
        model = build_seeded(arch(name, task.input_shape[-1]), 0, task)
        train_model(model, task, train_config(name, epochs), run, progress=False, overwrite=True)
    return load(run).eval()


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Let the enclosed call allocate at most ``extra_bytes`` more address space: Torch-Pruning 1.6 exhausts the
    machine's memory on swin_t (24 GB, OOM-killed), and a MemoryError is a result, a killed run is not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def attempt(row: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded in the row (and printed), never ends the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports whatever breaks, per architecture
        row.setdefault("errors", {})[key] = (
            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or ['(no message)'])[0][:300]}"
        )
        print(f"  {row['model']} {key}: {row['errors'][key]}", flush=True)
        traceback.print_exc(limit=2)
        return None


def file_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    return float((run_ort(ort_session(path, threads), x).argmax(1) == y.numpy()).mean())


def recovery(name: str, epochs: int) -> TrainConfig:
    return train_config(name, epochs).model_copy(update={"warmup_epochs": 0, "lr": train_config(name, 1).lr / 2})


def accuracy_row(name: str, splits, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """fp32, pruned (slimkit and Torch-Pruning), int8 (slimkit and ONNX Runtime) and pruned+int8, at 32 px."""
    model = trained(name, task, args.epochs)
    example = splits.x_train[:8]
    shape = task.input_shape
    params, macs = count_params(model)[0], count_macs(model, shape)[0]
    row: dict[str, Any] = {
        "model": name,
        "size": shape[-1],
        "params": params,
        "macs": macs,
        "fp32": task.test_score(model),
    }
    ft = recovery(name, args.recovery_epochs)
    x_test, y_test = splits.x_test, splits.y_test

    def slimkit_pruned():
        (pruned, notes), seconds = timed(lambda: prune_channels(model, example, RATIO))
        out = {
            "params_ratio": count_params(pruned)[0] / params,
            "macs_ratio": count_macs(pruned, shape)[0] / macs,
            "seconds": seconds,
            "before_recovery": task.test_score(pruned),
            "unpruned": {**notes["pinned"], **notes["skipped"]},
        }
        out["accuracy"] = task.test_score(finetune(pruned, task, ft).eval())
        return pruned, out

    def tp_pruned():
        with memory_limit(TP_MEMORY):
            pruned, seconds = timed(lambda: torch_pruning_model(model, example, RATIO))
        out = {
            "params_ratio": count_params(pruned)[0] / params,
            "macs_ratio": count_macs(pruned, shape)[0] / macs,
            "seconds": seconds,
            "before_recovery": task.test_score(pruned),
        }
        out["accuracy"] = task.test_score(finetune(pruned, task, ft).eval())
        return out

    ours = attempt(row, "slimkit prune", slimkit_pruned)
    if ours is not None:
        row["slimkit_pruned"] = ours[1]
    row["tp_pruned"] = attempt(row, "Torch-Pruning", tp_pruned)
    calib = calibration_subset(splits, 256, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, source in (
            ("int8", model),
            ("pruned_int8", ours[0] if ours else None),
        ):
            if source is None:
                continue

            def slimkit_int8(source=source, label=label):
                (quantized, _), seconds = timed(lambda: quantize_static(source, calib, StaticQuantConfig()))
                out = {"ptq_simulated": task.test_score(quantized), "seconds": seconds, "method": "PTQ"}
                if task.val_score(source) - task.val_score(quantized) > QAT_WHEN_VAL_DROPS:
                    quantized, out["qat_seconds"] = timed(lambda: quantization_aware(source, calib, task, args))
                    out["method"] = f"QAT {args.qat_epochs} epochs"
                path = tmp / f"{label}.onnx"
                _, out["export_seconds"] = timed(
                    lambda: export_int8_verified(quantized, path, x_test, reference=source)
                )
                return {
                    **out,
                    "accuracy": file_accuracy(path, x_test, y_test, args.threads),
                    "simulated": task.test_score(quantized),
                }

            def ort_int8(source=source, label=label):
                fp32 = tmp / f"{label}-fp32.onnx"
                export_onnx(source, fp32, x_test[:2], verify_on=x_test[:64])
                made, seconds = timed(lambda: ort_static(fp32, calib, tmp / f"ort-{label}.onnx"))
                return {"accuracy": file_accuracy(made, x_test, y_test, args.threads), "seconds": seconds}

            row[f"slimkit_{label}"] = attempt(row, f"slimkit {label}", slimkit_int8)
            row[f"ort_{label}"] = attempt(row, f"ORT {label}", ort_int8)
    return row


def quantization_aware(model: torch.nn.Module, calib: torch.Tensor, task: Task, args: argparse.Namespace):
    """Static int8 recovered by a few epochs of quantization-aware training from the calibrated scales."""
    trainable, ctx = prepare_qat(model, calib, StaticQuantConfig())
    cfg = TrainConfig(epochs=args.qat_epochs, lr=1e-4)
    fit(trainable, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
    return convert_qat(trainable, ctx)[0]


def at_speed_size(name: str, model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """The trained model at 224 px: ViT rebuilt for 224 with its position embeddings interpolated (torchvision's
    own helper); a network with BatchNorm gets statistics re-estimated on ``images`` at 224 px (trained at 32 px,
    efficientnet_b0's outputs reach 1e5 at 224 with the 32-px statistics: its fp32 export then fails its own
    check, and SQNR to fp32 measures overflowing activations, not quantization)."""
    if not name.startswith(FIXED_SIZE):
        return batchnorm_at(copy.deepcopy(model), images)
    tv = import_torchvision()
    big = tv.models.get_model(name, **arch(name, SPEED_SIZE)["args"])
    state = tv.models.vision_transformer.interpolate_embeddings(SPEED_SIZE, big.patch_size, model.state_dict())
    big.load_state_dict(state)
    return big.eval()


@torch.no_grad()
def batchnorm_at(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return model
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    for i in range(0, len(images), 16):
        model(images[i : i + 16])
    return model.eval()


def peak_gemm(threads: int, n: int = 2048) -> dict[str, float]:
    """ONNX Runtime's fp32 MatMul and int8 MatMulInteger (u8 activations x s8 weights) on n x n x n: GMAC/s."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fp32", "int8"):
            if kind == "fp32":
                a = rng.standard_normal((n, n), dtype=np.float32)
                b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
                node = helper.make_node("MatMul", ["A", "B"], ["Y"])
                inputs, y = (
                    [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                    TensorProto.FLOAT,
                )
                inits = [b]
            else:
                a = rng.integers(0, 256, (n, n), dtype=np.uint8)
                b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
                zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "Z")
                node = helper.make_node("MatMulInteger", ["A", "B", "Z"], ["Y"])
                inputs, y = (
                    [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                    TensorProto.INT32,
                )
                inits = [b, zero]
            graph = helper.make_graph(
                [node],
                kind,
                inputs,
                [helper.make_tensor_value_info("Y", y, [n, n])],
                inits,
            )
            path = Path(tmp) / f"{kind}.onnx"
            onnx.save(
                helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                str(path),
            )
            session = ort_session(path, threads)
            ms = ort_latency(session, torch.from_numpy(a), min_repeats=10).median_ms
            out[kind] = n**3 / (ms / 1e3) / 1e9
    return out


def interleaved_latency(files: dict[str, Path], batches: list[int], threads: int, rounds: int) -> dict[str, Any]:
    """Median (and spread) over ``rounds`` of each file's median latency; the files take turns in every round."""
    sessions = {label: ort_session(path, threads) for label, path in files.items()}
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {label: {} for label in files}
    for batch in batches:
        x = torch.randn(batch, 3, SPEED_SIZE, SPEED_SIZE, generator=gen)
        samples: dict[str, list[float]] = {label: [] for label in files}
        for _ in range(rounds):
            for label, session in sessions.items():
                samples[label].append(ort_latency(session, x, warmup=1, min_repeats=5, budget_s=1.0).median_ms)
        for label, values in samples.items():
            out[label][f"b{batch}"] = {
                "median_ms": statistics.median(values),
                "min_ms": min(values),
                "max_ms": max(values),
            }
    return out


def linear_share(model: torch.nn.Module) -> float:
    """The fraction of the model's parameters in linear layers (transformers, ConvNeXt: most; CNNs: the head)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = sum(
        m.in_proj_weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None
    )
    return (linear + attention) / count_params(model)[0]


def speed_calibration(name: str) -> int:
    return next((n for prefix, n in SPEED_CALIBRATION.items() if name.startswith(prefix)), 64)


def speed_row(name: str, model: torch.nn.Module, big: Any, args: argparse.Namespace) -> dict[str, Any]:
    """fp32, pruned and int8 files at 224 px: export and quantization times, fidelity to fp32, latency."""
    images = speed_calibration(name)
    calib, test = calibration_subset(big, images, seed=0), big.x_test[:32]
    fp32_model = at_speed_size(name, model, big.x_train[-64:])
    shape = (3, SPEED_SIZE, SPEED_SIZE)
    row: dict[str, Any] = {
        "model": name,
        "macs": count_macs(fp32_model, shape)[0],
        "seconds": {},
        "calibration_images": images,
    }
    pruned = attempt(row, "prune at 224", lambda: prune_channels(fp32_model, calib[:8], RATIO)[0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files: dict[str, Path] = {}
        for label, source in (("fp32", fp32_model), ("pruned", pruned)):
            if source is None:
                continue
            prefix = "" if label == "fp32" else "pruned "
            path = tmp / f"{label}.onnx"

            def export(source=source, path=path, prefix=prefix):
                # rtol 1e-3: weights trained at 32 px give outputs up to 1e4 at 224 (EfficientNet), where float
                # sums in another order differ by more than 1e-4 of the largest
                _, seconds = timed(lambda: export_onnx(source, path, test[:2], verify_on=test[:8], rtol=1e-3))
                row["seconds"][f"{prefix}fp32 export"] = seconds
                return path

            if attempt(row, f"{label} export", export) is None:
                continue
            files[f"{prefix}fp32"] = path
            row.setdefault("macs_of", {})[f"{prefix}fp32"] = count_macs(source, shape)[0]

            def slimkit_int8(source=source, label=label, prefix=prefix):
                (quantized, _), seconds = timed(lambda: quantize_static(source, calib, StaticQuantConfig()))
                qpath = tmp / f"{label}-int8.onnx"
                _, export_s = timed(lambda: export_qdq(quantized, qpath, test[:2]))
                row["seconds"][f"{prefix}slimkit quantize"] = seconds
                row["seconds"][f"{prefix}slimkit int8 export"] = export_s
                files[f"{prefix}slimkit int8"] = qpath

            def ort_int8(path=path, label=label, prefix=prefix):
                made, seconds = timed(lambda: ort_static(path, calib, tmp / f"ort-{label}.onnx"))
                row["seconds"][f"{prefix}ORT quantize_static"] = seconds
                files[f"{prefix}ORT int8"] = made
                if label == "fp32":
                    files["ORT dynamic int8"] = ort_dynamic(path, tmp / "ort-dynamic.onnx")

            def slimkit_dynamic(source=source):
                quantized, _ = quantize_static(source, calib, StaticQuantConfig(activations="dynamic"))
                export_qdq(quantized, tmp / "slimkit-dynamic.onnx", test[:2])
                files["slimkit dynamic int8"] = tmp / "slimkit-dynamic.onnx"

            attempt(row, f"{prefix}slimkit int8", slimkit_int8)
            if label == "fp32" and linear_share(source) > 0.5:  # dynamic int8 quantizes linear layers only
                attempt(row, "slimkit dynamic int8", slimkit_dynamic)
            attempt(row, f"{prefix}ORT int8", ort_int8)
        row["file_bytes"] = {label: path.stat().st_size for label, path in files.items()}
        reference = run_ort(ort_session(files["fp32"], args.threads), test) if "fp32" in files else None
        if reference is not None:
            row["sqnr_db_vs_fp32"] = {
                label: sqnr_db(reference, run_ort(ort_session(path, args.threads), test))
                for label, path in files.items()
                if "pruned" not in label
            }
        row["latency"] = interleaved_latency(files, [1, 8], args.threads, args.rounds)
    return row


def ratio(row: dict, label: str, batch: str) -> str:
    lat = row.get("latency", {})
    if label not in lat or "fp32" not in lat:
        return "-"
    return f"{lat[label][batch]['median_ms'] / lat['fp32'][batch]['median_ms']:.2f}x"


def achieved_rate(row: dict, label: str, kind: str) -> str:
    """MAC/s of ``label`` at batch 8, and its share of the GEMM peak of ``kind`` measured in the row's run."""
    lat, peak = row.get("latency", {}), row.get("peak_gemm_gmacs")
    if label not in lat or not peak:
        return "-"
    rate = 8 * row["macs"] / (lat[label]["b8"]["median_ms"] / 1e3) / 1e9
    return f"{rate:.0f} ({100 * rate / peak[kind]:.0f}% of {peak[kind]:.0f})"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_tables(acc: list[dict], speed: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n### Accuracy on real labels (digits at 32 px, 3 channels; test split), ratio {RATIO}, "
        f"{args.recovery_epochs} recovery epochs for both pruners\n"
    )
    print(
        "| model | params | fp32 | slimkit pruned: params, MACs, acc | Torch-Pruning: params, MACs, acc "
        "| slimkit int8 | ORT int8 | slimkit pruned+int8 | ORT pruned+int8 |"
    )
    print("|---|---:|---:|---|---|---:|---:|---:|---:|")
    for r in acc:

        def pruned(p):
            return "failed" if not p else (f"{p['params_ratio']:.3f}x, {p['macs_ratio']:.3f}x, {pct(p['accuracy'])}")

        def acc_of(key, r=r):
            done = r.get(key) or {}
            qat = " (QAT)" if done.get("method", "PTQ") != "PTQ" else ""
            return pct(done.get("accuracy")) + qat

        if "params" not in r:
            print(f"| {r['model']} | - | failed (see below) |" + " - |" * 6)
            continue
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {pct(r['fp32'])} | {pruned(r.get('slimkit_pruned'))} "
            f"| {pruned(r.get('tp_pruned'))} | {acc_of('slimkit_int8')} | {acc_of('ort_int8')} "
            f"| {acc_of('slimkit_pruned_int8')} | {acc_of('ort_pruned_int8')} |"
        )
    print(
        f"\n(QAT): slimkit's static int8 lost more than {100 * QAT_WHEN_VAL_DROPS:g} point of validation accuracy, "
        f"so {args.qat_epochs} epochs of quantization-aware training recovered it (chosen on the validation split)"
    )
    print("\n### Quantization time at 32 px (256 calibration images; seconds)\n")
    print("| model | slimkit quantize | slimkit export + verify | ORT quantize_static |")
    print("|---|---:|---:|---:|")
    for r in acc:
        s, o = r.get("slimkit_int8") or {}, r.get("ort_int8") or {}
        print(
            f"| {r['model']} | {s.get('seconds', float('nan')):.1f} | {s.get('export_seconds', float('nan')):.1f} "
            f"| {o.get('seconds', float('nan')):.1f} |"
        )
    print(
        f"\n### Speed at {SPEED_SIZE}x{SPEED_SIZE}: ONNX Runtime, {args.threads} threads, latency ratio to fp32 "
        f"(median of {args.rounds} interleaved rounds)\n"
    )
    print(
        "Peak GEMM: ONNX Runtime MatMul (fp32) and MatMulInteger (u8 x s8), 2048^3, measured in the same run as "
        "the model's row.\n"
    )
    labels = [
        "slimkit int8",
        "ORT int8",
        "ORT dynamic int8",
        "slimkit dynamic int8",
        "pruned fp32",
        "pruned slimkit int8",
        "pruned ORT int8",
    ]
    print(
        "| model | GMACs | fp32 ms b1 / b8 | "
        + " | ".join(f"{label} b1 / b8" for label in labels)
        + " | slimkit int8 GMAC/s b8 (% of int8 peak) | fp32 GMAC/s b8 (% of fp32 peak) | SQNR to fp32: slimkit / ORT static / ORT dynamic / slimkit dynamic |"
    )
    print("|---|---:|---:|" + "---:|" * len(labels) + "---:|---:|---:|")
    for r in speed:
        lat = r.get("latency", {})
        fp32 = lat.get("fp32", {})
        base = f"{fp32['b1']['median_ms']:.1f} / {fp32['b8']['median_ms']:.1f}" if fp32 else "-"
        achieved = {kind: achieved_rate(r, label, kind) for kind, label in (("int8", "slimkit int8"), ("fp32", "fp32"))}
        sq = r.get("sqnr_db_vs_fp32", {})
        sqnr = " / ".join(
            f"{sq[k]:.1f}" if k in sq else "-"
            for k in ("slimkit int8", "ORT int8", "ORT dynamic int8", "slimkit dynamic int8")
        )
        print(
            f"| {r['model']} | {r['macs'] / 1e9:.2f} | {base} | "
            + " | ".join(f"{ratio(r, label, 'b1')} / {ratio(r, label, 'b8')}" for label in labels)
            + f" | {achieved['int8']} | {achieved['fp32']} | {sqnr} |"
        )
    print("\n### Time to export and quantize at 224 px (seconds; the same calibration images for both quantizers)\n")
    keys = [
        "fp32 export",
        "slimkit quantize",
        "slimkit int8 export",
        "ORT quantize_static",
    ]
    print("| model | calibration images | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for r in speed:
        s = r.get("seconds", {})
        print(
            f"| {r['model']} | {r.get('calibration_images', speed_calibration(r['model']))} | "
            + " | ".join(f"{s[k]:.1f}" if k in s else "-" for k in keys)
            + " |"
        )
    failures = [(r["model"], k, v) for r in (*acc, *speed) for k, v in r.get("errors", {}).items()]
    if failures:
        print("\nFailures:\n")
        for model, key, message in failures:
            print(f"- {model}, {key}: {message}")


SWEEP_SIZE = 64
SWEEP_SIZES = {
    "inception_v3": 299,  # its auxiliary head (training mode) pools 5x5 over a 17x17 map
    "maxvit_t": 224,
    "vit_h_14": 56,
}  # what their stems and patch sizes accept


def randomize_zero_linears(model: torch.nn.Module) -> list[str]:
    """torchvision initialises ViT's classifier to zeros: with random weights elsewhere every output would be 0
    and every export check vacuous (identical zeros), so such layers get random weights too."""
    zero = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not m.weight.any()]
    for n in zero:
        torch.nn.init.normal_(model.get_submodule(n).weight, std=0.02)
    return zero


def sweep_one(name: str) -> dict[str, Any]:
    """One architecture, random weights (BatchNorm statistics from a few batches): pruned at 0.5 by slimkit and
    by Torch-Pruning, and the dense and pruned models exported to fp32 and int8 ONNX, each verified."""
    from slimkit.export.qdq import deployed_is_faithful
    from slimkit.models.vision import build_torchvision

    size = SWEEP_SIZES.get(name, SWEEP_SIZE)
    torch.manual_seed(0)
    model = build_torchvision(name, arch(name, size)["args"])
    randomized = randomize_zero_linears(model)
    x = torch.randn(16, 3, size, size)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x[4 * i : 4 * i + 4])
    model.eval()
    shape = (3, size, size)
    params, macs = count_params(model)[0], count_macs(model, shape)[0]
    row: dict[str, Any] = {
        "model": name,
        "size": size,
        "params": params,
        "macs": macs,
        "exports": {},
        "machine": describe_machine(machine_fingerprint()),  # rows of one file can come from several runs
        "reduce_range": StaticQuantConfig().reduces_range(),  # 7-bit weight codes (a CPU without VNNI)
        "randomized": randomized,
    }

    def slimkit_prune():
        (pruned, notes), seconds = timed(lambda: prune_channels(model, x[:4], RATIO))
        row["slimkit"] = {
            "params_ratio": count_params(pruned)[0] / params,
            "macs_ratio": count_macs(pruned, shape)[0] / macs,
            "seconds": seconds,
            "unpruned": {**notes["pinned"], **notes["skipped"]},
        }
        return pruned

    def tp_prune():
        with memory_limit(TP_MEMORY):
            pruned, seconds = timed(lambda: torch_pruning_model(model, x[:4], RATIO))
        with torch.no_grad():
            pruned(x[:2])
        row["torch_pruning"] = {
            "params_ratio": count_params(pruned)[0] / params,
            "seconds": seconds,
        }

    pruned = attempt(row, "slimkit prune", slimkit_prune)
    attempt(row, "Torch-Pruning", tp_prune)
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in (("dense", model), ("pruned", pruned)):
            if source is None:
                continue

            def fp32(source=source, label=label):
                result, seconds = timed(lambda: export_onnx(source, Path(tmp) / f"{label}.onnx", x[:2], verify_on=x))
                row["exports"][f"{label} fp32"] = {
                    "max_abs_diff": result.max_abs_diff,
                    "allowed": result.allowed_diff,
                    "seconds": seconds,
                }

            def int8(source=source, label=label):
                (quantized, _), seconds = timed(lambda: quantize_static(source, x, StaticQuantConfig()))
                path = Path(tmp) / f"{label}-int8.onnx"
                check, export_s = timed(lambda: export_int8_verified(quantized, path, x, reference=source))
                row["exports"][f"{label} int8"] = {
                    "sqnr_db": check["deployed_vs_reference"]["sqnr_db"],
                    "simulation_sqnr_db": check["simulation_vs_reference"]["sqnr_db"],
                    "faithful": deployed_is_faithful(check),
                    "seconds": seconds + export_s,
                }

            attempt(row, f"{label} fp32 export", fp32)
            attempt(row, f"{label} int8 export", int8)
    return row


def sweep(names: list[str], timeout_s: int, fresh: bool) -> list[dict[str, Any]]:
    """Each architecture in its own process, smallest first: one that exhausts memory or hangs is recorded,
    not fatal; rows are written as they come, and a rerun keeps the finished rows of an earlier one (resume)."""
    from slimkit.models.vision import _parameters_on_meta

    path = RESULTS / "vision-sweep.json"
    earlier = [] if fresh or not path.is_file() else json.loads(path.read_text())["rows"]
    finished = {r["model"]: r for r in earlier if "process" not in r.get("errors", {})}
    others = [r for r in earlier if r["model"] not in names]  # kept in the file, not swept now

    models = import_torchvision().models

    def size(name: str) -> int:
        args = arch(name, 224)["args"]
        return _parameters_on_meta(models, name, args) or sum(
            p.numel() for p in models.get_model(name, **args).parameters()
        )  # RegNet: not on the meta device

    rows = []
    for name in sorted(names, key=size):
        if name in finished:
            rows.append(finished[name])
            continue
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--sweep-one", name],
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {
                    "model": name,
                    "errors": {"process": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"},
                }
            )
        except subprocess.TimeoutExpired:
            row = {"model": name, "errors": {"process": f"over {timeout_s} s"}}
        rows.append(row)
        print(f"sweep {name}: {json.dumps(row)[:600]}", flush=True)
        write_json_atomic(path, {"slimkit_version": slimkit.__version__, "rows": others + rows})
    return others + rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    def export(row, key):
        done = row.get("exports", {}).get(key)
        if done is None:
            return "failed" if f"{key} export" in row.get("errors", {}) else "-"
        return f"ok ({done['sqnr_db']:.1f} dB)" if "sqnr_db" in done else "ok"

    def params(pruned):
        return f"{pruned['params_ratio']:.3f}x" if pruned else "failed"

    print(
        f"\n### Every torchvision classifier: random weights at {SWEEP_SIZE} px (or the size it needs), pruned at "
        f"{RATIO}, exported and verified\n"
    )
    print(
        "| model | params | slimkit pruned params | Torch-Pruning pruned params | fp32 ONNX dense / pruned "
        "| int8 ONNX dense / pruned (SQNR to fp32) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r.get('params', 0) / 1e6:.1f}M | {params(r.get('slimkit'))} "
            f"| {params(r.get('torch_pruning'))} | {export(r, 'dense fp32')} / {export(r, 'pruned fp32')} "
            f"| {export(r, 'dense int8')} / {export(r, 'pruned int8')} |"
        )
    for r in rows:
        for key, message in r.get("errors", {}).items():
            print(f"- {r['model']}, {key}: {message}")
    machines: dict[str, list[str]] = {}
    for r in rows:
        label = r.get("machine", "not recorded") + (", 7-bit weight codes" if r.get("reduce_range") else "")
        machines.setdefault(label, []).append(r["model"])
    for label, names in machines.items():
        print(f"\nMeasured on {label}: {len(names)} rows ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--all",
        action="store_true",
        help="every torchvision classification architecture",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--recovery-epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--skip-accuracy",
        action="store_true",
        help="speed rows only (the trained models cached by an accuracy run); accuracy rows kept from vision.json",
    )
    parser.add_argument("--tables", action="store_true", help="print the tables of vision.json and stop")
    parser.add_argument(
        "--fresh", action="store_true", help="drop the rows earlier runs left in vision.json (vision-sweep.json)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: every architecture (or --models) pruned and exported with random weights",
    )
    parser.add_argument("--sweep-one", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-timeout", type=int, default=1800)
    args = parser.parse_args()
    if args.sweep_one:
        print(json.dumps(sweep_one(args.sweep_one)))
        return
    if args.sweep:
        rows = sweep(
            classification_models() if args.all or args.models == ",".join(MODELS) else args.models.split(","),
            args.sweep_timeout,
            args.fresh,
        )
        print_sweep(rows)
        return
    if args.tables:
        earlier = previous_rows(fresh=False)
        print_tables(earlier["accuracy"], earlier["speed"], args)
        return
    names = classification_models() if args.all else args.models.split(",")
    torch.set_num_threads(args.threads)
    peak = peak_gemm(args.threads)
    print(f"peak GEMM: {peak}", flush=True)
    big = None if args.skip_speed else load_data(f"digits:size={SPEED_SIZE},channels=3")
    earlier = previous_rows(args.fresh)
    acc_rows, speed_rows = [], []
    for name in names:
        splits = load_data(f"digits:size={image_size(name)},channels=3")
        task = Task.classification(splits)
        if not args.skip_accuracy:
            row = {"model": name}
            acc = attempt(row, "accuracy", partial(accuracy_row, name, splits, task, args))
            acc_rows.append(acc or row)
            print(f"accuracy {name}: {acc_rows[-1]}", flush=True)
        if big is not None:
            srow = {"model": name}
            speed = attempt(srow, "speed", partial(speed_row, name, trained(name, task, args.epochs), big, args))
            speed_rows.append({**(speed or srow), "peak_gemm_gmacs": peak})
            print(f"speed {name}: {speed_rows[-1]}", flush=True)
        acc_all, speed_all = merged(earlier["accuracy"], acc_rows), merged(earlier["speed"], speed_rows)
        write_json_atomic(
            RESULTS / "vision.json",
            {
                "slimkit_version": slimkit.__version__,
                "machine": machine_fingerprint(args.threads),
                "threads": args.threads,
                "accuracy": acc_all,
                "speed": speed_all,
            },
        )
    print_tables(acc_all, speed_all, args)


def previous_rows(fresh: bool) -> dict[str, list[dict]]:
    """Rows of an earlier run, kept for the models this run does not measure (one architecture can be measured
    again without the others); every speed row carries the GEMM peak of its own run."""
    path = RESULTS / "vision.json"
    if fresh or not path.is_file():
        return {"accuracy": [], "speed": []}
    data = json.loads(path.read_text())
    speed = [{"peak_gemm_gmacs": data.get("peak_gemm_gmacs"), **r} for r in data.get("speed", [])]
    return {"accuracy": data.get("accuracy", []), "speed": speed}


def merged(earlier: list[dict], now: list[dict]) -> list[dict]:
    measured = {r["model"] for r in now}
    return [r for r in earlier if r["model"] not in measured] + now


if __name__ == "__main__":
    main()
