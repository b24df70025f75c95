"""What a runtime requires of the ONNX files it takes, checked before a file travels to it.

``check_onnx(path, target)`` returns findings that name the node breaking a rule (``slimkit check-onnx``): an
error means the runtime refuses the file or computes something else than the file says, a warning that it runs
but not as intended (a layer left in floating point). TensorRT's rules are checked statically here, as no
GPU is needed to read them: its ONNX parser's operator table (onnx-tensorrt's support matrix for TensorRT 10.0,
opsets 9 to 20) and its explicit-quantization rules (int8/fp8/int4 with zero point 0, constant scales, per-channel
weights on the output-channel axis, integers only between a QuantizeLinear and its DequantizeLinear). ONNX Runtime
and OpenVINO are asked directly: the file is loaded in ONNX Runtime and converted by OpenVINO's ONNX frontend, and
what they cannot take is reported by node.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from ..errors import SlimkitError

Severity = Literal["error", "warning"]
RULE_TARGETS = ("tensorrt", "ort", "openvino")

# onnx-tensorrt's support matrix for TensorRT 10.0: operators its parser does not import
TENSORRT_UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow ImageDecoder MatMulInteger
MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
StringNormalizer StringSplit TfIdfVectorizer Unique""".split())
TENSORRT_OPSETS = (9, 20)
REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
# inputs TensorRT must know when it builds the engine: (operator, input index, input name)
TENSORRT_CONSTANT_INPUTS = {"Slice": (3, "axes"), "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"),
                            "Pad": (3, "axes"), "CumSum": (1, "axis"), "TopK": (1, "K"),
                            **{op: (1, "axes") for op in REDUCTIONS}}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    node: str  # "OpType 'name'", or "" for the model as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.node + ': ' if self.node else ''}{self.message} [{self.rule}]"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class _Graph:
    """A model's graph with the lookups the rules share: constants, producers, readers and value types."""

    def __init__(self, model, path: Path):
        import onnx

        from .qdq import _constants

        self.model, self.path, self.graph = model, path, model.graph
        self.constants = _constants(self.graph)
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # a model shape inference cannot follow keeps the types it declares
            inferred = self.graph
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in [*inferred.value_info, *inferred.input, *inferred.output]}
        self.types.update({init.name: init.data_type for init in self.graph.initializer})
        self.outputs = {o.name for o in self.graph.output}

    @functools.cached_property
    def ort_optimized(self) -> tuple[str | None, Any]:
        """ONNX Runtime's load of the file: (why it failed, or None; the graph it optimized to, at the level
        where it fuses Q/DQ into integer operators and before its CPU layout rewrites)."""
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            try:
                ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
                return None, onnx.load(options.optimized_model_filepath)
            except Exception as exc:  # ORT raises its own exception types; the message names the node
                return (str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__), None

    def dtype_of(self, name: str) -> int | None:
        if name in self.types and self.types[name]:
            return self.types[name]
        value = self.constants.get(name)
        if value is not None:
            from onnx import helper

            return helper.np_dtype_to_tensor_dtype(value.dtype)
        return None


def label(node) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _dtype_name(dtype: int | None) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(dtype).lower() if dtype else "unknown"


def _quantized_dtype(g: _Graph, node) -> int | None:
    """The integer (or fp8) type a QuantizeLinear produces or a DequantizeLinear reads."""
    from onnx import TensorProto

    if node.op_type == "DequantizeLinear":
        return g.dtype_of(node.input[0])
    if len(node.input) > 2 and node.input[2]:
        return g.dtype_of(node.input[2])
    return next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), TensorProto.UINT8)


# --- TensorRT ------------------------------------------------------------------------------------------------

def _tensorrt_opset(g: _Graph) -> Iterator[Finding]:
    low, high = TENSORRT_OPSETS
    version = g.opsets.get("ai.onnx")
    if version is not None and not low <= version <= high:
        yield Finding("error" if version < low else "warning", "opset", "",
                      f"opset {version}: TensorRT 10.0's ONNX parser takes opsets {low} to {high}"
                      + ("" if version < low else "; a newer TensorRT is needed"))


