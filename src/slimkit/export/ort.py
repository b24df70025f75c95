"""ONNX Runtime as a target of the registry (``onnx``, ``onnx-int8``), so ``bench`` and the recipe stage treat
it as every other runtime; ``slimkit export`` writes these two formats through ``export_onnx`` and
``export_int8_verified`` (the same checks), which also handle models over 2 GiB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..inputs import Inputs
from .targets import Runner, Target, register_target


def _write_float(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    from .onnx import DEFAULT_OPSET, _export_graph

    _export_graph(model, path, sample, DEFAULT_OPSET)
    return {}


def _write_int8(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    from .qdq import write_qdq

    write_qdq(model, path, sample)
    return {}


class OrtRunner(Runner):
    optimize = True

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        from .onnx import ort_session, ort_session_options

        opts = ort_session_options(threads)
        if not self.optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort_session(path, opts=opts)

    def run(self, x: Inputs) -> np.ndarray:
        from .onnx import ort_feed

        return self.session.run(None, ort_feed(self.session, x))[0]


register_target(Target(name="onnx", runtime="ONNX Runtime", suffix=".onnx", precision="fp32", extra="",
                       modules=("onnxruntime",), write=_write_float, open=OrtRunner, side_suffixes=(".onnx.data",)))
register_target(Target(name="onnx-int8", runtime="ONNX Runtime", suffix=".onnx", precision="int8", extra="",
                       modules=("onnxruntime",), write=_write_int8, open=OrtRunner, side_suffixes=(".onnx.data",)))
