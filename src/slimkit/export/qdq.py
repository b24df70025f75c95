"""Quantized ONNX in QDQ form, carrying slimkit's own scales and zero points.

The fake-quantized graph from ``quant/ptq.py`` exports as QuantizeLinear /
DequantizeLinear pairs. Two rewrites then make the file what runtimes expect:
weights are stored as int8 initializers (QuantizeLinear of a constant is
computed here, so the file is about 4x smaller), and conv/gemm biases become
int32 at scale ``s_x * s_w`` behind a DequantizeLinear. ONNX Runtime fuses the
pattern into integer kernels; TensorRT-style runtimes read the same file.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SlimkitError
from ..inputs import Inputs
from ..models.text import is_embedder
from ..outputs import claim_output
from .onnx import DEFAULT_OPSET, _export_graph, atomic_onnx_path, run_torch, save_onnx, shorten_names


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Cast" and node.input[0] in values:  # a large constant the optimizer left unfolded
            from onnx import helper

            values[node.output[0]] = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to", 1)))
    return values


def _attr(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _ints(node, name: str) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), [])


def _axis(node) -> int:
    return _attr(node, "axis", 1)


def _spread(values: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """Per-axis (or per-block along ``axis``) quantization parameters broadcast against a tensor of ``shape``."""
    if values.ndim == 0:
        return values
    if block:
        return np.repeat(values, block, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return values.reshape(view)


def _integer_tensor(name: str, codes: np.ndarray, dtype: int):
    """An initializer holding ``codes`` as ``dtype``, 4-bit types packed two per byte (low nibble first)."""
    from onnx import TensorProto, helper, numpy_helper

    if dtype not in (TensorProto.INT4, TensorProto.UINT4):
        return numpy_helper.from_array(codes.astype(helper.tensor_dtype_to_np_dtype(dtype)), name)
    nibbles = (codes.reshape(-1) & 0xF).astype(np.uint8)
    nibbles = np.append(nibbles, np.uint8(0)) if len(nibbles) % 2 else nibbles
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, dtype, codes.shape, packed.tobytes(), raw=True)


def fold_weight_quantizers(model) -> int:
    """Replace QuantizeLinear(constant weight) by its integer result; returns how many were folded."""
    from onnx import TensorProto, helper

    graph = model.graph
    consts = _constants(graph)
    inits = {init.name: init for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = consts[node.input[0]].astype(np.float64)
        axis, block = _axis(node) % w.ndim, _attr(node, "block_size", 0)
        scale = _spread(consts[node.input[1]].astype(np.float64), w.shape, axis, block)
        if len(node.input) > 2 and node.input[2]:
            zero = consts[node.input[2]]
            dtype = helper.np_dtype_to_tensor_dtype(zero.dtype)
            zero = _spread(zero.astype(np.float64), w.shape, axis, block)
        else:
            zero, dtype = 0.0, _attr(node, "output_dtype", TensorProto.UINT8)
        low, high = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}.get(dtype) or (
            lambda info: (info.min, info.max))(np.iinfo(helper.tensor_dtype_to_np_dtype(dtype)))
        codes = np.clip(np.round(w / scale) + zero, low, high).astype(np.int64)
        graph.initializer.append(_integer_tensor(node.output[0], codes, dtype))
        graph.node.remove(node)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def _index(graph):
    """(graph, constant values, producer of each value, number of node inputs reading each value)."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return graph, _constants(graph), {out: node for node in graph.node for out in node.output}, uses


