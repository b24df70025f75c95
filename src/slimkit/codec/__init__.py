"""Lossless tensor encodings for model files (sparse positions, packed integer and codebook values)."""

from .state import decode_state, encode_state

__all__ = ["decode_state", "encode_state"]
