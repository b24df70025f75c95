"""Distill a teacher into a student with the shared training loop; build students from a spec."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import SlimkitError
from ..task import Task
from ..train.compressed import compression_kept
from ..train.loop import TrainConfig, TrainResult, fit
from .distiller import DistillConfig, Distiller


def parse_student_spec(spec: str | dict[str, Any]) -> dict[str, Any] | Path:
    """``"lenet5:width=0.25"`` or ``{"zoo": "vit", "args": {"depth": 2}}`` -> an architecture; a path stays a path.

    Arguments are YAML scalars (``depth=2``, ``width=0.5``, ``hidden=[64,32]``).
    """
    if isinstance(spec, dict):
        return dict(spec)
    if os.path.exists(spec):
        return Path(spec)
    name, _, rest = spec.partition(":")
    args = {}
    for item in filter(None, (part.strip() for part in _split_args(rest))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SlimkitError(f"student spec {spec!r}: expected name:key=value,..., got {item!r}")
        try:
            args[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SlimkitError(f"student spec {spec!r}: cannot read the value of {key.strip()!r}") from None
    return {"zoo": name.strip(), "args": args}


def _split_args(text: str) -> list[str]:
    """Split on commas outside brackets (``hidden=[64,32],width=2``)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def build_student(spec: str | dict[str, Any], task: Task, seed: int = 0, trust_code: bool = False) -> nn.Module:
    """A fresh student from an architecture spec, or a saved model (a pruned or quantized one) from a path."""
    from ..modelfile import load
    from ..train.run import build_seeded

    parsed = parse_student_spec(spec)
    if isinstance(parsed, Path):
        return load(parsed, trust_code=trust_code)
    return build_seeded(parsed, seed, task, trust_code)


def distill(student: nn.Module, teacher: nn.Module, task: Task, cfg: DistillConfig | None = None,
            train: TrainConfig | None = None, *, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False, progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Train ``student`` from ``teacher`` (and the labels); returns the student with its best validation weights.

    The teacher is not modified (one-way distillation uses it frozen; mutual distillation trains a copy).
    A compressed student keeps its compression (``train.compressed``): pruned zeros, shared values, grids.
    """
    cfg, train = cfg or DistillConfig(), train or TrainConfig()
    if student is teacher:
        raise SlimkitError("the student and the teacher are the same model")
    device = next((p.device for p in student.parameters()), None)
    teacher = copy.deepcopy(teacher).to(device) if device is not None else copy.deepcopy(teacher)
    distiller = Distiller(student, teacher, cfg, task.example_inputs, hard_loss=task.loss_fn)
    try:
        with compression_kept(student):  # a pruned, shared or quantized student stays so
            result = fit(distiller, task.train_batches(train), None, train,
                         score_fn=lambda m: task.val_score(m.student), loss_fn=distiller.loss,
                         checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, description="distill")
    finally:
        student = distiller.close()
    return student.eval(), result
