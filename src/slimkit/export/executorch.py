"""ExecuTorch (the successor of PyTorch Mobile): a ``.pte`` program lowered to the XNNPACK backend.

``executorch`` holds a float model; ``executorch-int8`` a slimkit-quantized one, carrying slimkit's own scales
and zero points (``decomposed.py``), which XNNPACK runs as int8. The batch is fixed at export (``batch``, 1 by
default, as a phone runs it): ExecuTorch 1.5's XNNPACK programs exported with a dynamic batch refused batches
over four times the example's and returned the largest batch's shape from layers outside the delegate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, export_arguments
from .targets import Runner, Target, feed_arrays, register_target


def _lower(model: nn.Module, sample: Inputs) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    args, kwargs, _ = export_arguments(sample, {})
    program = torch.export.export(model, args, kwargs, strict=False)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _write_float(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    path.write_bytes(_lower(model, sample))
    return {"backend": "XNNPACK"}


def _write_int8(model: nn.Module, path: Path, sample: Inputs, batch: int) -> dict[str, Any]:
    import executorch.kernels.quantized  # noqa: F401 - kernels for the Q/DQ ops left outside the delegate

    from .decomposed import decomposed_qdq

    path.write_bytes(_lower(decomposed_qdq(model, weights="codes"), sample))
    return {"backend": "XNNPACK", "scales": "slimkit's"}


class ExecuTorchRunner(Runner):
    def __init__(self, path: Path, threads: int):
        """``threads`` is not applied: ExecuTorch's XNNPACK runs on one pool per process, as many threads as
        cores, and resetting it while programs are loaded (``_unsafe_reset_threadpool``) crashed the process."""
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(str(path))
            self.method = program.load_method("forward")
        except RuntimeError as exc:
            raise SlimkitError(f"{path}: ExecuTorch cannot load this program ({str(exc).splitlines()[0]})") from None
        meta = self.method.metadata
        self.batch = int(meta.input_tensor_meta(0).sizes()[0])

    def run(self, x: Inputs) -> np.ndarray:
        outputs = self.method.execute([torch.from_numpy(a) for a in feed_arrays(x)])
        return outputs[0].detach().numpy().copy()


register_target(Target(name="executorch", runtime="ExecuTorch (XNNPACK)", suffix=".pte", precision="fp32",
                       extra="deploy", modules=("executorch.exir", "executorch.runtime"), write=_write_float,
                       open=ExecuTorchRunner, static_batch=True))
register_target(Target(name="executorch-int8", runtime="ExecuTorch (XNNPACK)", suffix=".pte", precision="int8",
                       extra="deploy", modules=("executorch.exir", "executorch.runtime", "torchao"),
                       write=_write_int8, open=ExecuTorchRunner, static_batch=True))
