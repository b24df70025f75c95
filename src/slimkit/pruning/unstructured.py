"""Unstructured and N:M weight pruning to a target sparsity, per layer or global.

Masks only grow: weights already pruned stay pruned when pruning again
(iterative and gradual schedules rely on this).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..config import Config
from ..errors import SlimkitError
from ..select import select_layers
from ..task import Task
from ..train.loop import TrainConfig
from .importance import weight_importance
from .mask import get_mask, original_weight, set_mask


class PruneConfig(Config):
    """What to prune and how much: ``sparsity`` is the fraction of selected weights set to zero.

    ``bn-scale`` ranks channels by their BatchNorm/LayerNorm scale, so it applies to structured pruning only.
    """

    method: Literal["l1", "l2", "bn-scale", "taylor", "random"] = "l1"
    sparsity: float = Field(0.5, ge=0, lt=1)
    scope: Literal["layer", "global"] = "layer"
    nm: str | None = None
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("nm")
    @classmethod
    def _nm_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"(\d+):(\d+)", value)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"expected 'N:M' with 0 < N < M, like '2:4', got {value!r}")
        return value

    @field_validator("layer_sparsity")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"layer sparsities must be in [0, 1), got {bad}")
        return value


def prune_weights(model: nn.Module, cfg: PruneConfig, task: Task | None = None,
                  sparsity: float | None = None) -> dict[str, Any]:
    """Attach masks per ``cfg`` (``sparsity`` overrides ``cfg.sparsity``); returns per-layer results."""
    layers = select_layers(model, cfg.include, cfg.exclude)
    unknown = set(cfg.layer_sparsity) - {name for name, _ in layers}
    if unknown:
        raise SlimkitError(f"layer_sparsity names layers that are not selected: {sorted(unknown)}")
    batches = task.train_batches(TrainConfig(seed=cfg.seed)) if task is not None and cfg.method == "taylor" else None
    scores = weight_importance(layers, cfg.method, model=model, batches=batches,
                               loss_fn=task.loss_fn if task else None, seed=cfg.seed)
    for name, module in layers:  # already-pruned weights rank below everything
        mask = get_mask(module)
        if mask is not None:
            scores[name] = torch.where(mask.bool(), scores[name], torch.full_like(scores[name], -1.0))
    target = cfg.sparsity if sparsity is None else sparsity
    if cfg.nm is not None:
        masks, skipped = _nm_masks(layers, scores, cfg.nm)
    elif cfg.scope == "global":
        masks, skipped = _global_masks(scores, target), {}
    else:
        masks = {name: _lowest_out(s, cfg.layer_sparsity.get(name, target)) for name, s in scores.items()}
        skipped = {}
    for name, module in layers:
        if name in masks:
            previous = get_mask(module)
            set_mask(module, masks[name] if previous is None else masks[name] * previous)
    return {
        "layers": {name: {"sparsity": sparsity_of(model, [name]), "weights": m.numel()} for name, m in masks.items()},
        "skipped": skipped,
        "sparsity": sparsity_of(model, [n for n, _ in layers]),
    }


def sparsity_of(model: nn.Module, names: list[str]) -> float:
    """Fraction of zeros in the effective weights of the named layers."""
    modules = dict(model.named_modules())
    total = zeros = 0
    for name in names:
        w = modules[name].weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(1, total)


def _lowest_out(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask zeroing exactly round(sparsity * n) lowest-scoring entries (ties broken by position)."""
    flat = scores.reshape(-1)
    k = round(sparsity * flat.numel())
    mask = torch.ones_like(flat)
    if k:
        mask[torch.argsort(flat, stable=True)[:k]] = 0
    return mask.reshape(scores.shape)


def _global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = _lowest_out(torch.cat([scores[n].reshape(-1) for n in names]), sparsity)
    masks, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        masks[name] = flat[offset : offset + n].reshape(scores[name].shape)
        offset += n
    return masks


def _nm_masks(layers, scores, pattern: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the N highest of every M consecutive weights along the input dimension."""
    n, m = (int(v) for v in pattern.split(":"))
    masks, skipped = {}, {}
    for name, module in layers:
        weight = original_weight(module)
        in_dim = weight.shape[1]
        if in_dim % m:
            skipped[name] = f"input dimension {in_dim} is not a multiple of {m}"
            continue
        # move the input dimension last: (out, in) or (out, in, *k) -> (out, *k, in)
        s = scores[name].movedim(1, -1)
        groups = s.reshape(-1, m)
        keep = torch.zeros_like(groups)
        keep.scatter_(1, torch.topk(groups, n, dim=1).indices, 1.0)
        masks[name] = keep.reshape(s.shape).movedim(-1, 1).contiguous()
    if skipped:
        warnings.warn(f"N:M {pattern} skipped layers: {skipped}", stacklevel=3)
    return masks, skipped
