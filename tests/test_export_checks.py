"""Export checks that judge what matters: relative fp32 tolerances, int8 files judged against a reference
as well as against the simulation, infinite SQNR for identical outputs, fp32 rewrites verified."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimkit import SlimkitError, calibration_subset
from slimkit.export import export_onnx
from slimkit.export.qdq import (
    activations_in_float, agreement_slack, compare_with_runtime, deployed_is_faithful, export_int8_verified, export_qdq, sqnr_db,
)
from slimkit.quant.ptq import StaticQuantConfig, quantize_static


def test_sqnr_of_identical_outputs_is_infinite():
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    assert sqnr_db(a, a) == math.inf and sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert sqnr_db(a, a + 0.01) == pytest.approx(10 * np.log10((a**2).sum() / (4 * 1e-4)))


class Scaled(nn.Module):
    """Large outputs: float sums that differ in order between torch and ONNX Runtime differ by more in absolute
    terms, not in relative ones."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(64, 256), nn.Linear(256, 10), scale

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1)))) * self.scale


def test_fp32_export_tolerance_is_relative_to_the_outputs(tmp_path, digits):
    torch.manual_seed(0)
    model = Scaled(1e5).eval()
    x = digits.x_test[:64]
    result = export_onnx(model, tmp_path / "m.onnx", x[:2], verify_on=x)
    assert result.max_abs_diff > 1e-4  # an absolute tolerance of 1e-4 would have refused a correct export
    assert result.max_abs_diff <= result.allowed_diff == pytest.approx(1e-5 + 1e-4 * float(model(x).abs().max()),
                                                                       rel=1e-6)
    with pytest.raises(SlimkitError, match=r"max abs diff .* > allowed .* \(atol 0 \+ rtol 1e-09 x max \|output\|"):
        export_onnx(model, tmp_path / "strict.onnx", x[:2], verify_on=x, atol=0, rtol=1e-9)
    assert not (tmp_path / "strict.onnx").exists()


def test_int8_files_are_judged_against_a_reference_too(tmp_path, digits, briefly_trained):
    model = briefly_trained("resnet8")
    quantized, _ = quantize_static(model, calibration_subset(digits, 128))
    check = export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test, reference=model)
    sim, dep = check["simulation_vs_reference"], check["deployed_vs_reference"]
    assert check["reference"] == "the float model" and sim["top1_agreement"] > 0.95
    assert abs(dep["sqnr_db"] - sim["sqnr_db"]) < 1.0 and 15 < sim["sqnr_db"] < 60
    default = compare_with_runtime(quantized, tmp_path / "q.onnx", digits.x_test)  # no float model at hand
    assert default["reference"] == "the int8 weights with float activations"
    assert default["simulation_vs_reference"]["sqnr_db"] > sim["sqnr_db"]  # weight rounding is not counted there
    other, _ = quantize_static(briefly_trained("mobilenetv2"), calibration_subset(digits, 64))
    wrong = compare_with_runtime(other, tmp_path / "q.onnx", digits.x_test)  # the file is not this model
    assert not deployed_is_faithful(wrong)


def test_the_rule_lets_a_file_differ_from_the_simulation_if_it_is_as_good():
    close = {"top1_agreement": 0.995, "sqnr_db": 35.0}
    as_good = {"top1_agreement": 0.94, "sqnr_db": 25.0, "simulation_vs_reference": {"top1_agreement": 0.97,
               "sqnr_db": 26.0}, "deployed_vs_reference": {"top1_agreement": 0.965, "sqnr_db": 25.6}}
    worse = {**as_good, "deployed_vs_reference": {"top1_agreement": 0.9, "sqnr_db": 22.0}}
    assert deployed_is_faithful(close) and deployed_is_faithful(as_good) and not deployed_is_faithful(worse)
    # a deep model's file that is as close to fp32 (SQNR) flips 10 of 360 top-1 decisions against the simulation:
    # its agreement with fp32 may differ by chance by about sqrt(10)/360 per sample set, not by 0.01 at most
    noisy = {"top1_agreement": 350 / 360, "sqnr_db": 24.5, "samples": 360,
             "simulation_vs_reference": {"top1_agreement": 334 / 360, "sqnr_db": 16.2},
             "deployed_vs_reference": {"top1_agreement": 328 / 360, "sqnr_db": 16.3}}
    assert agreement_slack(noisy) == pytest.approx(3 * 10**0.5 / 360) and deployed_is_faithful(noisy)
    assert not deployed_is_faithful({**noisy, "deployed_vs_reference": {"top1_agreement": 320 / 360,
                                                                         "sqnr_db": 16.3}})


