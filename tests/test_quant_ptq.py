import json

import onnx
import pytest
import torch
from torch import nn

from slimkit import SlimkitError, Task, load, new_model, parse_recipe, run_recipe, save
from slimkit.data import calibration_subset
from slimkit.export import export_onnx
from slimkit.export.qdq import compare_with_runtime, export_int8_verified
from slimkit.io import dir_bytes
from slimkit.quant.ptq import StaticQuantConfig, fold_batchnorm, quantize_static

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def randomized_bn(model):
    """Give BatchNorms non-trivial statistics, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2"])
def test_batchnorm_folding_preserves_outputs(name):
    torch.manual_seed(0)
    model = randomized_bn(new_model(name))
    folded, pairs = fold_batchnorm(model, X)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(X), model(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lenet5", "resnet8", "mobilenetv2", "vit"])
def test_int8_onnx_agrees_with_simulation_and_is_integer(name, tmp_path, digits, briefly_trained):
    model = briefly_trained(name)
    quantized, step = quantize_static(model, calibration_subset(digits, 128))
    check = export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test)
    assert check["top1_agreement"] >= 0.99 and check["sqnr_db"] >= 30
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dtypes = {init.name: init.data_type for init in graph.initializer}
    weight_inputs = [n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    producers = {o: n for n in graph.node for o in n.output}
    for name_ in weight_inputs:  # every weight is dequantized from an int8 initializer
        dq = producers.get(name_)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in dtypes:
            assert dtypes[dq.input[0]] == onnx.TensorProto.INT8
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in dtypes for n in graph.node)
    export_onnx(model, tmp_path / "f.onnx", digits.x_test[:2])
    ratio = (tmp_path / "q.onnx").stat().st_size / (tmp_path / "f.onnx").stat().st_size
    # resnet8 is mostly full convolutions: its file is the int8 weights plus per-channel scales and biases;
    # vit's token linears also carry int32 biases and the reshapes that make them integer Gemms
    assert ratio < {"resnet8": 0.285, "mobilenetv2": 0.41, "lenet5": 0.30, "vit": 0.345}[name]
    values = {v for n in graph.node for v in (*n.input, *n.output)} - {"input", "logits"}
    assert max(map(len, values)) <= 4 and not graph.metadata_props  # short names, no exporter signature


def test_simulated_accuracy_close_to_float(digits, briefly_trained):
    task = Task.classification(digits)
    model = briefly_trained("lenet5")
    quantized, _ = quantize_static(model, calibration_subset(digits, 256))
    assert abs(task.test_score(quantized) - task.test_score(model)) <= 0.02


def test_quantized_model_directory_round_trip(tmp_path, digits, briefly_trained):
    model = briefly_trained("resnet8")
    save(model, tmp_path / "fp32")
    quantized, step = quantize_static(model, calibration_subset(digits, 64))
    quantized.slimkit_meta = {**model.slimkit_meta, "plan": [*model.slimkit_meta["plan"], step]}
    save(quantized, tmp_path / "int8")
    meta = json.loads((tmp_path / "int8" / "slimkit.json").read_text())
    assert {e["encoding"] for e in meta["tensors"].values()} == {"int8-channel"}
    assert len(meta["tensors"]) == len(step["weights"])
    again = load(tmp_path / "int8")
    assert torch.equal(again(digits.x_test), quantized(digits.x_test))  # bit for bit
    assert dir_bytes(tmp_path / "int8") < 0.3 * dir_bytes(tmp_path / "fp32")


def test_exclude_keeps_layers_in_float(digits, briefly_trained):
    model = briefly_trained("lenet5")
    _, step = quantize_static(model, calibration_subset(digits, 32), StaticQuantConfig(exclude=["fc3", "conv1"]))
    assert set(step["weights"]) == {"conv2.weight", "fc1.weight", "fc2.weight"}
    with pytest.raises(SlimkitError, match="nothing to quantize"):
        quantize_static(model, calibration_subset(digits, 8), StaticQuantConfig(exclude=["*"]))
    with pytest.raises(ValueError, match="observer"):
        StaticQuantConfig(observer="magic")


def test_runtime_comparison_detects_a_wrong_model(tmp_path, digits, briefly_trained):
    model = briefly_trained("lenet300")
    quantized, _ = quantize_static(model, calibration_subset(digits, 64))
    export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test)
    other, _ = quantize_static(briefly_trained("lenet5"), calibration_subset(digits, 64))
    check = compare_with_runtime(other, tmp_path / "q.onnx", digits.x_test)
    assert check["sqnr_db"] < 30


def test_quantize_recipe_and_cli(cli, trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "quantize", "calib": 128},
                                      {"type": "export", "format": "onnx-int8", "filename": "again.onnx"}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][1]["notes"]["quantize"]
    assert notes["top1_agreement"] >= 0.99 and notes["weights_int8"] == 3
    assert report["summary"]["compression_ratio"] > 3.3
    assert abs(report["summary"]["accuracy_delta"]) <= 0.01
    assert (tmp_path / "r" / "model-int8.onnx").is_file() and (tmp_path / "r" / "again.onnx").is_file()
    proc = cli("export", str(tmp_path / "r"), "--format", "onnx",
               "--out", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2 and "use --format onnx-int8" in proc.stderr
    proc = cli("diff-int8", str(tmp_path / "r"),
               str(tmp_path / "r" / "model-int8.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    diff = json.loads(proc.stdout)
    assert diff["first_divergence"] is None and [r["quantizer"] for r in diff["layers"]][0] == "input of fc1"
    # fc1..fc3 inputs: the logits leave the last linear in float (its integer kernel writes float)
    assert len(diff["layers"]) == 3 and all(r["max_steps"] <= 1 for r in diff["layers"])
    proc = cli("diff-int8", str(tmp_path / "r"),
               str(tmp_path / "r" / "report.json"))
    assert proc.returncode == 2 and "is not a readable ONNX file" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("quantize", str(trained_run), "--calib", "64",
               "--no-latency", "--no-progress", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert load(tmp_path / "c")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    from slimkit.analyze import measure_latency

    latency = measure_latency(load(tmp_path / "c"), (1, 8, 8))["latency_ms"]  # timed as the int8 ONNX model
    assert set(latency) == {"torch_b1", "torch_b64", "ort_b1", "ort_b64"} and latency["ort_b64"] > 0


def test_qat_recovers_low_bit_accuracy_and_keeps_pruned_zeros(digits, tmp_path, briefly_trained):
    from slimkit import TrainConfig, fit
    from slimkit.pruning import PruneConfig, prune_weights, remove_masks
    from slimkit.quant.qat import convert_qat, prepare_qat

    task = Task.classification(digits)
    model = briefly_trained("lenet5")
    prune_weights(model, PruneConfig(sparsity=0.5))
    remove_masks(model)
    cfg = StaticQuantConfig(weight_bits=3)
    calib = calibration_subset(digits, 256)
    ptq, _ = quantize_static(model, calib, cfg)
    trainable, ctx = prepare_qat(model, calib, cfg)
    assert task.test_score(trainable) == pytest.approx(task.test_score(ptq), abs=1 / 360)  # same starting point
    train_cfg = TrainConfig(epochs=4, lr=5e-4)
    fit(trainable, task.train_batches(train_cfg), None, train_cfg, score_fn=task.val_score, progress=False)
    qat, step = convert_qat(trainable, ctx)
    assert task.test_score(qat) >= task.test_score(ptq)
    for name in step["weights"]:
        w = qat.get_parameter(name)
        scale = qat.get_buffer(f"_slimkit_wscale_{list(step['weights']).index(name)}")
        codes = w / scale.reshape(-1, *([1] * (w.dim() - 1)))
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 3 + 1e-4  # 3-bit codes
    zeros_before = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    zeros_after = sum(int((qat.get_parameter(n) == 0).sum()) for n in step["weights"])
    assert zeros_after >= zeros_before
    qat.slimkit_meta = {**model.slimkit_meta, "plan": [*model.slimkit_meta["plan"], step]}
    save(qat, tmp_path / "q3")
    encodings = {e["encoding"] for e in json.loads((tmp_path / "q3" / "slimkit.json").read_text())["tensors"].values()}
    assert encodings == {"int4-channel"}  # 3-bit codes pack two per byte
    assert torch.equal(load(tmp_path / "q3")(digits.x_test), qat(digits.x_test))
    check = export_int8_verified(qat, tmp_path / "q3.onnx", digits.x_test)
    assert check["top1_agreement"] >= 0.99


def test_log_scheme_exports_power_of_two_codes(digits, tmp_path, briefly_trained):
    from slimkit.quant.qat import prepare_qat

    model = briefly_trained("lenet5")
    calib = calibration_subset(digits, 64)
    quantized, step = quantize_static(model, calib, StaticQuantConfig(weight_bits=4, weight_levels="log"))
    for i, name in enumerate(step["weights"]):
        w, s = quantized.get_parameter(name), quantized.get_buffer(f"_slimkit_wscale_{i}")
        codes = (w / s.reshape(-1, *([1] * (w.dim() - 1)))).round().abs()
        assert set(codes[codes != 0].tolist()) <= {1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0}
    check = export_int8_verified(quantized, tmp_path / "log.onnx", digits.x_test)
    assert check["top1_agreement"] >= 0.99 and check["sqnr_db"] >= 30
    with pytest.raises(ValueError, match="at most 4 bits"):
        StaticQuantConfig(weight_bits=5, weight_levels="log")
    with pytest.raises(SlimkitError, match="linear step sizes"):
        prepare_qat(model, calib, StaticQuantConfig(weight_bits=4, weight_levels="log"))


def test_weight_only_quantization_keeps_activations_float(digits, tmp_path, briefly_trained):
    model = briefly_trained("lenet5")
    quantized, step = quantize_static(model, calibration_subset(digits, 64), StaticQuantConfig(activations="none"))
    assert step["activations"] == {} and len(step["weights"]) == 5
    export_int8_verified(quantized, tmp_path / "w.onnx", digits.x_test)
    graph = onnx.load(str(tmp_path / "w.onnx")).graph
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)  # only weights, already int8
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == 5
    recipe = parse_recipe({"model": {"path": str(tmp_path / "m")}, "evaluate": {"latency": False},
                           "stages": [{"type": "quantize", "scheme": "int8-weight", "weight_bits": 4}]})
    save(model, tmp_path / "m")
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    assert report["summary"]["compression_ratio"] > 5  # 4-bit codes packed two per byte


def test_a_channel_pruned_away_keeps_a_usable_scale(digits, briefly_trained, tmp_path):
    """Regression: an all-zero output channel got the smallest float scale, so its bias overflowed int32."""
    model = briefly_trained("lenet300")
    with torch.no_grad():
        model.fc1.weight[:5] = 0  # five dead neurons; their biases stay
    gm, _ = quantize_static(model, calibration_subset(digits, 128), StaticQuantConfig())
    scale = gm.get_buffer("_slimkit_wscale_0")
    assert torch.all(scale[:5] == scale[5:].double().median().float())
    check = export_int8_verified(gm, tmp_path / "q.onnx", digits.x_test)
    assert check["top1_agreement"] == 1.0 and check["sqnr_db"] >= 40


def test_a_pruned_then_quantized_model_directory_is_smaller_than_the_pruned_one(digits, briefly_trained, tmp_path):
    from slimkit.pruning.mask import remove_masks
    from slimkit.pruning.unstructured import PruneConfig, prune_weights

    model = briefly_trained("lenet300")
    prune_weights(model, PruneConfig(sparsity=0.9, scope="global"), Task.classification(digits))
    remove_masks(model)
    save(model, tmp_path / "pruned")
    gm, step = quantize_static(model, calibration_subset(digits, 128), StaticQuantConfig())
    gm.slimkit_meta = {**model.slimkit_meta, "plan": [step]}
    save(gm, tmp_path / "quantized")
    meta = json.loads((tmp_path / "quantized" / "slimkit.json").read_text())
    assert meta["tensors"]["fc1.weight"]["positions"] in ("bitmask", "indices")  # the non-zero int8 codes only
    assert dir_bytes(tmp_path / "quantized") < 0.7 * dir_bytes(tmp_path / "pruned")
    reloaded = load(tmp_path / "quantized")
    assert torch.equal(reloaded(digits.x_test), gm(digits.x_test))


def test_quantizer_buffers_the_codes_carry_are_not_stored_twice(digits, briefly_trained, tmp_path):
    from slimkit.modelfile.store import read_safetensors, save_model
    from slimkit.quant.ptq import weight_scale_buffer, weight_zero_buffer

    model = briefly_trained("lenet300")
    gm, step = quantize_static(model, calibration_subset(digits, 128), StaticQuantConfig())
    gm.slimkit_meta = {**model.slimkit_meta, "plan": [step]}
    save(gm, tmp_path / "new")
    stored = read_safetensors(tmp_path / "new" / "model.safetensors")
    assert not [k for k in stored if k.startswith(("_slimkit_wscale", "_slimkit_wzero"))]
    reloaded = load(tmp_path / "new")
    for i in range(len(step["weights"])):
        for buffer in (weight_scale_buffer(i), weight_zero_buffer(i)):
            assert torch.equal(reloaded.get_buffer(buffer), gm.get_buffer(buffer)), buffer
    assert torch.equal(reloaded(digits.x_test), gm(digits.x_test))
    meta = {k: v for k, v in gm.slimkit_meta.items()}  # a directory from before: the buffers stored as well
    save_model(gm, tmp_path / "old", meta, {name: (gm.get_buffer(weight_scale_buffer(i)), None)
                                            for i, name in enumerate(step["weights"])})
    assert torch.equal(load(tmp_path / "old")(digits.x_test), gm(digits.x_test))
    channels = 300 + 100 + 10  # a float32 scale and an int32 zero point per output channel, no longer twice
    assert dir_bytes(tmp_path / "old") - dir_bytes(tmp_path / "new") >= 8 * channels


def test_qat_runs_only_where_static_int8_loses_too_much(trained_run, tmp_path):
    def quantize(out, **stage):
        recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                               "stages": [{"type": "quantize", "calib": 128, **stage}]})
        return run_recipe(recipe, tmp_path / out, progress=False)["stages"][1]["notes"]

    kept = quantize("kept", qat_if_drop=0.05)  # 8-bit lenet300 loses well under 5 points: PTQ stays
    assert kept["qat_decision"]["method"] == "PTQ" and kept["quantize"]["qat_epochs"] == 0
    decision = kept["qat_decision"]
    assert decision["val_score_float"] - decision["val_score_ptq"] <= 0.05
    trained = quantize("trained", weight_bits=2, qat_if_drop=0.01, qat={"epochs": 1, "lr": 5e-4})
    decision = trained["qat_decision"]  # 2-bit weights lose far more than a point: QAT runs, as configured
    assert decision["method"] == "QAT" and decision["val_score_float"] - decision["val_score_ptq"] > 0.01
    assert trained["quantize"]["qat_epochs"] == 1 and len(trained["training"]["QAT"]["history"]) == 1


class SiLUWithGate(nn.Module):
    """EfficientNet's pattern in small: conv + SiLU, then a squeeze-and-excitation sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.squeeze, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        x = nn.functional.silu(self.conv1(x))
        y = nn.functional.silu(self.conv2(x))
        y = y * torch.sigmoid(self.squeeze(y.mean((2, 3), keepdim=True)))
        return self.head(y.mean((2, 3)))


