"""Static post-training quantization, on the model's exported graph.

1. BatchNorm is folded into the convolution before it.
2. The model is captured with ``torch.export`` (dynamic batch). Every conv, linear
   and activation-activation matmul becomes a quantized op: its weight gets a
   symmetric per-channel quantizer (8 bits, or fewer as int8 codes in a smaller
   range, or power-of-two levels), and the activations entering and leaving it get
   an asymmetric uint8 quantizer (leaving: after a directly following ReLU/ReLU6,
   which the runtime fuses), or a symmetric int8 one with zero point 0 where the
   target needs it (TensorRT). A value feeding several ops is quantized once.
3. Observers watch those activations on calibration data; slimkit computes the
   scales and zero points. Weights are rounded to nearest, by GPTQ, or to
   power-of-two levels, optionally followed by bias correction.
4. The observers are replaced by fake-quantization ops. The result is a plain
   ``GraphModule``: slimkit's simulation of the integer model, and what is
   exported to ONNX in QDQ form (see ``export/qdq.py``), where ONNX Runtime runs
   it with integer kernels.

Variants: ``activations="dynamic"`` quantizes the inputs of linear layers with
ranges taken at run time, nothing calibrated: one range per token
(``ops.token_fake_quant``; the default for text models) or per batch
(``ops.dynamic_fake_quant``); ``activations="none"`` is weight-only, where ``group_size`` gives
one scale per group of inputs (``ops.group_fake_quant``) instead of per channel.
"""

from __future__ import annotations

import copy
from fnmatch import fnmatchcase
import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import fx, nn

from ..config import Config
from ..errors import SlimkitError
from ..limits import MAX_INPUT_ELEMENTS, MAX_TENSOR_DIMS
from ..export.onnx import exporter_cause
from ..inputs import InputSpec, Inputs, MultiInput, call, export_arguments
from ..models.text import dynamic_dims, text_spec
from ..plan import StepSchema, register_plan_op
from .observers import OBSERVERS, Observer, make_observer
from .ops import expand_group_scale, group_count, group_fake_quant
from .scheme import QScheme, log2_quantize, qparams

# Activation grids by the dtype a plan records: uint8 with a zero point (ONNX Runtime's x86 kernels prefer it, and
# a ReLU's output uses all 256 levels) or int8 with zero point 0 (TensorRT accepts nothing else). Observers choose
# the range with the scheme; quantizers clamp to the full range of the dtype, as QuantizeLinear saturates.
ACTIVATION_SCHEMES = {"uint8": QScheme(bits=8, symmetric=False, signed=False),
                      "int8": QScheme(bits=8, symmetric=True, signed=True)}
ACTIVATION_LIMITS = {"uint8": (0, 255), "int8": (-128, 127)}
aten = torch.ops.aten
CONVS = {aten.conv2d.default, aten.conv1d.default}
WEIGHTED = {*CONVS, aten.linear.default}
EMBEDDINGS = {aten.embedding.default}  # lookup tables: int8 rows, one scale per row, weight-only
MATMULS = {aten.matmul.default, aten.bmm.default}
PLAN_OP = "quantize-static"
FUSED_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}


def weight_scheme(bits: int) -> QScheme:
    """Symmetric signed weights; fewer than 8 bits are int8 codes limited to +/-(2^(bits-1) - 1)."""
    return QScheme(bits=bits, symmetric=True, signed=True, granularity="channel", axis=0)