def _readers(graph) -> dict[str, list]:
    """The nodes reading each value."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _plain_gemms(graph):
    """Gemm nodes computing ``A @ B^T + C`` (what the exporter emits for a 2-D linear layer)."""
    for node in list(graph.node):
        if node.op_type == "Gemm" and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0 and all(
                a.f == 1.0 for a in node.attribute if a.name in ("alpha", "beta")):
            yield node


def _replace_initializer(graph, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    old = next(init for init in graph.initializer if init.name == name)
    graph.initializer.remove(old)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))


def _set_axis(node, axis: int) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("axis", axis)])


def _insert_in_place_of(graph, old, nodes) -> None:
    index = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def fold_constant_reshapes(model) -> int:
    """Reshape(initializer, constant shape) -> initializer, so weight quantizers behind one can be folded."""
    from onnx import numpy_helper

    graph = model.graph
    consts = _constants(graph)
    inits = {init.name for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Reshape" or node.input[0] not in inits or node.input[1] not in consts:
            continue
        value = consts[node.input[0]]
        shape = [value.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d)
                 for i, d in enumerate(consts[node.input[1]])]
        graph.initializer.append(numpy_helper.from_array(value.reshape(shape), node.output[0]))
        graph.node.remove(node)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def _blocked_weight_pair(producers, consts, uses, name: str):
    """The QuantizeLinear -> DequantizeLinear pair over a constant block-quantized weight that
    produces ``name`` for one reader and nothing else, or None."""
    dq = producers.get(name) if uses.get(name) == 1 else None
    q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if (q is None or q.op_type != "QuantizeLinear" or not _attr(q, "block_size", 0)
            or q.input[0] not in consts or uses.get(q.input[0]) != 1 or uses.get(dq.input[0]) != 1):
        return None
    return q, dq


def _transpose_blocked_pair(graph, consts, q, dq) -> None:
    """Store a 2-D block-quantized weight transposed, with its block scales (and the quantizers' axis) to match."""
    for name in {q.input[0], *q.input[1:], *dq.input[1:]} - {""}:
        if consts[name].ndim == 2:  # the weight, and block scales [out, groups] -> [groups, out]
            _replace_initializer(graph, name, consts[name].T)
    for node in (q, dq):
        _set_axis(node, 1 - _axis(node) % 2)


def blocked_gemms_to_matmuls(model) -> int:
    """Rewrite Gemm (and Transpose -> MatMul) over a block-quantized weight as MatMul (+ Add) over the
    transposed weight, before the quantizer is folded.

    ONNX Runtime fuses 4-bit blocked weights -> MatMul into MatMulNBits (blocks along the
    reduction axis), but not the same pattern around Gemm, nor with a Transpose between: the
    exporter writes a linear layer over 3-D inputs (a transformer's) as ``x @ W^T``.
    """
    from onnx import helper

    graph, consts, producers, uses = _index(model.graph)
    count = 0
    for gemm in _plain_gemms(graph):
        pair = _blocked_weight_pair(producers, consts, uses, gemm.input[1])
        if pair is None:
            continue
        _transpose_blocked_pair(graph, consts, *pair)
        out, has_bias = gemm.output[0], len(gemm.input) > 2 and bool(gemm.input[2])
        nodes = [helper.make_node("MatMul", gemm.input[:2], [out + "_matmul" if has_bias else out],
                                  name=gemm.name + "_matmul")]
        if has_bias:
            nodes.append(helper.make_node("Add", [nodes[0].output[0], gemm.input[2]], [out], name=gemm.name + "_bias"))
        _insert_in_place_of(graph, gemm, nodes)
        count += 1
    for transpose in [n for n in graph.node if n.op_type == "Transpose"]:
        pair = _blocked_weight_pair(producers, consts, uses, transpose.input[0])
        if pair is None or _ints(transpose, "perm") != [1, 0] or consts[pair[0].input[0]].ndim != 2:
            continue
        _transpose_blocked_pair(graph, consts, *pair)
        for node in graph.node:
            node.input[:] = [transpose.input[0] if i == transpose.output[0] else i for i in node.input]
        graph.node.remove(transpose)
        count += 1
    return count


def gather_rows_before_dequantizing(model) -> int:
    """Rewrite Gather over a dequantized int8 table (one scale per row) to gather the int8 rows and their
    scales first and dequantize only those: ``Cast(Gather(W_q, ids)) * Gather(s, ids)[..., None]``.

    Dequantizing the whole table on every run (a word embedding: 30522 x 384) costs more than a
    small transformer's first layer; the rows a batch reads are a few hundred. Runs after the weight
    quantizers are folded; tables with a non-zero zero point are left as they are.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph, consts, producers, uses = _index(model.graph)
    axes = "_slimkit_last_axis"
    count = 0
    for gather in [n for n in graph.node if n.op_type == "Gather" and _attr(n, "axis", 0) == 0]:
        dq = producers.get(gather.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or uses.get(gather.input[0]) != 1:
            continue
        table, scale = dq.input[0], dq.input[1]
        zero = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if (table not in consts or consts[table].dtype != np.int8 or consts[table].ndim != 2
                or scale not in consts or consts[scale].shape != consts[table].shape[:1]
                or _axis(dq) % 2 != 0 or _attr(dq, "block_size", 0)
                or (len(dq.input) > 2 and dq.input[2] and (zero is None or np.any(zero)))):
            continue
        base, ids = gather.output[0], gather.input[1]
        _insert_in_place_of(graph, gather, [
            helper.make_node("Gather", [table, ids], [base + "_rows"], axis=0),
            helper.make_node("Cast", [base + "_rows"], [base + "_float"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [scale, ids], [base + "_scales"], axis=0),
            helper.make_node("Unsqueeze", [base + "_scales", axes], [base + "_column"]),
            helper.make_node("Mul", [base + "_float", base + "_column"], [base]),
        ])
        graph.node.remove(dq)
        count += 1
    if count:
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
        _drop_unread(graph)
    return count


def dynamic_gemms_to_integer(model) -> int:
    """Rewrite Gemm over a dynamically quantized input and an int8 weight in integer form.

    ``MatMulInteger(x_q, W_q^T) * (s_x * s_w) + b`` is what ONNX Runtime fuses into
    DynamicQuantizeMatMul; the QDQ form around a 2-D Gemm is not fused (its MatMul + Add
    fusion runs first). Runs after the weight quantizers are folded.
    """
    from onnx import TensorProto, helper

    graph, consts, producers, uses = _index(model.graph)
    count = 0
    for gemm in _plain_gemms(graph):
        x_dq, w_dq = producers.get(gemm.input[0]), producers.get(gemm.input[1])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        dynamic = producers.get(x_dq.input[0])
        weight = w_dq.input[0]
        if (dynamic is None or dynamic.op_type != "DynamicQuantizeLinear" or weight not in consts
                or consts[weight].dtype != np.int8 or uses.get(weight) != 1 or uses.get(gemm.input[1]) != 1
                or not np.all(consts[w_dq.input[2]] == 0 if len(w_dq.input) > 2 else True)):
            continue
        _replace_initializer(graph, weight, consts[weight].T)
        base, out = gemm.name or gemm.output[0], gemm.output[0]
        has_bias = len(gemm.input) > 2 and bool(gemm.input[2])
        nodes = [
            helper.make_node("MatMulInteger", [dynamic.output[0], weight, dynamic.output[2]], [base + "_int32"]),
            helper.make_node("Cast", [base + "_int32"], [base + "_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [dynamic.output[1], w_dq.input[1]], [base + "_scale"]),
            helper.make_node("Mul", [base + "_float", base + "_scale"], [out + "_unbiased" if has_bias else out]),
        ]
        if has_bias:
            nodes.append(helper.make_node("Add", [out + "_unbiased", gemm.input[2]], [out]))
        _insert_in_place_of(graph, gemm, nodes)
        graph.node.remove(w_dq)
        count += 1
    _drop_unread(graph)
    return count


def batched_linears_to_gemms(model) -> int:
    """Rewrite a linear layer over a >2-D input (Transpose(W) -> MatMul -> Add(b), which the exporter emits for
    ViT tokens or ConvNeXt's channels-last pixels) as a Gemm over the flattened rows, between Reshapes of the
    *quantized* tensors: ONNX Runtime then fuses DequantizeLinear -> Gemm -> QuantizeLinear into one integer
    QGemm with its int32 bias, where the MatMul form became MatMulIntegerToFloat plus a float bias Add, and
    the Q/DQ pair around every such layer stayed. Runs after the weight quantizers are folded."""
    from onnx import helper, numpy_helper

    graph, consts, producers, uses = _index(model.graph)
    consumers = _readers(graph)
    count = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        transpose, x_dq = producers.get(matmul.input[1]), producers.get(matmul.input[0])
        w_dq = producers.get(transpose.input[0]) if transpose is not None else None
        readers = consumers.get(matmul.output[0], [])
        add = readers[0] if len(readers) == 1 else None
        if not (transpose is not None and transpose.op_type == "Transpose"
                and [int(p) for a in transpose.attribute if a.name == "perm" for p in a.ints] == [1, 0]
                and w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in consts
                and consts[w_dq.input[0]].dtype == np.int8 and uses.get(matmul.input[1]) == 1
                and x_dq is not None and x_dq.op_type == "DequantizeLinear"
                and getattr(producers.get(x_dq.input[0]), "op_type", "") == "QuantizeLinear"  # static only
                and add is not None and add.op_type == "Add"):
            continue
        bias = next((name for name in add.input if name != matmul.output[0]), "")
        width, out_width = consts[w_dq.input[0]].shape[1], consts[w_dq.input[0]].shape[0]
        if bias not in consts or consts[bias].shape != (out_width,):
            continue
        base = matmul.output[0]
        after = consumers.get(add.output[0], [])
        q_out = after[0] if len(after) == 1 and after[0].op_type == "QuantizeLinear" else None
        graph.initializer.extend([numpy_helper.from_array(np.array([-1, width], dtype=np.int64), f"{base}_rows"),
                                  numpy_helper.from_array(np.array([out_width], dtype=np.int64), f"{base}_width")])
        nodes = [
            helper.make_node("Reshape", [x_dq.input[0], f"{base}_rows"], [f"{base}_rows_q"]),
            helper.make_node("DequantizeLinear", [f"{base}_rows_q", *x_dq.input[1:]], [f"{base}_rows_x"]),
            helper.make_node("Gemm", [f"{base}_rows_x", transpose.input[0], bias], [f"{base}_gemm"], transB=1,
                             name=matmul.name),
            # the shape of the quantized tensor: the dequantized one would be computed only to be measured
            helper.make_node("Shape", [x_dq.input[0]], [f"{base}_lead"], end=-1),
            helper.make_node("Concat", [f"{base}_lead", f"{base}_width"], [f"{base}_shape"], axis=0),
        ]
        if q_out is not None:  # quantize the Gemm's rows, then give them back their shape, still quantized
            nodes += [helper.make_node("QuantizeLinear", [f"{base}_gemm", *q_out.input[1:]], [f"{base}_gemm_q"]),
                      helper.make_node("Reshape", [f"{base}_gemm_q", f"{base}_shape"], [q_out.output[0]])]
            graph.node.remove(q_out)
        else:
            nodes.append(helper.make_node("Reshape", [f"{base}_gemm", f"{base}_shape"], [add.output[0]]))
        nodes[2].metadata_props.extend(matmul.metadata_props)  # the layer it came from (kept names only)
        _insert_in_place_of(graph, matmul, nodes)
        graph.node.remove(transpose)
        graph.node.remove(add)
        count += 1
    _drop_unread(graph)
    _topological_sort(graph)
    return count


def shield_float_layers(model) -> int:
    """Keep float the Conv/Gemm layers that read a quantized activation but have float weights (layers
    excluded from quantization): ONNX Runtime's WeightBiasQuantization would quantize such a layer's weight
    per tensor itself, which is not the model slimkit measured. It acts only on a per-tensor dequantizer, so
    the layer gets its own dequantizer with the same scale repeated per channel (axis 1); the values are the
    same. Returns how many layers were shielded."""
    from onnx import helper, numpy_helper

    graph, consts, producers, _ = _index(model.graph)
    inits = {init.name for init in graph.initializer}
    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.input[1] not in inits:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        scale, zero = consts.get(dq.input[1]), consts.get(dq.input[2])
        if scale is None or zero is None or scale.size != 1:
            continue
        weight = consts[node.input[1]]
        if node.op_type == "Gemm":
            channels = weight.shape[1] if _attr(node, "transB", 0) else weight.shape[0]
        elif node.op_type == "Conv":
            channels = weight.shape[1] * _attr(node, "group", 1)
        else:  # ConvTranspose: weight [C_in, C_out / group, ...]
            channels = weight.shape[0]
        base = f"{node.output[0]}_float_input"
        graph.initializer.extend([
            numpy_helper.from_array(np.full(channels, scale.reshape(()), scale.dtype), f"{base}_scale"),
            numpy_helper.from_array(np.full(channels, zero.reshape(()), zero.dtype), f"{base}_zero"),
        ])
        graph.node.append(helper.make_node("DequantizeLinear", [dq.input[0], f"{base}_scale", f"{base}_zero"],
                                           [base], axis=1, name=f"{base}_dequantize"))
        node.input[0] = base
        count += 1
    _drop_unread(graph)
    _topological_sort(graph)
    return count


def quantize_biases(model) -> int:
    """Conv/Gemm biases as int32 at scale s_x * s_w (what integer kernels add to their accumulators)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        s_x, s_w = consts.get(dq_x.input[1]), consts.get(dq_w.input[1])
        if s_x is None or s_w is None or s_x.ndim != 0:
            continue
        scale = (s_x.astype(np.float64) * s_w.astype(np.float64)).reshape(-1)
        bias = consts[node.input[2]].astype(np.float64)
        q = np.round(bias / scale).astype(np.int32)
        base = f"{node.output[0]}_bias"  # per layer: the exporter shares one initializer among equal biases
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_int32"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_int32_scale"),
        ])  # no zero point: it defaults to 0 of the input's type (int32)
        graph.node.append(helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_int32_scale"],
                                           [f"{base}_dequantized"], axis=0, name=f"{base}_dequantize"))
        node.input[2] = f"{base}_dequantized"
        count += 1
    _drop_unused_initializers(graph)
    _topological_sort(graph)
    return count


