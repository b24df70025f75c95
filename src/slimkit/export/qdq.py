"""Quantized ONNX in QDQ form, carrying slimkit's own scales and zero points.

The fake-quantized graph from ``quant/ptq.py`` exports as QuantizeLinear /
DequantizeLinear pairs. Two rewrites then make the file what runtimes expect:
weights are stored as int8 initializers (QuantizeLinear of a constant is
computed here, so the file is about 4x smaller), and conv/gemm biases become
int32 at scale ``s_x * s_w`` behind a DequantizeLinear. ONNX Runtime fuses the
pattern into integer kernels; TensorRT-style runtimes read the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimkitError
from ..io import atomic_path
from .onnx import _export_graph


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _broadcast(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def fold_weight_quantizers(model) -> int:
    """Replace QuantizeLinear(constant weight) by its int8 result; returns how many were folded."""
    from onnx import numpy_helper

    graph = model.graph
    consts = _constants(graph)
    inits = {init.name: init for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = consts[node.input[0]].astype(np.float64)
        scale, zero = consts[node.input[1]], consts[node.input[2]]
        axis = _axis(node) % w.ndim
        q = np.round(w / _broadcast(scale.astype(np.float64), w.ndim, axis)) + _broadcast(zero, w.ndim, axis)
        info = np.iinfo(zero.dtype)
        graph.initializer.append(numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zero.dtype),
                                                         node.output[0]))
        graph.node.remove(node)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def quantize_biases(model) -> int:
    """Conv/Gemm biases as int32 at scale s_x * s_w (what integer kernels add to their accumulators)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        s_x, s_w = consts.get(dq_x.input[1]), consts.get(dq_w.input[1])
        if s_x is None or s_w is None or s_x.ndim != 0:
            continue
        scale = (s_x.astype(np.float64) * s_w.astype(np.float64)).reshape(-1)
        bias = consts[node.input[2]].astype(np.float64)
        q = np.round(bias / scale).astype(np.int32)
        base = node.input[2]
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_int32"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_int32_scale"),
        ])  # no zero point: it defaults to 0 of the input's type (int32)
        graph.node.append(helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_int32_scale"],
                                           [f"{base}_dequantized"], axis=0, name=f"{base}_dequantize"))
        node.input[2] = f"{base}_dequantized"
        count += 1
    _drop_unused_initializers(graph)
    _topological_sort(graph)
    return count


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _topological_sort(graph) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise SlimkitError("quantized ONNX graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
            pending.remove(n)
    del graph.node[:]
    graph.node.extend(ordered)


def export_qdq(model: torch.nn.Module, path: str | os.PathLike, sample: torch.Tensor, opset: int = 18) -> Path:
    """Export a fake-quantized model as a QDQ ONNX file with int8 weights and int32 biases."""
    import onnx

    from ..quant.meta_kernels import ensure_fake_quant_meta_kernels

    ensure_fake_quant_meta_kernels()
    path = Path(path)
    with atomic_path(path) as tmp:
        _export_graph(model, tmp, sample[:2], opset)
        proto = onnx.load(str(tmp))
        if fold_weight_quantizers(proto) == 0:
            raise SlimkitError(f"{type(model).__name__} has no quantized weights to export as int8")
        quantize_biases(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


MIN_AGREEMENT = 0.99
MIN_SQNR_DB = 30.0


def compare_with_runtime(model: torch.nn.Module, path: str | os.PathLike, inputs: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and SQNR (dB) between slimkit's simulation and ONNX Runtime's integer model."""
    from .onnx import ort_session, run_ort

    with torch.no_grad():
        expected = torch.cat([model(inputs[i : i + 256]) for i in range(0, len(inputs), 256)]).double().numpy()
    got = run_ort(ort_session(path), inputs).astype(np.float64)
    signal = float((expected**2).sum())
    noise = max(float(((expected - got) ** 2).sum()), signal * 1e-30)  # identical outputs read as 300 dB
    return {
        "top1_agreement": float((expected.argmax(-1) == got.argmax(-1)).mean()),
        "sqnr_db": float(10 * np.log10(signal / noise)) if signal else 0.0,
        "max_abs_diff": float(np.abs(expected - got).max()),
        "samples": len(inputs),
    }


def export_int8_verified(model: torch.nn.Module, path: str | os.PathLike, inputs: torch.Tensor) -> dict[str, float]:
    """Export QDQ and check it against the simulation; a file that disagrees is not left behind."""
    path = Path(path)
    with atomic_path(path) as tmp:
        export_qdq(model, tmp, inputs[:2])
        check = compare_with_runtime(model, tmp, inputs)
        if check["top1_agreement"] < MIN_AGREEMENT or check["sqnr_db"] < MIN_SQNR_DB:
            raise SlimkitError(
                f"int8 ONNX of {type(model).__name__} disagrees with slimkit's simulation: top-1 agreement "
                f"{check['top1_agreement']:.4f} (need {MIN_AGREEMENT}), SQNR {check['sqnr_db']:.1f} dB "
                f"(need {MIN_SQNR_DB})")
    return check
