"""Deep Compression on digits (Han, Mao and Dally, ICLR 2016), stage by stage, and low-rank
factorization, in one run.

For lenet300 and lenet5 (zoo models trained with their defaults): pruning (AGP to a global
sparsity, fine-tuned), then weight sharing (k-means per layer, biases too, centroids
fine-tuned), then entropy coding (the .slim container). Each stage's size is the real file:
the fp32 safetensors file of the trained model, the model directory after pruning (sparse
positions + fp32 values) and after sharing (positions + codebook + n-bit codes), and the
.slim file (coded with Huffman only, rANS only, and the best per stream). The coder is then
compared with its limit: the coded bytes of every integer stream against their order-0
entropy, and against gzip, LZMA and zstd of the same streams. Low-rank: lenet300 and vit
factorized by truncated SVD at several retained energies, fine-tuned, measured (params, MACs,
latency against the dense model in the same run, accuracy). Prints Markdown tables and writes
benchmarks/results/deep_compression.json.

    python benchmarks/deep_compression.py
"""

from __future__ import annotations

import argparse
import copy
import lzma
import tempfile
import zlib
from pathlib import Path

import torch

from slimkit import Task, count_macs, count_params, load, load_data, measure_latency, save
from slimkit.codec.container import read_container
from slimkit.io import dir_bytes, write_json_atomic
from slimkit.lowrank.stage import FactorizeStage
from slimkit.modelfile import pack
from slimkit.pruning.stage import PruneStage
from slimkit.share.stage import ClusterStage
from slimkit.stages import StageContext
from slimkit.train import build_seeded, default_train_config, train_model

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {  # Deep Compression, Table 1 (MNIST): original and compressed size, top-1 error before and after
    "lenet300": {"ratio": 40, "size": "1070 KB -> 27 KB", "error": "1.64% -> 1.58%"},
    "lenet5": {"ratio": 39, "size": "1720 KB -> 44 KB", "error": "0.80% -> 0.74%"},
}
POINTS = [  # (model, global AGP sparsity, shared-value bits, pruning and centroid fine-tuning epochs)
    {"model": "lenet300", "sparsity": 0.95, "bits": 5, "prune_epochs": 40, "share_epochs": 15},
    {"model": "lenet5", "sparsity": 0.92, "bits": 5, "prune_epochs": 60, "share_epochs": 15},
    {"model": "lenet5", "sparsity": 0.93, "bits": 4, "prune_epochs": 60, "share_epochs": 20},
]


def trained(name: str, task: Task):
    run = RESULTS / "zoo" / name
    if not (run / "model" / "slimkit.json").is_file():
        train_model(build_seeded(name, 0, task), task, default_train_config(name, seed=0), run, progress=False,
                    overwrite=True)
    return load(run), run / "model" / "model.safetensors"


def stage(cls, model, task, tmp: Path, **settings):
    """Run one recipe stage on ``model``; returns the model and the stage's notes."""
    ctx = StageContext(task, tmp, tmp / cls.__name__, progress=False)
    return cls(**settings).apply(model, ctx), ctx.notes