def _drop_unread(graph) -> None:
    """Remove the dequantizers (and the casts and constants feeding them) nothing reads any more after a
    rewrite, then the initializers they read."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unread = [node for node in graph.node if node.op_type in ("DequantizeLinear", "Cast", "Constant")
                  and not read.intersection(node.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _topological_sort(graph) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise SlimkitError("quantized ONNX graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
            pending.remove(n)
    del graph.node[:]
    graph.node.extend(ordered)


def export_qdq(model: torch.nn.Module, path: str | os.PathLike, sample: Inputs, opset: int = DEFAULT_OPSET) -> Path:
    """Export a fake-quantized model as a QDQ ONNX file with integer weights and int32 biases
    (opset 21 where weights are block-quantized)."""
    path = Path(path)
    with atomic_onnx_path(path) as tmp:
        write_qdq(model, tmp, sample, opset)
    return path


def write_qdq(model: torch.nn.Module, path: Path, sample: Inputs, opset: int = DEFAULT_OPSET,
              keep_names: bool = False, standard_only: bool = False) -> None:
    """``export_qdq`` into a path the caller makes atomic (a temporary file: its side file's name is recorded
    in the model, so the file is written where ONNX Runtime will load it). ``keep_names`` keeps the exporter's
    node names (``node_<graph node>``), which ONNX Runtime's profiler reports, for attributing time.
    ``standard_only`` leaves out ONNX Runtime's forms (integer matrix products, int32 biases, fused attention,
    gathered int8 rows): plain Q/DQ around standard operators, as TensorRT reads them."""
    import onnx

    from ..quant.meta_kernels import ensure_fake_quant_meta_kernels
    from ..quant.ops import OPSET_NEEDED, onnx_translations
    from .attention_fusion import fuse_attention
    from .token_quant import token_linears_to_integer

    ensure_fake_quant_meta_kernels()
    if isinstance(model, torch.fx.GraphModule):
        opset = max([opset, *(OPSET_NEEDED.get(node.target, opset) for node in model.graph.nodes)])
    _export_graph(model, path, sample[:2], opset, onnx_translations(), strip=not keep_names)
    proto = onnx.load(str(path))
    fold_constant_reshapes(proto)
    blocked_gemms_to_matmuls(proto)
    if fold_weight_quantizers(proto) == 0:
        raise SlimkitError(f"{type(model).__name__} has no quantized weights to export as int8")
    if not standard_only:
        token_linears_to_integer(proto)
        dynamic_gemms_to_integer(proto)
        gather_rows_before_dequantizing(proto)
        batched_linears_to_gemms(proto)
        quantize_biases(proto)
        shield_float_layers(proto)
        fuse_attention(proto)
    if not keep_names:
        shorten_names(proto)
    save_onnx(proto, path)
    onnx.checker.check_model(str(path))  # by path: a model with a side file is over protobuf's limit in memory


MIN_AGREEMENT = 0.99  # the deployed file against the simulation: close enough to need no further judgement
MIN_SQNR_DB = 30.0
SQNR_SLACK_DB = 1.0  # or: the deployed file at most this much further from the reference than the simulation
AGREEMENT_SLACK = 0.01


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``other`` against ``reference``, in dB: identical is +inf."""
    reference, other = reference.astype(np.float64), other.astype(np.float64)
    noise = float(((reference - other) ** 2).sum())
    signal = float((reference**2).sum())
    if noise == 0:
        return math.inf
    return float(10 * np.log10(signal / noise)) if signal else -math.inf


