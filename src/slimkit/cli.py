"""The ``slimkit`` command line: a thin layer over the Python API.

User errors (``SlimkitError``, bad options) print one line and exit non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import SlimkitError
from .console import is_terminal, one_line_warnings, print_table
from .limits import echo

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags shown as flags, the same on a terminal and in a log
    context_settings={"terminal_width": 100, "max_content_width": 100},
    help="Make trained PyTorch models smaller and faster, with measured bytes, milliseconds and accuracy.",
)

DataOpt = typer.Option(None, "--data", help="'digits', an .npz file or an image folder (default: the model's own data)")
TrustOpt = typer.Option(False, "--trust-code", help="allow a model directory to import the Python factory it names")
ArchOpt = typer.Option(None, "--arch", help="zoo architecture of a bare weights file (.safetensors/.pt)")
DeviceOpt = typer.Option("cpu", "--device", help="where training runs: cpu, cuda, cuda:N, or auto (cuda when available)")
OverwriteOpt = typer.Option(False, "--overwrite",
                            help="replace an existing output slimkit did not write (a run folder: start it over)")
ResumeOpt = typer.Option(False, "--resume", help="continue the run in --out: reuse finished stages and checkpoints")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of a table")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slimkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of errors"),
    no_verify: bool = typer.Option(False, "--no-verify",
                                   help="load model directories whose weights no longer match their recorded SHA-256 "
                                        "(files you edited on purpose)"),
) -> None:
    """slimkit: model compression with real, measured gains."""


def _load_for_data(path: Path, arch: Optional[str], trust_code: bool, data: Optional[str]):
    """The model and the task of its data (``--data``, or the data it records), checked to fit each other."""
    from .modelfile import load
    from .task import task_from_spec

    model = load(path, arch=arch, trust_code=trust_code)
    spec = data or model.slimkit_meta.get("data")
    task = task_from_spec(spec, model=model) if spec else None
    if task is not None:
        task.check_model(model)
    return model, task


def _check_inputs(model, task, samples: Optional[int] = None):
    """Held-out inputs to check a model on: its data's test inputs, or (no data) synthetic inputs of the shape
    it records."""
    from .models.text import synthetic_inputs

    if task is not None:
        return task.example_inputs[:samples]
    return synthetic_inputs(model, _input_shape(model, None), samples or 64)


def _data_path(data: Optional[str]) -> Optional[str]:
    """``--data`` when it names a file or folder (an input that outputs must not touch)."""
    return data if data and data != "digits" else None


def _torch_device(name: str):
    """A torch device from --device; under torchrun, cuda means this process's local GPU."""
    import os

    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlimkitError(f"--device {name}: no CUDA device is available")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise SlimkitError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None


def _input_shape(model, task):
    """The per-sample input shape (or the spec of several inputs) of the task's data, else as the model records."""
    from .inputs import recorded_signature

    if task is not None:
        return task.input_shape
    recorded = recorded_signature(model.slimkit_meta)
    if not recorded:
        raise SlimkitError("the model does not record its input shape; pass --data")
    return recorded


