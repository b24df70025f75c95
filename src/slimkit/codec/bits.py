"""n-bit unsigned codes packed into bytes (little-endian bit order), and back."""

from __future__ import annotations

import numpy as np


def bits_for(count: int) -> int:
    """Bits needed to index ``count`` distinct symbols (at least 1)."""
    return max(1, int(count - 1).bit_length())


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    planes = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if len(packed) * 8 < count * bits:
        raise ValueError(f"{len(packed)} bytes cannot hold {count} codes of {bits} bits")
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    return (planes.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