class StaticQuantConfig(Config):
    observer: str = "minmax"
    calib: int = Field(256, ge=1)
    per_channel: bool = True
    weight_bits: int = Field(8, ge=2, le=8)
    layer_bits: dict[str, int] = Field(default_factory=dict)  # per-layer weight bits (mixed precision)
    rounding: Literal["nearest", "gptq"] = "nearest"  # how weights meet their grid
    bias_correction: bool = False  # remove the mean output shift the weight rounding causes
    weight_levels: Literal["linear", "log"] = "linear"  # log: power-of-two levels (shift-friendly)
    exclude: list[str] = Field(default_factory=list)
    # static: uint8 ranges calibrated once; dynamic: uint8 ranges of each batch, at the inputs of linear
    # layers only (convolutions stay float: ONNX Runtime's ConvInteger is slower than its float Conv);
    # none: weight-only (activations stay float)
    activations: Literal["static", "dynamic", "none"] = "static"
    # dynamic ranges per token (row) or per tensor; None: per token for text models, whose LayerNorm outputs
    # differ from token to token (MiniLM: cosine to fp32 0.9975 vs 0.9917), per tensor otherwise (cheaper: the
    # vision results were measured so)
    dynamic_scales: Literal["token", "tensor"] | None = None
    group_size: int | None = Field(None, ge=1)  # one weight scale per group of inputs instead of per channel
    matmul: bool = True
    fold_bn: bool = True
    seed: int = 0
    # 8-bit weights as 7-bit codes (+/-63), so that ONNX Runtime's integer kernels cannot saturate on x86 CPUs
    # without VNNI (analyze.machine.int8_pairs_saturate); None: only on such a CPU (where the model is
    # quantized and its export checked)
    reduce_range: bool | None = None
    # embedding tables (a transformer's word and position embeddings) as int8 rows with one scale per row: no
    # integer kernel multiplies them, so they are weight-only whatever ``activations`` says
    embeddings: bool = True
    # static activations as int8 with zero point 0 rather than uint8 with a zero point: what TensorRT's explicit
    # quantization requires (export format onnx-tensorrt); ONNX Runtime runs both
    symmetric_activations: bool = False

    def model_post_init(self, __context: Any) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        bad = {k: v for k, v in self.layer_bits.items() if not 2 <= v <= 8}
        if bad:
            raise ValueError(f"layer_bits must be between 2 and 8, got {bad}")
        if self.group_size is not None and (self.weight_levels == "log" or not self.per_channel
                                            or self.activations != "none"):
            raise ValueError("group_size is for weight-only quantization (activations 'none') with linear "
                             "levels: integer kernels take one weight scale per output channel")
        if self.dynamic_scales is not None and self.activations != "dynamic":
            raise ValueError("dynamic_scales is for activations 'dynamic'")
        if self.symmetric_activations and self.activations != "static":
            raise ValueError("symmetric_activations is for static activations: run-time ranges are uint8 "
                             "(ONNX's DynamicQuantizeLinear)")
        if self.weight_levels == "log" and (max([self.weight_bits, *self.layer_bits.values()]) > 4
                                            or self.rounding != "nearest"):
            raise ValueError("log weight levels take at most 4 bits (their codes 0, +/-1 ... +/-64 must fit "
                             "int8) and round to nearest")

    def bits_of(self, weight: str, integer_kernel: bool = True) -> int:
        """A weight's bits; 7 at most where ``reduces_range`` says integer kernels could saturate on them."""
        bits = self.layer_bits.get(weight.rpartition(".")[0], self.weight_bits)
        return min(bits, 7) if integer_kernel and self.reduces_range() else bits

    def layout_of(self, weight: str, table: bool) -> dict[str, Any]:
        """How a weight is stored: its bits and, if grouped, group size. A lookup table keeps int8 rows with
        one scale per row whatever ``weight_bits`` and ``group_size`` say (unless ``layer_bits`` names it):
        a runtime gathers the integer rows it needs and dequantizes those only, and ONNX has no 4-bit Gather."""
        if table:
            return {"bits": self.layer_bits.get(weight.rpartition(".")[0], 8), "table": True}
        return {"bits": self.bits_of(weight), **({} if self.group_size is None else {"group_size": self.group_size})}

    def dynamic_kind(self, model: nn.Module) -> str:
        """The plan's activation quantizer of a dynamically quantized linear layer of ``model``."""
        token = self.dynamic_scales == "token" or (self.dynamic_scales is None and text_spec(model) is not None)
        return "dynamic-token" if token else "dynamic"

    def reduces_range(self) -> bool:
        """Whether 8-bit weights become 7-bit codes: only where integer kernels multiply them with quantized
        activations (not weight-only), and with linear levels (power-of-two codes reach 64 at most)."""
        from ..analyze.machine import int8_pairs_saturate

        if self.activations == "none" or self.weight_levels == "log":
            return False
        return int8_pairs_saturate() if self.reduce_range is None else self.reduce_range

    @property
    def activation_dtype(self) -> Literal["uint8", "int8"]:
        return "int8" if self.symmetric_activations else "uint8"


