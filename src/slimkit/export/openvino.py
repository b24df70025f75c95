"""OpenVINO: slimkit's ONNX (fp32, or int8 QDQ for a quantized model) converted to OpenVINO's IR.

OpenVINO reads the QDQ pairs as FakeQuantize and runs the layers between them as int8 on CPU (measured:
lenet5's convolutions and fully connected layers run in u8), so a quantized model gets a second integer
runtime next to ONNX Runtime from the same file. The IR is two files, ``NAME.xml`` and ``NAME.bin`` beside
it; the batch stays dynamic. Inference runs in f32 where the model is float (OpenVINO would pick bf16 on
CPUs that have it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs
from .targets import Runner, Target, feed_arrays, register_target


def _write(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    import openvino as ov

    from ..quant.ptq import is_quantized
    from .onnx import DEFAULT_OPSET, _export_graph
    from .qdq import write_qdq

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        if is_quantized(model):
            write_qdq(model, onnx_path, sample)
        else:
            _export_graph(model, onnx_path, sample, DEFAULT_OPSET)
        converted = ov.convert_model(str(onnx_path))
        ov.save_model(converted, str(path), compress_to_fp16=False)
    return {"weights_file": path.with_suffix(".bin").name}


class OpenVINORunner(Runner):
    def __init__(self, path: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as exc:
            raise SlimkitError(f"{path}: OpenVINO cannot load this model ({str(exc).splitlines()[0][:300]})") from None
        self.request = self.compiled.create_infer_request()

    def run(self, x: Inputs) -> np.ndarray:
        result = self.request.infer(feed_arrays(x))
        return np.array(result[self.compiled.output(0)])


register_target(Target(name="openvino", runtime="OpenVINO", suffix=".xml", precision="fp32", extra="deploy",
                       modules=("openvino",), write=_write, open=OpenVINORunner, side_suffixes=(".bin",)))
register_target(Target(name="openvino-int8", runtime="OpenVINO", suffix=".xml", precision="int8", extra="deploy",
                       modules=("openvino",), write=_write, open=OpenVINORunner, side_suffixes=(".bin",)))