def agreement(reference: np.ndarray, other: np.ndarray, neighbours: bool = False) -> float:
    """Share of samples on which ``other`` decides as ``reference`` does: the same top-1 class, or for
    an embedder (``neighbours``), the same nearest other sample by cosine (an argmax over embedding
    dimensions means nothing)."""
    if neighbours:
        from ..analyze.embedding import retrieval_agreement

        return retrieval_agreement(torch.from_numpy(other), torch.from_numpy(reference), k=1)
    return float((reference.argmax(-1) == other.argmax(-1)).mean())


def _outputs(model: torch.nn.Module, inputs: Inputs) -> np.ndarray:
    return run_torch(model, inputs).double().numpy()


def activations_in_float(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a quantized graph whose activation quantizers are removed (weights stay on their grids): the
    reference for a quantized model whose float original is not at hand, which the simulation's and the deployed
    file's activation rounding are both measured against."""
    from ..quant.ops import RUNTIME_ACTIVATION_QUANTIZERS

    return without_quantizers(gm, {torch.fake_quantize_per_tensor_affine, *RUNTIME_ACTIVATION_QUANTIZERS})


def without_quantizers(gm: torch.fx.GraphModule, quantizers: set) -> torch.fx.GraphModule:
    """A copy of ``gm`` with every call of one of ``quantizers`` removed (its input passed through); the other
    nodes keep their names."""
    reference = copy.deepcopy(gm)
    for node in list(reference.graph.nodes):
        if node.op == "call_function" and node.target in quantizers:
            node.replace_all_uses_with(node.args[0])
            reference.graph.erase_node(node)
    reference.recompile()
    return reference


def compare_with_runtime(model: torch.nn.Module, path: str | os.PathLike, inputs: Inputs,
                         reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """ONNX Runtime's integer model against slimkit's simulation: ``compare_outputs``."""
    from .onnx import ort_session, run_ort

    return compare_outputs(model, run_ort(ort_session(path), inputs), inputs, reference)


def compare_outputs(model: torch.nn.Module, deployed: np.ndarray, inputs: Inputs,
                    reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """A runtime's outputs of an integer file against slimkit's simulation (top-1 agreement, SQNR), and both
    against a reference: the float model when given, else the simulation with float activations."""
    simulated = _outputs(model, inputs)
    deployed = np.asarray(deployed, dtype=np.float64)
    if reference is None and isinstance(model, torch.fx.GraphModule):
        reference, kind = activations_in_float(model), "the int8 weights with float activations"
    else:
        kind = "the float model"
    expected = _outputs(reference, inputs) if reference is not None else simulated
    neighbours = is_embedder(model)
    return {
        "top1_agreement": agreement(simulated, deployed, neighbours), "sqnr_db": sqnr_db(simulated, deployed),
        "max_abs_diff": float(np.abs(simulated - deployed).max()), "samples": len(inputs), "reference": kind,
        "agreement": "nearest neighbour" if neighbours else "top-1 class",
        "simulation_vs_reference": {"top1_agreement": agreement(expected, simulated, neighbours),
                                    "sqnr_db": sqnr_db(expected, simulated)},
        "deployed_vs_reference": {"top1_agreement": agreement(expected, deployed, neighbours),
                                  "sqnr_db": sqnr_db(expected, deployed)},
    }


def deployed_is_faithful(check: dict[str, Any]) -> bool:
    """The deployed file is as good as slimkit measured: it agrees with the simulation outright, or it is no
    meaningfully further from the reference than the simulation is (deep models flip a few roundings between
    two float implementations, which compound; that is not a worse model)."""
    if check["top1_agreement"] >= MIN_AGREEMENT and check["sqnr_db"] >= MIN_SQNR_DB:
        return True
    sim, dep = check["simulation_vs_reference"], check["deployed_vs_reference"]
    return (dep["sqnr_db"] >= sim["sqnr_db"] - SQNR_SLACK_DB
            and dep["top1_agreement"] >= sim["top1_agreement"] - agreement_slack(check))


def agreement_slack(check: dict[str, Any]) -> float:
    """How far the deployed file's top-1 agreement with the reference may fall below the simulation's by
    chance: only the k samples on which the two disagree can move it, each by 1/n, so its noise is about
    sqrt(k)/n; three times that, and at least ``AGREEMENT_SLACK``."""
    n = check.get("samples") or 0
    if not n:
        return AGREEMENT_SLACK
    k = round((1 - check["top1_agreement"]) * n)
    return max(AGREEMENT_SLACK, 3 * math.sqrt(k) / n)


def export_int8_verified(model: torch.nn.Module, path: str | os.PathLike, inputs: Inputs, *,
                         reference: torch.nn.Module | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export QDQ and check what ONNX Runtime runs against slimkit's simulation and against ``reference`` (the
    float model; by default the simulation with float activations); a file that is worse than the simulation
    is not left behind. An existing ONNX file slimkit wrote is replaced; anything else needs ``overwrite``."""
    path = Path(path)
    with claim_output(path, "onnx", overwrite=overwrite), atomic_onnx_path(path) as tmp:
        write_qdq(model, tmp, inputs[:2])
        check = compare_with_runtime(model, tmp, inputs, reference)
        if not deployed_is_faithful(check):
            sim, dep = check["simulation_vs_reference"], check["deployed_vs_reference"]
            raise SlimkitError(
                f"int8 ONNX of {type(model).__name__} is worse than slimkit's simulation: against "
                f"{check['reference']}, ONNX Runtime reaches SQNR {dep['sqnr_db']:.1f} dB and {check['agreement']} agreement "
                f"{dep['top1_agreement']:.4f}, the simulation {sim['sqnr_db']:.1f} dB and {sim['top1_agreement']:.4f} "
                f"(allowed: {SQNR_SLACK_DB:g} dB and {agreement_slack(check):.3f} less); against each other "
                f"{check['sqnr_db']:.1f} dB and {check['top1_agreement']:.4f}; {_where_it_parts(model, tmp, inputs)}"
                f"{_saturation_hint(model)}")
    return check


def _saturation_hint(model: torch.nn.Module) -> str:
    """Why a file with 8-bit weight codes can part from the simulation on this CPU, and the remedy."""
    from ..analyze.machine import int8_pairs_saturate

    steps = [s for s in getattr(model, "slimkit_meta", {}).get("plan", []) if s.get("op") == "quantize-static"]
    full = not steps or any(w.get("bits", steps[-1].get("weight_bits", 8)) == 8 for w in steps[-1]["weights"].values())
    if not (full and int8_pairs_saturate()):
        return ""
    return ("; this CPU has no VNNI, so ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits, "
            "which saturate with 8-bit weight codes: quantize with reduce_range (7-bit codes)")


def _where_it_parts(model: torch.nn.Module, path: Path, inputs: Inputs) -> str:
    from .layer_diff import first_divergence, int8_layer_diff

    if not isinstance(model, torch.fx.GraphModule):
        return "slimkit diff-int8 compares the two layer by layer"
    try:
        first = first_divergence(int8_layer_diff(model, path, inputs[:16]))
    except SlimkitError as exc:
        return f"cannot compare layer by layer: {exc}"
    if first is None:
        return "no single layer diverges: rounding differences compound with depth"
    return (f"the codes part at the {first['quantizer']} ({100 * first['codes_differ']:.1f}% differ, up to "
            f"{first['max_steps']} steps; slimkit diff-int8 lists every layer)")