def _tensorrt_operators(g: _Graph) -> Iterator[Finding]:
    for node in g.graph.node:
        if node.domain not in ("", "ai.onnx"):
            yield Finding("error", "custom-op", label(node),
                          f"operator of domain {node.domain!r}: TensorRT's ONNX parser has no such operator (it "
                          "would need a plugin); export without runtime-specific fusions")
        elif node.op_type in TENSORRT_UNSUPPORTED:
            yield Finding("error", "unsupported-op", label(node),
                          f"TensorRT's ONNX parser does not support {node.op_type}")


TENSORRT_QUANTIZED = {"INT8", "FLOAT8E4M3FN", "INT4"}


def _tensorrt_quantizers(g: _Graph) -> Iterator[Finding]:
    from onnx import TensorProto

    for node in g.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dtype = _quantized_dtype(g, node)
        name = TensorProto.DataType.Name(dtype) if dtype else "unknown"
        if dtype == TensorProto.INT32:
            yield Finding("error", "int32-dequantize", label(node),
                          "dequantizes int32 (a quantized bias): TensorRT takes float biases and quantizes them "
                          "itself")
            continue
        if name not in TENSORRT_QUANTIZED:
            hint = " (quantize with symmetric activations)" if dtype == TensorProto.UINT8 else ""
            yield Finding("error", "quantized-type", label(node),
                          f"{_dtype_name(dtype)} quantization: TensorRT quantizes to int8, fp8 or int4{hint}")
        scale = g.constants.get(node.input[1])
        if scale is None:
            yield Finding("error", "scale-constant", label(node),
                          f"scale {node.input[1]!r} is computed at run time: TensorRT needs it at build time")
        else:
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                yield Finding("error", "scale-value", label(node), "scale has values that are not finite and "
                                                                    "positive")
            if scale.ndim > 1 and dtype != TensorProto.INT4:
                yield Finding("error", "block-quantization", label(node),
                              f"block quantization ({scale.ndim}-D scale) of {_dtype_name(dtype)}: TensorRT "
                              "blocks int4 weights only")
        if len(node.input) > 2 and node.input[2]:
            zero = g.constants.get(node.input[2])
            if zero is None:
                yield Finding("error", "zero-point", label(node), "zero point is computed at run time: TensorRT "
                                                                  "needs zero point 0")
            elif np.any(zero != 0):
                values = np.unique(zero)
                shown = ", ".join(str(v) for v in values[:4]) + (", ..." if values.size > 4 else "")
                yield Finding("error", "zero-point", label(node),
                              f"zero point {shown}: TensorRT's quantization is symmetric (zero point 0); "
                              "quantize with symmetric activations")


def _tensorrt_integer_flow(g: _Graph) -> Iterator[Finding]:
    for node in g.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        others = [r for r in g.readers.get(node.output[0], []) if r.op_type != "DequantizeLinear"]
        if others or node.output[0] in g.outputs:
            read_by = ", ".join(label(r) for r in others[:3]) or "the graph's output"
            yield Finding("error", "integer-flow", label(node),
                          f"its integer output reaches {read_by}: in TensorRT quantized values flow only into "
                          "a DequantizeLinear")


