"""slimkit's int8 grids as torch's ``quantized_decomposed`` Q/DQ ops: the form ExecuTorch's XNNPACK backend
and LiteRT's converter lower to integer kernels, so those files carry slimkit's own scales and zero points.

A quantized slimkit graph fake-quantizes activations per tensor on uint8 ``[0, 255]`` (or on int8 with zero point
0: symmetric activations, kept as they are) and weights per output channel on symmetric int8. The rewrite is
exact (the same grid values):

* an activation quantizer becomes ``quantize_per_tensor`` -> ``dequantize_per_tensor`` on int8, its zero point
  moved by -128 (uint8 code ``q`` is int8 code ``q - 128``);
* a weight quantizer becomes ``dequantize_per_channel`` of its int8 codes (``weights="codes"``, ExecuTorch) or
  ``quantize_per_channel`` -> ``dequantize_per_channel`` of the float weight (``weights="quantize"``, LiteRT's
  converter folds the pair itself);
* a layer whose output is not quantized (the classifier at the end) keeps its weights as float constants
  holding the dequantized values: ExecuTorch 1.5's XNNPACK computes such int8-weight layers wrongly (measured:
  lenet5's logits off by up to 6), and the values are the simulation's exactly;
* max pooling and flattening keep the grid, so a quantized tensor stays quantized through them (XNNPACK
  expects a quantizer after each).

Anything else (ranges taken at run time, 4-bit groups, power-of-two levels) is refused by name: those files
go to ONNX Runtime (``onnx-int8``).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import fx

from ..errors import SlimkitError
from ..quant.ops import QUANTIZERS

aten = torch.ops.aten
PER_TENSOR = torch.fake_quantize_per_tensor_affine
PER_CHANNEL = torch.fake_quantize_per_channel_affine
KEEP_GRID = {aten.max_pool2d.default, aten.flatten.using_ints, aten.view.default, aten.reshape.default,
             aten.relu.default, aten.hardtanh.default}
INT8_MIN, INT8_MAX = -128, 127


def decomposed_qdq(quantized: fx.GraphModule, weights: Literal["codes", "quantize"]) -> fx.GraphModule:
    """A copy of ``quantized`` (a slimkit int8 graph) computing the same values with Q/DQ ops."""
    import torchao.quantization.pt2e  # noqa: F401 - registers the quantized_decomposed ops

    gm = copy.deepcopy(quantized)
    graph = gm.graph
    unsupported = sorted({_op_name(n) for n in graph.nodes if n.op == "call_function" and n.target in QUANTIZERS
                          and n.target not in (PER_TENSOR, PER_CHANNEL)})
    if unsupported:
        raise SlimkitError(f"this quantized model uses {', '.join(unsupported)}, which ExecuTorch and LiteRT files "
                           "cannot carry: they carry static int8 (per-tensor activations, per-channel weights); "
                           "export it as onnx-int8")
    _functional_ops(graph)
    counter = iter(range(1 << 30))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is PER_TENSOR:
            _activation(graph, node)
        elif node.op == "call_function" and node.target is PER_CHANNEL:
            _weight(gm, node, weights, next(counter))
    _keep_grid_through_pooling(graph)
    _one_dequantize_per_reader(graph)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


INPLACE = {aten.add_.Tensor: aten.add.Tensor, aten.relu_.default: aten.relu.default,
           aten.hardtanh_.default: aten.hardtanh.default, aten.mul_.Tensor: aten.mul.Tensor}


def _functional_ops(graph: fx.Graph) -> None:
    """In-place ops (torchvision's ``out += identity``, ``ReLU(inplace=True)``) as their functional twins where
    nothing reads the overwritten input afterwards: the same values, and XNNPACK's partitioner found dependency
    cycles around the in-place residual adds of resnet18 and mobilenet_v2."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in INPLACE and isinstance(node.args[0], fx.Node):
            if all(order[user] <= order[node] for user in node.args[0].users):
                node.target = INPLACE[node.target]


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _activation(graph: fx.Graph, node: fx.Node) -> None:
    source, scale, zero, low, high = node.args
    if any(isinstance(a, fx.Node) for a in (scale, zero)) or (low, high) not in ((0, 255), (INT8_MIN, INT8_MAX)):
        raise SlimkitError(f"activation quantizer {node.name}: expected a constant uint8 or int8 range, got "
                           f"[{low}, {high}]")
    shift = INT8_MIN if low == 0 else 0
    params = (float(scale), int(zero) + shift, INT8_MIN, INT8_MAX, torch.int8)
    _replace_with_qdq(graph, node, source, params)


def _replace_with_qdq(graph: fx.Graph, node: fx.Node, source: fx.Node, params: tuple) -> None:
    decomposed = torch.ops.quantized_decomposed
    with graph.inserting_before(node):
        quantized = graph.call_function(decomposed.quantize_per_tensor.default, (source, *params))
        restored = graph.call_function(decomposed.dequantize_per_tensor.default, (quantized, *params))
    node.replace_all_uses_with(restored)
    graph.erase_node(node)


def _weight(gm: fx.GraphModule, node: fx.Node, weights: str, index: int) -> None:
    decomposed = torch.ops.quantized_decomposed
    source, scale, zero, axis, low, high = node.args
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (source, scale, zero)):
        raise SlimkitError(f"weight quantizer {node.name}: expected a stored weight with stored scales")
    weight, scales = _attr(gm, source.target).detach(), _attr(gm, scale.target)
    zeros = _attr(gm, zero.target).long()
    if zeros.any() or low < INT8_MIN or high > INT8_MAX:
        raise SlimkitError(f"weight quantizer {node.name}: expected symmetric int8 weights (zero points 0)")
    graph = gm.graph
    if not _output_quantized(node):
        values = torch.fake_quantize_per_channel_affine(weight, scales, zeros.int(), axis, low, high)
        gm.register_buffer(f"_slimkit_weight_float_{index}", values)
        with graph.inserting_before(node):
            constant = graph.get_attr(f"_slimkit_weight_float_{index}")
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        return
    low = -INT8_MAX  # symmetric codes never reach -128; XNNPACK and TFLite expect [-127, 127] weights
    gm.register_buffer(f"_slimkit_weight_zero_{index}", zeros)
    with graph.inserting_before(node):
        zero_node = graph.get_attr(f"_slimkit_weight_zero_{index}")
        if weights == "codes":
            codes = decomposed.quantize_per_channel(weight, scales, zeros, axis, low, high, torch.int8)
            gm.register_buffer(f"_slimkit_weight_int8_{index}", codes)
            codes_node = graph.get_attr(f"_slimkit_weight_int8_{index}")
        else:
            codes_node = graph.call_function(decomposed.quantize_per_channel.default,
                                             (source, scale, zero_node, axis, low, high, torch.int8))
        restored = graph.call_function(decomposed.dequantize_per_channel.default,
                                       (codes_node, scale, zero_node, axis, low, high, torch.int8))
    node.replace_all_uses_with(restored)
    graph.erase_node(node)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _output_quantized(weight_quantizer: fx.Node) -> bool:
    """Whether the layer reading this weight has its output quantized (through grid-keeping ops)."""
    node = next(iter(weight_quantizer.users))
    while True:
        if any(user.target is PER_TENSOR for user in node.users):
            return True
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
        if node.target not in KEEP_GRID:
            return False


