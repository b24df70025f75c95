"""Store sparse tensors sparse: a bitmask or relative indices plus the non-zero values.

Each tensor gets whichever encoding is smallest in bytes (dense included), so a
pruned model's file really shrinks and a dense one is unchanged. Decoding
restores the exact tensor, zeros and all.

* ``bitmask``: one bit per element (``numpy.packbits``) + the non-zero values.
* ``indices``: the gap to the previous non-zero as ``uint8`` (Deep Compression's
  relative indices); a gap over 255 inserts an explicit zero as filler.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import SlimkitError

MAX_GAP = 255
SEP = "::"


def _bitmask_bytes(numel: int, nnz: int, itemsize: int) -> int:
    return math.ceil(numel / 8) + nnz * itemsize


def _gaps(flat_nonzero: np.ndarray) -> np.ndarray:
    """Positions -> gaps, with filler positions inserted wherever a gap exceeds ``MAX_GAP``."""
    positions = np.concatenate([[-1], flat_nonzero])
    gaps = np.diff(positions)
    fillers = (gaps - 1) // MAX_GAP
    if not fillers.any():
        return gaps
    out = np.full(int((fillers + 1).sum()), MAX_GAP, dtype=gaps.dtype)
    out[np.cumsum(fillers + 1) - 1] = gaps - MAX_GAP * fillers
    return out


def _scale_grid(scale: torch.Tensor, shape: list[int], group_size: int | None) -> torch.Tensor:
    """A weight's scales spread to its shape: one per output channel, or per group of its flattened inputs."""
    if group_size:
        from ..quant.ops import expand_group_scale

        return expand_group_scale(scale, shape, group_size)
    return scale.reshape(-1, *([1] * (len(shape) - 1)))


def _as_int8(tensor: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor | None:
    """int8 codes if ``tensor`` is exactly ``codes * scale`` (a quantized weight), else None."""
    s = _scale_grid(scale, list(tensor.shape), group_size)
    codes = torch.round(tensor / s)
    if codes.abs().max() > 127 or not torch.equal(codes * s, tensor):
        return None
    return codes.to(torch.int8)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes, two per byte (low nibble first)."""
    flat = (codes.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.zeros(1, dtype=torch.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel].to(torch.int16)
    if nibbles.numel() != numel:
        raise ValueError("packed 4-bit codes are too short")
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def encode_state(state: dict[str, torch.Tensor],
                 int8_scales: dict[str, tuple[torch.Tensor, int | None]] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Encode each floating-point tensor in the smallest lossless form; returns tensors and their encodings.

    ``int8_scales`` names weights a quantization plan says are integer codes times scales
    (``(scales, group_size)``: per channel when the group size is None): those are stored as
    int8 or packed int4 codes (and checked to decode to exactly the same values).
    """
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if SEP in name:
            raise SlimkitError(f"tensor name {name!r} contains the reserved separator {SEP!r}")
        scale, group_size = int8_scales[name] if int8_scales and name in int8_scales else (None, None)
        codes = _as_int8(tensor, scale, group_size) if scale is not None else None
        if codes is not None:
            tensors[name + SEP + "scale"] = scale.float().contiguous()
            meta = {"shape": list(tensor.shape), **({"group_size": group_size} if group_size else {})}
            if int(codes.min()) >= -8 and int(codes.max()) <= 7:  # 4-bit codes: two per byte
                tensors[name + SEP + "int4"] = _pack_int4(codes)
                encodings[name] = {"encoding": "int4-channel", **meta}
            else:
                tensors[name + SEP + "int8"] = codes
                encodings[name] = {"encoding": "int8-channel", **meta}
            continue
        if not tensor.is_floating_point() or tensor.numel() < 64:
            tensors[name] = tensor
            continue
        flat = tensor.detach().reshape(-1)
        nonzero = torch.nonzero(flat).reshape(-1).numpy()
        itemsize = tensor.element_size()
        dense = flat.numel() * itemsize
        bitmask = _bitmask_bytes(flat.numel(), len(nonzero), itemsize)
        gaps = _gaps(nonzero)
        indices = len(gaps) * (1 + itemsize)
        if min(bitmask, indices) >= dense:
            tensors[name] = tensor
            continue
        meta = {"shape": list(tensor.shape)}
        if indices < bitmask:
            positions = np.cumsum(gaps) - 1
            tensors[name + SEP + "gaps"] = torch.from_numpy(gaps.astype(np.uint8))
            tensors[name + SEP + "values"] = flat[torch.from_numpy(positions)].clone()
            encodings[name] = {"encoding": "indices", **meta}
        else:
            mask = np.zeros(flat.numel(), dtype=bool)
            mask[nonzero] = True
            tensors[name + SEP + "bitmask"] = torch.from_numpy(np.packbits(mask))
            tensors[name + SEP + "values"] = flat[torch.from_numpy(nonzero)].clone()
            encodings[name] = {"encoding": "bitmask", **meta}
    return tensors, encodings


def decode_state(tensors: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]], source: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`; any inconsistency is a clear error naming the tensor."""
    state = {k: v for k, v in tensors.items() if SEP not in k}
    for name, enc in encodings.items():
        try:
            shape = [int(d) for d in enc["shape"]]
            numel = math.prod(shape)
            if enc["encoding"] in ("int8-channel", "int4-channel"):
                scale = tensors[name + SEP + "scale"]
                codes = (tensors[name + SEP + "int8"] if enc["encoding"] == "int8-channel"
                         else _unpack_int4(tensors[name + SEP + "int4"], numel))
                state[name] = codes.float().reshape(shape) * _scale_grid(scale, shape, enc.get("group_size"))
                continue
            values = tensors[name + SEP + "values"]
            if enc["encoding"] == "bitmask":
                bits = np.unpackbits(tensors[name + SEP + "bitmask"].numpy(), count=numel).astype(bool)
                positions = np.flatnonzero(bits)
            elif enc["encoding"] == "indices":
                positions = np.cumsum(tensors[name + SEP + "gaps"].numpy().astype(np.int64)) - 1
            else:
                raise ValueError(f"unknown encoding {enc['encoding']!r}")
            if len(positions) != values.numel() or (len(positions) and positions[-1] >= numel):
                raise ValueError("positions do not match the values")
        except (KeyError, ValueError, TypeError) as exc:
            raise SlimkitError(f"{source}: sparse tensor '{name}' is corrupt ({exc})") from None
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(positions)] = values
        state[name] = flat.reshape(shape)
    return state
