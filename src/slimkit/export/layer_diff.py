"""Where an int8 file parts from slimkit's simulation: every activation quantizer, compared in int8 codes.

The simulation and the QDQ file quantize the same activations with the same scales, in the same order, so
each of the simulation's activation quantizers has one QuantizeLinear in the file. Two float implementations
flip a few roundings by one step, and flips compound slowly with depth; a real mismatch (an operator the
runtime computes differently, a wrong scale, a damaged weight) shows as a jump: many codes differing by
several steps from one quantizer on. Reading the codes layer by layer names that quantizer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from ..errors import SlimkitError
from ..inputs import Inputs, flat

# A quantizer diverges when its codes part far more than everything before it did: rounding noise grows
# gradually with depth (a random-weight resnet18 at 32 px, by hand: at most 6 steps and 9% of codes by its
# classifier), a mismatch jumps.
DIVERGED_STEPS = 8  # a code this many steps away, and twice the largest distance so far; or ...
DIVERGED_SHARE = 0.05  # ... this share of codes differing, and ten times the largest share so far


def _activation_quantizers(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.fake_quantize_per_tensor_affine]


def weight_owner(node: fx.Node) -> str | None:
    weight = node.args[1] if len(node.args) > 1 else None
    while isinstance(weight, fx.Node) and weight.op == "call_function":  # the weight's own fake quantizer
        weight = weight.args[0]
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return str(weight.target).rpartition(".")[0]
    return None


def describe(node: fx.Node) -> str:
    """A quantizer named by the layers around it ('output of layer1.0.conv1, input of layer1.0.conv2')."""
    names = []
    source = node.args[0]
    for _ in range(3):  # through a fused activation or a reshape to the op that produced the value
        if not isinstance(source, fx.Node) or source.op != "call_function":
            break
        owner = weight_owner(source)
        if owner is not None:
            names.append(f"output of {owner}")
            break
        source = source.args[0] if source.args else None
    consumer = next((owner for user in node.users if user.args and user.args[0] is node
                     for owner in [weight_owner(user)] if owner is not None), None)
    if consumer is not None:
        names.append(f"input of {consumer}")
    return ", ".join(names) or f"activation {node.name}"


def _file_quantizers(proto) -> list[Any]:
    constants = {init.name for init in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


def _pair_by_scale(ours: list[fx.Node], theirs: list[Any], constants: dict[str, np.ndarray]) -> list[Any]:
    """The file's quantizer for each of the simulation's: the same scale and zero point, taken in graph order
    (the exporter may order parallel branches differently; quantizers that share both quantize one value)."""
    waiting: dict[tuple[float, int], list[Any]] = {}
    for q in theirs:
        key = (float(np.float32(constants[q.input[1]])), int(constants[q.input[2]]) if len(q.input) > 2 else 0)
        waiting.setdefault(key, []).append(q)
    paired = []
    for node in ours:
        key = (float(np.float32(node.args[1])), int(node.args[2]))
        if not waiting.get(key):
            raise SlimkitError(f"the file has no quantizer with the scale {key[0]:g} and zero point {key[1]} of "
                               f"{describe(node)}: it was not exported from this model")
        paired.append(waiting[key].pop(0))
    return paired


def _deployed_codes(proto, names: list[str], inputs: Inputs) -> list[np.ndarray]:
    """The file's QuantizeLinear outputs, made graph outputs, as ONNX Runtime computes them."""
    import onnx

    from .onnx import ort_feed, ort_session

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    outputs = {o.name for o in proto.graph.output}
    for name in names:
        if name not in outputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        session = ort_session(tmp)
        return session.run(names, ort_feed(session, inputs))
    finally:
        Path(tmp).unlink(missing_ok=True)


def _simulated_values(gm: fx.GraphModule, nodes: list[fx.Node], inputs: Inputs) -> list[torch.Tensor]:
    wanted, values = set(nodes), {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out.clone()  # later in-place ops (out += identity) would change it
            return out

    with torch.no_grad():
        Capture(gm).run(*flat(inputs))
    return [values[n] for n in nodes]


def int8_layer_diff(model: fx.GraphModule, path: str | os.PathLike, inputs: Inputs) -> list[dict[str, Any]]:
    """Per activation quantizer, in graph order: the share of int8 codes where ONNX Runtime running ``path``
    differs from slimkit's simulation ``model``, and the largest difference in quantization steps."""
    import onnx

    from .qdq import _constants

    if not Path(path).is_file():
        raise SlimkitError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: not a readable ONNX file
        raise SlimkitError(f"{path} is not a readable ONNX file: {str(exc).splitlines()[0]}") from None
    ours, theirs = _activation_quantizers(model), _file_quantizers(proto)
    if len(ours) != len(theirs):
        raise SlimkitError(f"cannot pair the file's {len(theirs)} activation quantizers with the simulation's "
                           f"{len(ours)}: the file was not exported from this model")
    theirs = _pair_by_scale(ours, theirs, _constants(proto.graph))
    deployed = _deployed_codes(proto, [q.output[0] for q in theirs], inputs)
    simulated = _simulated_values(model, ours, inputs)
    rows = []
    for node, value, codes in zip(ours, simulated, deployed):
        scale, zero = float(node.args[1]), int(node.args[2])
        mine = (torch.round(value.double() / scale) + zero).numpy()
        steps = np.abs(mine - codes.astype(np.float64))
        rows.append({"quantizer": describe(node), "codes_differ": float((steps > 0).mean()),
                     "max_steps": int(steps.max()) if steps.size else 0})
    return rows


def first_divergence(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first quantizer whose codes jump away from the simulation, if any."""
    steps, share = 0, 0.0
    for row in rows:
        if (row["max_steps"] >= max(DIVERGED_STEPS, 2 * steps)
                or row["codes_differ"] >= max(DIVERGED_SHARE, 10 * share)):
            return row
        steps, share = max(steps, row["max_steps"]), max(share, row["codes_differ"])
    return None
