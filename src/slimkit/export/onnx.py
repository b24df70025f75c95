"""fp32 ONNX export with a dynamic batch axis, verified against torch on every export.

The file is exported to a temporary path, run in ONNX Runtime and compared
with the torch model; only a file that matches is renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, MultiInput, call, export_arguments, graph_input_names
from ..models.outputs import prediction
from ..models.text import TEXT_INPUTS, NamedInputs, dynamic_dims, text_spec
from ..io import atomic_path
from ..outputs import ONNX_PRODUCER, claim_output
from .nan_guards import drop_nan_guards

OUTPUT_NAME = "logits"
DEFAULT_ATOL = 1e-5  # ONNX Runtime vs torch: at most atol + rtol x the largest output magnitude
DEFAULT_RTOL = 1e-4
# protobuf cannot hold 2 GiB: a model with more weight bytes than this keeps them in a side file (NAME.onnx.data)
EXTERNAL_DATA_BYTES = 1 << 30
# opset 20: GELU is one Gelu op (ONNX Runtime fuses it with the bias before it); at 18 it is five
# elementwise passes over the widest activations of ViT, Swin and ConvNeXt
DEFAULT_OPSET = 20
NBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"  # the fused 4-bit MatMulNBits' compute


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    samples_checked: int
    allowed_diff: float


def ort_session_options(threads: int = 1):
    """Session options for reproducible timing (a fixed number of threads, sequential execution, every graph
    optimization) with 4-bit weight kernels computing as fast as this CPU allows (``nbits_accuracy_level``)."""
    import onnxruntime as ort

    from ..analyze.machine import nbits_accuracy_level

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry(NBITS_ACCURACY_KEY, str(nbits_accuracy_level()))
    return opts


def ort_session(path: str | os.PathLike, threads: int = 1, opts=None):
    """An ONNX Runtime CPU session (``opts``: ``ort_session_options(threads)`` unless given)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts or ort_session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per failure kind
        raise SlimkitError(f"{path}: ONNX Runtime cannot load this model ({exc})") from None


