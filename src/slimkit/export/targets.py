"""Deployment targets: every file format slimkit writes for a runtime, in one registry keyed by format name.

A target writes its file, opens it in its runtime and is verified against slimkit's model before the file is
put in place (``export_to``): a float file must match torch within ``atol + rtol x max |output|``, an fp16 file
must agree on the decision and keep the outputs' SQNR, an int8 file must match slimkit's int8 simulation (or be
no further from the float model than the simulation is). ``slimkit export``, the recipe's ``export`` stage and
``slimkit bench`` all go through here. A target's runtime is an optional extra, imported only when used.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, concat, flat, rows_of
from ..io import atomic_files
from ..outputs import claim_output

Precision = Literal["fp32", "fp16", "int8"]
FP16_MIN_AGREEMENT = 0.99  # fp16 weights must take the fp32 model's decision on nearly every sample
FP16_MIN_SQNR_DB = 30.0


class Runner:
    """A loaded file that maps a batch of inputs to outputs; ``batch`` is the only batch size it takes (files
    exported with a static batch), or None for any."""

    batch: int | None = None

    def run(self, x: Inputs) -> np.ndarray:  # one batch of ``batch`` rows (or any)
        raise NotImplementedError

    def __call__(self, x: Inputs, chunk: int = 256) -> np.ndarray:
        """Outputs for every row of ``x``: in chunks, a static-batch file's last chunk padded with its first rows."""
        size = self.batch or chunk
        outs = []
        for start in range(0, len(x), size):
            part = x[start : start + size]
            rows = len(part)
            if self.batch and rows < self.batch:
                part = concat([part, rows_of(x, self.batch - rows)])
            outs.append(np.asarray(self.run(part))[:rows])
        return np.concatenate(outs)


@dataclass(frozen=True)
class Target:
    """A format: the runtime that runs it, the extra that installs it, and how to write and open its files."""

    name: str
    runtime: str
    suffix: str
    precision: Precision
    extra: str
    modules: tuple[str, ...]  # what must import for the target to work
    write: Callable[[nn.Module, Path, Inputs, int], dict[str, Any]]  # (model, path, sample, batch) -> details
    open: Callable[[Path, int], Runner]  # (path, threads)
    static_batch: bool = False  # the file takes one batch size, chosen at export
    side_suffixes: tuple[str, ...] = ()  # files written beside it with its stem (OpenVINO's .bin)

    @property
    def kind(self) -> str:
        """The kind of output it writes (``outputs.KIND_NAMES``)."""
        return self.name.split("-")[0]

    def available(self) -> str | None:
        """None when the runtime imports here, else why not."""
        import importlib

        for module in self.modules:
            try:
                with quiet_native():  # their imports print notices about optional GPU kernels
                    importlib.import_module(module)
            except (SlimkitError, ImportError) as exc:
                return f"{module} does not import ({str(exc).splitlines()[0][:200]})"
        return None


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    from . import executorch, openvino, ort, tensorrt, tflite  # noqa: F401 - each registers its targets

    if name not in TARGETS:
        raise SlimkitError(f"unknown format {name!r}; known: {', '.join(sorted(TARGETS))}")
    target = TARGETS[name]
    missing = target.available()
    if missing:
        raise SlimkitError(f"format {name} needs {target.runtime}: {missing}; install it with "
                           f"pip install 'slimkit[{target.extra}]'")
    return target