@app.command()
def zoo() -> None:
    """List the built-in models."""
    from .models import ZOO

    for name, entry in ZOO.items():
        typer.echo(f"{name:12s} {entry.description}")


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="zoo model name (see 'slimkit zoo') or torchvision:NAME "
                                                    "(e.g. torchvision:resnet18, with --data digits:size=32,channels=3)"),
    out: Path = typer.Option(..., "--out", help="run directory to create (model/, metrics.json, checkpoint/)"),
    data: str = typer.Option("digits", "--data", help="'digits', an .npz file or an image folder"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="default: the zoo model's tuned value"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast) or fp16 (autocast + loss scaling)"),
    device: str = DeviceOpt,
    patience: Optional[int] = typer.Option(None, "--patience", help="stop after this many epochs without improvement"),
    resume: bool = typer.Option(False, "--resume", help="continue from out/checkpoint/last.pt"),
    overwrite: bool = OverwriteOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a zoo model; keeps the best-on-validation weights, checkpoints every epoch."""
    from .data import load_data
    from .models.arch import named_spec
    from .outputs import check_disjoint
    from .task import Task
    from .train import build_seeded, default_train_config, train_model

    named_spec(model)  # a known name, before the data is read
    check_disjoint(out, [_data_path(data)])
    task = Task.classification(load_data(data, seed=seed))
    try:
        cfg = default_train_config(model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                   precision=precision, patience=patience)
    except ValueError as exc:
        raise SlimkitError(f"invalid training option: {exc}") from None
    net = build_seeded(named_spec(model, num_classes=task.splits.num_classes), seed, task).to(_torch_device(device))
    from .train.distributed import is_main, rank_folder

    with rank_folder(out) as folder:
        metrics = train_model(net, task, cfg, folder, resume=resume, overwrite=overwrite, progress=progress,
                              description=f"train {model}")
    if is_main():
        typer.echo(f"{model}: test accuracy {metrics['test_accuracy']:.4f} "
                   f"(val {metrics['val_accuracy']:.4f}, best epoch {metrics['best_epoch']}) -> {out / 'model'}")


@app.command()
def analyze(
    path: Path = typer.Argument(..., help="model directory, run directory, or weights file (with --arch)"),
    data: Optional[str] = DataOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: int = typer.Option(1, "--threads", min=1, help="threads for latency runs (torch and ONNX Runtime)"),
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    arch: Optional[str] = ArchOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Profile a model: params, MACs, bytes on disk, test accuracy, latency (torch and ONNX Runtime)."""
    from .analyze import profile
    from .limits import check_threads
    from .modelfile import resolve_model_dir

    check_threads(threads)
    model, task = _load_for_data(path, arch, trust_code, data)
    # (a text embedder is scored against its uncompressed model, which a model directory does not hold)
    score = task.test_score if task is not None and task.metric == "accuracy" else None
    result = profile(model, _input_shape(model, task), model_path=resolve_model_dir(path), score_fn=score,
                     latency=latency, threads=threads)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from .io import human_bytes

    rows = [["params", f"{result['params']:,}"], ["non-zero params", f"{result['nonzero_params']:,}"],
            ["MACs per sample", f"{result['macs']:,}"],
            ["dense fp32 bytes (computed)", f"{result['dense_fp32_bytes']:,}"],
            ["file bytes (on disk)", f"{result['file_bytes']:,} ({human_bytes(result['file_bytes'])})"]]
    if result["accuracy"] is not None:
        rows.append(["test accuracy", f"{100 * result['accuracy']:.2f}%"])
    rows += [[f"latency {key} (ms, {threads} thread{'s' if threads > 1 else ''})", f"{ms:.3f}"]
             for key, ms in result.get("latency_ms", {}).items()]
    if "machine" in result:
        from .analyze.machine import describe_machine

        rows.append(["measured on", describe_machine(result["machine"])])
    print_table(f"slimkit analyze {path}", ["metric", "value"], rows)