def test_silu_and_sigmoid_gates_run_on_integers(tmp_path, digits):
    """SiLU is split into x * sigmoid(x) with a quantizer between, so ONNX Runtime fuses both ops (and the gate's
    product) into integer QLinearSigmoid / QLinearMul: no float Sigmoid or Mul is left in the optimized graph."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = SiLUWithGate().eval()
    quantized, step = quantize_static(model, calibration_subset(digits, 64))
    check = export_int8_verified(quantized, tmp_path / "q.onnx", digits.x_test[:128], reference=model)
    assert check["top1_agreement"] >= 0.99 and check["deployed_vs_reference"]["sqnr_db"] >= 25
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearSigmoid") == 3 and ops.count("QLinearMul") == 3
    assert "Sigmoid" not in ops and "Mul" not in ops
    quantized.slimkit_meta = {"architecture": {"factory": f"{__name__}:SiLUWithGate"}, "input_shape": [1, 8, 8],
                              "plan": [step]}
    save(quantized, tmp_path / "int8")
    again = load(tmp_path / "int8", trust_code=True)
    assert torch.equal(again(digits.x_test), quantized(digits.x_test))  # the split replays identically
    products = {n.name for n in quantized.graph.nodes if n.target is torch.ops.aten.mul.Tensor}
    assert {"silu", "silu_1"} <= products  # plans saved before the split name the SiLU outputs so


def _mlp():
    """Random weights and zero-centred inputs: uint8 activations near 255 meet weight codes near +/-127."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10)).eval(), torch.randn(64, 1, 8, 8)


