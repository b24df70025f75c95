"""Run a recipe end to end: baseline, stages, measurement after each, report.

Run folder layout (``--out DIR``)::

    baseline/           trained or loaded baseline (model/, metrics.json, checkpoint/)
    stages/NN-TYPE/     each stage's model/ and stage.json (written last: marks it done)
    model/              the final model directory
    report.json, report.html

With ``resume=True`` a finished stage whose config is unchanged is loaded
instead of re-run, and interrupted training continues from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .analyze import count_macs, count_params, layer_stats, measure_latency
from .analyze.machine import machine_fingerprint
from .inputs import named_for, signature_json
from .io import dir_bytes, write_json_atomic
from .outputs import claim_run
from .limits import check_threads
from .models.arch import named_spec
from .modelfile import PACKAGE_PREFIX, WEIGHTS_FILE, load, read_meta, resolve_model_dir, save
from .modelfile.store import read_safetensors
from .report.layers import layer_decisions
from .report.summary import report_warnings
from .quant.ptq import is_quantized
from .recipe import Recipe
from .stages import StageContext, apply_stage, copy_model
from .task import Task, task_from_spec
from .train import build_seeded, default_train_config, train_model
from .train.distributed import check_same_model, is_main, mirror_from_main, rank_folder
from .train.loop import on_device
from .train.run import METRICS_FILE, MODEL_SUBDIR

STAGE_RECORD = "stage.json"
HISTOGRAM_BINS = 60


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    task: Task | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Execute ``recipe`` into ``out_dir`` and return the report (also written as JSON and HTML).

    An existing run folder needs ``resume`` (reuse its finished stages, continue interrupted
    training) or ``overwrite`` (start over); ``out_dir`` may not hold or lie inside the recipe's
    inputs. ``task`` replaces the recipe's ``data`` with the caller's own loaders and scores;
    ``device`` is where training runs (the model returns to the CPU between trainings). Under
    ``torchrun`` every rank runs the recipe and trains data-parallel; rank 0 alone keeps files
    and reports (the other ranks return an empty report).
    """
    if recipe.evaluate.latency:
        check_threads(recipe.evaluate.threads, "evaluate.threads")
    with claim_run(out_dir, "recipe", inputs=recipe_inputs(recipe), overwrite=overwrite, resume=resume), \
            rank_folder(out_dir) as out:
        return _run(recipe, out, resume, progress, task, torch.device(device) if device else None,
                    log if is_main() else lambda msg: None)


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """What a recipe reads: its model, its data and any teacher or student model named by path (a run
    folder's model directory, not the whole folder)."""
    named = [recipe.model.path, recipe.data]
    named += [value for stage in recipe.stages for value in (getattr(stage, "teacher", None),
                                                             getattr(stage, "student", None))]
    return [resolve_model_dir(value) for value in named
            if isinstance(value, str) and (value.startswith(PACKAGE_PREFIX) or Path(value).exists())]


def _run(recipe: Recipe, out: Path, resume: bool, progress: bool, task: Task | None, device, log) -> dict[str, Any]:
    section = recipe.model
    given = load(section.path, trust_code=section.trust_code) if section.path is not None else None
    task = task or task_from_spec(recipe.data, recipe.seed, given)
    main = is_main()
    if given is not None:  # an input: every node needs it, like the data
        model, baseline_dir = given, resolve_model_dir(section.path)
    else:
        model, baseline_dir = _trained_baseline(recipe, task, out, resume, progress, device, log)
    task.check_model(model)
    entries = [_measure("baseline", model, baseline_dir, task, 0.0)] if main else []
    if main:
        log(f"baseline: {task.metric} {entries[0]['accuracy']:.4f}, {entries[0]['file_bytes']} bytes")
    baseline_model = model
    artifacts: dict[str, str] = {}

    for i, stage in enumerate(recipe.stages):
        stage_dir = out / "stages" / f"{i:02d}-{stage.type}"
        if stage.changes_model:  # files exported before this stage no longer are the model
            artifacts.pop("onnx", None)
            artifacts.pop("slim", None)
        done = _finished_stage(stage_dir, stage) if resume else None
        if done is not None:
            log(f"stage {i} ({stage.type}): already done, loading it")
            model = load(stage_dir / MODEL_SUBDIR) if stage.changes_model else model
            artifacts.update(done.get("artifacts", {}))
            entries.append(done["metrics"])
            continue
        ctx = StageContext(task, out, stage_dir, resume, progress, artifacts, baseline=baseline_model, device=device)
        started = time.perf_counter()
        model = apply_stage(stage, _copy_for_stage(model, baseline_model), ctx)
        seconds = time.perf_counter() - started
        check_same_model(model, f"stage {i} ({stage.type})")
        if main:
            entries.append(_keep_stage(f"{i}:{stage.type}", stage, model, ctx, seconds,
                                       _last_model_dir(entries, baseline_dir)))
            log(f"stage {i} ({stage.type}): {task.metric} {entries[-1]['accuracy']:.4f}, "
                f"{entries[-1]['file_bytes']} bytes, {seconds:.1f}s")
    if not main:
        return {}
    return _finish(recipe, task, entries, baseline_model, model, artifacts, out, log)