def export_to(model: nn.Module, fmt: str, path: str | os.PathLike, inputs: Inputs, *, batch: int = 1,
              overwrite: bool = False, atol: float | None = None, rtol: float | None = None) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` at ``path``, verified on ``inputs`` in its runtime before it is put in place;
    returns what was written and how it compared. A failed check leaves nothing behind and says by how much it
    failed."""
    from ..quant.ptq import is_quantized

    target = get_target(fmt)
    if is_quantized(model) != (target.precision == "int8"):
        kind = "quantized" if is_quantized(model) else "float"
        raise SlimkitError(f"format {fmt} is for {'quantized' if target.precision == 'int8' else 'float'} models; "
                           f"this one is {kind}" + ("" if is_quantized(model) else ": quantize it first"))
    path = Path(path)
    model = model.eval()
    sample = inputs[:batch] if target.static_batch else inputs[:2]
    if target.static_batch and len(sample) < batch:
        raise SlimkitError(f"--batch {batch}: only {len(inputs)} inputs to export with")
    if target.side_suffixes and path.suffix != target.suffix:
        raise SlimkitError(f"{path}: {target.runtime} reads a {target.suffix} file with its "
                           f"{', '.join(target.side_suffixes)} beside it: name it NAME{target.suffix}")
    for suffix in target.side_suffixes:
        side = path.with_suffix(suffix)
        if side.exists() and not overwrite:
            raise SlimkitError(f"{side} already exists (it would hold {path.name}'s weights): choose another path, "
                               "or pass --overwrite (overwrite=True) to replace it")
    with claim_output(path, target.kind, overwrite=overwrite), atomic_files(path, target.side_suffixes) as tmp:
        with quiet_native():
            details = target.write(model, tmp, sample, batch)
            deployed = target.open(tmp, 1)(inputs)
        check = verify(model, deployed, inputs, target.precision, atol=atol, rtol=rtol)
    size = sum(p.stat().st_size for p in [path, *(path.with_suffix(x) for x in target.side_suffixes)] if p.exists())
    return {"format": fmt, "runtime": target.runtime, "file": str(path), "bytes": size,
            **({"batch": batch} if target.static_batch else {}), **details, "check": check}


def verify(model: nn.Module, deployed: np.ndarray, inputs: Inputs, precision: Precision, *,
           atol: float | None = None, rtol: float | None = None) -> dict[str, Any]:
    """How the runtime's outputs compare with slimkit's model; raises if they are not faithful."""
    from .onnx import DEFAULT_ATOL, DEFAULT_RTOL, run_torch
    from .qdq import agreement, compare_outputs, deployed_is_faithful, sqnr_db
    from ..models.text import is_embedder

    if precision == "int8":
        check = compare_outputs(model, deployed, inputs)
        if not deployed_is_faithful(check):
            raise SlimkitError(f"the int8 file does not match slimkit's simulation: top-1 agreement "
                               f"{check['top1_agreement']:.4f}, SQNR {check['sqnr_db']:.1f} dB on {len(inputs)} "
                               f"samples")
        return {"against": "slimkit's int8 simulation", **check}
    expected = run_torch(model, inputs).double().numpy()
    got = deployed.astype(np.float64)
    if got.shape != expected.shape:
        raise SlimkitError(f"the runtime's outputs have shape {list(got.shape)}, the model's {list(expected.shape)}")
    diff = float(np.abs(got - expected).max()) if expected.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    check = {"against": "the torch model", "samples": len(inputs), "max_abs_diff": diff,
             "top1_agreement": agreement(expected, got, is_embedder(model)), "sqnr_db": sqnr_db(expected, got)}
    if precision == "fp16":
        if check["top1_agreement"] < FP16_MIN_AGREEMENT or check["sqnr_db"] < FP16_MIN_SQNR_DB:
            raise SlimkitError(f"the fp16 file parts from the fp32 model: top-1 agreement "
                               f"{check['top1_agreement']:.4f} (at least {FP16_MIN_AGREEMENT}), SQNR "
                               f"{check['sqnr_db']:.1f} dB (at least {FP16_MIN_SQNR_DB:g})")
        return check
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    allowed = atol + rtol * scale
    if not diff <= allowed:
        raise SlimkitError(f"the file does not match torch: max abs diff {diff:.3g} > allowed {allowed:.3g} (atol "
                           f"{atol:g} + rtol {rtol:g} x max |output| {scale:.3g}); loosen --rtol/--atol if the "
                           "runtime's arithmetic is meant to differ")
    return {**check, "allowed": allowed}


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Silence what converters and runtimes print from native code (progress, banners) by pointing the process's
    stdout and stderr at a temporary file; a failure's message gets the last lines they printed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    printed = io.StringIO()  # what Python code prints, wherever sys.stdout points (a captured stream too)
    try:
        with tempfile.TemporaryFile(mode="w+b") as log, contextlib.redirect_stdout(printed), \
                contextlib.redirect_stderr(printed):
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            except SlimkitError:
                raise
            except Exception as exc:  # converters raise many types; name the cause, with their log's tail
                log.seek(0)
                text = log.read().decode(errors="replace") + printed.getvalue()
                tail = [line for line in text.splitlines() if line.strip()][-3:]
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise SlimkitError(f"{type(exc).__name__}: {first}"
                                   + (f" (its log: {' | '.join(t[:200] for t in tail)})" if tail else "")) from None
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def feed_arrays(x: Inputs) -> list[np.ndarray]:
    """The batch's tensors as contiguous arrays, in the order the exported graph takes them."""
    return [t.detach().contiguous().numpy() for t in flat(x)]