class QuantizedWeight(Config):
    input: str  # the graph node feeding the layer (its activation quantizer, when static)
    bits: int = Field(8, ge=2, le=8)
    group_size: int | None = Field(None, ge=1)
    activation: Literal["dynamic", "dynamic-token"] | None = None  # ranges at run time: per tensor, per token
    table: bool = False  # an embedding table: one scale per row


ActivationQParams = tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], Annotated[int, Field(ge=-128, le=255)]]


class QuantizeStaticStep(StepSchema):
    """A quantization plan step: everything needed to rebuild the fake-quantized graph from the float model."""

    op: Literal["quantize-static"] = PLAN_OP
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=MAX_TENSOR_DIMS)
    inputs: InputSpec | None = None  # a model taking several tensors: instead of input_shape
    input_dtype: Literal["float32", "float16", "bfloat16", "int64", "int32"] = "float32"  # token ids are integers
    folded_batchnorm: list[tuple[str, str]]
    weights: dict[str, QuantizedWeight] = Field(min_length=1)
    activations: dict[str, ActivationQParams]
    activation_dtype: Literal["uint8", "int8"] = "uint8"  # int8: zero points 0 (TensorRT)
    weight_bits: int = Field(8, ge=2, le=8)
    rounding: Literal["nearest", "gptq"] = "nearest"
    weight_levels: Literal["linear", "log"] = "linear"
    observer: str = "minmax"
    calibration_samples: int = Field(0, ge=0)
    qat: bool = False  # the scales were trained (quantization-aware training)

    @model_validator(mode="after")
    def _bounded_input(self) -> "QuantizeStaticStep":
        if (self.input_shape is None) == (self.inputs is None):
            raise ValueError("a step records input_shape (one input) or inputs (several), exactly one of them")
        if self.input_shape and math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {self.input_shape} has more than {MAX_INPUT_ELEMENTS:,} elements")
        low, high = ACTIVATION_LIMITS[self.activation_dtype]
        off_grid = {name: zero for name, (_, zero) in self.activations.items()
                    if not low <= zero <= high or (self.activation_dtype == "int8" and zero != 0)}
        if off_grid:
            raise ValueError(f"activation zero points outside the {self.activation_dtype} grid: {off_grid}")
        return self


def is_quantized(model: nn.Module) -> bool:
    """True for a model whose plan ends in integer quantization (it exports as QDQ, not fp32 ONNX)."""
    return any(step.get("op") == PLAN_OP for step in getattr(model, "slimkit_meta", {}).get("plan", []))


def fold_batchnorm(model: nn.Module, example: Inputs) -> tuple[nn.Module, list[list[str]]]:
    """A copy of ``model`` with every eval-mode BatchNorm that directly follows a conv folded into it."""
    model = copy.deepcopy(model).eval()
    args, kwargs, _ = export_arguments(example[:2], {})
    program = torch.export.export(model, args, kwargs, strict=False)
    params = program.graph_signature.inputs_to_parameters
    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        conv = node.args[0]
        if not (isinstance(conv, fx.Node) and conv.target in CONVS
                and len(conv.users) == 1):
            continue
        conv_name = params.get(conv.args[1].name, "").rpartition(".")[0]
        bn_name = params.get(node.args[1].name, "").rpartition(".")[0] if isinstance(node.args[1], fx.Node) else ""
        if conv_name and bn_name:
            pairs.append([conv_name, bn_name])
    original = copy.deepcopy(model)
    _fold_pairs(model, pairs)
    if not _same_outputs(original, model, example[:2]):  # find the pair that changed them, and name it
        for pair in pairs:
            trial = copy.deepcopy(original)
            _fold_pairs(trial, [pair])
            if not _same_outputs(original, trial, example[:2]):
                conv_name, bn_name = pair
                raise SlimkitError(
                    f"folding {bn_name} ({type(original.get_submodule(bn_name)).__name__}) into {conv_name} changes "
                    f"the model's output: its forward computes more than a BatchNorm (an activation inside it?). "
                    f"Quantize with fold_bn: false (recipe) or StaticQuantConfig(fold_bn=False)")
    return model, pairs


