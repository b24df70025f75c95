"""Pruning masks as a reversible reparametrization (``torch.nn.utils.parametrize``).

While a mask is attached the layer computes with ``weight * mask``: pruned
weights contribute nothing and receive zero gradient, and the original
``Parameter`` object stays the one the optimizer holds. :func:`remove_masks`
bakes the zeros in and detaches the parametrization, again keeping the
parameter's identity.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _mask_module(module: nn.Module, name: str) -> WeightMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p
    return None


def original_weight(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The trainable tensor behind ``module.<name>``, masked or not."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Attach (or replace) the mask of ``module.<name>``; 1 keeps a weight, 0 prunes it."""
    weight = original_weight(module, name)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    mask = mask.to(dtype=weight.dtype, device=weight.device)
    existing = _mask_module(module, name)
    if existing is not None:
        existing.mask.copy_(mask)
    else:
        parametrize.register_parametrization(module, name, WeightMask(mask), unsafe=True)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    existing = _mask_module(module, name)
    return None if existing is None else existing.mask


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if get_mask(m) is not None]


def remove_masks(model: nn.Module) -> nn.Module:
    """Make pruning permanent: weights become ``weight * mask`` and the parametrizations go."""
    for _, module in masked_layers(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
