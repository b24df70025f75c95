"""What each layer of the baseline became: the per-layer decisions of a run, read off the two models.

One row per layer that owns parameters: its weight's shape before and after (channels kept by
structured pruning; the factors of a factorized layer), parameters and non-zero parameters, weight
sparsity, weight bits (quantization), distinct weight values (weight sharing), rank (factorization),
the layer a BatchNorm was folded into, and the bytes its tensors take in the final model directory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codec.state import MAX_CODEBOOK, SEP


def _own_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if list(module.parameters(recurse=False))}


def _plan_facts(final: nn.Module) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(weight bits, factorization rank, folded-into layer) per layer name, from the final model's plan."""
    bits, ranks, folded = {}, {}, {}
    for step in getattr(final, "slimkit_meta", {}).get("plan", []):
        if step.get("op") == "quantize-static":
            for weight, spec in step["weights"].items():
                bits[weight.rpartition(".")[0]] = spec.get("bits", step.get("weight_bits", 8))
            folded.update({bn: conv for conv, bn in step["folded_batchnorm"]})
        elif step.get("op") == "factorize":
            ranks.update({name: spec["rank"] for name, spec in step["layers"].items()})
    return bits, ranks, folded


def layer_bytes(stored: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of each layer's stored tensors (all the streams of its encoded tensors), by layer name."""
    out: dict[str, int] = {}
    for key, tensor in stored.items():
        layer = key.split(SEP)[0].rpartition(".")[0]
        out[layer] = out.get(layer, 0) + tensor.numel() * tensor.element_size()
    return out


def layer_decisions(baseline: nn.Module, final: nn.Module, stored: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    before, after = _own_layers(baseline), _own_layers(final)
    bits, ranks, folded = _plan_facts(final)
    sizes = layer_bytes(stored)
    names = list(before) + [name for name in after if name not in before and not _part_of(name, before)]
    rows = []
    for name in names:
        parts = [m for n, m in after.items() if n == name or (name and n.startswith(name + ".") and n not in before)]
        shapes = [_shape(m) for m in parts if _shape(m) is not None]
        weights = [m.weight.detach() for m in parts if _shape(m) is not None and m.weight.dim() >= 2]  # not norms
        old = before.get(name)
        flat = torch.cat([w.reshape(-1) for w in weights]) if weights else torch.zeros(0)
        nonzero = flat[flat != 0]
        distinct = _shared_values(weights)
        rows.append({
            "layer": name or type(baseline).__name__,
            "type": type(old if old is not None else parts[0]).__name__,
            "weight_before": _shape(old),
            "weight_after": shapes,
            "params_before": _params(old),
            "params_after": sum(_params(m) for m in parts),
            "nonzero_after": sum(int(torch.count_nonzero(p)) for m in parts for p in m.parameters(recurse=False)),
            "sparsity": float(1 - nonzero.numel() / flat.numel()) if flat.numel() else None,
            "bits": bits.get(name),
            "shared_values": distinct if name not in bits else None,  # (a quantized layer's values: its grid)
            "rank": ranks.get(name),
            "folded_into": folded.get(name),
            "bytes": sum(v for k, v in sizes.items() if k == name or k.startswith(name + ".")) if name else
            sizes.get("", 0),
        })
    return rows


def _shared_values(weights: list[torch.Tensor]) -> int | None:
    """The largest codebook among the weights (each tensor has its own), when every weight has few distinct
    non-zero values, each used more than once: a shared (clustered) layer; None otherwise."""
    counts = []
    for weight in weights:
        nonzero = weight[weight != 0]
        distinct = int(torch.unique(nonzero).numel())
        if not 0 < distinct <= MAX_CODEBOOK or distinct >= nonzero.numel():
            return None
        counts.append(distinct)
    return max(counts) if counts else None


def _part_of(name: str, layers: dict[str, nn.Module]) -> bool:
    """A module the final model added inside a baseline layer (the factors of a factorized layer)."""
    return any(name.startswith(layer + ".") for layer in layers if layer)


def _shape(module: nn.Module | None) -> list[int] | None:
    weight = getattr(module, "weight", None)
    return list(weight.shape) if isinstance(weight, torch.Tensor) else None


def _params(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False)) if module is not None else 0