def test_reduce_range_gives_7_bit_codes_where_integer_kernels_saturate(tmp_path, monkeypatch):
    """On an x86 CPU without VNNI ONNX Runtime sums pairs of uint8 x int8 products in 16 bits; 8-bit codes
    saturate there and the file parts from the simulation, 7-bit codes match it code for code."""
    from slimkit.analyze import machine
    from slimkit.export.layer_diff import int8_layer_diff
    from slimkit.export.qdq import write_qdq

    model, x = _mlp()
    for saturates in (True, False):
        monkeypatch.setattr(machine, "int8_pairs_saturate", lambda: saturates)
        for cfg, bits in ((StaticQuantConfig(), 7 if saturates else 8), (StaticQuantConfig(reduce_range=False), 8),
                          (StaticQuantConfig(reduce_range=True), 7),
                          (StaticQuantConfig(activations="none", reduce_range=True), 8),
                          (StaticQuantConfig(weight_bits=4), 4)):
            assert {s["bits"] for s in quantize_static(model, x, cfg)[1]["weights"].values()} == {bits}, cfg
    monkeypatch.undo()
    reduced, _ = quantize_static(model, x, StaticQuantConfig(reduce_range=True))
    assert all(w.abs().max() <= 63 * s.max() * 1.0001 for w, s in
               ((reduced.get_parameter(f"{i}.weight"), reduced.get_buffer(f"_slimkit_wscale_{j}"))
                for j, i in enumerate((1, 3, 5))))
    write_qdq(reduced, tmp_path / "reduced.onnx", x[:2])
    assert [r["codes_differ"] for r in int8_layer_diff(reduced, tmp_path / "reduced.onnx", x)] == [0, 0, 0]
    full, _ = quantize_static(model, x, StaticQuantConfig(reduce_range=False))
    if machine.int8_pairs_saturate():  # this CPU: the check refuses the file and names the cause
        with pytest.raises(SlimkitError, match="no VNNI.*reduce_range"):
            export_int8_verified(full, tmp_path / "full.onnx", x, reference=model)
    else:
        export_int8_verified(full, tmp_path / "full.onnx", x, reference=model)


def test_an_excluded_layer_between_quantized_ones_stays_float_in_onnx_runtime(tmp_path):
    """ONNX Runtime quantizes the weight of a float Conv/Gemm that reads a per-tensor dequantizer itself
    (WeightBiasQuantization); the export gives such a layer a per-channel dequantizer, so it stays float."""
    import onnxruntime as ort

    model, x = _mlp()
    quantized, step = quantize_static(model, x, StaticQuantConfig(exclude=["3"], reduce_range=True))
    assert set(step["weights"]) == {"1.weight", "5.weight"}
    check = export_int8_verified(quantized, tmp_path / "q.onnx", x, reference=model)
    assert check["sqnr_db"] >= 40
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QGemm") == 2 and ops.count("Gemm") == 1
