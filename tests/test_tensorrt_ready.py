"""TensorRT-ready ONNX: symmetric int8 activations, plain Q/DQ files, and ``check-onnx``'s rules per runtime.

No TensorRT runs here (it needs an NVIDIA GPU): the files are checked against TensorRT's documented rules and
run in ONNX Runtime against slimkit's simulation. Each rule is shown to fire, naming the node, on a small
hand-made graph that breaks it.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimkit
from slimkit import SlimkitError, save
from slimkit.export.onnx import run_torch
from slimkit.export.onnx_rules import check_onnx
from slimkit.export.qdq import export_qdq, sqnr_db
from slimkit.export.targets import export_to
from slimkit.quant.ptq import QuantizeStaticStep, StaticQuantConfig


@pytest.fixture(scope="module")
def resnet8(briefly_trained):
    return briefly_trained("resnet8")


@pytest.fixture(scope="module")
def symmetric(resnet8, digits):
    return slimkit.quantize(resnet8, {"scheme": "int8-static", "calib": 128, "symmetric_activations": True}, digits)


@pytest.fixture(scope="module")
def asymmetric(resnet8, digits):
    return slimkit.quantize(resnet8, {"scheme": "int8-static", "calib": 128}, digits)


def _plan_step(model) -> dict:
    return next(s for s in model.slimkit_meta["plan"] if s["op"] == "quantize-static")


def _accuracy(model, digits) -> float:
    return float((run_torch(model, digits.x_test).argmax(1) == digits.y_test).float().mean())


def test_symmetric_activations_are_int8_with_zero_point_0_and_keep_accuracy(symmetric, asymmetric, resnet8, digits,
                                                                            tmp_path):
    step = _plan_step(symmetric)
    assert step["activation_dtype"] == "int8" and _plan_step(asymmetric)["activation_dtype"] == "uint8"
    assert step["activations"] and all(zero == 0 for _, zero in step["activations"].values())
    quantizers = [n for n in symmetric.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    assert quantizers and all(n.args[3:5] == (-128, 127) for n in quantizers)
    # a ReLU output uses half the int8 codes: a little less accurate than uint8, still within a point of float
    float_acc, sym_acc = _accuracy(resnet8, digits), _accuracy(symmetric, digits)
    assert sym_acc >= float_acc - 0.01 and sym_acc >= _accuracy(asymmetric, digits) - 0.01
    reloaded = slimkit.load(save(symmetric, tmp_path / "m"))  # the plan replays the int8 grids
    torch.testing.assert_close(run_torch(reloaded, digits.x_test), run_torch(symmetric, digits.x_test), rtol=0, atol=0)


def test_a_plan_with_int8_activations_needs_zero_points_0_and_static_ranges():
    step = {"op": "quantize-static", "input_shape": [1, 8, 8], "folded_batchnorm": [],
            "weights": {"fc.weight": {"input": "x"}}, "activations": {"x": [0.1, 3]}, "activation_dtype": "int8"}
    with pytest.raises(ValueError, match=r"activation zero points outside the int8 grid: \{'x': 3\}"):
        QuantizeStaticStep.model_validate_json(json.dumps(step))
    QuantizeStaticStep.model_validate_json(json.dumps({**step, "activations": {"x": [0.1, 0]}}))
    with pytest.raises(ValueError, match="symmetric_activations is for static activations"):
        StaticQuantConfig(activations="dynamic", symmetric_activations=True)


def test_a_tensorrt_ready_file_follows_tensorrt_rules_and_matches_the_simulation(symmetric, digits, tmp_path):
    path = tmp_path / "trt.onnx"
    result = export_to(symmetric, "onnx-tensorrt", path, digits.x_test[:128])
    assert result["tensorrt_rules"] == [] and check_onnx(path, "tensorrt") == []
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not [n for n, v in inits.items() if v.dtype == np.int32]  # biases stay float: TensorRT quantizes them
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zeros = [inits[n.input[2]] for n in qdq]
    assert qdq and all(z.dtype == np.int8 and not z.any() for z in zeros)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in convs:  # int8 codes, one scale per output channel on axis 0
        dq = producers[conv.input[1]]
        assert inits[dq.input[0]].dtype == np.int8 and helper.get_attribute_value(dq.attribute[0]) == 0
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
    x = digits.x_test
    simulated = run_torch(symmetric, x).numpy()
    deployed = slimkit.export.targets.get_target("onnx-tensorrt").open(path, 1)(x)
    assert sqnr_db(simulated, deployed) >= 60 and (deployed.argmax(1) == simulated.argmax(1)).mean() == 1.0


def test_a_uint8_model_is_refused_for_tensorrt_by_name_and_nothing_is_written(asymmetric, digits, tmp_path):
    with pytest.raises(SlimkitError, match=r"uint8 with zero points; TensorRT takes int8 with zero point 0: "
                                           r"quantize with symmetric_activations"):
        export_to(asymmetric, "onnx-tensorrt", tmp_path / "t.onnx", digits.x_test[:16])
    assert list(tmp_path.iterdir()) == []


def test_check_onnx_names_the_nodes_of_an_onnx_runtime_file_that_tensorrt_refuses(asymmetric, symmetric, digits,
                                                                                  tmp_path):
    path = tmp_path / "ort.onnx"
    export_qdq(asymmetric, path, digits.x_test[:2])
    model = onnx.load(str(path))
    findings = check_onnx(path, "tensorrt")
    assert {f.rule for f in findings} == {"zero-point", "quantized-type", "int32-dequantize"}
    assert all(f.severity == "error" for f in findings)
    labels = {f"{n.op_type} '{n.name or n.output[0]}'" for n in model.graph.node}
    assert {f.node for f in findings} <= labels
    int32_inits = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT32}
    int32 = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32_inits)
    assert sum(f.rule == "int32-dequantize" for f in findings) == int32 > 0
    assert check_onnx(path, "ort") == []  # ONNX Runtime fuses every layer of it
    # the TensorRT-style file in ONNX Runtime: each Conv -> ReLU -> int8 quantizer runs in float, named
    export_to(symmetric, "onnx-tensorrt", tmp_path / "trt.onnx", digits.x_test[:64])
    ort_findings = check_onnx(tmp_path / "trt.onnx", "ort")
    nodes = onnx.load(str(tmp_path / "trt.onnx")).graph.node
    producers = {o: n for n in nodes for o in n.output}
    conv_relus = sum(1 for n in nodes if n.op_type == "Relu" and producers[n.input[0]].op_type == "Conv")
    assert ort_findings and {f.rule for f in ort_findings} == {"float-layer"}
    assert {f.node.split(" ")[0] for f in ort_findings} <= {"Conv", "Gemm"}
    fused = [f for f in ort_findings if "(FusedConv in its optimized graph): int8 activations" in f.message]
    assert len(fused) == conv_relus > 0  # ONNX Runtime's FusedConv: the ReLU kept, the Conv in float


def _model(nodes, inits=(), opset=20, rank=4, domains=()):
    """A graph from x [1, 4, 6, 6] to y (of ``rank`` unnamed dimensions)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


