"""Entropy coding of integer symbol streams: Huffman (as in Deep Compression) and rANS.

Both coders come from the ``constriction`` package. Each coded stream carries its own
order-0 model: the alphabet size, a bitmask of the symbols that occur and their counts
(LEB128 varints); encoder and decoder derive the same probabilities from those counts,
so the stream decodes exactly. ``encode`` tries every coder, and plain n-bit packing,
and keeps the smallest result, model bytes included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bits import bits_for, pack_bits, unpack_bits

CODERS = ("packed", "huffman", "rans")


@dataclass(frozen=True)
class Coded:
    coder: str  # packed | huffman | rans | constant
    data: bytes  # model + payload
    model_bytes: int


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of the stream, in bits (the limit for a coder of independent symbols)."""
    counts = np.bincount(np.asarray(symbols, dtype=np.int64).reshape(-1))
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum()) if counts.size else 0.0


def encode(symbols: np.ndarray, coders: tuple[str, ...] = CODERS) -> Coded:
    """The smallest coding of ``symbols`` (non-negative integers) among ``coders``."""
    options = [encode_with(symbols, coder) for coder in coders]
    return min(options, key=lambda c: len(c.data))


def encode_with(symbols: np.ndarray, coder: str) -> Coded:
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size and symbols.min() < 0:
        raise ValueError("symbols must be non-negative")
    alphabet = int(symbols.max()) + 1 if symbols.size else 1
    if coder == "packed":
        return Coded("packed", _varint([alphabet]) + pack_bits(symbols, bits_for(alphabet)).tobytes(), 0)
    counts = np.bincount(symbols, minlength=alphabet)
    present = counts > 0
    model = _varint([alphabet]) + np.packbits(present, bitorder="little").tobytes() + _varint(counts[present])
    ranks = np.cumsum(present) - 1  # symbol -> index among the symbols that occur
    dense = ranks[symbols]
    if present.sum() <= 1:
        return Coded("constant", model, len(model))
    probabilities = counts[present] / counts.sum()
    if coder == "huffman":
        payload = _huffman_encode(dense, probabilities)
    elif coder == "rans":
        payload = _rans_encode(dense, probabilities)
    else:
        raise ValueError(f"unknown coder {coder!r}; expected one of {', '.join(CODERS)}")
    return Coded(coder, model + payload, len(model))


def decode(coder: str, data: bytes, count: int) -> np.ndarray:
    """The ``count`` symbols coded in ``data``; raises ValueError when the data cannot be decoded."""
    alphabet, offset = _read_varints(data, 0, 1)
    alphabet = alphabet[0]
    if coder == "packed":
        return unpack_bits(np.frombuffer(data, dtype=np.uint8, offset=offset), bits_for(alphabet), count)
    mask_bytes = (alphabet + 7) // 8
    if offset + mask_bytes > len(data):
        raise ValueError("symbol model is truncated")
    present = np.unpackbits(np.frombuffer(data[offset : offset + mask_bytes], dtype=np.uint8),
                            count=alphabet, bitorder="little").astype(bool)
    symbols = np.flatnonzero(present)
    counts, offset = _read_varints(data, offset + mask_bytes, len(symbols))
    if coder == "constant":
        if len(symbols) != 1 and count:
            raise ValueError("a constant stream's model must hold exactly one symbol")
        return np.full(count, symbols[0] if len(symbols) else 0, dtype=np.int64)
    probabilities = np.asarray(counts, dtype=np.float64) / sum(counts)
    payload = data[offset:]
    if coder == "huffman":
        dense = _huffman_decode(payload, probabilities, count)
    elif coder == "rans":
        dense = _rans_decode(payload, probabilities, count)
    else:
        raise ValueError(f"unknown coder {coder!r}")
    return symbols[dense]


def _huffman_encode(symbols: np.ndarray, probabilities: np.ndarray) -> bytes:
    import constriction

    tree = constriction.symbol.huffman.EncoderHuffmanTree(probabilities)
    encoder = constriction.symbol.QueueEncoder()
    for s in symbols.tolist():
        encoder.encode_symbol(s, tree)
    words, bits = encoder.get_compressed_and_bitrate()
    return words.astype("<u4").tobytes()[: (bits + 7) // 8]  # the last word's unused high bytes are dropped


def _huffman_decode(payload: bytes, probabilities: np.ndarray, count: int) -> np.ndarray:
    import constriction

    words = np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype="<u4").copy()
    decoder = constriction.symbol.QueueDecoder(words)
    tree = constriction.symbol.huffman.DecoderHuffmanTree(probabilities)
    try:
        return np.array([decoder.decode_symbol(tree) for _ in range(count)], dtype=np.int64)
    except Exception as exc:  # constriction raises its own types on exhausted data
        raise ValueError(f"Huffman stream ends early ({exc})") from None


def _rans_encode(symbols: np.ndarray, probabilities: np.ndarray) -> bytes:
    import constriction

    model = constriction.stream.model.Categorical(probabilities, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _rans_decode(payload: bytes, probabilities: np.ndarray, count: int) -> np.ndarray:
    import constriction

    if len(payload) % 4:
        raise ValueError("rANS payload is not a whole number of 32-bit words")
    model = constriction.stream.model.Categorical(probabilities, perfect=False)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").copy())
    try:
        return coder.decode(model, count).astype(np.int64)
    except Exception as exc:
        raise ValueError(f"rANS stream cannot be decoded ({exc})") from None


def _varint(values) -> bytes:
    out = bytearray()
    for v in np.asarray(values, dtype=np.int64).reshape(-1).tolist():
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varints(data: bytes, offset: int, count: int) -> tuple[list[int], int]:
    values = []
    for _ in range(count):
        value, shift = 0, 0
        while True:
            if offset >= len(data) or shift > 63:
                raise ValueError("symbol model is truncated")
            byte = data[offset]
            offset += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(value)
    return values, offset
