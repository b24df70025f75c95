"""Quantization schemes as pure tensor functions: affine and symmetric, per tensor, channel or group,
2 to 16 bits, power-of-two (logarithmic) levels, and fp16/bf16 casts.

Conventions (the ONNX QuantizeLinear ones, so exported files mean the same):
``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` with round-half-to-even,
``x_hat = (q - zero_point) * scale``. Ranges always include 0, so zero is exact
and pruned weights stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import SlimkitError


@dataclass(frozen=True)
class QScheme:
    bits: int = 8
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "tensor"
    axis: int = 0  # channel axis for "channel"; "group" groups along the last axis
    group_size: int = 32
    signed: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise SlimkitError(f"bits must be between 2 and 16, got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise SlimkitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.group_size < 1:
            raise SlimkitError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        # symmetric signed ranges drop the most negative code so that +/- are balanced (-127..127)
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (widened to include 0)."""
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float64), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float64), torch.zeros(()))
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        bound = torch.maximum(-lo, hi)
        scale = (bound / scheme.qmax).clamp_min(tiny)
        zero = torch.full_like(scale, 0 if scheme.signed else (scheme.qmax + 1) // 2)
    else:
        scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp_min(tiny)
        zero = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale.float(), zero.to(torch.int32)


def quantize(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as an integer tensor wide enough for the range)."""
    codes = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return codes.to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero) -> torch.Tensor:
    return (q.to(torch.float32) - zero) * scale


def fake_quantize(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, qmin, qmax), scale, zero)


def _grouped(x: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A view where each row is one quantization group (tensor, channel or group)."""
    if scheme.granularity == "tensor":
        return x.reshape(1, -1), x.shape
    if scheme.granularity == "channel":
        moved = x.movedim(scheme.axis, 0)
        return moved.reshape(moved.shape[0], -1), moved.shape
    if x.shape[-1] % scheme.group_size:
        raise SlimkitError(f"last dimension {x.shape[-1]} is not a multiple of group_size {scheme.group_size}")
    return x.reshape(-1, scheme.group_size), x.shape


def _ungrouped(rows: torch.Tensor, shape: tuple[int, ...], scheme: QScheme) -> torch.Tensor:
    if scheme.granularity == "channel":
        return rows.reshape(shape).movedim(0, scheme.axis)
    return rows.reshape(shape)


def quantize_tensor(x: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zero points of ``x`` under ``scheme`` (scales/zeros: one per group)."""
    rows, shape = _grouped(x.detach(), scheme)
    scale, zero = qparams(rows.amin(1), rows.amax(1), scheme)
    codes = quantize(rows, scale[:, None], zero[:, None], scheme.qmin, scheme.qmax)
    return _ungrouped(codes, shape, scheme), scale, zero


def fake_quantize_tensor(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """``x`` rounded to the scheme's levels, in float."""
    rows, shape = _grouped(x.detach(), scheme)
    scale, zero = qparams(rows.amin(1), rows.amax(1), scheme)
    out = fake_quantize(rows, scale[:, None], zero[:, None], scheme.qmin, scheme.qmax)
    return _ungrouped(out, shape, scheme).to(x.dtype)


def log2_quantize(x: torch.Tensor, bits: int, max_exponent: int | None = None) -> torch.Tensor:
    """Power-of-two levels (shift-friendly): sign * 2^e for 2^(bits-1) - 1 exponents, plus exact zero.

    The exponent is the rounded log2 of |x| (rounding in the log domain), clipped to the
    ``2^(bits-1) - 1`` exponents ending at ``max_exponent`` (default: the one covering max |x|);
    values below half the smallest level become 0.
    """
    if not 2 <= bits <= 8:
        raise SlimkitError(f"log quantization takes 2 to 8 bits, got {bits}")
    levels = 2 ** (bits - 1) - 1  # one sign bit, one code for zero
    magnitude = x.abs()
    top = magnitude.max()
    if top == 0:
        return torch.zeros_like(x)
    e_max = int(torch.ceil(torch.log2(top))) if max_exponent is None else max_exponent
    e_min = e_max - levels + 1
    exponent = torch.round(torch.log2(magnitude.clamp_min(torch.finfo(x.dtype).tiny))).clamp(e_min, e_max)
    out = torch.sign(x) * torch.exp2(exponent)
    return torch.where(magnitude < 2.0 ** (e_min - 1), torch.zeros_like(x), out)


def cast_roundtrip(x: torch.Tensor, dtype: Literal["fp16", "bf16"]) -> torch.Tensor:
    """``x`` stored as fp16 or bf16 and read back (values outside fp16's range become inf: checked)."""
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    y = x.to(target)
    if not torch.isfinite(y).all() and torch.isfinite(x).all():
        raise SlimkitError(f"values up to {float(x.abs().max()):.3g} overflow {dtype}")
    return y.to(x.dtype)