S = np.array(0.1, np.float32)
W = np.ones((3, 4, 1, 1), np.int8)


@pytest.mark.parametrize("case, rule, node", [
    ("uint8", "zero-point", "QuantizeLinear 'q', DequantizeLinear 'dq'"),
    ("uint8", "quantized-type", "QuantizeLinear 'q', DequantizeLinear 'dq'"),
    ("flow", "integer-flow", "QuantizeLinear 'q'"),
    ("axis", "weight-axis", "DequantizeLinear 'wdq'"),
    ("float-input", "float-input", "Conv 'conv'"),
    ("scale", "scale-constant", "QuantizeLinear 'q', DequantizeLinear 'dq'"),
    ("custom", "custom-op", "Mystery 'm'"),
    ("unsupported", "unsupported-op", "Det 'det'"),
    ("axes", "constant-input", "Squeeze 'sq'"),
    ("dilation", "pool-dilation", "MaxPool 'pool'"),
    ("opset", "opset", ""),
])
def test_each_tensorrt_rule_fires_and_names_the_node(case, rule, node, tmp_path):
    zero8, zerou = np.array(0, np.int8), np.array(3, np.uint8)
    if case == "uint8":
        model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
                       [("s", S), ("z", zerou)])
    elif case == "flow":
        model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                        helper.make_node("Flatten", ["q"], ["f"], name="flat"),
                        helper.make_node("DequantizeLinear", ["f", "s", "z"], ["y"], name="dq")],
                       [("s", S), ("z", zero8)], rank=2)
    elif case in ("axis", "float-input"):
        axis = 1 if case == "axis" else 0
        scales = np.full(4 if axis else 3, 0.1, np.float32)
        data = ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"], name="dq")] if case == "axis" else [])
        model = _model([*data, helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis, name="wdq"),
                        helper.make_node("Conv", ["xd" if data else "x", "wd"], ["y"], name="conv")],
                       [("s", S), ("z", zero8), ("w", W), ("ws", scales), ("wz", np.zeros(scales.size, np.int8))])
    elif case == "scale":
        model = _model([helper.make_node("ReduceMax", ["x"], ["s"], keepdims=0, name="max"),
                        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")], [("z", zero8)])
    elif case == "custom":
        model = _model([helper.make_node("Mystery", ["x"], ["y"], name="m", domain="com.example")],
                       domains=["com.example"])
    elif case == "unsupported":
        model = _model([helper.make_node("Det", ["x"], ["y"], name="det")], rank=2)
    elif case == "axes":
        model = _model([helper.make_node("Shape", ["x"], ["n"], start=0, end=1, name="shape"),
                        helper.make_node("Sub", ["n", "one"], ["zero"], name="sub"),
                        helper.make_node("Squeeze", ["x", "zero"], ["y"], name="sq")],
                       [("one", np.array([1], np.int64))], rank=3)
    elif case == "dilation":
        model = _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2],
                                         name="pool")])
    else:
        model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=21)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    findings = [f for f in check_onnx(path, "tensorrt") if f.rule == rule]
    assert ", ".join(f.node for f in findings) == node
    assert findings[0].severity == ("warning" if rule in ("float-input", "opset") else "error")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # read only