def deep_compress(task: Task, settings: dict) -> dict:
    name = settings["model"]
    dense, fp32_file = trained(name, task)
    fp32_bytes = fp32_file.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pruned, _ = stage(PruneStage, copy.deepcopy(dense), task, tmp, sparsity=settings["sparsity"], scope="global",
                       schedule="agp", finetune={"epochs": settings["prune_epochs"], "lr": 1e-3})
        save(pruned, tmp / "pruned")
        pruned_bytes = dir_bytes(tmp / "pruned")
        shared, _ = stage(ClusterStage, copy.deepcopy(pruned), task, tmp, bits=settings["bits"], biases=True,
                       init="linear", codebook_dtype="float16", finetune={"epochs": settings["share_epochs"], "lr": 1e-3})
        save(shared, tmp / "shared")
        shared_bytes = dir_bytes(tmp / "shared")
        table = pack(tmp / "shared", tmp / "best.slim")
        sizes = {coder: pack(tmp / "shared", tmp / f"{coder}.slim", coders=("packed", coder))["file_bytes"]
                 for coder in ("huffman", "rans")}
        reloaded = load(tmp / "best.slim")
        with torch.no_grad():
            assert torch.equal(reloaded(task.splits.x_test), shared(task.splits.x_test))
        limits = coder_limits(tmp / "best.slim", table)
    return {"model": name, "settings": settings, "fp32_bytes": fp32_bytes, "accuracy": {
        "dense": task.test_score(dense), "pruned": task.test_score(pruned), "shared": task.test_score(shared)},
        "bytes": {"pruned": pruned_bytes, "shared": shared_bytes, "huffman": sizes["huffman"],
                  "rans": sizes["rans"], "best": table["file_bytes"]},
        "layers": table["layers"], "header_bytes": table["header_bytes"], "limits": limits}


def coder_limits(slim: Path, table: dict) -> dict:
    """Coded bytes of the integer streams vs their order-0 entropy and general-purpose compressors."""
    import zstandard

    streams = [s for s in table["streams"] if "symbols" in s]
    _, stored = read_container(slim)
    raw = b"".join(stored[s["stream"]].numpy().tobytes() for s in streams)
    symbols = sum(s["symbols"] for s in streams)
    return {
        "symbols": symbols,
        "entropy_bytes": sum(s["entropy_bytes"] for s in streams),
        "coded_bytes": sum(s["bytes"] for s in streams),
        "coded_payload_bytes": sum(s["bytes"] - s["model_bytes"] for s in streams),
        "huffman_bytes": sum(s["huffman_bytes"] for s in streams),
        "rans_bytes": sum(s["rans_bytes"] for s in streams),
        "stored_bytes": len(raw),
        "gzip_bytes": len(zlib.compress(raw, 9)),
        "lzma_bytes": len(lzma.compress(raw, preset=9)),
        "zstd_bytes": len(zstandard.ZstdCompressor(level=22).compress(raw)),
    }


ENERGIES = (0.95, 0.9, 0.8, 0.7)


