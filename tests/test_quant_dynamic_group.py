"""Dynamic int8 quantization (ranges per batch) and per-group weight-only quantization (int4-weight)."""

import json

import numpy as np
import onnx
import pytest
import torch

from slimkit import SlimkitError, Task, load, parse_recipe, run_recipe, save
from slimkit.analyze import machine
from slimkit.data import calibration_subset
from slimkit.export.qdq import export_int8_verified
from slimkit.quant.gptq import gptq_quantize
from slimkit.quant.ops import dynamic_fake_quant, expand_group_scale, group_fake_quant
from slimkit.quant.ptq import StaticQuantConfig, quantize_static


def with_plan(quantized, model, step):
    quantized.slimkit_meta = {**model.slimkit_meta, "plan": [*model.slimkit_meta["plan"], step]}
    return quantized


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "constant"])
def test_dynamic_fake_quant_is_exactly_onnx_dynamic_quantize_linear(case):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = torch.Generator().manual_seed(3)
    x = {"mixed": torch.randn(64, 37, generator=g) * 3, "positive": torch.rand(64, 37, generator=g) + 0.5,
         "negative": -torch.rand(64, 37, generator=g) - 0.1, "zeros": torch.zeros(8, 5),
         "constant": torch.full((8, 5), 2.5)}[case]
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(dynamic_fake_quant(x).numpy(), expected)
    # and against the float64 definition: the range includes 0, 255 steps, error at most half a step
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255 if hi > lo else 1.0
    assert float((dynamic_fake_quant(x).double() - x.double()).abs().max()) <= step / 2 + 1e-6


def test_group_fake_quant_matches_float64_with_a_short_last_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 5, 5, generator=g)  # 75 inputs per channel: groups of 32, 32, 11
    rows = w.reshape(6, -1).double()
    bounds = [(0, 32), (32, 64), (64, 75)]
    scale = torch.stack([rows[:, a:b].abs().amax(1) / 7 for a, b in bounds], 1)
    got = group_fake_quant(w, scale.float(), 32, 7)
    ref = torch.cat([torch.clamp(torch.round(rows[:, a:b] / scale[:, i : i + 1]), -7, 7) * scale[:, i : i + 1]
                     for i, (a, b) in enumerate(bounds)], 1).reshape(w.shape)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    spread = expand_group_scale(scale, w.shape, 32).reshape(6, -1)
    assert (spread[:, 64:] == scale[:, 2:3]).all() and (spread[:, :32] == scale[:, :1]).all()
    assert float(((got.double() - w.double()).abs() / spread.reshape(w.shape)).max()) <= 0.5 + 1e-6


def test_gptq_with_group_scales_beats_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g).double()
    w = torch.randn(16, 64, generator=g)
    scale = expand_group_scale(w.reshape(16, 4, 16).abs().amax(2) / 7, w.shape, 16)
    rtn = torch.clamp(torch.round(w / scale), -7, 7) * scale
    gptq = gptq_quantize(w, x.T @ x / len(x), scale, 7)
    codes = gptq / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4

    def output_error(q):
        return float(((x @ (w - q).double().T) ** 2).mean())

    assert output_error(gptq) < 0.7 * output_error(rtn)


def test_dynamic_quantization_runs_as_dynamic_quantize_matmul(ort_ops, digits, tmp_path, briefly_trained):
    task = Task.classification(digits)
    model = briefly_trained("lenet300")
    quantized, step = quantize_static(model, calibration_subset(digits, 64), StaticQuantConfig(activations="dynamic"))
    assert step["activations"] == {} and all(s["activation"] == "dynamic" for s in step["weights"].values())
    assert abs(task.test_score(quantized) - task.test_score(model)) <= 0.005
    check = export_int8_verified(quantized, tmp_path / "d.onnx", digits.x_test)
    assert check["top1_agreement"] == 1.0 and check["sqnr_db"] >= 60  # the same arithmetic, not an approximation
    ops = ort_ops(tmp_path / "d.onnx")
    assert ops["DynamicQuantizeMatMul"] == 3 and ops["Gemm"] + ops["FusedGemm"] + ops["MatMul"] == 0
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer) == 3
    save(with_plan(quantized, model, step), tmp_path / "m")
    assert torch.equal(load(tmp_path / "m")(digits.x_test), quantized(digits.x_test))


