"""The ``.slim`` container: a whole model in one file, its integer streams entropy-coded.

Layout (little-endian)::

    b"SLIM" | u16 format version | u32 header length | u32 CRC-32 of the header
    header: zlib-compressed JSON {"meta": <slimkit.json>, "streams": [[name, dtype, shape,
            view, count, coder, length, crc32], ...]}
    payload: the streams' bytes, one after another, in header order

The tensors are exactly those of the model directory's safetensors file (the same
lossless encodings: sparse positions, codebook codes, int8/int4 codes), so packing
and unpacking never change a value. Float streams are stored raw (as float16 when
every value is exactly a float16, as fp16-rounded codebooks are); integer streams
become symbols (bytes; n-bit codebook codes and 4-bit codes unpacked to one symbol
each) and are stored with whichever of n-bit packing, Huffman and rANS is smallest.
Every stream and the header carry a CRC-32; the file length is checked, so a
truncated or corrupted file is an error that names what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SlimkitError
from ..limits import MAX_META_BYTES, MAX_MODEL_ELEMENTS, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, echo, echo_text
from .bits import pack_bits, unpack_bits
from .entropy import CODERS, decode, encode, encode_with, entropy_bits
from .state import INTEGER_CODES, SEP, decode_state, encode_state, value_count

MAGIC = b"SLIM"
VERSION = 2  # 2: integer codes may be stored at sparse positions (1 is read too)
PREAMBLE = struct.Struct("<4sHII")
SUFFIX = ".slim"


def is_container(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _symbol_view(stream: str, tensor: torch.Tensor, encoding: dict[str, Any] | None,
                 siblings: dict[str, torch.Tensor]) -> tuple[str, np.ndarray | None]:
    """How one stored stream becomes symbols: (view, symbols), or ("raw", None) for bytes kept as they are.

    ``siblings`` are the other streams of the same tensor (by stream name), ``encoding`` its record.
    """
    if tensor.dtype not in (torch.uint8, torch.int8):
        return "raw", None
    if stream == "codes":
        count = value_count(encoding, {f"t{SEP}{k}": v for k, v in siblings.items()}, "t")
        return f"codes{encoding['codebook_bits']}", unpack_bits(tensor.numpy(), int(encoding["codebook_bits"]), count)
    if stream == "int4":
        return "codes4", unpack_bits(tensor.numpy(), 4, value_count(encoding, {f"t{SEP}{k}": v for k, v in siblings.items()}, "t"))
    return "bytes", tensor.numpy().view(np.uint8).reshape(-1).astype(np.int64)


def _coded_bytes(streams: dict[str, torch.Tensor], encoding: dict[str, Any] | None,
                 coders: tuple[str, ...] = CODERS) -> int:
    """What a tensor's streams cost in the container (integer streams entropy-coded)."""
    total = 0
    for stream, tensor in streams.items():
        _, symbols = _symbol_view(stream, tensor, encoding, streams)
        total += tensor.numel() * tensor.element_size() if symbols is None else len(encode(symbols, coders).data)
    return total