def _keep_stage(name: str, stage, model: nn.Module, ctx: StageContext, seconds: float, previous_dir: Path,
                ) -> dict[str, Any]:
    """Save a finished stage's model, measure it, and write its record (which marks the stage done)."""
    if stage.changes_model:
        save(model, ctx.stage_dir / MODEL_SUBDIR)
    entry = _measure(name, model, ctx.stage_dir / MODEL_SUBDIR if stage.changes_model else previous_dir,
                     ctx.task, seconds)
    entry["config"] = stage.to_dict()
    entry["notes"] = ctx.notes
    write_json_atomic(ctx.stage_dir / STAGE_RECORD,
                      {"config": stage.to_dict(), "metrics": entry, "artifacts": dict(ctx.artifacts)})
    return entry


def _finish(recipe: Recipe, task: Task, entries, baseline_model, model, artifacts, out: Path, log) -> dict[str, Any]:
    """Save the final model, measure it (and time both ends), write report.json and report.html."""
    save(model, out / MODEL_SUBDIR)
    final = _measure("final", model, out / MODEL_SUBDIR, task, 0.0)
    final["simulated_in_torch"] = is_quantized(model)  # torch runs its fake-quant simulation; ONNX Runtime, int8
    report = _report(recipe, task, entries, final, baseline_model, model, artifacts, out)
    if recipe.evaluate.latency:
        log("measuring latency (torch eager and ONNX Runtime, batch 1 and 64)")
        onnx_final = out / artifacts["onnx"] if "onnx" in artifacts else None
        report["baseline"].update(measure_latency(baseline_model, task.input_shape, recipe.evaluate.threads))
        report["final"].update(measure_latency(model, task.input_shape, recipe.evaluate.threads, onnx_path=onnx_final))
        report["summary"]["speedup"] = {
            k: report["baseline"]["latency_ms"][k] / report["final"]["latency_ms"][k]
            for k in report["final"]["latency_ms"]
        }
        report["machine"] = machine_fingerprint(recipe.evaluate.threads)
    report["warnings"] = report_warnings(report, recipe.evaluate.max_metric_drop)
    for warning in report["warnings"]:
        log(f"warning: {warning}")
    write_json_atomic(out / "report.json", report)
    from .report import write_html

    write_html(report, out / "report.html")
    return report


def _trained_baseline(recipe: Recipe, task: Task, out: Path, resume: bool, progress: bool, device,
                      log) -> tuple[nn.Module, Path]:
    section = recipe.model
    base = out / "baseline"
    if resume and mirror_from_main(base, (MODEL_SUBDIR, METRICS_FILE)) and (base / METRICS_FILE).is_file():
        log("baseline: already trained, loading it")
        return load(base / MODEL_SUBDIR, trust_code=section.trust_code), base / MODEL_SUBDIR
    overrides = section.train.model_dump(include=section.train.model_fields_set)
    cfg = default_train_config(section.zoo, **{"seed": recipe.seed, **overrides})
    classes = task.splits.num_classes if task.splits is not None else None
    model = build_seeded(named_spec(section.zoo, section.args, classes), cfg.seed, task, section.trust_code)
    log(f"training {section.zoo} for {cfg.epochs} epochs")
    with on_device(model, device):
        train_model(model, task, cfg, base, resume=resume, progress=progress, description=f"train {section.zoo}")
    return model, base / MODEL_SUBDIR