def _one_dequantize_per_reader(graph: fx.Graph) -> None:
    """Give every reader of a dequantized activation its own DequantizeLinear, as torch's pt2e convert does: a
    residual block's input read by a convolution and by the add through one shared node put that node in two
    delegate partitions at once, which XNNPACK's partitioner reports as dependency cycles (resnet18,
    mobilenet_v2)."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not dequantize or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                copy_node = graph.call_function(dequantize, node.args, dict(node.kwargs))
            user.replace_input_with(node, copy_node)


def _keep_grid_through_pooling(graph: fx.Graph) -> None:
    """Quantize again, on the same grid, the output of a grid-keeping op whose input is dequantized but whose
    output is not quantized (values unchanged: they already lie on the grid)."""
    decomposed = torch.ops.quantized_decomposed
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in KEEP_GRID:
            continue
        source = node.args[0]
        if getattr(source, "target", None) is not decomposed.dequantize_per_tensor.default:
            continue
        if node.users and all(u.target is decomposed.quantize_per_tensor.default for u in node.users):
            continue
        params = source.args[1:]
        with graph.inserting_after(node):
            quantized = graph.call_function(decomposed.quantize_per_tensor.default, (node, *params))
        with graph.inserting_after(quantized):
            restored = graph.call_function(decomposed.dequantize_per_tensor.default, (quantized, *params))
        node.replace_all_uses_with(restored)
        quantized.args = (node, *params)
