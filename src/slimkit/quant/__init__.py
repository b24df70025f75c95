"""Quantization: schemes, observers, and (next) post-training and quantization-aware flows."""

from .observers import OBSERVERS, Observer, make_observer
from .scheme import (
    QScheme, cast_roundtrip, dequantize, fake_quantize, fake_quantize_tensor, log2_quantize, qparams, quantize,
    quantize_tensor,
)

__all__ = [
    "OBSERVERS", "Observer", "QScheme", "cast_roundtrip", "dequantize", "fake_quantize", "fake_quantize_tensor",
    "log2_quantize", "make_observer", "qparams", "quantize", "quantize_tensor",
]
