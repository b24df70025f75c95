"""Importance of each weight: higher means keep.

* ``l1`` / ``l2``: magnitude ``|w|`` / ``w^2`` (same ranking per weight; they
  differ when weights are grouped into channels).
* ``taylor``: first-order Taylor estimate of the loss change, ``|w * dL/dw|``,
  accumulated over a few batches.
* ``random``: a seeded control.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import call
from ..models.outputs import prediction
from ..train.loop import Batch, LossFn
from .mask import original_weight

METHODS = ("l1", "l2", "taylor", "random")


def weight_importance(
    layers: list[tuple[str, nn.Module]],
    method: str,
    *,
    model: nn.Module | None = None,
    batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-weight scores for each selected layer, shaped like its weight."""
    if method not in METHODS:
        hint = " (bn-scale ranks whole channels: use structured pruning)" if method == "bn-scale" else ""
        raise SlimkitError(f"importance {method!r} does not apply to single weights{hint}; "
                           f"choose one of {', '.join(METHODS)}")
    if method == "taylor":
        if model is None or batches is None:
            raise SlimkitError("taylor importance needs the model and a few batches of training data")
        return _taylor(model, layers, batches, loss_fn or nn.CrossEntropyLoss(), max_batches)
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name, module in layers:
        w = original_weight(module).detach()
        if method == "l1":
            scores[name] = w.abs()
        elif method == "l2":
            scores[name] = w.pow(2)
        else:
            scores[name] = torch.rand(w.shape, generator=gen)
    return scores


def gradient_magnitudes(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn,
                        max_batches: int = 8) -> dict[str, torch.Tensor]:
    """Sum over a few batches of |dL/dp| for every parameter (by name); the model is left as it was."""
    params = dict(model.named_parameters())
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for i, (x, y) in enumerate(batches):
            if i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(prediction(call(model, x)), y).backward()
            for name, p in params.items():
                if p.grad is not None:
                    grads[name] += p.grad.abs()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return grads


def _taylor(model, layers, batches, loss_fn, max_batches) -> dict[str, torch.Tensor]:
    """|w| * sum |dL/dw| = sum |w * dL/dw| (w does not change while scoring)."""
    grads = gradient_magnitudes(model, batches, loss_fn, max_batches)
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {name: original_weight(m).detach().abs() * grads[name_of[id(original_weight(m))]] for name, m in layers}