@app.command()
def bench(
    paths: list[Path] = typer.Argument(..., help="model or run directories; the first is the baseline"),
    runtimes: str = typer.Option("torch,ort,openvino,tflite,executorch", "--runtimes",
                                 help="comma-separated: torch, ort, openvino, tflite, executorch"),
    batch: str = typer.Option("1,8", "--batch", help="comma-separated batch sizes"),
    data: Optional[str] = DataOpt,
    threads: int = typer.Option(1, "--threads", min=1, help="threads every runtime may use"),
    rounds: int = typer.Option(3, "--rounds", min=1, max=50, help="interleaved timing rounds"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write the HTML report (table and plots) here"),
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Every model in every runtime it runs in, side by side: accuracy, file bytes, latency (median, p90)."""
    from .analyze.bench import bench as run_bench
    from .limits import check_threads
    from .modelfile import resolve_model_dir
    from .outputs import claim_output, check_disjoint
    from .report.bench import bench_rows, write_bench_html

    check_threads(threads)
    batches = _int_list(batch, "--batch")
    if html_out is not None:
        check_disjoint(html_out, [*(resolve_model_dir(p) for p in paths), _data_path(data)])
    models, task = {}, None
    for path in paths:
        model, model_task = _load_for_data(path, None, trust_code, data)
        name = path.name if path.name != "model" else path.parent.name
        models[name if name not in models else str(path)] = model
        task = task or model_task
    if task is None:
        raise SlimkitError("slimkit bench measures accuracy on data: pass --data (the models record none)")
    result = run_bench(models, task, [r.strip() for r in runtimes.split(",") if r.strip()], batches, threads, rounds)
    if html_out is not None:
        with claim_output(html_out, "html", overwrite=overwrite):
            write_bench_html(result, html_out)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    header, rows = bench_rows(result)
    print_table(f"slimkit bench ({threads} thread{'s' if threads > 1 else ''})", header, rows)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlimkitError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 1,8") from None
    if not values or any(v < 1 or v > 4096 for v in values):
        raise SlimkitError(f"{option} {text!r}: expected batch sizes from 1 to 4096")
    return values


@app.command()
def export(
    path: Path = typer.Argument(..., help="model directory or run directory"),
    out: Path = typer.Option(..., "--out", help="file to write"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (fp32, dynamic batch), onnx-int8 (a quantized model), "
                                                      "onnx-tensorrt (a model quantized with "
                                                      "--symmetric-activations: TensorRT's Q/DQ rules), "
                                                      "huggingface (a float text model: a directory transformers "
                                                      "loads), openvino[-int8] (IR), executorch[-int8] (.pte, "
                                                      "XNNPACK), tflite, tflite-fp16, tflite-int8 (LiteRT)"),
    batch: int = typer.Option(1, "--batch", min=1, max=4096, help="executorch and tflite files: the batch size "
                                                                  "they take (fixed at export)"),
    rtol: float = typer.Option(1e-4, "--rtol", min=0, help="fp32: allowed difference from torch, relative to the "
                                                            "largest output (plus --atol)"),
    atol: float = typer.Option(1e-5, "--atol", min=0),
    data: Optional[str] = DataOpt,
    arch: Optional[str] = ArchOpt,
    overwrite: bool = OverwriteOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Export to a deployment format; the result is checked against torch on the test split."""
    from .export import export_onnx, onnx_bytes
    from .export.qdq import export_int8_verified
    from .outputs import check_disjoint
    from .modelfile import resolve_model_dir
    from .quant.ptq import is_quantized

    check_disjoint(out, [resolve_model_dir(path), _data_path(data)])
    if fmt not in ("onnx", "onnx-int8", "huggingface"):
        from .export.targets import export_to, get_target

        target = get_target(fmt)
        model, task = _load_for_data(path, arch, trust_code, data)
        result = export_to(model, fmt, out, _check_inputs(model, task), batch=batch, overwrite=overwrite, rtol=rtol,
                           atol=atol)
        typer.echo(f"wrote {out} ({result['bytes']:,} bytes); {target.runtime} vs {result['check']['against']} on "
                   f"{result['check']['samples']} samples: {_describe_check(result['check'])}")
        return
    if fmt == "huggingface":
        from .export.huggingface import export_huggingface
        from .modelfile import load

        result = export_huggingface(load(path, arch=arch, trust_code=trust_code), out, overwrite=overwrite)
        typer.echo(f"wrote {out}: {result['layers']} layers, FFN width {result['intermediate_size']}; transformers "
                   f"loads it with outputs within {result['max_abs_diff']:.1e} of slimkit's")
        return
    model, task = _load_for_data(path, arch, trust_code, data)
    if is_quantized(model) != (fmt == "onnx-int8"):
        raise SlimkitError(f"--format {fmt}: this is a {'quantized' if is_quantized(model) else 'float'} model; "
                           f"use --format {'onnx-int8' if is_quantized(model) else 'onnx'}")
    check = _check_inputs(model, task)
    if fmt == "onnx-int8":
        result = export_int8_verified(model, out, check, overwrite=overwrite)
        typer.echo(f"wrote {out} ({onnx_bytes(out):,} bytes); ONNX Runtime int8 vs slimkit's simulation on "
                   f"{result['samples']} samples: top-1 agreement {result['top1_agreement']:.4f}, "
                   f"SQNR {result['sqnr_db']:.1f} dB")
        return
    result = export_onnx(model, out, check[:2], verify_on=check, atol=atol, rtol=rtol, overwrite=overwrite)
    typer.echo(f"wrote {out} ({onnx_bytes(out):,} bytes); ONNX Runtime vs torch on {result.samples_checked} "
               f"samples: max abs diff {result.max_abs_diff:.2e}")


def _describe_check(check: dict) -> str:
    words = f"top-1 agreement {check['top1_agreement']:.4f}, SQNR {check['sqnr_db']:.1f} dB"
    return f"max abs diff {check['max_abs_diff']:.2e}, {words}"


@app.command("check-onnx")
def check_onnx_cmd(
    onnx_file: Path = typer.Argument(..., help="an ONNX file (read only)"),
    target: str = typer.Option(..., "--target", help="tensorrt (its ONNX parser's operators and explicit-"
                                                     "quantization rules), ort (ONNX Runtime loads it; int8 layers "
                                                     "left in float) or openvino (its ONNX frontend converts it)"),
    strict: bool = typer.Option(False, "--strict", help="warnings fail the check too"),
    shown: int = typer.Option(20, "--show", min=1, help="findings listed (--json lists all)"),
    as_json: bool = JsonOpt,
) -> None:
    """Check an ONNX file against a runtime's rules; every finding names its node. Exit 1 on errors."""
    from .export.onnx_rules import check_onnx, summarize

    findings = check_onnx(onnx_file, target)
    failed = any(f.severity == "error" or strict for f in findings)
    if as_json:
        typer.echo(json.dumps({"file": str(onnx_file), "target": target, "passed": not failed,
                               "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        for finding in findings[:shown]:
            typer.echo(str(finding))
        if len(findings) > shown:
            typer.echo(f"... and {len(findings) - shown} more (--show N, or --json for all)")
        typer.echo(f"{onnx_file} for {target}: {summarize(findings)}: {'fails' if failed else 'passes'}")
    if failed:
        raise typer.Exit(1)


@app.command("diff-int8")
def diff_int8(
    path: Path = typer.Argument(..., help="quantized model directory or run directory"),
    onnx_file: Path = typer.Argument(..., help="an int8 ONNX file exported from that model"),
    data: Optional[str] = DataOpt,
    samples: int = typer.Option(16, "--samples", min=1, max=1024, help="test inputs to compare on"),
    arch: Optional[str] = ArchOpt,
    trust_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Where an int8 file parts from slimkit's simulation: every activation quantizer's int8 codes compared,
    in graph order, and the first layer whose codes jump away from rounding noise."""
    from .export.layer_diff import first_divergence, int8_layer_diff
    from .quant.ptq import is_quantized

    model, task = _load_for_data(path, arch, trust_code, data)
    if not is_quantized(model):
        raise SlimkitError(f"{path} is a float model; diff-int8 compares a quantized model with its int8 file")
    inputs = _check_inputs(model, task, samples)
    rows = int8_layer_diff(model, onnx_file, inputs)
    first = first_divergence(rows)
    if as_json:
        typer.echo(json.dumps({"layers": rows, "first_divergence": first}, indent=2))
        return
    print_table(f"int8 codes of {onnx_file} vs slimkit's simulation ({len(inputs)} samples)",
                ["activation quantizer", "codes differing", "max steps"],
                [[r["quantizer"], f"{100 * r['codes_differ']:.3f}%", str(r["max_steps"])] for r in rows])
    typer.echo(f"first divergence: {first['quantizer']}" if first else "no layer diverges beyond rounding noise")


@app.command()
def prune(
    path: Path = typer.Argument(..., help="model directory or run directory (never modified)"),
    out: Path = typer.Option(..., "--out", help="run directory for the pruned model and its report"),
    method: str = typer.Option("l1", "--method", help="importance: l1, l2, bn-scale (structured), taylor, random"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity",
                                             help="fraction of weights to zero; with --structured, of channels/heads "
                                                  "per group (not needed with --nm)"),
    structured: bool = typer.Option(False, "--structured", help="remove whole channels, neurons and heads"),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M pattern along the input dimension, e.g. 2:4"),
    global_scope: bool = typer.Option(False, "--global", help="one threshold across layers, not per layer"),
    schedule: str = typer.Option("one-shot", "--schedule", help="one-shot, iterative or agp"),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="recovery epochs (agp/iterative: required)"),
    exclude: list[str] = typer.Option([], "--exclude", metavar="GLOB", help="layer name glob to leave dense (repeatable)"),
    data: Optional[str] = DataOpt,
    latency: Optional[bool] = typer.Option(None, "--latency/--no-latency",
                                           help="measure latency in the report (default: with --structured)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Prune: unstructured or N:M (stored sparse), or --structured (a physically smaller model)."""
    from .modelfile import load

    if sparsity is None and nm is None:
        raise SlimkitError("--sparsity is required (or --nm N:M, which sets it)")
    source = load(path, trust_code=trust_code)
    stage = {"type": "prune", "method": method, "sparsity": sparsity if sparsity is not None else 0.5, "nm": nm,
             "schedule": schedule,
             "structured": structured,
             "scope": "global" if global_scope else "layer", "exclude": exclude,
             "finetune": {"epochs": finetune_epochs}}
    recipe = {"name": f"prune {path}", "data": data or source.slimkit_meta.get("data", "digits"),
              "model": {"path": str(path), "trust_code": trust_code}, "stages": [stage],
              "evaluate": {"latency": structured if latency is None else latency}}
    _run_and_summarize(recipe, out, progress, device, resume, overwrite, as_json)


@app.command()
def quantize(
    path: Path = typer.Argument(..., help="model directory or run directory (never modified)"),
    out: Path = typer.Option(..., "--out", help="run directory for the quantized model, its int8 ONNX and report"),
    scheme: str = typer.Option("int8-static", "--scheme",
                               help="int8-static (int8 weights, calibrated uint8 activations), int8-dynamic "
                                    "(linear layers, activation ranges at run time), int8-weight (weights only), "
                                    "int4-weight (4-bit weights per group of inputs) or log (power-of-two "
                                    "weights, with --bits 4 or fewer)"),
    calib: int = typer.Option(256, "--calib", help="calibration samples from the training split"),
    observer: str = typer.Option("minmax", "--observer", help="minmax, moving-minmax, percentile, mse, entropy"),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="weight scales per output channel"),
    bits: Optional[int] = typer.Option(None, "--bits",
                                       help="weight bits, 2-8 (default 8; activations stay 8-bit: W4A8 with --bits 4)"),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="weight-only schemes: one scale per this many inputs (int4-weight: 32)"),
    reduce_range: Optional[bool] = typer.Option(
        None, "--reduce-range/--full-range",
        help="7-bit weight codes, so that ONNX Runtime's integer kernels cannot saturate on x86 CPUs without VNNI "
             "(default: only on such a CPU)"),
    symmetric_activations: bool = typer.Option(
        False, "--symmetric-activations", help="int8-static: int8 activations with zero point 0 instead of uint8 "
                                               "(TensorRT needs them; export with --format onnx-tensorrt)"),
    dynamic_scales: Optional[str] = typer.Option(
        None, "--dynamic-scales", help="int8-dynamic: activation ranges per token or per tensor (default: per token "
                                       "for text models, per tensor otherwise)"),
    rounding: str = typer.Option("nearest", "--rounding", help="nearest, or gptq (error-compensating, for low bits)"),
    bias_correction: bool = typer.Option(False, "--bias-correction",
                                         help="remove the mean output shift caused by weight rounding"),
    size_budget: Optional[float] = typer.Option(None, "--size-budget",
                                                help="mixed 4/8-bit weights within this fraction of fp32 bytes"),
    qat_epochs: int = typer.Option(0, "--qat-epochs", help="quantization-aware training epochs after calibration"),
    qat_lr: float = typer.Option(5e-4, "--qat-lr"),
    qat_if_drop: Optional[float] = typer.Option(
        None, "--qat-if-drop", help="run QAT only if static int8 loses more than this validation score (0.01: "
                                    "1 point); --qat-epochs sets its length (default 2)"),
    exclude: list[str] = typer.Option([], "--exclude", metavar="GLOB", help="layer name glob to keep in float (repeatable)"),
    embeddings: bool = typer.Option(True, "--int8-embeddings/--float-embeddings",
                                    help="embedding tables as int8 rows, one scale per row"),
    float_where_faster: bool = typer.Option(
        False, "--float-where-faster", help="keep in float the layers whose int8 form makes ONNX Runtime slower, "
                                            "measured at --deploy-batch and --deploy-threads"),
    deploy_batch: int = typer.Option(1, "--deploy-batch", min=1, help="batch size the model will run at"),
    deploy_threads: int = typer.Option(2, "--deploy-threads", min=1, help="ONNX Runtime threads it will run with"),
    data: Optional[str] = DataOpt,
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Quantize to int8 with slimkit's own scales; writes a verified integer ONNX model (QDQ)."""
    from .modelfile import load

    source = load(path, trust_code=trust_code)
    stage = {"type": "quantize", "scheme": scheme, "calib": calib, "observer": observer,
             "per_channel": per_channel, "exclude": exclude, "embeddings": embeddings, "rounding": rounding,
             "reduce_range": reduce_range, "symmetric_activations": symmetric_activations,
             "size_budget": size_budget, "bias_correction": bias_correction,
             "qat": {"epochs": qat_epochs, "lr": qat_lr} if qat_epochs else None, "qat_if_drop": qat_if_drop,
             "latency_placement": {"batch": deploy_batch, "threads": deploy_threads} if float_where_faster else None}
    stage.update({k: v for k, v in (("weight_bits", bits), ("group_size", group_size),
                                    ("dynamic_scales", dynamic_scales)) if v is not None})
    recipe = {"name": f"quantize {path}", "data": data or source.slimkit_meta.get("data", "digits"),
              "model": {"path": str(path), "trust_code": trust_code}, "stages": [stage],
              "evaluate": {"latency": latency}}
    _run_and_summarize(recipe, out, progress, device, resume, overwrite, as_json)


@app.command("sensitivity")
def sensitivity_cmd(
    path: Path = typer.Argument(..., help="model directory or run directory (never modified)"),
    out: Path = typer.Option(..., "--out", help="folder for sensitivity.json and sensitivity.png"),
    data: Optional[str] = DataOpt,
    method: str = typer.Option("l1", "--method", help="importance: l1, l2, taylor, random (bn-scale if structured)"),
    structured: bool = typer.Option(False, "--structured", help="sweep channel groups instead of weights"),
    sparsities: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95", "--sparsities"),
    exclude: list[str] = typer.Option([], "--exclude", metavar="GLOB", help="layer name glob to skip (repeatable)"),
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Per-layer sensitivity: validation score with each layer (or channel group) pruned alone."""
    from .io import write_bytes_atomic, write_json_atomic
    from .outputs import check_output, claim_output
    from .modelfile import resolve_model_dir
    from .pruning.sensitivity import sensitivity
    from .report.plots import sensitivity_curves

    inputs = [resolve_model_dir(path), _data_path(data)]
    check_output(out, "sensitivity", inputs, overwrite)  # before the sweep, not after it
    model, task = _load_for_data(path, None, trust_code, data)
    if task is None:
        raise SlimkitError("sensitivity needs data: pass --data")
    try:
        grid = tuple(float(s) for s in sparsities.split(","))
    except ValueError:
        raise SlimkitError(f"--sparsities: expected comma-separated numbers, got {echo(sparsities)}") from None
    with claim_output(out, "sensitivity", inputs=inputs, overwrite=overwrite):
        result = sensitivity(model, task, grid, method, structured, exclude=exclude,
                             progress=lambda name: _log(f"sweeping {name}"))
        write_json_atomic(out / "sensitivity.json", result)
        write_bytes_atomic(out / "sensitivity.png", sensitivity_curves(result))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    print_table(f"validation {result['metric']} with one layer pruned (unpruned: {result['baseline']:.4f})",
                ["layer", "params", *(f"{100 * s:g}%" for s in result["sparsities"])],
                [[name, f"{info['params']:,}", *(f"{v:.3f}" for v in info["scores"])]
                 for name, info in result["layers"].items()])
    typer.echo(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}")


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="the teacher: model directory, run directory or .slim file"),
    student: str = typer.Option(..., "--student",
                                help="zoo spec (lenet5:width=0.25, vit:depth=2) or a model path (a compressed model)"),
    out: Path = typer.Option(..., "--out", help="run directory for the student and the report (teacher vs student)"),
    data: Optional[str] = DataOpt,
    epochs: int = typer.Option(60, "--epochs", help="a fresh student trains from scratch: zoo-like length"),
    lr: float = typer.Option(3e-3, "--lr"),
    temperature: float = typer.Option(4.0, "--temperature", help="softmax temperature of the soft targets"),
    alpha: float = typer.Option(0.7, "--alpha", help="weight of the teacher's soft targets (the rest: labels)"),
    feature: list[str] = typer.Option([], "--feature", metavar="S=T",
                                      help="STUDENT_LAYER=TEACHER_LAYER hint (repeatable; widths may differ)"),
    attention: list[str] = typer.Option([], "--attention", metavar="S=T",
                                        help="STUDENT_ATTN=TEACHER_ATTN attention-map pair, e.g. blocks.0.attn=blocks.1.attn "
                                             "(repeatable)"),
    mutual: bool = typer.Option(False, "--mutual", help="two-way: teacher and student learn from each other"),
    seed: int = typer.Option(0, "--seed"),
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Distil a teacher into a student (Hinton KD, FitNets hints, attention maps, mutual learning)."""
    from .modelfile import load

    source = load(teacher, trust_code=trust_code)
    stage = {"type": "distill", "teacher": "baseline", "student": student, "temperature": temperature,
             "alpha": alpha, "features": _layer_pairs(feature, "--feature"),
             "attention": _layer_pairs(attention, "--attention"), "mutual": mutual, "trust_code": trust_code,
             "train": {"epochs": epochs, "lr": lr, "seed": seed}}
    recipe = {"name": f"distill {teacher} -> {student}", "seed": seed,
              "data": data or source.slimkit_meta.get("data", "digits"),
              "model": {"path": str(teacher), "trust_code": trust_code}, "stages": [stage],
              "evaluate": {"latency": latency}}
    _run_and_summarize(recipe, out, progress, device, resume, overwrite, as_json)


def _layer_pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        s_layer, sep, t_layer = item.partition("=")
        if not sep or not s_layer or not t_layer:
            raise SlimkitError(f"{option} {item!r}: expected STUDENT_LAYER=TEACHER_LAYER")
        pairs[s_layer] = t_layer
    return pairs


@app.command()
def pack(
    path: Path = typer.Argument(..., help="model directory or run directory (never modified)"),
    out: Path = typer.Option(..., "--out", help="the .slim file to write"),
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Pack a model into one .slim file (sparse positions, shared values, entropy-coded); prints where the bytes go."""
    from .modelfile import pack as pack_model

    if out.suffix != ".slim":
        raise SlimkitError(f"--out {out}: a packed model's file name ends in .slim")
    table = pack_model(path, out, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in table.items() if k != "streams"}, indent=2))
        return
    rows = [[r["layer"], f"{r['params']:,}", _percent(r["weights_kept"]), _number(r["bits_per_weight"]),
             _number(r["bits_per_index"]), f"{r['codebook_bytes']:,}", f"{r['compressed_bytes']:,}",
             f"{r['ratio']:.1f}x smaller"] for r in table["layers"]]
    rows.append(["(header)", "", "", "", "", "", f"{table['header_bytes']:,}", ""])
    print_table(f"{out}: {table['file_bytes']:,} bytes, {table['ratio_vs_fp32']:.1f}x smaller than fp32",
                ["layer", "params", "weights kept", "bits/weight", "bits/index", "codebook B", "bytes", "vs fp32"],
                rows)


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}%"


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


@app.command()
def unpack(
    path: Path = typer.Argument(..., help="a .slim file (never modified)"),
    out: Path = typer.Option(..., "--out", help="model directory to write"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Unpack a .slim file into a model directory holding the identical tensors."""
    from .modelfile import unpack as unpack_model

    unpack_model(path, out, overwrite=overwrite)
    typer.echo(f"wrote {out}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    out: Path = typer.Option(..., "--out", help="run directory (model/, report.json, report.html)"),
    model: Optional[str] = typer.Option(None, "--model", help="start from this model directory (replaces the "
                                                                "recipe's model section)"),
    data: Optional[str] = typer.Option(None, "--data", help="'digits', an .npz file or an image folder (replaces "
                                                              "the recipe's data)"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="set a recipe field, e.g. stages.0.sparsity=0.8 (YAML value; "
                                             "repeatable; checked like the file)"),
    resume: bool = typer.Option(False, "--resume", help="reuse finished stages and continue interrupted training"),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = DeviceOpt,
) -> None:
    """Run a recipe: train or load, compress stage by stage, evaluate, report."""
    from .outputs import check_disjoint
    from .recipe import override_recipe, parse_recipe, read_recipe

    check_disjoint(out, [recipe])
    spec = override_recipe(read_recipe(recipe), model=model, data_spec=data, assignments=overrides)
    _run_and_summarize(parse_recipe(spec, str(recipe)), out, progress, device, resume, overwrite, as_json)


def _run_and_summarize(recipe, out: Path, progress: bool, device: str, resume: bool = False,
                       overwrite: bool = False, as_json: bool = False) -> None:
    from .pipeline import run_recipe
    from .recipe import parse_recipe
    from .train.distributed import is_main

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe, "options")
    report = run_recipe(recipe, out, resume=resume, overwrite=overwrite, progress=progress,
                        device=_torch_device(device), log=_log)
    if not is_main():
        return
    if as_json:
        typer.echo(json.dumps({k: report[k] for k in ("baseline", "final", "summary", "artifacts")}, indent=2))
        return
    _print_summary(report)
    typer.echo(f"report: {out / 'report.html'}")


def _print_summary(report: dict) -> None:
    from .report.summary import summary_rows

    print_table(f"{report['recipe']['name']}: baseline vs final", ["", "baseline", "final", "change"],
                summary_rows(report))


def _log(message: str) -> None:
    """A status line on stderr (dim on a terminal)."""
    if is_terminal(sys.stderr):
        from rich.console import Console

        Console(stderr=True).print(f"[dim]{message}[/dim]", highlight=False)
    else:
        print(message, file=sys.stderr, flush=True)


DISTRIBUTED_COMMANDS = ("train", "run", "prune", "quantize", "distill")  # the commands that train
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI, turning errors into one line and an exit code.

    Usage errors, ``--help`` and ``--version`` are handled by typer itself (``SystemExit``).
    """
    from .modelfile import digest_checks
    from .train.distributed import init_from_env, shutdown

    args = list(sys.argv[1:] if argv is None else argv)
    root_options = args[: next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]
    debug = "--debug" in root_options
    command = next((a for a in args if not a.startswith("-")), None)
    try:
        if init_from_env():  # under torchrun: join the process group before any training
            if command not in DISTRIBUTED_COMMANDS:
                raise SlimkitError(f"{command!r} does not train, so it does not run under torchrun; "
                                   f"data-parallel commands: {', '.join(DISTRIBUTED_COMMANDS)}")
        with digest_checks("--no-verify" not in root_options), one_line_warnings():
            app(args=args, prog_name="slimkit")
    except SlimkitError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        if _interrupted(exc):
            typer.echo(_interrupted_message(command, args), err=True)
            return INTERRUPTED
        code = getattr(exc, "code", 1)  # typer ends every run (--help, usage errors, success) with SystemExit
        return code if isinstance(code, int) else int(code is not None)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        return 1
    finally:
        shutdown()
    return 0


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or typer's exit 130 made from one."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


RESUMABLE = ("train", "run", "prune", "quantize", "distill")


def _interrupted_message(command: Optional[str], args: list[str]) -> str:
    """What was stopped, and how to continue it."""
    out = args[args.index("--out") + 1] if "--out" in args[:-1] else None
    if command in RESUMABLE and out:
        return (f"interrupted: slimkit {command} stopped; its finished stages and last checkpointed epoch are kept in "
                f"{out}: run the same command with --resume to continue")
    return f"interrupted: slimkit {command or ''} stopped; files are written whole or not at all, so nothing partial " \
           "was left"


if __name__ == "__main__":
    sys.exit(main())
