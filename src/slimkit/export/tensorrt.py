"""TensorRT-ready ONNX (``onnx-tensorrt``): slimkit's int8 model as plain Q/DQ that TensorRT's explicit
quantization builds an engine from.

TensorRT takes int8 with zero point 0 only, so the model must be quantized with symmetric activations
(``symmetric_activations``; the uint8 grids ONNX Runtime prefers are refused by name); weights are int8 codes
with per-output-channel scales; biases stay float (TensorRT quantizes them itself) and none of ONNX Runtime's
own forms (integer matrix products, fused attention, int32 biases) are written. Every file is checked against
TensorRT's rules (``onnx_rules``) before it is kept, and run operator by operator as ONNX defines them (ONNX
Runtime with its fusions off) against slimkit's simulation, as no TensorRT runs on a CPU: building an engine
needs an NVIDIA GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs
from .ort import OrtRunner
from .targets import Target, register_target


def tensorrt_refusal(model: nn.Module) -> str | None:
    """Why a quantized model cannot become a TensorRT-ready file, or None."""
    from ..quant.ops import RUNTIME_ACTIVATION_QUANTIZERS

    graph = getattr(model, "graph", None)
    nodes = [n for n in graph.nodes if n.op == "call_function"] if graph is not None else []
    if any(n.target is torch.fake_quantize_per_tensor_affine and n.args[3] == 0 for n in nodes):
        return ("its activations are uint8 with zero points; TensorRT takes int8 with zero point 0: quantize "
                "with symmetric_activations (slimkit quantize --symmetric-activations)")
    runtime = sorted({n.target.__name__ for n in nodes if n.target in RUNTIME_ACTIVATION_QUANTIZERS})
    if runtime:
        return (f"it quantizes activations at run time ({', '.join(runtime)}); TensorRT needs calibrated scales: "
                "quantize with static activations")
    return None


def _write(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    from .onnx_rules import check_onnx
    from .qdq import write_qdq

    refusal = tensorrt_refusal(model)
    if refusal:
        raise SlimkitError(f"format onnx-tensorrt: {refusal}")
    write_qdq(model, path, sample, standard_only=True)
    findings = check_onnx(path, "tensorrt")
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise SlimkitError("the file breaks TensorRT's rules: " + "; ".join(str(f) for f in errors[:5])
                           + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    return {"tensorrt_rules": [str(f) for f in findings]}  # warnings only, if any


class ReferenceRunner(OrtRunner):
    """ONNX Runtime with its graph optimizations off: every operator as the ONNX standard defines it, which is
    what the file means to TensorRT. (Optimized, ONNX Runtime 1.32 dropped the ReLU6 before int8 zero-point-0
    quantizers in torchvision's mobilenet_v2: its fusions are not the file's meaning.)"""

    optimize = False


register_target(Target(name="onnx-tensorrt", runtime="ONNX reference (TensorRT-ready)", suffix=".onnx",
                       precision="int8", extra="", modules=("onnxruntime",), write=_write, open=ReferenceRunner,
                       side_suffixes=(".onnx.data",)))
