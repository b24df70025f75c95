"""Pruning: importance criteria, masks, unstructured and N:M sparsity, schedules."""

from .importance import weight_importance
from .mask import get_mask, masked_layers, remove_masks, set_mask
from .unstructured import PruneConfig, prune_weights, sparsity_of

__all__ = [
    "PruneConfig", "get_mask", "masked_layers", "prune_weights", "remove_masks", "set_mask", "sparsity_of",
    "weight_importance",
]
