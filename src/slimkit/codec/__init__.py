"""Lossless tensor encodings for model files (sparse now; packed integers and entropy coding later)."""

from .sparse import decode_state, encode_state

__all__ = ["decode_state", "encode_state"]
