import pytest

from slimkit import SlimkitError, Task, parse_recipe, run_recipe
from slimkit.data import calibration_subset
from slimkit.quant.mixed import allocate_bits
from slimkit.quant.ptq import StaticQuantConfig, quantize_static


@pytest.fixture
def lenet5(briefly_trained):
    return briefly_trained("lenet5")


def weight_fraction(model, layer_bits):
    sizes = {n.rpartition(".")[0]: p.numel() for n, p in model.named_parameters() if n.endswith("weight")}
    return sum(layer_bits[l] * sizes[l] for l in layer_bits) / (32 * sum(sizes[l] for l in layer_bits))


@pytest.mark.parametrize("budget", [0.125, 0.16, 0.2, 0.25])
def test_allocation_meets_the_budget(lenet5, digits, budget):
    task = Task.classification(digits)
    calib = calibration_subset(digits, 128)
    result = allocate_bits(lenet5, task, calib, budget)
    bits = result["layer_bits"]
    assert set(bits.values()) <= {4, 8}
    assert weight_fraction(lenet5, bits) == pytest.approx(result["weight_fraction"])
    assert result["weight_fraction"] <= budget + 1e-9
    if budget == 0.25:
        assert set(bits.values()) == {8}
    if budget == 0.125:
        assert set(bits.values()) == {4}
    cfg = StaticQuantConfig(layer_bits=bits)
    quantized, step = quantize_static(lenet5, calib, cfg)
    for name, spec in step["weights"].items():  # 8-bit codes are 7-bit where ONNX Runtime's kernels saturate
        assert spec["bits"] == min(bits[name.rpartition(".")[0]], 7 if cfg.reduces_range() else 8)


def test_bad_budgets_and_layers(lenet5, digits):
    task = Task.classification(digits)
    calib = calibration_subset(digits, 32)
    with pytest.raises(SlimkitError, match="outside what 4-8 bit weights can reach"):
        allocate_bits(lenet5, task, calib, 0.05)
    with pytest.raises(SlimkitError, match="not quantized"):
        quantize_static(lenet5, calib, StaticQuantConfig(layer_bits={"fc9": 4}))
    with pytest.raises(ValueError, match="layer_bits"):
        StaticQuantConfig(layer_bits={"fc1": 1})


def test_mixed_precision_stage(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "quantize", "calib": 64, "size_budget": 0.15}]})
    report = run_recipe(recipe, tmp_path, progress=False)
    notes = report["stages"][1]["notes"]
    assert notes["mixed_precision"]["weight_fraction"] <= 0.15
    assert report["summary"]["compression_ratio"] > 4  # some layers stored as packed 4-bit codes
