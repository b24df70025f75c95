"""Quantization benchmark: slimkit's int8 (static, dynamic, weight-only) and int4 weight-only against
ONNX Runtime's own quantizer, in one run.

For lenet5, resnet8, mobilenetv2 and vit (trained with zoo defaults): the same fp32 ONNX file
and the same 256 calibration samples go to slimkit (its own observers and scales, QDQ export)
and to ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax) and ``quantize_dynamic``. Every model runs in ONNX Runtime with the same thread count;
accuracy is on the 360-image test split; sizes are file bytes. Prints a Markdown table and
writes benchmarks/results/quant.json.

    python benchmarks/quant.py [--threads 1] [--observer minmax]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import slimkit
from slimkit import Task, load, load_data
from slimkit.analyze.latency import ort_latency, torch_latency
from slimkit.data import calibration_subset
from slimkit.export import export_onnx, ort_session, run_ort
from slimkit.export.qdq import export_int8_verified
from slimkit.io import write_json_atomic
from slimkit.quant.ptq import StaticQuantConfig, quantize_static
from slimkit.train import build_seeded, default_train_config, train_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("lenet5", "resnet8", "mobilenetv2", "vit")


def trained(name: str, task: Task):
    run = RESULTS / "zoo" / name
    if not (run / "model" / "slimkit.json").is_file():
        train_model(build_seeded(name, 0, task), task, default_train_config(name, seed=0), run, progress=False,
                    overwrite=True)
    return load(run)


class _Reader:
    """ONNX Runtime's calibration interface over the same samples slimkit calibrates on."""

    def __init__(self, inputs: torch.Tensor, name: str, batch: int = 64):
        self.batches = iter([{name: inputs[i : i + batch].numpy()} for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self.batches, None)


def ort_static(fp32: Path, calib: torch.Tensor, out: Path) -> Path:
    """ONNX Runtime's quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # its calibrator keeps every intermediate output of every sample until the end (22 GB for vit_b_16 at 224 px
    # and 64 images); its CalibMaxIntermediateOutputs option discards them without taking their ranges
    # (onnxruntime 1.32: "No data is collected"), so callers keep calibration sets small enough
    quantize_static(str(fp32), str(out), _Reader(calib, "input", batch=8), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def ort_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def ort_quantizers(fp32: Path, calib: torch.Tensor, out: Path) -> dict[str, Path]:
    return {"ORT quantize_static": ort_static(fp32, calib, out / "ort-static.onnx"),
            "ORT quantize_dynamic": ort_dynamic(fp32, out / "ort-dynamic.onnx")}


def slimkit_variants(observer: str) -> dict[str, StaticQuantConfig]:
    return {
        "slimkit int8 static": StaticQuantConfig(observer=observer),
        "slimkit int8 dynamic": StaticQuantConfig(activations="dynamic"),
        "slimkit int8 weight-only": StaticQuantConfig(activations="none"),
        "slimkit int4 weight-only g32": StaticQuantConfig(activations="none", weight_bits=4, group_size=32),
    }


def measure(path: Path, x_test: torch.Tensor, y_test: torch.Tensor, threads: int) -> dict:
    session = ort_session(path, threads=threads)
    logits = run_ort(session, x_test)
    gen = torch.Generator().manual_seed(0)
    return {
        "accuracy": float((logits.argmax(1) == y_test.numpy()).mean()),
        "file_bytes": path.stat().st_size,
        "ort_b1_ms": ort_latency(session, torch.randn(1, *x_test.shape[1:], generator=gen)).median_ms,
        "ort_b64_ms": ort_latency(session, torch.randn(64, *x_test.shape[1:], generator=gen)).median_ms,
        "logits": logits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--observer", default="minmax")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--qat-epochs", type=int, default=5)
    args = parser.parse_args()
    splits = load_data("digits")
    task = Task.classification(splits)
    calib = calibration_subset(splits, 256, seed=0)
    rows = []
    for name in args.models.split(","):
        model = trained(name, task)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            fp32 = tmp / "fp32.onnx"
            export_onnx(model, fp32, splits.x_test[:2], verify_on=splits.x_test)
            candidates, checks = {"fp32": fp32}, {}
            for i, (label, cfg) in enumerate(slimkit_variants(args.observer).items()):
                quantized, _ = quantize_static(model, calib, cfg)
                checks[label] = export_int8_verified(quantized, tmp / f"slimkit-{i}.onnx", splits.x_test)
                candidates[label] = tmp / f"slimkit-{i}.onnx"
            candidates.update(ort_quantizers(fp32, calib, tmp))
            torch_b64 = torch_latency(model, torch.randn(64, *splits.input_shape), args.threads).median_ms
            results = {label: measure(path, splits.x_test, splits.y_test, args.threads)
                       for label, path in candidates.items()}
        base = results["fp32"]
        fp32_top1 = base["logits"].argmax(1)
        for label, r in results.items():
            logits = r.pop("logits")
            rows.append({
                "model": name, "method": label, **r,
                "size_vs_fp32": r["file_bytes"] / base["file_bytes"],
                "b64_vs_ort_fp32": r["ort_b64_ms"] / base["ort_b64_ms"],
                "b64_vs_torch_fp32": r["ort_b64_ms"] / torch_b64,
                "top1_agreement_with_fp32": float((logits.argmax(1) == fp32_top1).mean()),
                "simulation_check": checks.get(label),
            })
        print(f"measured {name}", flush=True)

    print(f"\n### Static int8 vs ONNX Runtime's quantizer ({args.threads} thread, 256 calibration samples, "
          f"observer {args.observer})\n")
    print("| model | method | test acc | file bytes | size vs fp32 | ORT b1 ms | ORT b64 ms | b64 vs ORT fp32 "
          "| b64 vs torch fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {100 * r['accuracy']:.2f}% | {r['file_bytes']:,} "
              f"| {r['size_vs_fp32']:.3f}x | {r['ort_b1_ms']:.3f} | {r['ort_b64_ms']:.3f} "
              f"| {r['b64_vs_ort_fp32']:.2f}x | {r['b64_vs_torch_fp32']:.2f}x |")
    print("\nslimkit's ONNX models vs its own simulation (top-1 agreement, SQNR): "
          + ", ".join(f"{r['model']} {r['method'].removeprefix('slimkit ')}: "
                      f"{r['simulation_check']['top1_agreement']:.3f}, {r['simulation_check']['sqnr_db']:.1f} dB"
                      for r in rows if r["simulation_check"]))
    low = low_bit(task, calib, args.models.split(","), args.qat_epochs)
    print(f"\n### Low-bit weights, 8-bit activations (QAT: {args.qat_epochs} epochs, LSQ step sizes)\n")
    keys = [f"w{b}_{m}" for b in (4, 3) for m in ("ptq", "bc", "gptq", "qat")]
    print("| model | fp32 | W4A8 PTQ | + bias corr. | W4A8 GPTQ | W4A8 QAT | W3A8 PTQ | + bias corr. | W3A8 GPTQ "
          "| W3A8 QAT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in low:
        print(f"| {r['model']} | {100 * r['fp32']:.2f}% | " + " | ".join(f"{100 * r[k]:.2f}%" for k in keys) + " |")
    mixed = mixed_precision(task, calib, args.models.split(","), budget=0.16)
    print("\n### Mixed precision: 4/8-bit weights chosen by measured sensitivity, budget 16% of fp32 weight bytes\n")
    print("| model | fp32 | W8A8 (25%) | mixed (weights at) | W4A8 (12.5%) | layers at 4 bits |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in mixed:
        print(f"| {r['model']} | {100 * r['fp32']:.2f}% | {100 * r['w8']:.2f}% "
              f"| {100 * r['mixed']:.2f}% ({100 * r['fraction']:.1f}%) | {100 * r['w4']:.2f}% "
              f"| {r['low_layers']} of {r['layers']} |")
    levels = log_vs_linear(task, args.models.split(","))
    print("\n### Weight-only: linear vs logarithmic (power-of-two) levels, per output channel\n")
    print("| model | fp32 | linear 4-bit | log 4-bit | linear 3-bit | log 3-bit |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in levels:
        print(f"| {r['model']} | {100 * r['fp32']:.2f}% | " + " | ".join(
            f"{100 * r[k]:.2f}%" for k in ("linear4", "log4", "linear3", "log3")) + " |")
    write_json_atomic(RESULTS / "quant.json", {"slimkit_version": slimkit.__version__, "threads": args.threads,
                                               "observer": args.observer, "rows": rows, "low_bit": low,
                                               "log_vs_linear": levels, "mixed_precision": mixed})


def low_bit(task: Task, calib: torch.Tensor, names: list[str], epochs: int) -> list[dict]:
    from slimkit import TrainConfig, fit
    from slimkit.quant.qat import convert_qat, prepare_qat

    rows = []
    for name in names:
        model = trained(name, task)
        row = {"model": name, "fp32": task.test_score(model)}
        for bits in (4, 3):
            cfg = StaticQuantConfig(weight_bits=bits)
            row[f"w{bits}_ptq"] = task.test_score(quantize_static(model, calib, cfg)[0])
            corrected = StaticQuantConfig(weight_bits=bits, bias_correction=True)
            row[f"w{bits}_bc"] = task.test_score(quantize_static(model, calib, corrected)[0])
            gptq = StaticQuantConfig(weight_bits=bits, rounding="gptq")
            row[f"w{bits}_gptq"] = task.test_score(quantize_static(model, calib, gptq)[0])
            trainable, ctx = prepare_qat(model, calib, cfg)
            train_cfg = TrainConfig(epochs=epochs, lr=5e-4)
            fit(trainable, task.train_batches(train_cfg), None, train_cfg, score_fn=task.val_score, progress=False)
            row[f"w{bits}_qat"] = task.test_score(convert_qat(trainable, ctx)[0])
        rows.append(row)
    return rows


def mixed_precision(task: Task, calib: torch.Tensor, names: list[str], budget: float) -> list[dict]:
    from slimkit.quant.mixed import allocate_bits

    rows = []
    for name in names:
        model = trained(name, task)
        allocation = allocate_bits(model, task, calib, budget)
        bits = allocation["layer_bits"]
        rows.append({
            "model": name, "fp32": task.test_score(model), "budget": budget,
            "w8": task.test_score(quantize_static(model, calib, StaticQuantConfig(weight_bits=8))[0]),
            "w4": task.test_score(quantize_static(model, calib, StaticQuantConfig(weight_bits=4))[0]),
            "mixed": task.test_score(quantize_static(model, calib, StaticQuantConfig(layer_bits=bits))[0]),
            "fraction": allocation["weight_fraction"], "layers": len(bits),
            "low_layers": sum(b == 4 for b in bits.values()), "layer_bits": bits,
        })
    return rows


def log_vs_linear(task: Task, names: list[str]) -> list[dict]:
    import copy

    from slimkit.quant import QScheme, fake_quantize_tensor, log2_quantize

    rows = []
    for name in names:
        model = trained(name, task)
        row = {"model": name, "fp32": task.test_score(model)}
        for bits in (4, 3):
            for kind in ("linear", "log"):
                q = copy.deepcopy(model)
                with torch.no_grad():
                    for module in q.modules():
                        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                            w = module.weight
                            if kind == "linear":
                                w.copy_(fake_quantize_tensor(w, QScheme(bits=bits, granularity="channel")))
                            else:
                                w.copy_(torch.stack([log2_quantize(row_, bits) for row_ in w]))
                row[f"{kind}{bits}"] = task.test_score(q)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
