"""Linear layers over per-token quantized activations, in integer form for ONNX Runtime.

A token-quantized activation (``quant/ops.py: token_fake_quant``) exports as QuantizeLinear ->
DequantizeLinear with a scale ``s`` and a uint8 zero point ``z`` per row. ONNX Runtime's integer
GEMMs take one zero point for the whole input, so each row's zero point moves into the GEMM: the
uint8 rows gain ``k`` columns holding ``z``, the int8 weight ``W`` gains ``k`` rows ``R`` that sum
to minus its column sums, and one integer product computes exactly

    sum_i (q_i - z) W_ij  =  sum_i q_i W_ij + z * sum_r R_rj

which is then scaled by the weight's and the row's scales, and the bias added. The extra weight
entries stay within the weight's own range (+/-63 for 7-bit codes), so x86 kernels without VNNI,
which add pairs of uint8 * int8 products in int16, cannot saturate on them (255 * 63 * 2 < 2^15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .qdq import _attr, _drop_unread, _index, _insert_in_place_of, _ints, _readers

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators


@dataclass
class _Linear:
    node: object  # the MatMul or Gemm
    weight: np.ndarray  # int8 codes [in, out]
    weight_scale: str  # per output channel, or one
    bias: str | None
    output: str
    replaced: list  # the nodes the integer form replaces


def _weight_codes(producers, consts, readers, name: str, transposed: bool):
    """(int8 codes [in, out], scale name, the nodes computing ``name``) of a dequantized constant weight with zero
    points 0 and one scale per output channel; None for anything else."""
    nodes = []
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose" and _ints(node, "perm") == [1, 0] and len(readers[name]) == 1:
        nodes.append(node)
        transposed, node = not transposed, producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(readers[node.output[0]]) != 1:
        return None
    codes = consts.get(node.input[0])
    scale = consts.get(node.input[1])
    zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    out_axis = 0 if transposed else 1  # of the stored codes
    if (codes is None or codes.dtype != np.int8 or codes.ndim != 2 or scale is None or np.any(zero != 0)
            or _attr(node, "block_size", 0) or not (scale.size == 1 or (scale.ndim == 1 and _attr(node, "axis", 1)
                                                                         % 2 == out_axis))):
        return None
    return (codes.T if transposed else codes), node.input[1], [*nodes, node]


def _linear(node, x: str, producers, consts, readers) -> _Linear | None:
    """``node`` as a linear layer of ``x`` with an int8 weight, or None."""
    if node.input[0] != x or x in node.input[1:]:
        return None
    if node.op_type == "Gemm" and _attr(node, "transA", 0) == 0 and all(
            a.f == 1.0 for a in node.attribute if a.name in ("alpha", "beta")):
        found = _weight_codes(producers, consts, readers, node.input[1], transposed=_attr(node, "transB", 0) == 1)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if found is None or (bias is not None and (bias not in consts or consts[bias].ndim != 1)):
            return None
        return _Linear(node, found[0], found[1], bias, node.output[0], [node, *found[2]])
    if node.op_type != "MatMul":
        return None
    found = _weight_codes(producers, consts, readers, node.input[1], transposed=False)
    if found is None:
        return None
    codes, scale, weight_nodes = found
    add = readers.get(node.output[0], [])
    add = add[0] if len(add) == 1 and add[0].op_type == "Add" else None
    bias = add and next((i for i in add.input if i != node.output[0]), None)
    if add is None or bias not in consts or consts[bias].shape != (codes.shape[1],):
        return _Linear(node, codes, scale, None, node.output[0], [node, *weight_nodes])
    return _Linear(node, codes, scale, bias, add.output[0], [node, add, *weight_nodes])


def _zero_point_rows(weight: np.ndarray, count: int, limit: int) -> np.ndarray:
    """``count`` int8 rows within +/-``limit`` summing to minus the column sums of ``weight``."""
    rows, rest = np.zeros((count, weight.shape[1]), np.int64), -weight.astype(np.int64).sum(0)
    for r in range(count):
        rows[r] = np.clip(rest, -limit, limit)
        rest -= rows[r]
    assert not rest.any()
    return rows


def token_linears_to_integer(model) -> int:
    """Rewrite the linear layers reading per-token quantized activations as integer GEMMs; returns how many.
    Runs after the weight quantizers are folded."""
    from onnx import helper, numpy_helper

    graph, consts, producers, _ = _index(model.graph)
    readers = _readers(graph)
    count = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and _attr(n, "block_size", 0)]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in consts or len(dq.input) < 3:
            continue
        linears = [lin for node in readers.get(dq.output[0], [])
                   if (lin := _linear(node, dq.output[0], producers, consts, readers)) is not None]
        if not linears:
            continue
        base, scale, zero = dq.output[0], dq.input[1], dq.input[2]
        limit = 63 if all(np.abs(lin.weight.astype(np.int64)).max() <= 63 for lin in linears) else 127
        extra = max(math.ceil(np.abs(lin.weight.astype(np.int64).sum(0)).max() / limit) for lin in linears)
        graph.initializer.extend([numpy_helper.from_array(np.array([extra], np.int64), base + "_zero_columns"),
                                  numpy_helper.from_array(np.array(1.0, np.float32), base + "_unit")])
        codes = base + "_with_zero_points"
        _insert_in_place_of(graph, dq, [
            dq,
            helper.make_node("Expand", [zero, base + "_zero_columns"], [base + "_zeros"]),
            helper.make_node("Concat", [q.output[0], base + "_zeros"], [codes], axis=-1),
        ])
        for i, lin in enumerate(linears):
            name = f"{base}_linear{i}"
            weight = np.concatenate([lin.weight, _zero_point_rows(lin.weight, extra, limit)]).astype(np.int8)
            graph.initializer.append(numpy_helper.from_array(weight, name + "_weight"))
            unbiased = lin.output if lin.bias is None else name + "_unbiased"
            nodes = [  # ONNX Runtime does not fuse MatMulInteger -> Cast -> Mul(weight scales) by itself
                helper.make_node("MatMulIntegerToFloat", [codes, name + "_weight", base + "_unit", lin.weight_scale],
                                 [name + "_channels"], domain=MS_DOMAIN),
                helper.make_node("Mul", [name + "_channels", scale], [unbiased]),
            ]
            if lin.bias is not None:
                nodes.append(helper.make_node("Add", [unbiased, lin.bias], [lin.output]))
            _insert_in_place_of(graph, lin.node, nodes)
            for node in lin.replaced[1:]:
                graph.node.remove(node)
            count += 1
    if count and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unread(graph)
    return count