def _fold_pairs(model: nn.Module, pairs: list[list[str]]) -> None:
    for conv_name, bn_name in pairs:
        _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


# A rewrite in fp32 (folding) may change outputs by float rounding only. Ill-conditioned models move more
# (efficientnet_b0 trained at 32 px, run at 224 px: outputs near 1e4, one fold moves them by 2e-4 of that);
# a BatchNorm that hides an activation moves them by 1% to 100%.
REWRITE_RTOL = 1e-3


@torch.no_grad()
def _same_outputs(original: nn.Module, rewritten: nn.Module, x: Inputs) -> bool:
    from ..models.outputs import prediction

    expected, got = prediction(call(original, x)).double(), prediction(call(rewritten, x)).double()
    return bool((expected - got).abs().max() <= 1e-6 + REWRITE_RTOL * expected.abs().max())


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    conv.bias = nn.Parameter(new_bias)


class _Observe(nn.Module):
    def __init__(self, observer: Observer):
        super().__init__()
        self.observer = observer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.update(x)
        return x


def log_levels(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel power-of-two weights and the scale that makes them int8 codes (0, +/-1, ... +/-64)."""
    rows = weight.reshape(weight.shape[0], -1)
    quantized = torch.stack([log2_quantize(row, bits) for row in rows])
    top = rows.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    exponents = 2 ** (bits - 1) - 1
    scale = torch.exp2(torch.ceil(torch.log2(top)) - exponents + 1)
    return quantized.reshape(weight.shape), scale.float()


def capture(model: nn.Module, example: Inputs) -> fx.GraphModule:
    try:
        args, kwargs, dynamic = export_arguments(example[:2], dynamic_dims(model, example))
        program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic, strict=False)
        unlifted = program.module()  # fails on a submodule whose name a GraphModule uses itself (meta, graph, code)
    except Exception as exc:  # export raises many internal types
        raise SlimkitError(f"cannot capture {type(model).__name__} for quantization: {exporter_cause(exc)}") from None
    # a plain GraphModule: the unlifted program refuses .eval()/.train(), which every loop calls
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=f"Quantized{type(model).__name__}")
    spec = text_spec(model)
    if spec is not None:  # the graph still takes a text model's inputs: its exports name them, tokens dynamic
        gm.slimkit_meta = {**getattr(model, "slimkit_meta", {}), "architecture": spec}
    _split_silu(gm)
    return gm


SILU = {aten.silu.default, aten.silu_.default}


def _split_silu(gm: fx.GraphModule) -> None:
    """SiLU as ``x * sigmoid(x)``, the form ONNX has: a quantizer can then sit between the two, so ONNX Runtime
    runs them as its integer QLinearSigmoid and QLinearMul instead of dequantizing around float ones. The
    product keeps the SiLU's node name: plans saved before the split name it, and it is the same value."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in SILU:
            with gm.graph.inserting_before(node):
                gate = gm.graph.call_function(aten.sigmoid.default, (node.args[0],))
                product = gm.graph.call_function(aten.mul.Tensor, (node.args[0], gate))
            product.meta, gate.meta = dict(node.meta), dict(node.meta)
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            product.name = node.name  # unique: the erased node held it
    gm.recompile()


def _weight_arg(node: fx.Node) -> int:
    """Where an op takes its weight: ``embedding(weight, indices)``, ``linear/conv(input, weight, ...)``."""
    return 0 if node.target in EMBEDDINGS else 1


def _weight_name(node: fx.Node) -> str | None:
    weight = node.args[_weight_arg(node)] if len(node.args) > _weight_arg(node) else None
    return weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def quant_points(gm: fx.GraphModule, cfg: StaticQuantConfig) -> tuple[list[fx.Node], list[fx.Node]]:
    """(weighted ops to quantize, activation values to calibrate), in graph order."""
    ops, values = [], {}
    weighted = {aten.linear.default} if cfg.activations == "dynamic" else WEIGHTED
    weighted = weighted | EMBEDDINGS if cfg.embeddings else weighted
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in weighted:
            name = _weight_name(node)
            if name is None or any(fnmatchcase(name.rpartition(".")[0], p) for p in cfg.exclude):
                continue
            ops.append(node)
            if node.target in EMBEDDINGS:
                continue  # integer indices in, a float row out: nothing to calibrate
            inputs = [node.args[0]]
        elif node.target in MATMULS and cfg.matmul:
            inputs = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
            if len(inputs) != 2:
                continue
        else:
            continue
        users = list(node.users)
        fused = len(users) == 1 and users[0].target in FUSED_ACTIVATIONS
        outputs = [users[0] if fused else node] if fused or node.target in CONVS else []
        if cfg.activations == "static":
            for value in (*inputs, *outputs):
                values[value] = None
    if cfg.activations == "static":
        _add_gates(gm, values)
    return ops, list(values)


def _add_gates(gm: fx.GraphModule, values: dict[fx.Node, None]) -> None:
    """Quantize the outputs of sigmoid gates over quantized values and of their products (SiLU, squeeze-and-
    excitation): ONNX Runtime then runs them on integers (QLinearSigmoid, QLinearMul); in float they cost
    more than the convolutions around them (efficientnet_b0)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.sigmoid.default and node.args[0] in values:
            values[node] = None
        elif node.target is aten.mul.Tensor and all(isinstance(a, fx.Node) and a in values for a in node.args[:2]):
            values[node] = None


def weight_scales(weight: torch.Tensor, spec: dict[str, Any], cfg: StaticQuantConfig) -> torch.Tensor:
    """Symmetric scales for a weight of the plan (``spec``: its bits, and group size if grouped): one per output
    channel ``[out]``, per group of inputs ``[out, groups]``, or per tensor."""
    from .ops import group_count

    scheme, group_size = weight_scheme(spec["bits"]), spec.get("group_size")
    rows = weight.detach().reshape(weight.shape[0], -1)
    if group_size is not None:
        groups = group_count(rows.shape[1], group_size)
        padded = torch.nn.functional.pad(rows, (0, groups * group_size - rows.shape[1]))
        top = padded.reshape(rows.shape[0], groups, group_size).abs().amax(2)
    elif cfg.per_channel or spec.get("table"):
        top = rows.abs().amax(1)
    else:
        top = rows.abs().amax().reshape(1).expand(rows.shape[0]).clone()
    # An all-zero channel (pruned away) may have any scale; the smallest float one would put its bias on a
    # grid of ~1e-40 that overflows the runtime's int32 bias: it takes the median of the live channels'.
    live = top[top > 0]
    top = torch.where(top > 0, top, live.median() if live.numel() else torch.ones(()))
    return qparams(-top, top, scheme)[0].float()


@torch.no_grad()
def quantize_static(model: nn.Module, calib: Inputs, cfg: StaticQuantConfig | None = None,
                    batch_size: int = 64) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Calibrate and convert; returns the fake-quantized graph module and its plan step (all the scales)."""
    cfg = cfg or StaticQuantConfig()
    if len(calib) == 0:
        raise SlimkitError("static quantization needs calibration inputs")
    folded, pairs = fold_batchnorm(model, calib) if cfg.fold_bn else (copy.deepcopy(model).eval(), [])
    gm = capture(folded, calib)
    ops, values = quant_points(gm, cfg)
    if not ops:
        raise SlimkitError("nothing to quantize: no conv, linear or embedding layers were selected")
    observers = _insert_observers(gm, values, cfg)
    for i in range(0, len(calib), batch_size):
        call(gm, calib[i : i + batch_size])
    activations = {node.name: list(obs.qparams()) for node, obs in observers.items()}
    _remove_observers(gm)
    unknown = set(cfg.layer_bits) - {_weight_name(op).rpartition(".")[0] for op in ops}
    if unknown:
        raise SlimkitError(f"layer_bits names layers that are not quantized: {sorted(unknown)}")
    weights, scales = {}, {}
    for op in ops:
        name, table = _weight_name(op), op.target in EMBEDDINGS
        weights[name] = spec = {"input": op.args[1 if table else 0].name, **cfg.layout_of(name, table)}
        if cfg.activations == "dynamic" and not table:
            spec["activation"] = cfg.dynamic_kind(model)
        if cfg.weight_levels == "log":
            scales[name] = log_levels(gm.get_parameter(name).detach(), spec["bits"])[1]
        else:
            scales[name] = weight_scales(gm.get_parameter(name), spec, cfg)
    _round_weights(gm, ops, cfg, weights, scales, calib, batch_size)
    step = {"op": PLAN_OP, **_input_fields(calib), "folded_batchnorm": pairs, "weights": weights,
            "weight_bits": cfg.weight_bits, "rounding": cfg.rounding, "weight_levels": cfg.weight_levels,
            "activations": activations, "activation_dtype": cfg.activation_dtype, "observer": cfg.observer,
            "calibration_samples": len(calib)}
    return _convert(gm, step, scales), step


@register_plan_op(QuantizeStaticStep)
def replay_static(model: nn.Module, step: dict[str, Any]) -> fx.GraphModule:
    """Rebuild the quantized graph module from a fresh float model and the stored plan step."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in step["folded_batchnorm"]:
            _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
            parent, _, child = bn_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    meta = getattr(model, "slimkit_meta", None)
    gm = _convert(capture(model, plan_example(step)), step)
    if meta is not None:
        gm.slimkit_meta = meta
    return gm


def _input_fields(calib: Inputs) -> dict[str, Any]:
    """What a plan step records of its calibration inputs to capture the graph again: one tensor's shape (and
    dtype, if not float32: token ids), or every input's spec."""
    if isinstance(calib, MultiInput):
        return {"inputs": calib.spec().model_dump()}
    return {"input_shape": list(calib.shape[1:]),
            **({} if calib.dtype == torch.float32 else {"input_dtype": str(calib.dtype).removeprefix("torch.")})}


