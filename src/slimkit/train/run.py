"""Train a model into a run directory: ``model/``, ``metrics.json`` and ``checkpoint/``.

The run directory layout is shared with the recipe runner, and every command
that takes a model directory also takes a run directory (it uses ``model/``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Splits, make_loader
from ..io import write_json_atomic
from ..modelfile import new_model, save
from ..models import ZOO
from .loop import TrainConfig, TrainResult, evaluate, fit

MODEL_SUBDIR = "model"
CHECKPOINT_SUBDIR = "checkpoint"
METRICS_FILE = "metrics.json"


def default_train_config(zoo_name: str | None, **overrides: Any) -> TrainConfig:
    """The zoo model's tuned settings, then the caller's overrides (``None`` values ignored)."""
    base = dict(ZOO[zoo_name].train) if zoo_name in ZOO else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


def build_seeded(arch: dict[str, Any] | str, seed: int, splits: Splits, trust_code: bool = False) -> nn.Module:
    """Initialise a model from ``seed`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_model(arch, trust_code=trust_code, input_shape=list(splits.input_shape),
                         num_classes=splits.num_classes, data=splits.name)


def split_metrics(model: nn.Module, splits: Splits, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and loss on train, val and test."""
    out: dict[str, float] = {}
    for which in ("train", "val", "test"):
        for key, value in evaluate(model, make_loader(splits, which, batch_size)).items():
            out[f"{which}_{key}"] = value
    return out


def train_loaders(splits: Splits, cfg: TrainConfig):
    train = make_loader(splits, "train", cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment)
    return train, make_loader(splits, "val", 256)


def train_model(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    description: str = "train",
) -> dict[str, Any]:
    """Fit ``model`` on ``splits``, save the best-on-val weights and metrics under ``out_dir``."""
    out = Path(out_dir)
    train, val = train_loaders(splits, cfg)
    started = time.perf_counter()
    result: TrainResult = fit(
        model, train, val, cfg, checkpoint_dir=out / CHECKPOINT_SUBDIR, resume=resume,
        progress=progress, description=description,
    )
    seconds = time.perf_counter() - started
    metrics = {**split_metrics(model, splits), "best_epoch": result.best_epoch, "epochs": cfg.epochs,
               "train_seconds": seconds,
               "config": cfg.to_dict(), "history": result.history}
    save(model, out / MODEL_SUBDIR)
    write_json_atomic(out / METRICS_FILE, metrics)
    return metrics
