"""Recovery training that keeps what compression did: fine-tuning or distilling a compressed model.

Plain training would undo compression: pruned zeros regrow, shared values drift apart,
quantized weights leave their grids. Inside ``compression_kept(model)``:

* a quantized model trains its float weights through its fixed quantizers (straight-through
  gradients; scales and zero points stay), and on exit every weight goes back on its grid
  and every bias on its int32 grid, so the model still is exactly what the runtime executes;
* a weight or bias with at most 256 distinct values, each used twice or more on average
  (weight sharing), trains its shared values, the assignments fixed (half-precision codebooks
  are rounded back to half precision on exit);
* any other conv/linear weight holding exact zeros (pruning) trains through a mask of its
  non-zeros.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import fx, nn

from ..errors import SlimkitError
from ..pruning.mask import remove_masks, set_mask
from ..quant.ptq import PLAN_OP, is_quantized, round_onto_grids
from ..share.cluster import remove_sharing, round_to_half, share_centroids

SHARED_MAX_VALUES = 256  # the most distinct values a weight-shared layer has (8-bit codes)
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@contextlib.contextmanager
def compression_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Train ``model`` inside this context without undoing its pruning, weight sharing or quantization."""
    if is_quantized(model):
        with _quantized_trainable(model):
            yield model
        return
    shared, masked, half = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHTED) or torch.nn.utils.parametrize.is_parametrized(module):
            continue
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind)
            if tensor is None:
                continue
            values = tensor.detach()
            distinct = int(torch.unique(values).numel())
            if distinct <= SHARED_MAX_VALUES and int((values != 0).sum()) >= 2 * distinct:  # values really shared
                shared.append(f"{name}.{kind}" if name else kind)
                if torch.equal(round_to_half(values), values):
                    half.append(shared[-1])
            elif kind == "weight" and bool((values == 0).any()):
                set_mask(module, (values != 0).to(values.dtype))
                masked.append(module)
    share_centroids(model, shared, SHARED_MAX_VALUES)
    try:
        yield model
    finally:
        remove_sharing(model)
        for module in masked:
            remove_masks(module)
        with torch.no_grad():
            for name in half:
                tensor = model.get_parameter(name)
                tensor.copy_(round_to_half(tensor))


@contextlib.contextmanager
def _quantized_trainable(gm: nn.Module) -> Iterator[nn.Module]:
    step = next(s for s in reversed(gm.slimkit_meta["plan"]) if s.get("op") == PLAN_OP)
    if not isinstance(gm, fx.GraphModule):
        raise SlimkitError("cannot train this quantized model: it is not slimkit's quantized graph")
    if step.get("weight_levels") == "log":
        raise SlimkitError("cannot train a model with power-of-two weights: it would leave its levels "
                           "(quantize with qat instead)")
    masked = []
    for name in step["weights"]:
        weight = gm.get_parameter(name).detach()
        if bool((weight == 0).any()):  # a pruned, then quantized model: its zeros stay zeros
            owner, _, attr = name.rpartition(".")
            set_mask(gm.get_submodule(owner), (weight != 0).to(weight.dtype), attr)
            masked.append(gm.get_submodule(owner))
    gm.requires_grad_(True)
    try:
        yield gm
    finally:
        for module in masked:
            remove_masks(module)
        gm.requires_grad_(False)
        round_onto_grids(gm, step)