def plan_example(step: dict[str, Any]) -> Inputs:
    """Inputs of the shape and dtype a plan step was calibrated on (token ids are integers), to capture with."""
    if step.get("inputs"):
        return InputSpec.model_validate(step["inputs"]).synthetic(2, fill="zeros")
    return torch.zeros(2, *step["input_shape"], dtype=getattr(torch, step.get("input_dtype", "float32")))


def weight_scale_buffer(index: int) -> str:
    return f"_slimkit_wscale_{index}"


def weight_zero_buffer(index: int) -> str:
    return f"_slimkit_wzero_{index}"


def _convert(gm: fx.GraphModule, step: dict[str, Any], scales: dict[str, torch.Tensor] | None = None,
             ) -> fx.GraphModule:
    """Insert the plan's fake quantizers into a captured graph (weights and biases rounded in place).

    Weight scales live in buffers of the result, so a saved model carries them in its
    safetensors; on replay (``scales=None``) placeholders are made and the load fills them in.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    runtime_quantized: dict[tuple[fx.Node, str], fx.Node] = {}  # one quantizer per value, however many layers read it
    missing = sorted(set(step["activations"]) - set(nodes))
    if missing:
        raise SlimkitError(f"quantization plan does not fit this model's graph (no nodes {missing[:3]}); "
                           "was it saved by another PyTorch version?")
    for i, (name, spec) in enumerate(step["weights"].items()):
        op = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED | EMBEDDINGS
                   and _weight_name(n) == name), None)
        if op is None:
            raise SlimkitError(f"quantization plan names a weight no conv, linear or embedding layer of this graph "
                               f"uses: {name}")
        stored = op.args[_weight_arg(op)]
        weight = gm.get_parameter(name)
        group = spec.get("group_size")
        scale = scales[name] if scales is not None else torch.ones(
            weight.shape[0], *([group_count(weight[0].numel(), group)] if group else []))
        gm.register_buffer(weight_scale_buffer(i), scale)
        with gm.graph.inserting_before(op):
            s = gm.graph.get_attr(weight_scale_buffer(i))
            if group:
                fq = gm.graph.call_function(torch.ops.slimkit.group_fake_quant.default,
                                            (stored, s, group, _weight_limit(step, spec)))
            else:
                gm.register_buffer(weight_zero_buffer(i), torch.zeros_like(scale, dtype=torch.int32))
                z = gm.graph.get_attr(weight_zero_buffer(i))
                fq = gm.graph.call_function(torch.fake_quantize_per_channel_affine, (stored, s, z, 0, -128, 127))
            op.replace_input_with(stored, fq)
        if spec.get("activation"):
            op.replace_input_with(op.args[0], _runtime_quantizer(gm, op.args[0], spec["activation"], runtime_quantized))
    round_onto_grids(gm, step)
    low, high = activation_limits(step)
    for name, (scale, zero) in step["activations"].items():
        value = nodes[name]
        with gm.graph.inserting_after(value):
            node = gm.graph.call_function(torch.fake_quantize_per_tensor_affine, (value, scale, zero, low, high))
        value.replace_all_uses_with(node, delete_user_cb=lambda user, n=node: user is not n)
    gm.graph.lint()
    gm.recompile()
    gm.requires_grad_(False)  # an inference artifact; also keeps fake-quant ops exportable (no autograd variant)
    return gm


def activation_limits(step: dict[str, Any]) -> tuple[int, int]:
    """The codes a plan step's activation quantizers clamp to (plans saved before int8 grids are uint8)."""
    return ACTIVATION_LIMITS[step.get("activation_dtype", "uint8")]