def _output_axis(node, rank: int) -> int:
    """The axis of a weight holding the layer's output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return rank - 1  # MatMul: [..., K, N]


def _tensorrt_weights(g: _Graph) -> Iterator[Finding]:
    from onnx import TensorProto

    for node in g.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq, transpose = g.producer.get(node.input[1]), None
        if dq is not None and dq.op_type == "Transpose":  # a linear layer over tokens: DQ(W) -> Transpose -> MatMul
            dq, transpose = g.producer.get(dq.input[0]), dq
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.constants:
            continue
        weight, scale = g.constants[dq.input[0]], g.constants.get(dq.input[1])
        if scale is not None and scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
            if transpose is not None:  # where the scaled axis lands after the Transpose (default: reversed)
                perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"),
                            list(range(weight.ndim))[::-1])
                axis = perm.index(axis)
            expected = _output_axis(node, weight.ndim)
            if axis != expected:
                yield Finding("error", "weight-axis", label(dq),
                              f"per-channel scales on axis {axis} of {label(node)}'s weight: TensorRT takes them "
                              f"on the output-channel axis ({expected})")
        source = g.producer.get(node.input[0])
        weight_only = g.dtype_of(dq.input[0]) == TensorProto.INT4
        if not weight_only and (source is None or source.op_type != "DequantizeLinear"):
            yield Finding("warning", "float-input", label(node),
                          "its weight is quantized but its input is not: TensorRT runs it in floating point "
                          "(quantize the input too, or leave the weight in float)")


def _tensorrt_constant_inputs(g: _Graph) -> Iterator[Finding]:
    for node in g.graph.node:
        index, name = TENSORRT_CONSTANT_INPUTS.get(node.op_type, (None, ""))
        if index is not None and len(node.input) > index and node.input[index] \
                and node.input[index] not in g.constants:
            yield Finding("error", "constant-input", label(node),
                          f"input {name!r} is computed at run time: TensorRT needs it as an initializer")


def _tensorrt_pooling(g: _Graph) -> Iterator[Finding]:
    for node in g.graph.node:
        if node.op_type not in ("MaxPool", "AveragePool", "LpPool"):
            continue
        dilations = next((list(a.ints) for a in node.attribute if a.name == "dilations"), [])
        if any(d != 1 for d in dilations):
            yield Finding("error", "pool-dilation", label(node), f"dilations {dilations}: TensorRT pools without")
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            yield Finding("error", "pool-indices", label(node), "its Indices output: TensorRT does not compute it")


def _tensorrt_types(g: _Graph) -> Iterator[Finding]:
    """uint8 only at the graph's edges; float64 is cast to float32 (a warning: values are clamped)."""
    from onnx import TensorProto

    quantizer_values = {name for node in g.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                        for name in (*node.input, *node.output)}
    for node in g.graph.node:
        for out in node.output:
            if not out or out in quantizer_values:
                continue
            dtype = g.types.get(out)
            if dtype == TensorProto.UINT8 and out not in g.outputs:
                yield Finding("error", "uint8", label(node), f"produces uint8 {out!r}: TensorRT has uint8 only "
                                                             "as a network input or output")
            elif dtype == TensorProto.DOUBLE:
                yield Finding("warning", "float64", label(node),
                              f"produces float64 {out!r}: TensorRT casts it to float32")


# --- ONNX Runtime -------------------------------------------------------------------------------------------

def _ort_loads(g: _Graph) -> Iterator[Finding]:
    text, _ = g.ort_optimized
    if text is not None:
        yield Finding("error", "ort-load", _named_node(g, text), f"ONNX Runtime cannot load the file: {text}")


def _named_node(g: _Graph, text: str) -> str:
    """The node an ONNX Runtime message is about: by its name, or else the first of the operator it names."""
    match = re.search(r"node(?: with name)? '([^']+)'", text)
    if match:
        node = next((n for n in g.graph.node if match.group(1) in (n.name, n.output[0] if n.output else "")), None)
        return label(node) if node is not None else f"node '{match.group(1)}'"
    match = re.search(r"(?:([\w.]+):)?(\w+)\(-?\d+\)", text)  # "com.example:Mystery(-1)", "ConvInteger(10)"
    node = match and next((n for n in g.graph.node if n.op_type == match.group(2)
                           and (n.domain or "") == (match.group(1) or "")), None)
    return label(node) if node else ""


FLOAT_LAYERS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"}


def _ort_float_layers(g: _Graph) -> Iterator[Finding]:
    """Layers whose input and weights are quantized but that ONNX Runtime's own optimized graph computes with
    a float operator (read off the graph it builds: the layer's output, or that of the activation fused into
    it, comes out of a float Conv/Gemm/MatMul). Typical causes: nothing quantizes the output of a Conv (its
    integer QLinearConv writes int8), a ReLU/Clip before an int8 zero-point-0 quantizer, operators ONNX
    Runtime's x86 kernels take only with uint8 activations."""
    _, optimized = g.ort_optimized
    if optimized is None:
        return
    float_outputs = {out: node.op_type for node in optimized.graph.node if node.op_type in FLOAT_LAYERS
                     for out in node.output}
    for node in g.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        sources = [g.producer.get(name) for name in node.input[:2]]
        if not all(s is not None and s.op_type == "DequantizeLinear" for s in sources):
            continue
        readers = g.readers.get(node.output[0], [])
        outputs = [node.output[0], *(readers[0].output[:1] if len(readers) == 1
                                     and readers[0].op_type in ACTIVATIONS else [])]
        kind = next((float_outputs[o] for o in outputs if o in float_outputs), None)
        if kind is not None:
            yield Finding("warning", "float-layer", label(node),
                          f"its input and weights are quantized, but ONNX Runtime computes it in float ({kind} "
                          "in its optimized graph)" + _float_layer_hint(g, node, readers))


