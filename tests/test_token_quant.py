"""Per-token dynamic int8 (one uint8 range per row of a linear layer's input): the simulation against a float64
reference, the zero-point rows that carry each row's zero point into ONNX Runtime's integer GEMM, and a tiny BERT
end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import slimkit
from slimkit.data.text import docstring_corpus
from slimkit.export.token_quant import _zero_point_rows
from slimkit.models.text import tokenize
from slimkit.quant.ops import token_fake_quant
from slimkit.quant.ptq import StaticQuantConfig, quantize_static

pytest.importorskip("transformers")
from test_text import TEXTS, tiny_text_dir  # noqa: E402


def reference_token_quant(x: np.ndarray) -> np.ndarray:
    """Row-wise asymmetric uint8 quantization in float64, from the definition."""
    low = np.minimum(x.min(-1, keepdims=True), 0.0)
    high = np.maximum(x.max(-1, keepdims=True), 0.0)
    scale = np.where(high > low, (high - low) / 255, 1.0)
    zero = np.clip(np.round(-low / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def test_each_row_gets_its_own_range():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48) * torch.logspace(-2, 2, 5)[None, :, None]  # rows four decades apart
    x[0, 1] = 0.0  # an all-zero row (padding)
    x[1, 2] = x[1, 2].abs() + 1  # an all-positive row: its range still includes zero
    out = token_fake_quant(x, 48).double().numpy()
    ref = reference_token_quant(x.double().numpy())
    span = (np.maximum(x.double().numpy().max(-1), 0) - np.minimum(x.double().numpy().min(-1), 0)) / 255
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.all(np.abs(out - x.double().numpy()).max(-1) <= span / 2 * (1 + 1e-5))  # half a step of its own row
    assert not out[0, 1].any()
    per_tensor = float(np.abs(x.numpy()).max()) / 127
    assert np.abs(out[:, 0] - x[:, 0].numpy()).max() < per_tensor / 1000  # small rows keep their detail


def test_zero_point_rows_sum_to_minus_the_column_sums_within_the_weight_range():
    rng = np.random.default_rng(0)
    weight = rng.integers(-63, 64, size=(384, 40))
    weight[:, 0] = 63  # a column whose sum needs the most rows
    count = math.ceil(np.abs(weight.sum(0)).max() / 63)
    rows = _zero_point_rows(weight, count, 63)
    assert rows.shape == (count, 40) and np.abs(rows).max() <= 63
    assert np.array_equal(rows.sum(0), -weight.sum(0))
    codes = rng.integers(0, 256, size=(7, 384))
    zero = rng.integers(0, 256, size=(7, 1))
    padded = np.concatenate([codes, np.repeat(zero, count, axis=1)], axis=1)
    assert np.array_equal(padded @ np.concatenate([weight, rows]), (codes - zero) @ weight)  # exact, in integers


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return slimkit.load(tiny_text_dir(tmp_path_factory.mktemp("hf") / "bert"))


def test_a_text_models_dynamic_int8_quantizes_per_token_on_integer_gemms(ort_ops, text_model, tmp_path):
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    from slimkit.export.qdq import export_int8_verified

    calib = tokenize(text_model, docstring_corpus()[:32])
    cfg = StaticQuantConfig(activations="dynamic")
    quantized, step = quantize_static(text_model, calib, cfg)
    linears = {name: spec for name, spec in step["weights"].items() if not spec.get("table")}
    assert len(linears) == 13 and {spec["activation"] for spec in linears.values()} == {"dynamic-token"}
    check = export_int8_verified(quantized, tmp_path / "q.onnx", calib, reference=text_model)
    assert check["sqnr_db"] > 30  # ONNX Runtime's integers against the simulation
    ops = ort_ops(tmp_path / "q.onnx")
    assert ops["MatMulIntegerToFloat"] == 12 and not ops["DynamicQuantizeLinear"]  # the pooler is not read
    assert ops["MultiHeadAttention"] == 2 and not ops["Softmax"]  # each layer's attention fused (texts padded below)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = [inits[n.input[1]] for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    limit = 63 if cfg.reduces_range() else 127  # cannot saturate int16 pair sums of uint8 * int8 without VNNI
    assert all(w.dtype == np.int8 and np.abs(w.astype(int)).max() <= limit for w in weights)
    x = tokenize(text_model, TEXTS)  # other lengths than the calibration batch: batch and tokens stay dynamic
    session = onnxruntime.InferenceSession(str(tmp_path / "q.onnx"))
    feed = {i.name: part.contiguous().numpy() for i, part in zip(session.get_inputs(), x.unbind(1))}
    with torch.no_grad():
        simulated, original = quantized(x).double(), text_model(x).double()
    deployed = torch.from_numpy(session.run(None, feed)[0]).double()
    assert (deployed - simulated).norm() < 0.05 * (simulated - original).norm() + 1e-4
    quantized.slimkit_meta = {**text_model.slimkit_meta, "plan": [step]}
    slimkit.save(quantized, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "saved")(x), quantized(x))


def test_one_range_per_batch_remains_a_choice_for_text_models(ort_ops, text_model, tmp_path):
    from slimkit.export.qdq import export_int8_verified

    calib = tokenize(text_model, docstring_corpus()[:32])
    quantized, step = quantize_static(text_model, calib, StaticQuantConfig(activations="dynamic",
                                                                          dynamic_scales="tensor"))
    assert {s["activation"] for s in step["weights"].values() if not s.get("table")} == {"dynamic"}
    export_int8_verified(quantized, tmp_path / "t.onnx", calib, reference=text_model)
    ops = ort_ops(tmp_path / "t.onnx")
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 12 and not ops["QuantizeLinear"]
    assert ops["Softmax"] == 2 and not ops["MultiHeadAttention"]  # standard ONNX stays standard (portable)


def test_dynamic_scales_choice_and_its_errors(cli, small_model_dir, tmp_path):
    model = slimkit.load(small_model_dir)
    _, step = quantize_static(model, torch.randn(8, 1, 8, 8), StaticQuantConfig(activations="dynamic"))
    assert {s["activation"] for s in step["weights"].values()} == {"dynamic"}  # not a text model: per tensor
    with pytest.raises(ValueError, match="dynamic_scales is for activations 'dynamic'"):
        StaticQuantConfig(dynamic_scales="token")
    proc = cli("quantize", small_model_dir, "--scheme", "int8-static", "--dynamic-scales", "token", "--out",
               tmp_path / "r")
    assert proc.returncode != 0 and "dynamic_scales is for activations 'dynamic'" in proc.stderr
    assert not (tmp_path / "r").exists()
