"""Fake-quantization ops torch lacks, each with the ONNX it exports to.

* ``slimkit::dynamic_fake_quant`` quantizes an activation with a range taken from the
  tensor itself (the whole batch) exactly as ONNX's DynamicQuantizeLinear does: uint8,
  the range widened to include zero, zero point rounded half to even. It exports as
  DynamicQuantizeLinear -> DequantizeLinear, which ONNX Runtime fuses with a following
  int8-weight MatMul into DynamicQuantizeMatMul.
* ``slimkit::token_fake_quant`` does the same with one uint8 range per row (a token
  of a transformer: ranges differ from token to token, and one range for the whole
  batch costs MiniLM most of its int8 fidelity). It exports as blocked QuantizeLinear
  -> DequantizeLinear with scale and zero point ``[..., 1]`` computed in the graph
  (opset 21); ``export/token_quant.py`` turns that into integer GEMMs.
* ``slimkit::group_fake_quant`` quantizes a weight with one scale per group of
  ``group_size`` consecutive inputs of an output channel (the weight viewed as
  ``[out, -1]``; the last group may be shorter). It exports as blocked int4/int8
  QuantizeLinear -> DequantizeLinear (opset 21); the quantizer is folded into an
  integer initializer afterwards, and ONNX Runtime fuses a 4-bit one with its MatMul
  into MatMulNBits.
"""

from __future__ import annotations

import torch

GROUP_OPSET = 21  # blocked and 4-bit QuantizeLinear/DequantizeLinear


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear's uint8 scale and zero point for ``x``, in float32 as ONNX Runtime computes them."""
    low = torch.clamp(x.min().float(), max=0.0)
    high = torch.clamp(x.max().float(), min=0.0)
    scale = torch.where(high > low, (high - low) / 255, torch.ones_like(high))
    zero = torch.round(torch.clamp(-low / scale, 0, 255))
    return scale, zero


@torch.library.custom_op("slimkit::dynamic_fake_quant", mutates_args=())
def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    scale, zero = dynamic_qparams(x)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (codes - zero) * scale


@dynamic_fake_quant.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


TINY_SCALE = float(torch.finfo(torch.float32).tiny)  # the scale of an all-zero row: any positive value will do


def token_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of each row of ``x`` (over its last dimension, the range widened to include
    zero), computed as the exported graph computes them: ``[..., 1]`` each, the zero point a float."""
    low = torch.clamp(x.amin(-1, keepdim=True).float(), max=0.0)
    high = torch.clamp(x.amax(-1, keepdim=True).float(), min=0.0)
    scale = torch.clamp((high - low) / 255, min=TINY_SCALE)
    return scale, torch.clamp(torch.round(-low / scale), 0, 255)


@torch.library.custom_op("slimkit::token_fake_quant", mutates_args=())
def token_fake_quant(x: torch.Tensor, columns: int) -> torch.Tensor:
    """``columns``: the size of the last dimension, which the ONNX form needs as its block size."""
    scale, zero = token_qparams(x)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (codes - zero) * scale


@token_fake_quant.register_fake
def _(x: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.empty_like(x)


def expand_group_scale(scale: torch.Tensor, shape: torch.Size | list[int], group_size: int) -> torch.Tensor:
    """Per-group scales ``[out, groups]`` spread over a weight of ``shape`` (grouped along its flattened inputs)."""
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    return scale.repeat_interleave(group_size, dim=1)[:, :cols].reshape(shape)


def group_count(columns: int, group_size: int) -> int:
    return -(-columns // group_size)


@torch.library.custom_op("slimkit::group_fake_quant", mutates_args=())
def group_fake_quant(weight: torch.Tensor, scale: torch.Tensor, group_size: int, qmax: int) -> torch.Tensor:
    s = expand_group_scale(scale, weight.shape, group_size)
    return torch.clamp(torch.round(weight / s), -qmax, qmax) * s


@group_fake_quant.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, group_size: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(weight)


def onnx_translations() -> dict:
    """ONNX (onnxscript) functions for the exporter's ``custom_translation_table``."""
    from onnx import TensorProto
    from onnxscript import opset18, opset21

    def dynamic(x):
        q, s, z = opset18.DynamicQuantizeLinear(x)
        return opset18.DequantizeLinear(q, s, z)

    def token(x, columns: int):
        axes = opset21.Constant(value_ints=[-1])
        low = opset21.Min(opset21.ReduceMin(x, axes, keepdims=1), opset21.CastLike(0.0, x))
        high = opset21.Max(opset21.ReduceMax(x, axes, keepdims=1), opset21.CastLike(0.0, x))
        scale = opset21.Max(opset21.Div(opset21.Sub(high, low), opset21.CastLike(255.0, x)),
                            opset21.CastLike(TINY_SCALE, x))
        zero = opset21.QuantizeLinear(opset21.Neg(low), scale, axis=-1, block_size=1)  # uint8, saturating
        q = opset21.QuantizeLinear(x, scale, zero, axis=-1, block_size=columns)
        return opset21.DequantizeLinear(q, scale, zero, axis=-1, block_size=columns)

    def group(weight, scale, group_size: int, qmax: int):
        dtype = TensorProto.INT4 if qmax <= 7 else TensorProto.INT8
        flat = opset21.Reshape(weight, opset21.Constant(value_ints=[0, -1]))
        q = opset21.QuantizeLinear(flat, scale, axis=1, block_size=group_size, output_dtype=dtype)
        return opset21.Reshape(opset21.DequantizeLinear(q, scale, axis=1, block_size=group_size),
                               opset21.Shape(weight))

    return {torch.ops.slimkit.dynamic_fake_quant.default: dynamic, torch.ops.slimkit.group_fake_quant.default: group,
            torch.ops.slimkit.token_fake_quant.default: token}


# Straight-through gradients, so a quantized model's float weights can be trained through its fixed
# quantizers (fine-tuning or distilling a quantized model); the scales get none.
def _dynamic_backward(ctx, grad: torch.Tensor):
    return grad  # the range always covers the tensor: nothing is clipped


def _token_backward(ctx, grad: torch.Tensor):
    return grad, None  # each row's range covers the row


def _group_setup(ctx, inputs, output) -> None:
    weight, scale, group_size, qmax = inputs
    ctx.save_for_backward(weight, scale)
    ctx.group_size, ctx.qmax = group_size, qmax


def _group_backward(ctx, grad: torch.Tensor):
    weight, scale = ctx.saved_tensors
    inside = (weight / expand_group_scale(scale, weight.shape, ctx.group_size)).abs() <= ctx.qmax + 0.5
    return grad * inside, None, None, None


dynamic_fake_quant.register_autograd(_dynamic_backward)
token_fake_quant.register_autograd(_token_backward)
group_fake_quant.register_autograd(_group_backward, setup_context=_group_setup)

# Every fake-quantization op a quantized graph can hold (activations and weights).
QUANTIZERS = {torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine,
              dynamic_fake_quant._opoverload, token_fake_quant._opoverload, group_fake_quant._opoverload}

# The quantizers a graph applies to activations at run time (no calibrated range), and the ONNX opset each needs.
RUNTIME_ACTIVATION_QUANTIZERS = {dynamic_fake_quant._opoverload, token_fake_quant._opoverload}
OPSET_NEEDED = {token_fake_quant._opoverload: GROUP_OPSET, group_fake_quant._opoverload: GROUP_OPSET}