def _float_layer_hint(g: _Graph, node, readers) -> str:
    quantized_after = [r for r in readers if r.op_type == "QuantizeLinear"]
    if len(readers) == 1 and readers[0].op_type in ACTIVATIONS:
        quantized_after = [r for r in g.readers.get(readers[0].output[0], []) if r.op_type == "QuantizeLinear"]
    if node.op_type == "Conv" and not quantized_after:
        return ": nothing quantizes its output (QLinearConv writes integers)"
    from onnx import TensorProto

    if any(_quantized_dtype(g, q) == TensorProto.INT8 for q in quantized_after):
        return ": int8 activations (zero point 0) keep ONNX Runtime from fusing it here; uint8 ones let it"
    return ""


# --- OpenVINO -----------------------------------------------------------------------------------------------

def _openvino_converts(g: _Graph) -> Iterator[Finding]:
    try:
        from openvino.frontend import FrontEndManager
    except ImportError as exc:
        yield Finding("warning", "openvino-missing", "", f"openvino does not import ({exc}); its conversion was "
                                                         "not tried: pip install 'slimkit[deploy]'")
        return
    from .targets import quiet_native

    by_output = {out: node for node in g.graph.node for out in node.output}
    manager = FrontEndManager()  # it, the frontend and the loaded model stay referenced while the converted
    try:  # model is read: its untranslated nodes point into them (reading them after they were freed crashed)
        with quiet_native():
            frontend = manager.load_by_framework("onnx")
            loaded = frontend.load(str(g.path))
            converted = frontend.convert_partially(loaded)
    except SlimkitError as exc:
        yield Finding("error", "openvino-convert", "", f"OpenVINO cannot read the file: {exc}")
        return
    for op in converted.get_ordered_ops():
        if "FrameworkNode" not in op.get_type_name():
            continue
        attrs = op.get_attributes()
        names = [o.get_any_name() for o in op.outputs()]
        node = next((by_output[n] for n in names if n in by_output), None)
        kind = f"{attrs.get('ONNX_META_domain') or 'ai.onnx'}.{attrs.get('ONNX_META_type', '?')}"
        yield Finding("error", "openvino-unsupported", label(node) if node is not None else op.get_friendly_name(),
                      f"OpenVINO's ONNX frontend cannot convert {kind}")
    del converted, loaded, frontend, manager  # in this order


Rule = Callable[[_Graph], Iterator[Finding]]
RULES: dict[str, tuple[Rule, ...]] = {
    "tensorrt": (_tensorrt_opset, _tensorrt_operators, _tensorrt_quantizers, _tensorrt_integer_flow,
                 _tensorrt_weights, _tensorrt_constant_inputs, _tensorrt_pooling, _tensorrt_types),
    "ort": (_ort_loads, _ort_float_layers),
    "openvino": (_openvino_converts,),
}


def check_onnx(source: str | os.PathLike | Any, target: str) -> list[Finding]:
    """The findings of ``target``'s rules on an ONNX file (or a loaded ``ModelProto``), in graph order per rule.
    The ONNX checker runs first: a file that is not valid ONNX gets that one error."""
    import onnx

    if target not in RULES:
        raise SlimkitError(f"unknown target {target!r}; known: {', '.join(RULE_TARGETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, onnx.ModelProto):
            path = Path(tmp) / "model.onnx"
            onnx.save(source, str(path))
        else:
            path = Path(source)
        model = _load(path)
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            return [Finding("error", "onnx-checker", "", f"not valid ONNX: {str(exc).strip().splitlines()[0]}")]
        g = _Graph(model, path)
        return [finding for rule in RULES[target] for finding in rule(g)]


def _load(path: Path):
    import onnx

    if not path.is_file():
        raise SlimkitError(f"{path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise SlimkitError(f"{path}: not an ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None


def summarize(findings: list[Finding]) -> str:
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    return f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
