"""Lossless storage of a model's tensors, each in whichever encoding is smallest in bytes.

Positions of the stored values: all of them (``dense``), a ``bitmask`` of the non-zeros
(one bit per element), or relative ``indices``: the gap to the previous non-zero as
``uint8`` (Deep Compression's relative indices; a gap over 255 inserts an explicit zero
as filler). Values: raw, or (at most 256 distinct values: a clustered layer) a codebook
plus n-bit codes. Plain dense storage wins when nothing is gained, so a dense model is
unchanged. Weights a quantization plan names are stored as int8 or packed int4 codes
with their scales, all of them or (a pruned, then quantized weight) the non-zero ones at
bitmask or relative-index positions. Decoding restores the exact tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import SlimkitError
from .bits import bits_for, pack_bits, unpack_bits

MAX_GAP = 255
MAX_CODEBOOK = 256  # distinct values up to which a tensor may be stored as codebook + n-bit codes
SEP = "::"


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


def integer_codes(tensor: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor | None:
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
                 int8_scales: dict[str, tuple[torch.Tensor, int | None]] | None = None, cost=None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Encode each floating-point tensor in the smallest lossless form; returns tensors and their encodings.

    ``int8_scales`` names weights a quantization plan says are integer codes times scales
    (``(scales, group_size)``: per channel when the group size is None): those are stored as
    int8 or packed int4 codes (and checked to decode to exactly the same values). ``cost(streams,
    encoding)`` prices the candidate layouts: bytes as stored by default (a container prices them coded).
    """
    cost = cost or stored_bytes
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if SEP in name:
            raise SlimkitError(f"tensor name {name!r} contains the reserved separator {SEP!r}")
        scale, group_size = int8_scales[name] if int8_scales and name in int8_scales else (None, None)
        codes = integer_codes(tensor, scale, group_size) if scale is not None else None
        if codes is not None:
            streams, encoding = smallest_code_encoding(codes, scale, group_size, cost)
            tensors.update({name + SEP + key: value for key, value in streams.items()})
            encodings[name] = encoding
            continue
        if not tensor.is_floating_point() or tensor.numel() < 64:
            tensors[name] = tensor
            continue
        streams, encoding = smallest_float_encoding(tensor, cost)
        if encoding is None:
            tensors[name] = tensor
            continue
        tensors.update({name + SEP + key: value for key, value in streams.items()})
        encodings[name] = encoding
    return tensors, encodings


def stored_bytes(streams: dict[str, torch.Tensor], encoding: dict[str, Any] | None) -> int:
    """Bytes the streams take as they are (the model directory's cost)."""
    return sum(t.numel() * t.element_size() for t in streams.values())


def _layouts(flat: torch.Tensor) -> dict[str, tuple[dict[str, torch.Tensor], np.ndarray | None]]:
    """Ways to position a flat tensor's stored values: layout -> (position streams, the values' positions)."""
    nonzero = torch.nonzero(flat).reshape(-1).numpy()
    gaps = _gaps(nonzero)
    mask = np.zeros(flat.numel(), dtype=bool)
    mask[nonzero] = True
    return {
        "dense": ({}, None),
        "bitmask": ({"bitmask": torch.from_numpy(np.packbits(mask))}, nonzero),
        "indices": ({"gaps": torch.from_numpy(gaps.astype(np.uint8))}, np.cumsum(gaps) - 1),
    }