def _runtime_quantizer(gm: fx.GraphModule, value: fx.Node, kind: str,
                       made: dict[tuple[fx.Node, str], fx.Node]) -> fx.Node:
    """The run-time activation quantizer of ``value`` (``kind``: a plan's ``activation``), made once."""
    if (value, kind) not in made:
        with gm.graph.inserting_after(value):
            if kind == "dynamic-token":
                made[value, kind] = gm.graph.call_function(torch.ops.slimkit.token_fake_quant.default,
                                                           (value, int(value.meta["val"].shape[-1])))
            else:
                made[value, kind] = gm.graph.call_function(torch.ops.slimkit.dynamic_fake_quant.default, (value,))
    return made[value, kind]


def _weight_limit(step: dict[str, Any], spec: dict[str, Any]) -> int:
    """The largest weight code: int8 containers may carry fewer bits; power-of-two levels use the int8 range."""
    return 127 if step.get("weight_levels") == "log" else weight_scheme(spec.get("bits", step.get("weight_bits", 8))).qmax


@torch.no_grad()
def round_onto_grids(gm: fx.GraphModule, step: dict[str, Any]) -> None:
    """Put each quantized weight on its grid and its bias on the int32 grid ``s_x * s_w``, in place.

    The integer runtime adds biases as int32 at that scale, so the simulation rounds them the same
    way; after training a quantized model's float weights this puts both back where they belong.
    """
    biases = {}
    for op in gm.graph.nodes:
        if op.op == "call_function" and op.target in WEIGHTED and len(op.args) > 2:
            weight = op.args[1].args[0] if op.args[1].op == "call_function" else op.args[1]
            if isinstance(op.args[2], fx.Node) and op.args[2].op == "get_attr":
                biases[weight.target] = op.args[2].target
    for i, (name, spec) in enumerate(step["weights"].items()):
        weight, scale, limit = gm.get_parameter(name), gm.get_buffer(weight_scale_buffer(i)), _weight_limit(step, spec)
        if spec.get("group_size"):
            weight.copy_(group_fake_quant(weight, scale, spec["group_size"], limit))
        else:
            weight.copy_(torch.fake_quantize_per_channel_affine(
                weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -limit, limit))
        if name in biases and spec["input"] in step["activations"]:
            bias = gm.get_parameter(biases[name])
            unit = scale.double() * step["activations"][spec["input"]][0]
            bias.copy_((torch.round(bias.double() / unit) * unit).float())


