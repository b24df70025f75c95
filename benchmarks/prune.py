"""Pruning benchmark: slimkit against torch.nn.utils.prune and Torch-Pruning, side by side in one run.

1. Unstructured, lenet300, 90/95/98% (and the 92% Deep Compression point): test accuracy after the
   same fine-tuning and the real bytes of the saved file (torch.save of the state dict for
   torch.nn.utils.prune after prune.remove, the model directory for slimkit).
2. Structured, 50% of channels, resnet8 and mobilenetv2: params, MACs, measured latency vs dense
   (torch eager and ONNX Runtime, batch 1 and 64) and accuracy after equal fine-tuning, slimkit vs
   Torch-Pruning (MetaPruner, L1 magnitude, classifier ignored).
3. N:M 2:4 on lenet300 and vit: accuracy after fine-tuning (2:4 gives no CPU speedup; it is the
   pattern sparse tensor cores run).

Zoo models are trained with their defaults into benchmarks/results/zoo (shared with zoo.py).
Prints Markdown tables and writes benchmarks/results/prune.json.

    python benchmarks/prune.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import slimkit
from slimkit import Task, count_macs, count_params, load, load_data, save
from slimkit.analyze import measure_latency
from slimkit.io import dir_bytes, write_json_atomic
from slimkit.pruning import PruneConfig, prune_weights, remove_masks
from slimkit.pruning.stage import PruneStage
from slimkit.pruning.structured import prune_channels
from slimkit.stages import StageContext
from slimkit.train import TrainConfig, build_seeded, default_train_config, fit, train_model

RESULTS = Path(__file__).resolve().parent / "results"


def trained(name: str, task: Task) -> nn.Module:
    run = RESULTS / "zoo" / name
    if not (run / "model" / "slimkit.json").is_file():
        train_model(build_seeded(name, 0, task), task, default_train_config(name, seed=0), run, progress=False,
                    overwrite=True)
    return load(run)


def finetune(model: nn.Module, task: Task, cfg: TrainConfig) -> nn.Module:
    fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, loss_fn=task.loss_fn, progress=False)
    return model


def torch_file_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "m.pt")
        return (Path(tmp) / "m.pt").stat().st_size


def slimkit_file_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "m")
        return dir_bytes(Path(tmp) / "m")


def linear_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def unstructured(task: Task, sparsities: list[float], ft: TrainConfig) -> list[dict]:
    dense = trained("lenet300", task)
    rows = [{"method": "dense", "sparsity": 0.0, "accuracy": task.test_score(dense),
             "file_bytes": slimkit_file_bytes(dense), "torch_save_bytes": torch_file_bytes(dense)}]
    for s in sparsities:
        candidates = {}
        m = copy.deepcopy(dense)
        for module, name in linear_layers(m):
            torch_prune.l1_unstructured(module, name, amount=s)
        candidates["torch.nn.utils.prune l1_unstructured"] = m
        m = copy.deepcopy(dense)
        torch_prune.global_unstructured(linear_layers(m), pruning_method=torch_prune.L1Unstructured, amount=s)
        candidates["torch.nn.utils.prune global_unstructured"] = m
        m = copy.deepcopy(dense)
        prune_weights(m, PruneConfig(sparsity=s, scope="global"))
        candidates["slimkit global, one-shot"] = m
        for label, model in candidates.items():
            finetune(model, task, ft)
            if label.startswith("torch"):
                for module, name in linear_layers(model):
                    torch_prune.remove(module, name)
                size = torch_file_bytes(model)
            else:
                remove_masks(model)
                size = slimkit_file_bytes(model)
            rows.append({"method": label, "sparsity": s, "accuracy": task.test_score(model), "file_bytes": size})
        with tempfile.TemporaryDirectory() as tmp:
            agp = PruneStage(sparsity=s, scope="global", schedule="agp", finetune=ft.model_dump())
            model = agp.apply(copy.deepcopy(dense), StageContext(task, Path(tmp), Path(tmp) / "s", progress=False))
        rows.append({"method": "slimkit global, AGP", "sparsity": s, "accuracy": task.test_score(model),
                     "file_bytes": slimkit_file_bytes(model)})
    return rows


def torch_pruning_model(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    classifier = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]  # squeezenet: a conv
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[classifier])
    pruner.step()
    return model


def structured(task: Task, names: list[str], ratio: float, epochs: int, threads: int) -> list[dict]:
    rows = []
    example = task.example_inputs[:8]
    for name in names:
        dense = trained(name, task)
        ft = default_train_config(name, epochs=epochs)
        ours, _ = prune_channels(dense, example, ratio)
        theirs = torch_pruning_model(dense, example, ratio)
        for label, model in (("dense", dense), ("slimkit", finetune(ours, task, ft)),
                             ("Torch-Pruning", finetune(theirs, task, ft))):
            lat = measure_latency(model.eval(), task.input_shape, threads=threads)["latency_ms"]
            rows.append({"model": name, "method": label, "params": count_params(model)[0],
                         "macs": count_macs(model, task.input_shape)[0], "accuracy": task.test_score(model),
                         "latency_ms": lat})
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["method"] == "dense")
        row["latency_vs_dense"] = {k: v / base["latency_ms"][k] for k, v in row["latency_ms"].items()}
    return rows


def nm(task: Task, names: list[str], pattern: str, ft_epochs: int) -> list[dict]:
    rows = []
    for name in names:
        dense = trained(name, task)
        model = copy.deepcopy(dense)
        result = prune_weights(model, PruneConfig(nm=pattern))
        finetune(model, task, default_train_config(name, epochs=ft_epochs, lr=1e-3, warmup_epochs=0))
        remove_masks(model)
        rows.append({"model": name, "pattern": pattern, "dense_accuracy": task.test_score(dense),
                     "accuracy": task.test_score(model), "sparsity": result["sparsity"],
                     "skipped": sorted(result["skipped"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer fine-tuning epochs (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    task = Task.classification(load_data("digits"))
    epochs = 3 if args.quick else 30

    ft = TrainConfig(epochs=epochs, lr=1e-3)
    un = unstructured(task, [0.9, 0.92, 0.95, 0.98], ft)
    print("\n### Unstructured, lenet300 (same fine-tuning: %d epochs, AdamW lr 1e-3)\n" % epochs)
    print("| method | sparsity | test acc | file bytes | dense bytes / file bytes |")
    print("|---|---:|---:|---:|---:|")
    dense = un[0]
    for r in un:
        print(f"| {r['method']} | {100 * r['sparsity']:.0f}% | {100 * r['accuracy']:.2f}% | {r['file_bytes']:,} "
              f"| {dense['file_bytes'] / r['file_bytes']:.2f}x |")

    st = structured(task, ["resnet8", "mobilenetv2"], 0.5, epochs, args.threads)
    print(f"\n### Structured, 50% of channels per group (same fine-tuning: {epochs} epochs, zoo settings; "
          f"latency: {args.threads} thread, median)\n")
    print("| model | method | params | MACs | test acc | torch b1 | torch b64 | ORT b1 | ORT b64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in st:
        v = r["latency_vs_dense"]
        print(f"| {r['model']} | {r['method']} | {r['params']:,} | {r['macs']:,} | {100 * r['accuracy']:.2f}% "
              f"| {v['torch_b1']:.2f}x | {v['torch_b64']:.2f}x | {v['ort_b1']:.2f}x | {v['ort_b64']:.2f}x |")
    print("\n(latency columns: time relative to the dense model measured in the same run; lower is faster)")

    nms = nm(task, ["lenet300", "vit"], "2:4", epochs)
    print(f"\n### N:M 2:4 (fine-tuned {epochs} epochs)\n")
    print("| model | dense acc | 2:4 acc | sparsity of selected layers | left dense |")
    print("|---|---:|---:|---:|---|")
    for r in nms:
        print(f"| {r['model']} | {100 * r['dense_accuracy']:.2f}% | {100 * r['accuracy']:.2f}% "
              f"| {100 * r['sparsity']:.1f}% | {', '.join(r['skipped']) or '-'} |")

    write_json_atomic(RESULTS / "prune.json", {"slimkit_version": slimkit.__version__, "epochs": epochs,
                                               "unstructured": un, "structured": st, "nm": nms})


if __name__ == "__main__":
    main()