def ort_feed(session, x: Inputs) -> dict[str, np.ndarray]:
    """The session's inputs from one batch: several inputs in the graph's order, a text model's packed batch as
    its named inputs, else ``x``."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(x, MultiInput):
        return {name: t.contiguous().numpy() for name, t in zip(names, x.tensors)}
    if len(names) > 1 and x.dim() == 3 and x.shape[1] == len(names):
        return {name: part.contiguous().numpy() for name, part in zip(names, x.unbind(1))}
    return {names[0]: x.numpy()}


def run_ort(session, x: Inputs, batch_size: int = 256) -> np.ndarray:
    outs = [session.run(None, ort_feed(session, x[i : i + batch_size]))[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


@torch.no_grad()
def run_torch(model: nn.Module, x: Inputs, batch_size: int = 256) -> torch.Tensor:
    """``model``'s predictions on ``x``, in batches."""
    return torch.cat([prediction(call(model, x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def export_signature(model: nn.Module, sample: Inputs) -> tuple[nn.Module, tuple, dict, list[str], Any]:
    """(module, args, kwargs, input names, dynamic shapes) to export ``model`` with: a text model's packed
    sample as its named inputs (``input_ids``, ``attention_mask``, ``token_type_ids``), dynamic in batch and
    tokens; several inputs one graph input each, named as the model names them; any other model as it is;
    all dynamic in the batch."""
    dims = dynamic_dims(model, sample)
    if text_spec(model) is None or isinstance(sample, MultiInput) or sample.dim() != 3:
        args, kwargs, dynamic = export_arguments(sample, dims)
        return model, args, kwargs, graph_input_names(model, sample), dynamic
    axes = {0: dims[0], 1: dims[2]}
    return NamedInputs(model), tuple(sample.unbind(1)), {}, list(TEXT_INPUTS), (axes,) * len(TEXT_INPUTS)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and logs optional-dependency notices; keep the CLI's output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def exporter_cause(exc: BaseException) -> str:
    """The root of an exporter failure in one line: torch.onnx wraps torch.export's error in a page of advice
    whose first line says only which step failed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"[:500]


def _export_graph(model: nn.Module, path: Path, sample: Inputs, opset: int,
                  translations: dict | None = None, strip: bool = True) -> None:
    with _quiet_exporter():
        warnings.simplefilter("ignore")
        module, args, kwargs, names, dynamic = export_signature(model, sample)
        try:
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, opset_version=opset, input_names=names, output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic, verbose=False, custom_translation_table=translations,
            )
        except Exception as exc:  # the exporter raises many internal types; say which model failed, and why
            raise SlimkitError(f"ONNX export failed for {type(model).__name__}: {exporter_cause(exc)}") from None
        proto = program.model_proto
        drop_nan_guards(proto)
        if strip:
            strip_debug_info(proto)
        proto.producer_name = ONNX_PRODUCER  # marks slimkit's files (so only they are replaced without --overwrite)
        save_onnx(proto, path)


def side_file(path: Path) -> Path:
    """Where the weights of a model too large for one protobuf live: ``NAME.onnx.data`` beside ``NAME.onnx``."""
    return path.with_name(path.name + ".data")


def save_onnx(proto, path: Path) -> None:
    """Save ``proto`` at ``path`` (a temporary path of ``atomic_onnx_path``: its old side file is replaced), its
    weights in ``side_file(path)`` when they pass ``EXTERNAL_DATA_BYTES`` (ONNX Runtime finds the side file by
    the name recorded in the model, relative to the model's folder)."""
    import onnx

    side_file(path).unlink(missing_ok=True)
    if sum(t.ByteSize() for t in proto.graph.initializer) <= EXTERNAL_DATA_BYTES:
        onnx.save(proto, str(path))
        return
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=side_file(path).name)  # tensors under 1 KiB (shapes) stay in the model


def onnx_bytes(path: Path) -> int:
    """Bytes of an ONNX model on disk: the file and its side file of weights, if any."""
    side = side_file(path)
    return path.stat().st_size + (side.stat().st_size if side.is_file() else 0)


@contextlib.contextmanager
def atomic_onnx_path(target: Path):
    """``atomic_path`` for an ONNX file and its side file of weights, if it has one: the side file is renamed
    into place first (and the model's reference to it rewritten), then the model."""
    with atomic_path(target) as tmp:
        try:
            yield tmp
            if side_file(tmp).exists():
                _publish_side_file(tmp, target)
        finally:
            side_file(tmp).unlink(missing_ok=True)


def _publish_side_file(tmp: Path, target: Path) -> None:
    import onnx

    from ..outputs import output_kind

    dest = side_file(target)
    if dest.exists() and output_kind(target) != "onnx":
        raise SlimkitError(f"{dest} already exists and slimkit did not write it (it would hold the weights of "
                           f"{target.name}): move it away or choose another path")
    proto = onnx.load(str(tmp), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = dest.name
    onnx.save(proto, str(tmp))  # references only: the weights stay in the side file
    os.replace(side_file(tmp), dest)


def strip_debug_info(proto) -> None:
    """Drop the exporter's provenance (per node, and the exported program's signature on the graph) and
    intermediate shape annotations: bytes that are not the model."""
    del proto.graph.metadata_props[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


def shorten_names(proto) -> None:
    """Rename every internal value to a short name and drop node names: in a small quantized model the
    exporter's names (``fake_quantize_per_tensor_affine_12``) are a measurable share of the file."""
    graph = proto.graph
    keep = {v.name for v in (*graph.input, *graph.output)} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            n, digits = len(names), ""
            while True:
                n, r = divmod(n, 36)
                digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
                if n == 0:
                    break
            names[name] = "_" + digits  # never clashes with a kept name unless that starts with "_"
        return names[name]

    if any(name.startswith("_") for name in keep - {""}):
        return
    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    sample: Inputs,
    verify_on: Inputs | None = None,
    atol: float = DEFAULT_ATOL,
    opset: int = DEFAULT_OPSET,
    *,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` (eval mode) to ``path``; verify ONNX Runtime against torch on ``verify_on``: the largest
    difference may be ``atol + rtol * max |output|`` (float sums differ in order between the two; deep models
    with large outputs differ more in absolute terms).

    An existing ONNX file slimkit wrote is replaced; anything else at ``path`` needs ``overwrite``."""
    model = model.eval()
    path = Path(path)
    check = verify_on if verify_on is not None else sample
    with claim_output(path, "onnx", overwrite=overwrite), atomic_onnx_path(path) as tmp:
        _export_graph(model, tmp, sample[:2] if len(sample) >= 2 else sample, opset)
        expected = run_torch(model, check).numpy()
        got = run_ort(ort_session(tmp), check)
        diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        allowed = atol + rtol * scale
        if not diff <= allowed:
            raise SlimkitError(
                f"ONNX export of {type(model).__name__} does not match torch: max abs diff {diff:.3g} > allowed "
                f"{allowed:.3g} (atol {atol:g} + rtol {rtol:g} x max |output| {scale:.3g})")
    return ExportResult(path, diff, len(check), allowed)