def _round_weights(gm: fx.GraphModule, ops: list[fx.Node], cfg: StaticQuantConfig, weights: dict[str, dict[str, Any]],
                   scales: dict[str, torch.Tensor], calib: Inputs, batch_size: int) -> None:
    """Put every weight on its grid (nearest, GPTQ or power-of-two levels), then correct biases if asked.

    GPTQ and bias correction use the statistics of each layer's calibration inputs (grouped
    convolutions have none recorded: they round to nearest, uncorrected). Bias correction
    (Nagel et al., 2019): rounding changes ``W`` by ``dW``, which shifts the layer's mean
    output by ``dW E[x]``; subtracting it from the bias removes the shift.
    """
    from .gptq import gptq_quantize, record_hessians

    needs_stats = cfg.rounding == "gptq" or cfg.bias_correction
    layers = [op for op in ops if op.target in WEIGHTED]  # (a lookup table has no input statistics)
    moments = record_hessians(gm, layers, _weight_name, calib, batch_size) if needs_stats else {}
    biases = {_weight_name(op): op.args[2] for op in ops if len(op.args) > 2 and isinstance(op.args[2], fx.Node)}
    for op in ops:
        name = _weight_name(op)
        weight = gm.get_parameter(name)
        bits, group_size = weights[name]["bits"], weights[name].get("group_size")
        qmax = weight_scheme(bits).qmax
        original = weight.detach().clone()
        s = (expand_group_scale(scales[name], weight.shape, group_size) if group_size
             else scales[name].reshape(-1, *([1] * (weight.dim() - 1))))
        if cfg.weight_levels == "log":
            rounded = log_levels(original, bits)[0]
        elif cfg.rounding == "gptq" and name in moments:
            rounded = gptq_quantize(weight, moments[name][0], s.expand_as(weight), qmax)
        else:
            rounded = torch.clamp(torch.round(original / s), -qmax, qmax) * s
        weight.data = rounded
        if cfg.bias_correction and name in biases and name in moments:
            shift = (rounded - original).reshape(weight.shape[0], -1).double() @ moments[name][1]
            bias = gm.get_parameter(biases[name].target)
            bias.data = (bias.double() - shift).float()


def _insert_observers(gm: fx.GraphModule, values: list[fx.Node], cfg: StaticQuantConfig) -> dict[fx.Node, Observer]:
    observers = {}
    for i, value in enumerate(values):
        observer = make_observer(cfg.observer, ACTIVATION_SCHEMES[cfg.activation_dtype], seed=cfg.seed)
        name = f"_slimkit_observer_{i}"
        gm.add_submodule(name, _Observe(observer))
        with gm.graph.inserting_after(value):
            node = gm.graph.call_module(name, (value,))
        value.replace_all_uses_with(node, delete_user_cb=lambda user, n=node: user is not n)
        observers[value] = observer
    gm.recompile()
    return observers


def _remove_observers(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_slimkit_observer_"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
