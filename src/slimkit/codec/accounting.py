"""Where a ``.slim`` file's bytes go, per layer, in the terms of Deep Compression's tables."""

from __future__ import annotations

import math
from typing import Any

import torch

from .state import SEP

POSITION_STREAMS = {"gaps", "bitmask"}
VALUE_STREAMS = {"codes", "values", "int8", "int4"}


def accounting(state: dict[str, torch.Tensor], stats: dict[str, Any]) -> dict[str, Any]:
    """Per-layer rows: parameters, weights kept, bits per kept weight and per index, codebook bytes,
    compressed bytes and the ratio to fp32 (4 bytes per parameter); plus the totals.

    ``state`` is the decoded model, ``stats`` what ``write_container`` returned.
    """
    layers: dict[str, dict[str, Any]] = {}

    def row(tensor: str) -> dict[str, Any]:
        layer = tensor.rpartition(".")[0] or tensor
        return layers.setdefault(layer, {"layer": layer, "params": 0, "weights": 0, "kept": 0, "value_bytes": 0,
                                         "index_bytes": 0, "codebook_bytes": 0, "compressed_bytes": 0})

    for name, tensor in state.items():
        r = row(name)
        r["params"] += tensor.numel()
        if name.endswith("weight") and tensor.dim() >= 2:
            r["weights"] += tensor.numel()
            r["kept"] += int((tensor != 0).sum())
    for stream in stats["streams"]:
        owner, _, kind = stream["stream"].rpartition(SEP)
        r = row(owner or stream["stream"])
        r["compressed_bytes"] += stream["bytes"]
        if owner.endswith("weight"):
            key = {"codebook": "codebook_bytes", **{k: "index_bytes" for k in POSITION_STREAMS},
                   **{k: "value_bytes" for k in VALUE_STREAMS}}.get(kind)
            if key:
                r[key] += stream["bytes"]
        elif stream["stream"].endswith("weight"):  # stored plain: all values, no index
            r["value_bytes"] += stream["bytes"]
    rows = []
    for r in layers.values():
        kept = max(r["kept"], 1)
        rows.append({"layer": r["layer"], "params": r["params"],
                     "weights_kept": r["kept"] / r["weights"] if r["weights"] else math.nan,
                     "bits_per_weight": 8 * r["value_bytes"] / kept if r["weights"] else math.nan,
                     "bits_per_index": 8 * r["index_bytes"] / kept if r["weights"] else math.nan,
                     "codebook_bytes": r["codebook_bytes"], "compressed_bytes": r["compressed_bytes"],
                     "ratio": 4 * r["params"] / max(r["compressed_bytes"], 1)})
    params = sum(r["params"] for r in rows)
    return {"layers": rows, "params": params, "header_bytes": stats["header_bytes"],
            "file_bytes": stats["file_bytes"], "ratio_vs_fp32": 4 * params / stats["file_bytes"]}
