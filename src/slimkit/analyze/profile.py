"""The honest profile of a model: counted parameters and MACs, bytes on disk, measured accuracy and latency.

MACs come from a real forward pass under torch's ``FlopCounterMode``, which
counts every matmul and convolution the model actually runs (attention
included), not a per-layer formula table.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io import dir_bytes
from ..inputs import call
from ..models.text import synthetic_inputs
from .machine import machine_fingerprint
from .latency import Timing, ort_latency, torch_latency

LATENCY_BATCHES = (1, 64)
PROVENANCE = {
    "params": "counted from the module's tensors",
    "nonzero_params": "counted from the module's tensors",
    "macs": "counted per sample in a real forward pass (torch FlopCounterMode, MACs = FLOPs / 2)",
    "dense_fp32_bytes": "computed: params x 4 bytes (the dense fp32 reference, not a file)",
    "file_bytes": "measured: bytes of the model's files on disk",
    "accuracy": "measured on the held-out test split",
    "latency_ms": "measured: median wall time of repeated runs after warm-up, fixed threads",
}


@dataclass(frozen=True)
class LayerStats:
    name: str
    kind: str
    params: int
    nonzero_params: int
    macs: int


def count_params(model: nn.Module) -> tuple[int, int]:
    """Total and non-zero elements of parameters and floating-point buffers that are weights."""
    tensors = list(model.parameters())
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    return total, nonzero


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's inference fast path is one fused op no counter sees; count the plain path."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """MACs of one sample, in total and per module (qualified name -> MACs including children): convolutions,
    linear layers and matmuls, attention included (nn.MultiheadAttention, scaled_dot_product_attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={  # CPU attention kernels torch has no formula for
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    try:
        with counter, _mha_fastpath(False):
            call(model, synthetic_inputs(model, input_shape, 1))
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key[len(root) + 1 :] if key.startswith(root + ".") else ("" if key == root else key)
        per_module[name] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


def layer_stats(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerStats]:
    """Per-layer parameters and MACs for every module that owns parameters directly."""
    _, macs = count_macs(model, input_shape)
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        rows.append(LayerStats(
            name or type(model).__name__, type(module).__name__, sum(p.numel() for p in own),
            sum(int(torch.count_nonzero(p)) for p in own), macs.get(name, 0),
        ))
    return rows


def _timing_dict(t: Timing) -> dict[str, float]:
    return {"median_ms": t.median_ms, "p25_ms": t.p25_ms, "p75_ms": t.p75_ms, "repeats": t.repeats}


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    threads: int = 1,
    onnx_path: str | os.PathLike | None = None,
    batches: tuple[int, ...] = LATENCY_BATCHES,
) -> dict[str, Any]:
    """Torch eager and ONNX Runtime latency at each batch size; exports ONNX (QDQ if quantized) if no file is given."""
    from ..export import export_onnx, ort_session
    from ..export.qdq import export_int8_verified
    from ..limits import check_threads
    from ..quant.ptq import is_quantized

    check_threads(threads, "threads")
    gen = torch.Generator().manual_seed(0)
    inputs = {b: synthetic_inputs(model, input_shape, b, gen) for b in batches}
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_path is None:
            onnx_path, check = Path(tmp) / "model.onnx", inputs[max(batches)]
            if is_quantized(model):
                export_int8_verified(model, onnx_path, check)
            else:
                export_onnx(model, onnx_path, check[:2], verify_on=check)
        session = ort_session(onnx_path, threads=threads)
        medians, details = {}, {}
        for b, x in inputs.items():
            for runtime, timing in (("torch", torch_latency(model, x, threads)), ("ort", ort_latency(session, x))):
                medians[f"{runtime}_b{b}"] = timing.median_ms
                details[f"{runtime}_b{b}"] = _timing_dict(timing)
    return {"latency_ms": medians, "latency_detail": details, "threads": threads,
            "machine": machine_fingerprint(threads)}


def profile(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    model_path: str | os.PathLike | None = None,
    score_fn: Callable[[nn.Module], float] | None = None,
    latency: bool = True,
    threads: int = 1,
    onnx_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Everything ``slimkit analyze`` reports; ``score_fn`` is the accuracy (or the user's metric)."""
    params, nonzero = count_params(model)
    macs, _ = count_macs(model, input_shape)
    result: dict[str, Any] = {
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "dense_fp32_bytes": params * 4,
        "file_bytes": dir_bytes(model_path) if model_path is not None else None,
        "accuracy": float(score_fn(model)) if score_fn is not None else None,
    }
    if latency:
        result.update(measure_latency(model, input_shape, threads=threads, onnx_path=onnx_path))
    result["provenance"] = {k: v for k, v in PROVENANCE.items() if result.get(k) is not None}
    return result
