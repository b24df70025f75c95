"""Train a model into a run directory: ``model/``, ``metrics.json`` and ``checkpoint/``.

The run directory layout is shared with the recipe runner, and every command
that takes a model directory also takes a run directory (it uses ``model/``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import remember_signature, signature_meta
from ..io import write_json_atomic
from ..outputs import claim_run
from ..modelfile import new_model, save
from ..models import ZOO
from .loop import TrainConfig, TrainResult, fit

if TYPE_CHECKING:
    from ..data import Splits
    from ..task import Task

MODEL_SUBDIR = "model"
CHECKPOINT_SUBDIR = "checkpoint"
METRICS_FILE = "metrics.json"


def default_train_config(zoo_name: str | None, **overrides: Any) -> TrainConfig:
    """The zoo model's tuned settings, then the caller's overrides (``None`` values ignored)."""
    base = dict(ZOO[zoo_name].train) if zoo_name in ZOO else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


def build_seeded(arch: dict[str, Any] | str, seed: int, task: "Task", trust_code: bool = False) -> nn.Module:
    """Initialise a model from ``seed`` without touching the caller's RNG."""
    meta: dict[str, Any] = {**signature_meta(task.input_shape), "data": task.name}
    if task.splits is not None:
        meta["num_classes"] = task.splits.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_model(arch, trust_code=trust_code, **meta)


def train_model(
    model: nn.Module,
    task: "Task | Splits | Iterable",
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    description: str = "train",
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit ``model`` on ``task`` (a ``Task``, ``Splits``, or labelled loaders: see ``as_task``), save the
    best-on-val weights and metrics under ``out_dir``.

    An existing run folder needs ``resume`` (continue from its checkpoint) or ``overwrite`` (start over).
    Under ``torchrun`` give each rank its own ``out_dir`` (``distributed.rank_folder``): rank 0's is the run's.
    """
    from ..task import as_task

    task = as_task(task)
    if not task.can_score:
        raise SlimkitError("train_model chooses the best epoch on validation data: pass Splits, a Task, or "
                           "Task.from_loaders(train, val)")
    with claim_run(out_dir, "train", overwrite=overwrite, resume=resume) as out:
        task.check_model(model)
        started = time.perf_counter()
        result: TrainResult = fit(
            model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, loss_fn=task.loss_fn,
            checkpoint_dir=out / CHECKPOINT_SUBDIR, resume=resume, progress=progress, description=description,
        )
        metrics = {**task.metrics(model), "best_epoch": result.best_epoch, "epochs": cfg.epochs,
                   "train_seconds": time.perf_counter() - started, "config": cfg.to_dict(), "history": result.history}
        remember_signature(model, task.input_shape)
        save(model, out / MODEL_SUBDIR)
        write_json_atomic(out / METRICS_FILE, metrics)
    return metrics