def reencode(meta: dict[str, Any], stored: dict[str, torch.Tensor], source: str,
             coders: tuple[str, ...] = CODERS) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The same tensors, each re-encoded for the container: its layout (dense, bitmask, relative
    indices; raw or codebook values; integer codes for quantized weights) chosen by entropy-coded
    size rather than stored size. Lossless: decoding gives the identical tensors."""
    encodings = meta.get("tensors", {})
    state = decode_state(stored, encodings, source)
    scales = {name: (stored[name + SEP + "scale"], enc.get("group_size")) for name, enc in encodings.items()
              if enc["encoding"] in INTEGER_CODES}
    tensors, new_encodings = encode_state(state, scales, cost=lambda st, e: _coded_bytes(st, e, coders))
    return {**meta, "tensors": new_encodings}, tensors


def _restore(view: str, symbols: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if view.startswith("codes"):
        data = pack_bits(symbols, int(view[len("codes"):]))
    else:
        data = symbols.astype(np.uint8)
    return torch.from_numpy(data.copy()).view(dtype).reshape(shape)


def write_container(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    coders: tuple[str, ...] = CODERS) -> dict[str, Any]:
    """Write ``meta`` (slimkit.json) and the stored ``tensors`` as one ``.slim`` file, atomically.

    Returns per-stream statistics (bytes, coder, symbols, order-0 entropy, each coder's size).
    """
    from ..io import atomic_path

    records, chunks, stats = [], [], []
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        owner, _, stream = name.rpartition(SEP)
        siblings = {k.rpartition(SEP)[2]: v for k, v in tensors.items() if k.rpartition(SEP)[0] == owner}
        view, symbols = _symbol_view(stream, tensor, meta.get("tensors", {}).get(owner), siblings)
        dtype = str(tensor.dtype).removeprefix("torch.")
        if symbols is None:
            if tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor):
                view, tensor = "f16", tensor.half()  # exact in half precision (e.g. fp16 codebooks): half the bytes
            data, coder, count, model_bytes = tensor.numpy().tobytes(), "raw", tensor.numel(), 0
            stat = {}
        else:
            coded = encode(symbols, coders)
            data, coder, count, model_bytes = coded.data, coded.coder, len(symbols), coded.model_bytes
            stat = {"symbols": count, "entropy_bytes": entropy_bits(symbols) / 8,
                    **{f"{c}_bytes": len(encode_with(symbols, c).data) for c in CODERS}}
        records.append([name, dtype, list(tensor.shape), view, count, coder, len(data), zlib.crc32(data)])
        chunks.append(data)
        stats.append({"stream": name, "view": view, "coder": coder, "bytes": len(data), "model_bytes": model_bytes,
                      "raw_bytes": tensor.numel() * tensor.element_size(), **stat})
    header = zlib.compress(json.dumps({"meta": meta, "streams": records}, separators=(",", ":")).encode(), 9)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, VERSION, len(header), zlib.crc32(header)))
            f.write(header)
            for chunk in chunks:
                f.write(chunk)
    return {"file_bytes": Path(path).stat().st_size, "header_bytes": PREAMBLE.size + len(header), "streams": stats}


DTYPES = {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
VIEWS = {"raw", "f16", "bytes", *(f"codes{b}" for b in range(1, 9))}


def _checked_record(record: Any) -> tuple:
    """A stream record whose every field has the type and range the reader relies on (ValueError otherwise),
    and whose symbol count is exactly what its shape holds, so the declared shape bounds the decoding."""
    if not isinstance(record, list) or len(record) != 8:
        raise ValueError("a stream record is not an 8-field list")
    name, dtype, shape, view, count, coder, length, crc = record
    if not isinstance(name, str) or dtype not in DTYPES or view not in VIEWS or coder not in {"raw", *CODERS,
                                                                                            "constant"}:
        raise ValueError(f"stream {echo(name)}: unknown dtype, view or coder")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and
            all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"stream {echo(name)}: bad shape {echo(shape)}")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (count, length, crc)):
        raise ValueError(f"stream {echo(name)}: bad sizes")
    numel = math.prod(shape)
    if numel > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"stream {echo(name)}: shape {shape} has more than {MAX_TENSOR_ELEMENTS:,} elements")
    stored_bytes = numel * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    expected_count = {"raw": numel, "f16": numel, "bytes": stored_bytes}.get(view)
    if expected_count is None:  # n-bit codes, packed into the stored bytes
        bits = int(view[len("codes"):])
        if (count * bits + 7) // 8 != stored_bytes:
            raise ValueError(f"stream {echo(name)}: {count} codes of {bits} bits do not fill {stored_bytes} bytes")
    elif count != expected_count:
        raise ValueError(f"stream {echo(name)}: {count} values declared for {expected_count}")
    return name, dtype, shape, view, count, coder, length, crc


class ContainerFile:
    """An opened ``.slim`` file: header (metadata and stream records) checked, streams not yet decoded."""

    def __init__(self, path: Path, blob: bytes, meta: Any, records: list[tuple], payload_offset: int):
        self.path, self.meta, self.records = path, meta, records
        self._blob, self._offset = blob, payload_offset

    def stream_shapes(self) -> dict[str, tuple[int, ...]]:
        return {r[0]: tuple(r[2]) for r in self.records}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Decode every stream (CRC-checked); any damage is a SlimkitError naming the stream."""
        tensors: dict[str, torch.Tensor] = {}
        offset = self._offset
        for name, dtype, shape, view, count, coder, length, crc in self.records:
            data = self._blob[offset : offset + length]
            offset += length
            if zlib.crc32(data) != crc:
                raise SlimkitError(f"{self.path}: stream '{name}' is corrupt (checksum mismatch)")
            try:
                torch_dtype = getattr(torch, dtype)
                if coder == "raw":
                    stored_dtype = torch.float16 if view == "f16" else torch_dtype
                    array = np.frombuffer(data, dtype=torch.empty(0, dtype=stored_dtype).numpy().dtype).copy()
                    tensors[name] = torch.from_numpy(array).reshape(shape).to(torch_dtype)
                else:
                    tensors[name] = _restore(view, decode(coder, data, count), torch_dtype, shape)
            except (ValueError, TypeError, RuntimeError, AttributeError, OverflowError) as exc:
                raise SlimkitError(f"{self.path}: stream '{name}' cannot be decoded ({echo_text(str(exc))})") from None
        return tensors


def open_container(path: str | os.PathLike) -> ContainerFile:
    """Read and check a ``.slim`` file's preamble, header and length; the streams are decoded on demand."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise SlimkitError(f"{path}: cannot read ({exc.strerror})") from None
    if len(blob) < PREAMBLE.size or blob[:4] != MAGIC:
        raise SlimkitError(f"{path}: not a .slim file (no SLIM signature)")
    _, version, header_length, header_crc = PREAMBLE.unpack_from(blob)
    if version > VERSION:
        raise SlimkitError(f"{path}: .slim format version {version} is newer than this slimkit reads ({VERSION})")
    header = blob[PREAMBLE.size : PREAMBLE.size + header_length]
    if len(header) != header_length or zlib.crc32(header) != header_crc:
        raise SlimkitError(f"{path}: the .slim header is truncated or corrupt (checksum mismatch)")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(header, MAX_META_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"the header expands to more than {MAX_META_BYTES:,} bytes")
        content = json.loads(text)
        meta, records = content["meta"], [_checked_record(r) for r in content["streams"]]
    except (zlib.error, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SlimkitError(f"{path}: the .slim header cannot be read ({echo_text(str(exc))})") from None
    declared = sum(math.prod(r[2]) for r in records)
    if declared > MAX_MODEL_ELEMENTS:
        raise SlimkitError(f"{path}: the .slim header declares {declared:,} elements; at most "
                           f"{MAX_MODEL_ELEMENTS:,} are read")
    offset = PREAMBLE.size + header_length
    expected = offset + sum(int(r[6]) for r in records)
    if len(blob) != expected:
        raise SlimkitError(f"{path}: file is {len(blob)} bytes, its header describes {expected}: "
                           f"{'truncated' if len(blob) < expected else 'trailing data'}")
    return ContainerFile(path, blob, meta, records, offset)


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, stored tensors) of a ``.slim`` file; any damage is a SlimkitError naming it."""
    container = open_container(path)
    return container.meta, container.tensors()