def test_dynamic_quantization_leaves_convolutions_float(digits, briefly_trained):
    model = briefly_trained("lenet5")
    _, step = quantize_static(model, calibration_subset(digits, 64), StaticQuantConfig(activations="dynamic"))
    assert sorted(step["weights"]) == ["fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_int4_group_weights_are_stored_as_4_bit_codes(name, digits, tmp_path, briefly_trained):
    task = Task.classification(digits)
    model = briefly_trained(name)
    cfg = StaticQuantConfig(activations="none", weight_bits=4, group_size=16)
    quantized, step = quantize_static(model, calibration_subset(digits, 64), cfg)
    assert task.test_score(quantized) >= task.test_score(model) - 0.02
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    check = export_int8_verified(quantized, tmp_path / "g.onnx", digits.x_test)
    assert check["top1_agreement"] >= 0.99 and check["sqnr_db"] >= 30
    proto = onnx.load(str(tmp_path / "g.onnx"))
    int4 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len(step["weights"]) and proto.opset_import[0].version == 21
    weights = sum(model.get_parameter(n).numel() for n in step["weights"])
    assert sum(len(i.raw_data) for i in int4) == sum((int(np.prod(i.dims)) + 1) // 2 for i in int4) >= weights // 2
    assert (tmp_path / "g.onnx").stat().st_size < 0.25 * fp32_bytes
    save(with_plan(quantized, model, step), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "slimkit.json").read_text())
    grouped = {k: v for k, v in meta["tensors"].items() if v.get("group_size") == 16}
    assert set(grouped) == set(step["weights"]) and {v["encoding"] for v in grouped.values()} == {"int4-channel"}
    assert torch.equal(load(tmp_path / "m")(digits.x_test), quantized(digits.x_test))


@pytest.mark.parametrize("level", [0, 4])
def test_linear_int4_weights_run_as_matmul_nbits(level, ort_ops, digits, tmp_path, briefly_trained, monkeypatch):
    """The last layer's MatMul is fused into ONNX Runtime's 4-bit kernel (earlier ones become float Gemm first),
    computing at the accuracy level slimkit's sessions choose for the CPU."""
    monkeypatch.setattr(machine, "nbits_accuracy_level", lambda: level)
    model = briefly_trained("lenet300")
    cfg = StaticQuantConfig(activations="none", weight_bits=4, group_size=32)
    quantized, _ = quantize_static(model, calibration_subset(digits, 64), cfg)
    export_int8_verified(quantized, tmp_path / "g.onnx", digits.x_test)
    nodes: list = []
    assert ort_ops(tmp_path / "g.onnx", nodes)["MatMulNBits"] >= 1
    levels = {onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {level}


def test_nbits_accuracy_level_follows_int8_saturation(monkeypatch):
    for saturates, level in ((True, 0), (False, 4)):
        monkeypatch.setattr(machine, "int8_pairs_saturate", lambda s=saturates: s)
        assert machine.nbits_accuracy_level() == level


def test_schemes_in_recipes_and_cli(cli, trained_run, tmp_path):
    for scheme, ratio in (("int8-dynamic", 3.3), ("int4-weight", 4.5)):
        recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                               "stages": [{"type": "quantize", "scheme": scheme}]})
        report = run_recipe(recipe, tmp_path / scheme, progress=False)
        notes = report["stages"][1]["notes"]["quantize"]
        assert notes["top1_agreement"] >= 0.99 and report["summary"]["compression_ratio"] > ratio
        assert abs(report["summary"]["accuracy_delta"]) <= 0.015
    assert notes["group_size"] == 32 and notes["weight_bits"] == 4 and notes["activations"] == "none"
    for stage, message in (({"scheme": "int4-weight", "weight_bits": 8}, "4-bit weights"),
                           ({"scheme": "int8-static", "group_size": 16}, "weight-only"),
                           ({"scheme": "int8-dynamic", "activations": "static"}, "leave it out")):
        with pytest.raises(SlimkitError, match=message):
            parse_recipe({"model": {"path": str(trained_run)}, "stages": [{"type": "quantize", **stage}]})
    proc = cli("quantize", str(trained_run), "--scheme", "int4-weight",
               "--group-size", "16", "--calib", "32", "--no-latency", "--no-progress",
               "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    step = load(tmp_path / "c").slimkit_meta["plan"][-1]
    assert {s["group_size"] for s in step["weights"].values()} == {16}
    proc = cli("quantize", str(trained_run), "--scheme", "int4-weight",
               "--bits", "3", "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "4-bit weights" in proc.stderr