def test_ort_names_a_quantized_layer_it_computes_in_float(tmp_path):
    path = tmp_path / "float-conv.onnx"
    scales = np.full(3, 0.1, np.float32)
    onnx.save(_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                      helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"], name="dq"),
                      helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, name="wdq"),
                      helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")],
                     [("s", S), ("z", np.array(0, np.uint8)), ("w", W), ("ws", scales),
                      ("wz", np.zeros(3, np.int8))]), str(path))
    findings = check_onnx(path, "ort")
    assert [(f.rule, f.node) for f in findings] == [("float-layer", "Conv 'conv'")]
    assert findings[0].message.endswith("nothing quantizes its output (QLinearConv writes integers)")


def test_ort_and_openvino_report_what_they_cannot_load_by_node(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                      helper.make_node("Mystery", ["r"], ["y"], name="m", domain="com.example")],
                     domains=["com.example"]), str(path))
    ort_findings = check_onnx(path, "ort")
    assert [(f.rule, f.severity, f.node) for f in ort_findings] == [("ort-load", "error", "Mystery 'm'")]
    assert "Mystery" in ort_findings[0].message
    try:
        import openvino  # noqa: F401
    except ImportError:
        pytest.skip("openvino is not installed (the deploy extra)")
    ov_findings = check_onnx(path, "openvino")
    assert [(f.rule, f.node) for f in ov_findings] == [("openvino-unsupported", "Mystery 'm'")]
    assert "com.example.Mystery" in ov_findings[0].message


def test_check_onnx_cli_exit_codes_and_json(asymmetric, symmetric, digits, tmp_path, cli):
    export_qdq(asymmetric, tmp_path / "ort.onnx", digits.x_test[:2])
    export_to(symmetric, "onnx-tensorrt", tmp_path / "trt.onnx", digits.x_test[:64])
    proc = cli("check-onnx", tmp_path / "ort.onnx", "--target", "tensorrt", "--show", "3")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and lines[0].startswith("error: ") and "more (--show N, or --json for all)" in lines[3]
    assert lines[-1].endswith("errors, 0 warnings: fails")
    proc = cli("check-onnx", tmp_path / "trt.onnx", "--target", "tensorrt", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {
        "file": str(tmp_path / "trt.onnx"), "target": "tensorrt", "passed": True, "findings": []}
    assert cli("check-onnx", tmp_path / "trt.onnx", "--target", "ort").returncode == 0  # warnings only
    assert cli("check-onnx", tmp_path / "trt.onnx", "--target", "ort", "--strict").returncode == 1
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    proc = cli("check-onnx", tmp_path / "junk.onnx", "--target", "ort")
    assert proc.returncode == 2 and "not an ONNX model" in proc.stderr
    proc = cli("check-onnx", tmp_path / "trt.onnx", "--target", "coreml")
    assert proc.returncode == 2 and "unknown target 'coreml'; known: tensorrt, ort, openvino" in proc.stderr


def test_quantize_and_export_for_tensorrt_from_the_cli(resnet8, tmp_path, cli):
    model_dir = save(resnet8, tmp_path / "m")
    proc = cli("quantize", model_dir, "--out", tmp_path / "q", "--symmetric-activations", "--calib", "64",
               "--no-latency", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert check_onnx(tmp_path / "q" / "model-int8.onnx", "tensorrt") == []  # the run's own file is TensorRT's
    notes = json.loads((tmp_path / "q" / "report.json").read_text())
    assert "onnx-tensorrt" in json.dumps(notes)
    proc = cli("export", tmp_path / "q", "--format", "onnx-tensorrt", "--out", tmp_path / "trt.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "ONNX reference (TensorRT-ready) vs slimkit's int8 simulation on 360 samples" in proc.stdout
    assert cli("check-onnx", tmp_path / "trt.onnx", "--target", "tensorrt").returncode == 0