def _copy_for_stage(model: nn.Module, baseline: nn.Module) -> nn.Module:
    """Stages edit models in place; the baseline must survive for the final comparison."""
    return copy_model(model) if model is baseline else model


def _finished_stage(stage_dir: Path, stage) -> dict[str, Any] | None:
    """The record of a stage finished with this very config (its folder mirrored from rank 0 when distributed)."""
    record = stage_dir / STAGE_RECORD
    if not mirror_from_main(stage_dir, (STAGE_RECORD, MODEL_SUBDIR)) or not record.is_file():
        return None
    done = json.loads(record.read_text(encoding="utf-8"))
    return done if done.get("config") == stage.to_dict() else None


def _last_model_dir(entries: list[dict[str, Any]], baseline_dir: Path) -> Path:
    for entry in reversed(entries):
        if entry.get("model_dir"):
            return Path(entry["model_dir"])
    return baseline_dir


def _measure(name: str, model: nn.Module, model_dir: Path, task: Task, seconds: float) -> dict[str, Any]:
    params, nonzero = count_params(model)
    macs, _ = count_macs(model, task.input_shape)
    return {
        "name": name, "accuracy": float(task.test_score(model)), "params": params, "nonzero_params": nonzero,
        "macs": macs, "file_bytes": dir_bytes(model_dir), "model_dir": str(model_dir), "seconds": seconds,
        **({"scores": task.extra_scores(model)} if task.extra_scores is not None else {}),
    }


def _layers(model: nn.Module, input_shape) -> list[dict[str, Any]]:
    return [row.__dict__ for row in layer_stats(model, input_shape)]


def _histograms(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer weight histograms (non-zero weights of every weight matrix/kernel)."""
    out = []
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        values = param.detach().flatten()
        values = values[values != 0]
        if values.numel() == 0:
            continue
        counts, edges = torch.histogram(values.double(), bins=HISTOGRAM_BINS)
        out.append({"name": name, "counts": counts.long().tolist(), "edges": edges.tolist(),
                    "zeros": int(param.numel() - values.numel())})
    return out


def _packed(entries, artifacts, out: Path, base: dict[str, Any]) -> dict[str, Any]:
    """The .slim file's size and per-layer accounting, when the recipe's final model was packed."""
    if "slim" not in artifacts:
        return {}
    table = next(e["notes"]["slim"] for e in reversed(entries) if "slim" in e.get("notes", {}))
    size = (out / artifacts["slim"]).stat().st_size
    return {"packed": {"file": artifacts["slim"], "file_bytes": size, "ratio_vs_baseline": base["file_bytes"] / size,
                       "accounting": table}}


def _report(recipe, task: Task, entries, final, baseline_model, model, artifacts, out: Path) -> dict[str, Any]:
    base = entries[0]
    meta = read_meta(out / MODEL_SUBDIR)
    return {
        "slimkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe.to_dict(),
        "data": {"name": task.name, "metric": task.metric, **task.describe,
                 "input_shape": signature_json(named_for(baseline_model, task.input_shape))},
        "architecture": meta.get("architecture"),
        "baseline": dict(base),
        "final": dict(final),
        "summary": {
            "accuracy_delta": final["accuracy"] - base["accuracy"],
            "compression_ratio": base["file_bytes"] / final["file_bytes"],
            "params_ratio": base["params"] / max(1, final["params"]),
            "macs_ratio": base["macs"] / max(1, final["macs"]),
        },
        **_packed(entries, artifacts, out, base),
        "stages": entries,
        "layers": {"baseline": _layers(baseline_model, task.input_shape), "final": _layers(model, task.input_shape)},
        "layer_decisions": layer_decisions(baseline_model, model, read_safetensors(out / MODEL_SUBDIR / WEIGHTS_FILE)),
        "histograms": _histograms(model),
        "artifacts": {"model": MODEL_SUBDIR, **artifacts},
        "provenance": {
            "accuracy": f"{task.metric} measured on the held-out test data (stages select on validation data)",
            "file_bytes": "measured: bytes of the model directory on disk",
            "params/macs": "counted (MACs in a real forward pass, per sample)",
            "latency_ms": "measured: median of repeated runs after warm-up, baseline and final in the same process",
        },
    }