def low_rank(name: str, task: Task, threads: int, epochs: int) -> list[dict]:
    """Params, MACs, latency (torch eager and ONNX Runtime, batch 1 and 64) and accuracy after fine-tuning
    at several retained energies; latency measured against the dense model in the same run."""
    dense, _ = trained(name, task)
    rows = [{"model": name, "energy": None, "params": count_params(dense)[0],
             "macs": count_macs(dense, task.input_shape)[0], "accuracy": task.test_score(dense),
             "accuracy_before_finetune": None,
             **measure_latency(dense, task.input_shape, threads)}]
    for energy in ENERGIES:
        with tempfile.TemporaryDirectory() as tmp:
            model, notes = stage(FactorizeStage, copy.deepcopy(dense), task, Path(tmp), energy=energy,
                                 finetune={"epochs": epochs, "lr": 1e-3})
            before = notes["factorize"]["score_before_finetune"]
        rows.append({"model": name, "energy": energy, "params": count_params(model)[0],
                     "macs": count_macs(model, task.input_shape)[0], "accuracy": task.test_score(model),
                     "accuracy_before_finetune": before, **measure_latency(model, task.input_shape, threads)})
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lowrank-epochs", type=int, default=15)
    args = parser.parse_args()
    task = Task.classification(load_data("digits"))
    rows = [deep_compress(task, point) for point in POINTS if point["model"] in args.models.split(",")]
    print("\n### Deep Compression on digits (sizes are files on disk; ratios against the fp32 safetensors file)\n")
    print("| model | stage | test acc | bytes | ratio vs fp32 |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        acc, b, fp32 = r["accuracy"], r["bytes"], r["fp32_bytes"]
        s = r["settings"]
        for label, a, size in (
            ("fp32 safetensors", acc["dense"], fp32),
            (f"pruned to {100 * s['sparsity']:.0f}% (sparse positions + fp32 values)", acc["pruned"], b["pruned"]),
            (f"+ {s['bits']}-bit sharing (positions + codebook + packed codes)", acc["shared"], b["shared"]),
            ("+ entropy coding, Huffman only (.slim)", acc["shared"], b["huffman"]),
            ("+ entropy coding, rANS only (.slim)", acc["shared"], b["rans"]),
            ("+ entropy coding, best per stream (.slim)", acc["shared"], b["best"]),
        ):
            print(f"| {r['model']} | {label} | {100 * a:.2f}% | {size:,} | {fp32 / size:.1f}x |")
        paper = PAPER[r["model"]]
        print(f"| {r['model']} | paper (MNIST): {paper['size']}, error {paper['error']} | | | {paper['ratio']}x |")
    for r in rows:
        print(f"\n#### {r['model']} ({100 * r['settings']['sparsity']:.0f}%, {r['settings']['bits']} bits): "
              f"where the {r['bytes']['best']:,} bytes go "
              f"(header {r['header_bytes']} bytes)\n")
        print("| layer | params | weights kept | bits/weight | bits/index | codebook bytes | bytes | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for layer in r["layers"]:
            print(f"| {layer['layer']} | {layer['params']:,} | {100 * layer['weights_kept']:.1f}% "
                  f"| {layer['bits_per_weight']:.2f} | {layer['bits_per_index']:.2f} | {layer['codebook_bytes']} "
                  f"| {layer['compressed_bytes']:,} | {layer['ratio']:.1f}x |")
    print("\n### The coder against its limit (all integer streams of the final .slim file)\n")
    print("| model | symbols | order-0 entropy | coded (payload) | coded (with models) | vs entropy | Huffman (same streams) "
          "| rANS (same streams) | gzip -9 | LZMA | zstd -22 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lim = r["limits"]
        print(f"| {r['model']} | {lim['symbols']:,} | {lim['entropy_bytes']:,.0f} | {lim['coded_payload_bytes']:,} "
              f"| {lim['coded_bytes']:,} | {lim['coded_payload_bytes'] / lim['entropy_bytes'] - 1:+.1%} "
              f"| {lim['huffman_bytes']:,} | {lim['rans_bytes']:,} | {lim['gzip_bytes']:,} | {lim['lzma_bytes']:,} "
              f"| {lim['zstd_bytes']:,} |")
    factorized = [row for name in ("lenet300", "vit") for row in low_rank(name, task, args.threads,
                                                                           args.lowrank_epochs)]
    print(f"\n### Low-rank factorization (truncated SVD, {args.lowrank_epochs} epochs of fine-tuning; "
          f"latency {args.threads} thread, relative to the dense model in the same run)\n")
    print("| model | retained energy | params | MACs | val acc right after SVD | test acc after fine-tuning | torch b1 | torch b64 "
          "| ORT b1 | ORT b64 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in factorized:
        base = next(r for r in factorized if r["model"] == row["model"] and r["energy"] is None)
        lat = {k: row["latency_ms"][k] / base["latency_ms"][k] for k in row["latency_ms"]}
        print(f"| {row['model']} | {'dense' if row['energy'] is None else row['energy']} | {row['params']:,} "
              f"| {row['macs']:,} | {_percent(row['accuracy_before_finetune'])} | {100 * row['accuracy']:.2f}% "
              f"| {lat['torch_b1']:.2f}x | {lat['torch_b64']:.2f}x | {lat['ort_b1']:.2f}x | {lat['ort_b64']:.2f}x |")
    write_json_atomic(RESULTS / "deep_compression.json", {"deep_compression": rows, "low_rank": factorized})


if __name__ == "__main__":
    main()