def smallest_code_encoding(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None, cost=stored_bytes,
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A quantized weight's integer codes in the cheapest layout: all of them, or the non-zero ones at
    bitmask or relative-index positions; int4 (two per byte) when every code fits in 4 bits."""
    flat = codes.reshape(-1)
    kind = "int4" if int(codes.min()) >= -8 and int(codes.max()) <= 7 else "int8"
    meta = {"encoding": f"{kind}-channel", "shape": list(codes.shape), **({"group_size": group_size} if group_size else {})}
    best = None
    for layout, (position_streams, positions) in _layouts(flat).items():
        values = flat if positions is None else flat[torch.from_numpy(positions)]
        candidate = ({"scale": scale.float().contiguous(), **position_streams,
                      kind: _pack_int4(values) if kind == "int4" else values.clone()},
                     {**meta, **({"positions": layout} if positions is not None else {})})
        price = cost(*candidate)
        if best is None or price < best[0]:
            best = (price, candidate)
    return best[1]


def smallest_float_encoding(tensor: torch.Tensor, cost=stored_bytes,
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The cheapest of: positions (all, bitmask, relative indices) x values (raw, codebook + n-bit codes).

    ``cost(streams, encoding)`` prices a candidate (bytes as stored, unless the caller entropy-codes
    them); ``({tensor}, None)`` means plain dense storage.
    """
    flat = tensor.detach().reshape(-1)
    plain: tuple[dict[str, torch.Tensor], dict[str, Any] | None] = ({"": tensor}, None)
    best = (cost(*plain), plain)
    for layout, (position_streams, positions) in _layouts(flat).items():
        values = flat if positions is None else flat[torch.from_numpy(positions)]
        options = [({"values": values.clone()}, {})] if layout != "dense" else []
        table, codes = torch.unique(values, return_inverse=True)
        if len(table) <= MAX_CODEBOOK:
            b = bits_for(len(table))
            options.append(({"codebook": table.clone(), "codes": torch.from_numpy(pack_bits(codes.numpy(), b))},
                            {"codebook_bits": b}))
        for value_streams, extra in options:
            candidate = ({**position_streams, **value_streams},
                         {"encoding": layout, "shape": list(tensor.shape), **extra})
            price = cost(*candidate)
            if price < best[0]:
                best = (price, candidate)
    streams, encoding = best[1]
    return ({}, None) if encoding is None else (streams, encoding)


INTEGER_CODES = ("int8-channel", "int4-channel")


def _positions(enc: dict[str, Any], tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """Flat positions of a tensor's stored values, from its position stream."""
    numel = math.prod(int(d) for d in enc["shape"])
    layout = enc.get("positions", "dense") if enc["encoding"] in INTEGER_CODES else enc["encoding"]
    if layout == "bitmask":
        return np.flatnonzero(np.unpackbits(tensors[name + SEP + "bitmask"].numpy(), count=numel))
    if layout == "indices":
        return np.cumsum(tensors[name + SEP + "gaps"].numpy().astype(np.int64)) - 1
    if layout == "dense":
        return np.arange(numel)
    raise ValueError(f"unknown encoding {layout!r}")


def value_count(enc: dict[str, Any], tensors: dict[str, torch.Tensor], name: str) -> int:
    """How many values a tensor's value stream holds (the codes of a codebook- or integer-coded tensor)."""
    return len(_positions(enc, tensors, name))


MAX_CODEBOOK_STREAM = MAX_CODEBOOK  # a codebook stream's entries


def check_streams(stream_shapes: dict[str, tuple[int, ...]], encodings: dict[str, dict[str, Any]], source: str,
                  expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check every size a file declares before anything is decoded from it.

    Each encoded tensor's shape must be the architecture's (``expected``: name -> shape, when the
    model was built first), and each of its streams can hold no more values than that tensor has
    elements (relative indices: twice that, for the filler gaps), so the decoded sizes are the model's.
    """
    for name, enc in encodings.items():
        shape = tuple(int(d) for d in enc["shape"])
        if expected is not None:
            if name not in expected:
                raise SlimkitError(f"{source}: the file holds tensor '{name}', which the architecture does not have")
            if shape != tuple(expected[name]):
                raise SlimkitError(f"{source}: tensor '{name}' has shape {shape} in the file, the architecture "
                                   f"expects {tuple(expected[name])}")
    for stream, shape in stream_shapes.items():
        owner, sep, _ = stream.rpartition(SEP)
        if not sep:
            continue
        if owner not in encodings:
            raise SlimkitError(f"{source}: stream '{stream}' belongs to no encoded tensor")
        limit = 2 * math.prod(int(d) for d in encodings[owner]["shape"]) + MAX_CODEBOOK_STREAM
        if math.prod(shape) > limit:
            raise SlimkitError(f"{source}: stream '{stream}' declares {math.prod(shape):,} values, more than its "
                               f"tensor's shape {encodings[owner]['shape']} can need")


def decode_state(tensors: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]], source: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`; any inconsistency is a clear error naming the tensor."""
    state = {k: v for k, v in tensors.items() if SEP not in k}
    for name, enc in encodings.items():
        try:
            shape = [int(d) for d in enc["shape"]]
            numel = math.prod(shape)
            positions = _positions(enc, tensors, name)
            if enc["encoding"] in INTEGER_CODES:
                values = (tensors[name + SEP + "int8"] if enc["encoding"] == "int8-channel"
                          else _unpack_int4(tensors[name + SEP + "int4"], len(positions)))
            elif "codebook_bits" in enc:
                table = tensors[name + SEP + "codebook"]
                codes = unpack_bits(tensors[name + SEP + "codes"].numpy(), int(enc["codebook_bits"]), len(positions))
                if len(codes) and codes.max() >= len(table):
                    raise ValueError("a code points past the codebook")
                values = table[torch.from_numpy(codes)]
            else:
                values = tensors[name + SEP + "values"]
            if len(positions) != values.numel() or (len(positions) and positions[-1] >= numel):
                raise ValueError("positions do not match the values")
            flat = torch.zeros(numel, dtype=values.dtype)
            flat[torch.from_numpy(positions)] = values
            state[name] = flat.reshape(shape)
            if enc["encoding"] in INTEGER_CODES:
                scale = _scale_grid(tensors[name + SEP + "scale"], shape, enc.get("group_size"))
                state[name] = state[name].float() * scale
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise SlimkitError(f"{source}: sparse tensor '{name}' is corrupt ({exc})") from None
    return state
