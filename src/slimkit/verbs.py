"""One verb per compression method, on any ``nn.Module``: the recipe stages, called from Python.

Each verb takes the config class its recipe stage uses (or a mapping of the stage's fields, or the
fields as keyword arguments), so a recipe stage and a Python call are one thing::

    small = slimkit.prune(model, slimkit.PruneStage(sparsity=0.9, scope="global"))
    small = slimkit.prune(model, sparsity=0.9, scope="global")          # the same
    q = slimkit.quantize(model, scheme="int8-static", calib=loader)

Data (``data``, ``calib``) is anything ``task.as_task`` takes: ``Splits``, a ``Task``, a DataLoader or
any iterable of batches (``transform_fn`` turns dict or tuple batches into inputs or
``(inputs, labels)``; a text model takes a tokenizer's dict batches without one), a tensor of inputs, or
nothing where the method needs none. Methods that
train (fine-tuning, AGP schedules, QAT, distillation) need labels and a validation score: pass
``Splits`` or ``Task.from_loaders(train, val)``.

The verb works on a copy: the model passed in is not changed. The result remembers its
architecture and plan (``slimkit_meta``) whenever the input did (a model from ``new_model`` or
``load``: zoo, factory or Hugging Face), so ``slimkit.save`` and ``slimkit.load`` round-trip it, and
what the stage decided (kept channels, bits, ranks, the int8 export check) is in
``result.slimkit_notes``. Training checkpoints go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import nn

from .config import describe_errors
from .distillation.stage import DistillStage
from .errors import SlimkitError
from .inputs import remember_signature
from .lowrank.stage import FactorizeStage
from .pruning.stage import PruneStage
from .quant.stage import QuantizeStage
from .share.stage import ClusterStage
from .stages import Stage, StageContext, apply_stage, copy_model
from .task import as_task

Transform = Callable[[Any], Any] | None


def prune(model: nn.Module, config: PruneStage | dict | None = None, data: Any = None, *,
          transform_fn: Transform = None, device: str | torch.device | None = None, progress: bool = False,
          **fields: Any) -> nn.Module:
    """Unstructured, N:M or (``structured=True``) channel/head pruning; see ``PruneStage`` for the fields."""
    return _run(PruneStage, model, config, fields, data, transform_fn, device, progress)


def quantize(model: nn.Module, config: QuantizeStage | dict | None = None, calib: Any = None, *,
             transform_fn: Transform = None, device: str | torch.device | None = None, progress: bool = False,
             **fields: Any) -> nn.Module:
    """int8/int4 quantization with slimkit's own scales, calibrated on ``calib`` (``calib`` samples of it) and
    checked against ONNX Runtime's integer model; see ``QuantizeStage``."""
    return _run(QuantizeStage, model, config, fields, calib, transform_fn, device, progress)


def cluster(model: nn.Module, config: ClusterStage | dict | None = None, data: Any = None, *,
            transform_fn: Transform = None, device: str | torch.device | None = None, progress: bool = False,
            **fields: Any) -> nn.Module:
    """Weight sharing (per-layer codebooks); see ``ClusterStage``."""
    return _run(ClusterStage, model, config, fields, data, transform_fn, device, progress)


def factorize(model: nn.Module, config: FactorizeStage | dict | None = None, data: Any = None, *,
              transform_fn: Transform = None, device: str | torch.device | None = None, progress: bool = False,
              **fields: Any) -> nn.Module:
    """Low-rank factorization (truncated SVD) of linear and convolution layers; see ``FactorizeStage``."""
    return _run(FactorizeStage, model, config, fields, data, transform_fn, device, progress)


def distill(student: nn.Module, teacher: nn.Module, data: Any, config: DistillStage | dict | None = None, *,
            transform_fn: Transform = None, device: str | torch.device | None = None, progress: bool = False,
            **fields: Any) -> nn.Module:
    """Train ``student`` (a copy) from ``teacher``'s outputs, features or attention maps; see ``DistillStage``.
    A compressed student stays compressed."""
    fields = {"teacher": "baseline", **fields}
    return _run(DistillStage, student, config, fields, data, transform_fn, device, progress, teacher=teacher)


def stage_config(cls: type[Stage], config: Stage | dict | None, fields: dict[str, Any]) -> Stage:
    """The stage config from an instance, a mapping or keyword fields (the later overriding the earlier)."""
    if config is not None and not isinstance(config, (cls, dict)):
        raise SlimkitError(f"config must be a {cls.__name__} or a mapping of its fields, got {type(config).__name__}")
    base = config.model_dump(exclude_unset=True) if isinstance(config, Stage) else dict(config or {})
    try:
        return cls.model_validate({**base, **fields})
    except ValidationError as exc:
        raise SlimkitError(f"{cls.__name__}: " + "; ".join(describe_errors(exc, "", cls))) from None


def _run(cls: type[Stage], model: nn.Module, config, fields: dict[str, Any], data: Any, transform_fn: Transform,
         device, progress: bool, teacher: nn.Module | None = None) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"expected a torch.nn.Module to compress, got {type(model).__name__}")
    stage = stage_config(cls, config, fields)
    task = as_task(data, transform_fn, model)
    task.check_model(model)
    with tempfile.TemporaryDirectory(prefix="slimkit-") as folder:
        ctx = StageContext(task, Path(folder), Path(folder) / stage.type, progress=progress, baseline=teacher,
                           device=torch.device(device) if device else None)
        result = apply_stage(stage, copy_model(model), ctx)
    remember_signature(result, task.input_shape)
    result.slimkit_notes = ctx.notes
    return result
