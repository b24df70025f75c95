"""Mixed precision: choose each layer's weight bits from a measured sensitivity to meet a size budget.

Each layer is quantized alone at the low bit width (every other layer at the high one) and
the drop in validation score is measured. Layers then move to the low width in order of
drop per byte saved, until the weights fit ``budget`` (a fraction of their fp32 bytes:
8-bit weights are 0.25, 4-bit 0.125).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs
from ..task import Task
from .ptq import StaticQuantConfig, quantize_static


def allocate_bits(model: nn.Module, task: Task, calib: Inputs, budget: float,
                  cfg: StaticQuantConfig | None = None, low: int = 4, high: int = 8) -> dict[str, Any]:
    """``{"layer_bits": {layer: bits}, "sensitivity": [...], "weight_fraction": achieved}``."""
    cfg = cfg or StaticQuantConfig()
    if not low / 32 <= budget <= high / 32:
        raise SlimkitError(f"size budget {budget} is outside what {low}-{high} bit weights can reach "
                           f"({low / 32:.4f}-{high / 32:.4f} of fp32)")
    base_cfg = cfg.model_copy(update={"weight_bits": high, "layer_bits": {}})
    _, step = quantize_static(model, calib, base_cfg)
    layers = {name.rpartition(".")[0]: name for name in step["weights"]}
    sizes = {layer: _numel(model, name) for layer, name in layers.items()}
    reference = task.val_score(quantize_static(model, calib, base_cfg)[0])
    rows = []
    for layer in layers:
        trial = cfg.model_copy(update={"weight_bits": high, "layer_bits": {layer: low}})
        drop = reference - task.val_score(quantize_static(model, calib, trial)[0])
        rows.append({"layer": layer, "weights": sizes[layer], "drop": drop})
    total = sum(sizes.values())
    bits = {layer: high for layer in layers}
    for row in sorted(rows, key=lambda r: (r["drop"] / r["weights"], -r["weights"])):
        if sum(bits[l] * sizes[l] for l in bits) / (32 * total) <= budget:
            break
        bits[row["layer"]] = low
    achieved = sum(bits[l] * sizes[l] for l in bits) / (32 * total)
    return {"layer_bits": bits, "sensitivity": rows, "weight_fraction": achieved, "reference": reference}


def _numel(model: nn.Module, weight: str) -> int:
    """Weight count in the original model (BatchNorm folding does not change conv weight shapes)."""
    return dict(model.named_parameters())[weight].numel()
