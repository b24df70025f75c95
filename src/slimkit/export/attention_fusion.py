"""Scaled dot-product attention as ONNX Runtime's fused ``MultiHeadAttention`` operator.

torch exports a transformer's attention as some twenty nodes per layer: Q, K and V split into
heads (Reshape, Transpose), K transposed again, both scaled, ``MatMul``, the mask added, ``Softmax``,
``MatMul`` with V and the heads merged back. ONNX Runtime's own optimizer does not recognise this
form, so slimkit rewrites it into one ``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=mask)``
per layer (the same GEMMs, without the transposes and the separate passes). Measured on
all-MiniLM-L6-v2, 2 threads, AVX2, 128 tokens: per-token int8 0.92x its unfused time at batch 8 and
0.97x at batch 1; fp32 0.95x / 0.98x.

The operator exists in ONNX Runtime only, so the rewrite is applied to files that are ONNX Runtime
files already (they use its ``com.microsoft`` operators); other exports stay standard ONNX.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]  # [batch, tokens, heads, dim] <-> [batch, heads, tokens, dim]


def _matching(node, op_type: str, perm: list[int] | None):
    if node is None or node.op_type != op_type:
        return None
    if perm is not None and [list(a.ints) for a in node.attribute if a.name == "perm"] != [perm]:
        return None
    return node


class _Graph:
    """Producers, readers and constants of an ONNX graph, for matching."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph, self._to_array = graph, numpy_helper.to_array
        self.producers = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self._to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return next((self._to_array(a.t) for a in node.attribute if a.name == "value"), None)
        return None

    def made_by(self, name: str, op_type: str, perm: list[int] | None = None):
        """The node producing ``name`` if it is an ``op_type`` (with permutation ``perm``), else None."""
        return _matching(self.producers.get(name), op_type, perm)

    def only_reader(self, name: str, op_type: str, perm: list[int] | None = None):
        """The one node reading ``name`` if it is an ``op_type`` (with permutation ``perm``), else None."""
        readers = self.readers.get(name, [])
        return _matching(readers[0], op_type, perm) if len(readers) == 1 else None

    def scaled(self, name: str) -> tuple[float, str]:
        """(scalar constant factor, the value it multiplies) of ``name``, or (1, ``name``)."""
        node = self.made_by(name, "Mul")
        if node is not None:
            for value, factor in ((0, 1), (1, 0)):
                c = self.constant(node.input[factor])
                if c is not None and c.size == 1:
                    return float(c.reshape(())), node.input[value]
        return 1.0, name

    def heads_of(self, name: str) -> tuple[str, int] | None:
        """(the [batch, tokens, width] value, number of heads) of a value split into heads by
        ``Transpose(Reshape(x, [b, t, heads or -1, dim]), [0, 2, 1, 3])``; x must be a linear layer's output
        (an Add of a 1-D bias), which gives the width when the head count is -1."""
        transpose = self.made_by(name, "Transpose", HEADS_FIRST)
        reshape = transpose and self.made_by(transpose.input[0], "Reshape")
        if reshape is None:
            return None
        shape = self.constant(reshape.input[1])
        concat = self.made_by(reshape.input[1], "Concat")
        if shape is None and concat is not None and len(concat.input) == 4:
            parts = [self.constant(i) for i in concat.input[2:]]
            shape = None if any(p is None or p.size != 1 for p in parts) else np.array([0, 0, *[int(p.reshape(())) for p in parts]])
        add = self.made_by(reshape.input[0], "Add")
        widths = [c.size for c in (self.constant(i) for i in (add.input if add is not None else [])) if c is not None
                  and c.ndim == 1]
        if shape is None or len(shape) != 4 or not widths or shape[3] <= 0 or widths[0] % shape[3]:
            return None
        heads = widths[0] // int(shape[3])
        return (reshape.input[0], heads) if shape[2] in (-1, heads) else None

    def transposed_heads_of(self, name: str) -> tuple[str, int] | None:
        """``heads_of`` the value under a chain of Reshape/Transpose nodes (K transposed for Q K^T)."""
        for _ in range(6):
            found = self.heads_of(name)
            if found is not None:
                return found
            node = self.producers.get(name)
            if node is None or node.op_type not in ("Reshape", "Transpose"):
                return None
            name = node.input[0]
        return None


def _attention(g: _Graph, softmax):
    """The MultiHeadAttention node replacing the attention around ``softmax``, or None if it is not one."""
    from onnx import helper

    if [a.i for a in softmax.attribute if a.name == "axis"] not in ([-1], [3]):
        return None
    summed = g.made_by(softmax.input[0], "Add")
    scores = summed and next(filter(None, (g.made_by(i, "MatMul") for i in summed.input)), None)
    if scores is None:
        return None
    mask = next(i for i in summed.input if i != scores.output[0])
    q_scale, q = g.scaled(scores.input[0])
    k_scale, k = g.scaled(scores.input[1])
    query, key = g.heads_of(q), g.transposed_heads_of(k)
    weighted = g.only_reader(softmax.output[0], "MatMul")
    if query is None or key is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    value = g.heads_of(weighted.input[1])
    merged = g.only_reader(weighted.output[0], "Transpose", HEADS_FIRST)
    out = merged and g.only_reader(merged.output[0], "Reshape")
    if value is None or out is None or not query[1] == key[1] == value[1]:
        return None
    node = helper.make_node("MultiHeadAttention", [query[0], key[0], value[0], "", "", mask], [out.output[0]],
                            domain=MS_DOMAIN, num_heads=query[1], scale=q_scale * k_scale)
    return node, out


def fuse_attention(model) -> int:
    """Rewrite every matched attention of an ONNX Runtime file as MultiHeadAttention; returns how many."""
    from .qdq import _drop_unused_initializers, _topological_sort

    graph = model.graph
    if not any(n.domain == MS_DOMAIN for n in graph.node):
        return 0
    g = _Graph(graph)
    fused = []
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        found = _attention(g, softmax)
        if found is not None:
            node, replaced = found
            graph.node.remove(replaced)  # its output is the fused node's now
            fused.append(node)
    graph.node.extend(fused)
    _drop_dead_nodes(graph)
    _drop_unused_initializers(graph)
    _topological_sort(graph)
    return len(fused)


def _drop_dead_nodes(graph) -> None:
    """Remove the nodes whose outputs nothing reads (the unfused attention's), repeatedly."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not read.intersection(node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
