"""TFLite / LiteRT through Google's PyTorch converter (``litert-torch``), run by the LiteRT interpreter.

* ``tflite``: fp32.
* ``tflite-fp16``: fp32 compute with fp16 weights (the source documents' ``supported_types = [tf.float16]``),
  by LiteRT's own quantizer (ai-edge-quantizer's float casting) on the fp32 file: half the weight bytes.
* ``tflite-int8``: a slimkit-quantized model with slimkit's own scales and zero points (``decomposed.py``):
  int8 convolutions and fully connected layers; the input is int8 on slimkit's input scale (the runner
  quantizes it, as an app would), the output float.

The batch is fixed at export (``batch``, 1 by default): the converter cannot keep a dynamic batch through a
flatten, and the interpreter cannot resize a delegated graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, export_arguments
from .targets import Runner, Target, feed_arrays, register_target


def _convert(model: nn.Module, sample: Inputs, path: Path, quant_config=None) -> None:
    import litert_torch

    args, kwargs, _ = export_arguments(sample, {})
    litert_torch.convert(model, args, kwargs or None, quant_config=quant_config).export(str(path))


def _write_float(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    _convert(model, sample, path)
    return {"weights": "fp32"}


def _write_fp16(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    from ai_edge_quantizer import quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    recipe = recipe_manager.RecipeManager()
    recipe.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
    _convert(model, sample, path)
    fp16 = quantizer.Quantizer(path.read_bytes(), recipe.get_quantization_recipe())
    path.write_bytes(bytes(fp16.quantize(enable_progress_report=False).quantized_model))
    return {"weights": "fp16", "quantizer": "ai-edge-quantizer float casting"}


def _write_int8(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    from .decomposed import decomposed_qdq

    # the config only tells the converter that the graph holds static Q/DQ pairs; the scales are slimkit's
    config = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True)))
    _convert(decomposed_qdq(model, weights="quantize"), sample, path, config)
    return {"weights": "int8", "scales": "slimkit's"}


class LiteRTRunner(Runner):
    def __init__(self, path: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise SlimkitError(f"{path}: LiteRT cannot load this model ({str(exc).splitlines()[0]})") from None
        self.inputs = self.interpreter.get_input_details()
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.inputs[0]["shape"][0])

    def run(self, x: Inputs) -> np.ndarray:
        for detail, array in zip(self.inputs, feed_arrays(x)):
            self.interpreter.set_tensor(detail["index"], _as_input(array, detail))
        self.interpreter.invoke()
        return _as_output(self.interpreter.get_tensor(self.output["index"]), self.output)


def _as_input(array: np.ndarray, detail: dict) -> np.ndarray:
    """An input as the file takes it: quantized on its own scale where the file's input is integer."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.floating):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale) + zero, info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _as_output(array: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer) and detail["quantization"][0]:
        scale, zero = detail["quantization"]
        return (array.astype(np.float32) - zero) * scale
    return array.copy()


MODULES = ("litert_torch", "ai_edge_litert.interpreter")
register_target(Target(name="tflite", runtime="LiteRT", suffix=".tflite", precision="fp32", extra="deploy",
                       modules=MODULES, write=_write_float, open=LiteRTRunner, static_batch=True))
register_target(Target(name="tflite-fp16", runtime="LiteRT", suffix=".tflite", precision="fp16", extra="deploy",
                       modules=(*MODULES, "ai_edge_quantizer"), write=_write_fp16, open=LiteRTRunner,
                       static_batch=True))
register_target(Target(name="tflite-int8", runtime="LiteRT", suffix=".tflite", precision="int8", extra="deploy",
                       modules=(*MODULES, "torchao"), write=_write_int8, open=LiteRTRunner, static_batch=True))