def test_the_float_activation_reference_drops_only_activation_quantizers(digits, briefly_trained):
    quantized, step = quantize_static(briefly_trained("lenet5"), calibration_subset(digits, 64))
    reference = activations_in_float(quantized)
    targets = [n.target for n in reference.graph.nodes if n.op == "call_function"]
    assert torch.fake_quantize_per_tensor_affine not in targets
    assert targets.count(torch.fake_quantize_per_channel_affine) == len(step["weights"])  # weights stay on grids
    assert any(n.target is torch.fake_quantize_per_tensor_affine for n in quantized.graph.nodes)  # original intact


class BatchNormReLU(nn.BatchNorm2d):
    """A BatchNorm that also applies its activation, as third-party model libraries often write it."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = BatchNormReLU(8)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_folding_a_batchnorm_that_is_more_than_one_is_refused_by_name(digits):
    torch.manual_seed(0)
    model = ConvBNAct().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    calib = calibration_subset(digits, 32)
    with pytest.raises(SlimkitError, match=r"folding bn \(BatchNormReLU\) into conv changes the model's output"):
        quantize_static(model, calib)
    quantized, step = quantize_static(model, calib, StaticQuantConfig(fold_bn=False))
    assert step["folded_batchnorm"] == []
    assert sqnr_db(model(digits.x_test).detach().numpy(), quantized(digits.x_test).detach().numpy()) > 20


def _damage_weight(path, out, layer_index: int) -> tuple[int, ...]:
    """Zero a quarter of the output channels of the file's ``layer_index``-th int8 conv weight."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    convs = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    target = convs[layer_index]
    codes = numpy_helper.to_array(target).copy()
    codes[: codes.shape[0] // 4] = 0
    target.CopyFrom(numpy_helper.from_array(codes, target.name))
    onnx.save(proto, str(out))
    return tuple(target.dims)


def test_layer_diff_finds_where_a_file_parts_from_the_simulation(tmp_path, digits, briefly_trained):
    from slimkit.export import first_divergence, int8_layer_diff

    quantized, _ = quantize_static(briefly_trained("resnet8"), calibration_subset(digits, 128))
    export_qdq(quantized, tmp_path / "q.onnx", digits.x_test[:2])
    x = digits.x_test[:32]
    clean = int8_layer_diff(quantized, tmp_path / "q.onnx", x)
    assert len(clean) == sum(n.target is torch.fake_quantize_per_tensor_affine for n in quantized.graph.nodes)
    assert first_divergence(clean) is None and max(r["max_steps"] for r in clean) <= 2
    assert clean[0]["quantizer"] == "input of stem.0"
    convs = [str(n.args[1].args[0].target).rpartition(".")[0]  # conv <- weight quantizer <- weight
             for n in quantized.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    for index in (1, 4):
        _damage_weight(tmp_path / "q.onnx", tmp_path / "bad.onnx", index)
        first = first_divergence(int8_layer_diff(quantized, tmp_path / "bad.onnx", x))
        assert first is not None and first["quantizer"].startswith(f"output of {convs[index]}")
        assert first["max_steps"] >= 8
    other, _ = quantize_static(briefly_trained("mobilenetv2"), calibration_subset(digits, 64))
    with pytest.raises(SlimkitError, match="not exported from this model"):
        int8_layer_diff(other, tmp_path / "q.onnx", x)


def test_a_refused_int8_export_names_the_layer_where_it_parts(tmp_path, digits, briefly_trained, monkeypatch):
    from slimkit.export import qdq

    quantized, _ = quantize_static(briefly_trained("resnet8"), calibration_subset(digits, 128))
    original = qdq.write_qdq

    def damaged(model, path, sample, opset=18):
        original(model, path, sample, opset)
        _damage_weight(path, path, 2)

    monkeypatch.setattr(qdq, "write_qdq", damaged)
    with pytest.raises(SlimkitError, match=r"worse than slimkit's simulation.*the codes part at the output of "
                                           r"\S+ \(\d+\.\d% differ, up to \d+ steps; slimkit diff-int8"):
        qdq.export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test)
    assert not (tmp_path / "q.onnx").exists()


class TokenMLP(nn.Module):
    """Linear layers over [batch, tokens, width] (ViT blocks, ConvNeXt's channels-last pixels)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 8, 8)
        return self.head(self.fc2(torch.nn.functional.gelu(self.fc1(tokens))).mean(1))


def test_linears_over_tokens_run_as_integer_gemms(tmp_path, digits):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = TokenMLP().eval()
    quantized, _ = quantize_static(model, calibration_subset(digits, 128))
    check = export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test, reference=model)
    assert check["top1_agreement"] >= 0.99 and check["sqnr_db"] > 30
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("Gemm") == 3 and "MatMul" not in ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QGemm") == 3 and "MatMulIntegerToFloat" not in fused
    # integer in, float out: GELU and the mean read floats straight from the kernel, no dequantize pass
    assert fused.count("QuantizeLinear") == 3 and "DequantizeLinear" not in fused
