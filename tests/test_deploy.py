"""Runtime targets beyond ONNX Runtime: OpenVINO, ExecuTorch (XNNPACK) and LiteRT files, each verified on creation.

Every test needs its target's runtime (the ``deploy`` extra); where it does not import, the test is skipped
with the reason.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import slimkit
from slimkit import SlimkitError, Task, save
from slimkit.export.onnx import run_torch
from slimkit.export.qdq import sqnr_db
from slimkit.export.targets import TARGETS, export_to, get_target

FLOAT_FORMATS = ["openvino", "executorch", "tflite", "tflite-fp16"]
INT8_FORMATS = ["openvino-int8", "executorch-int8", "tflite-int8"]


def needs(fmt: str) -> list:
    """Marks that skip unless ``fmt``'s runtime imports here, saying why."""
    try:
        get_target(fmt)
    except SlimkitError as exc:
        return [pytest.mark.skip(reason=str(exc))]
    return []


def formats(names: list[str]):
    return [pytest.param(name, marks=needs(name)) for name in names]


@pytest.fixture(scope="module")
def lenet5(briefly_trained):
    return briefly_trained("lenet5")


@pytest.fixture(scope="module")
def int8_models(briefly_trained, digits):
    """Static int8 (slimkit's scales) of two zoo models: plain layers, and residual blocks with BatchNorm."""
    return {name: slimkit.quantize(briefly_trained(name), {"scheme": "int8-static", "calib": 128}, digits)
            for name in ("lenet5", "resnet8")}


@pytest.mark.parametrize("fmt", formats(FLOAT_FORMATS))
def test_a_float_model_runs_in_each_runtime_as_in_torch(fmt, lenet5, digits, tmp_path):
    path = tmp_path / f"m{get_target(fmt).suffix}"
    result = export_to(lenet5, fmt, path, digits.x_test[:64])
    assert path.is_file() and result["bytes"] >= path.stat().st_size > 1000
    runner = get_target(fmt).open(path, 1)
    x = digits.x_test[64:200]  # not the inputs it was verified on
    expected, got = run_torch(lenet5, x).numpy(), runner(x)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= (0.99 if fmt == "tflite-fp16" else 1.0)
    tolerance = 1e-2 if fmt == "tflite-fp16" else 1e-4
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()
    if fmt == "tflite-fp16":  # half the weight bytes of the fp32 file
        fp32 = export_to(lenet5, "tflite", tmp_path / "fp32.tflite", digits.x_test[:8])
        assert result["bytes"] < 0.6 * fp32["bytes"]


@pytest.mark.parametrize("fmt, name", [pytest.param(f, n, marks=needs(f)) for f, n in [
    ("openvino-int8", "lenet5"), ("executorch-int8", "lenet5"), ("tflite-int8", "lenet5"),
    ("executorch-int8", "resnet8"), ("tflite-int8", "resnet8")]])
def test_int8_files_carry_slimkits_scales(fmt, name, int8_models, digits, tmp_path):
    quantized = int8_models[name]
    path = tmp_path / f"q{get_target(fmt).suffix}"
    result = export_to(quantized, fmt, path, digits.x_test[:64])
    assert result["check"]["against"] == "slimkit's int8 simulation"
    x, y = digits.x_test, digits.y_test.numpy()
    simulated, deployed = run_torch(quantized, x).numpy(), get_target(fmt).open(path, 1)(x)
    # the same grids: most outputs are the simulation's to float rounding; the rest differ where one rounding
    # in a deep stack went the other way (the runtime's own requantization)
    diff = np.abs(deployed - simulated)
    if not fmt.startswith("openvino"):  # OpenVINO rebuilds the arithmetic around its FakeQuantize: close, not equal
        assert np.median(diff) <= 1e-5 * np.abs(simulated).max()
    assert sqnr_db(simulated, deployed) >= 30
    assert abs((deployed.argmax(1) == y).mean() - (simulated.argmax(1) == y).mean()) <= 0.005


@pytest.mark.parametrize("fmt", formats(["executorch", "tflite"]))
def test_a_static_batch_file_runs_any_number_of_inputs(fmt, lenet5, digits, tmp_path):
    path = tmp_path / f"b4{get_target(fmt).suffix}"
    assert export_to(lenet5, fmt, path, digits.x_test[:64], batch=4)["batch"] == 4
    runner = get_target(fmt).open(path, 1)
    assert runner.batch == 4
    x = digits.x_test[:10]  # two full batches and a padded one
    np.testing.assert_allclose(runner(x), run_torch(lenet5, x).numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt", formats(["executorch-int8"]))
def test_what_a_target_cannot_take_is_refused_and_nothing_is_written(fmt, lenet5, digits, tmp_path):
    with pytest.raises(SlimkitError, match="for quantized models; this one is float: quantize it first"):
        export_to(lenet5, fmt, tmp_path / "a.pte", digits.x_test[:8])
    dynamic = slimkit.quantize(lenet5, {"scheme": "int8-dynamic"}, digits)
    with pytest.raises(SlimkitError, match="dynamic_fake_quant.*export it as onnx-int8"):
        export_to(dynamic, fmt, tmp_path / "b.pte", digits.x_test[:8])
    with pytest.raises(SlimkitError, match="unknown format 'tflite-int4'; known: .*openvino"):
        get_target("tflite-int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", formats(["tflite"]))
def test_a_file_that_fails_verification_is_not_written(fmt, lenet5, digits, tmp_path, monkeypatch):
    target = TARGETS[fmt]
    mine = tmp_path / "mine.tflite"
    mine.write_bytes(b"the user's")
    with pytest.raises(SlimkitError, match="already exists|slimkit did not write"):
        export_to(lenet5, fmt, mine, digits.x_test[:8])
    assert mine.read_bytes() == b"the user's"

    class Off:  # a runtime whose arithmetic drifts by 1% of the output
        batch = None

        def __init__(self, path, threads):
            self.inner = target.open(path, threads)

        def __call__(self, x):
            out = self.inner(x)
            return out + 0.01 * np.abs(out).max()

    monkeypatch.setitem(TARGETS, fmt, dataclasses.replace(target, open=Off))
    with pytest.raises(SlimkitError, match=r"does not match torch: max abs diff .* > allowed .*rtol"):
        export_to(lenet5, fmt, tmp_path / "drift.tflite", digits.x_test[:16])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.tflite"]


@pytest.mark.parametrize("fmt", formats(["openvino"]))
def test_openvino_writes_its_weights_beside_the_model_and_keeps_the_batch_dynamic(fmt, lenet5, digits, tmp_path,
                                                                                  cli):
    model_dir = save(lenet5, tmp_path / "m")
    proc = cli("export", model_dir, "--format", fmt, "--out", tmp_path / "ir.xml", "--data", "digits")
    assert proc.returncode == 0, proc.stderr
    assert "OpenVINO vs the torch model on 360 samples: max abs diff" in proc.stdout
    assert (tmp_path / "ir.bin").stat().st_size > 4 * sum(p.numel() for p in lenet5.parameters()) * 0.9
    runner = get_target(fmt).open(tmp_path / "ir.xml", 1)
    for n in (1, 7, 64):
        np.testing.assert_allclose(runner.run(digits.x_test[:n]), run_torch(lenet5, digits.x_test[:n]).numpy(),
                                   atol=1e-4)
    again = cli("export", model_dir, "--format", fmt, "--out", tmp_path / "ir.xml", "--data", "digits")
    assert again.returncode == 2 and "ir.bin already exists" in again.stderr


@pytest.mark.parametrize("fmts", [pytest.param(["onnx-int8", "openvino-int8", "tflite-int8", "executorch-int8"],
                                               marks=[m for f in INT8_FORMATS for m in needs(f)])])
def test_one_recipe_exports_several_runtimes_each_verified(fmts, briefly_trained, digits, tmp_path):
    save(briefly_trained("lenet5"), tmp_path / "m")
    recipe = slimkit.parse_recipe({
        "model": {"path": str(tmp_path / "m")}, "data": "digits", "evaluate": {"latency": False},
        "stages": [{"type": "quantize", "scheme": "int8-static", "calib": 128}, {"type": "export", "format": fmts}]})
    report = slimkit.run_recipe(recipe, tmp_path / "run", progress=False)
    exports = report["stages"][-1]["notes"]["exports"]
    assert [e["format"] for e in exports] == fmts
    for export in exports:
        assert (tmp_path / "run" / export["file"]).is_file()
        assert export["check"]["top1_agreement"] >= 0.99
    html = (tmp_path / "run" / "report.html").read_text()
    assert all(f"model-{f}" in html for f in fmts[1:]) and "LiteRT" in html and "ExecuTorch" in html
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]["notes"]["exports"] == exports


@pytest.mark.parametrize("runtimes", [pytest.param("torch,ort,tflite", marks=needs("tflite"))])
def test_bench_compares_runtimes_side_by_side(runtimes, trained_run, digits, tmp_path, cli):
    quantized = slimkit.quantize(slimkit.load(trained_run), {"scheme": "int8-static", "calib": 128}, digits)
    save(quantized, tmp_path / "int8")
    proc = cli("bench", trained_run, tmp_path / "int8", "--runtimes", runtimes, "--batch", "1,4", "--rounds", "1",
               "--data", "digits", "--json", "--html", tmp_path / "bench.html")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("{"), proc.stdout[:500]
    result = json.loads(proc.stdout)
    rows = {(r["model"], r["runtime"]): r for r in result["rows"]}
    assert len(rows) == 6 and not any("skipped" in r for r in rows.values())
    float_accuracy = Task.classification(digits).test_score(slimkit.load(trained_run))
    for (model, runtime), row in rows.items():
        assert set(row["latency_ms"]) == {"b1", "b4"} and 0 < row["latency_ms"]["b1"]["median"] <= \
            row["latency_ms"]["b1"]["p90"]
        if model == "int8":  # the int8 files and the simulation decide alike; the float files as torch does
            assert abs(row["accuracy"] - rows[("int8", "torch")]["accuracy"]) <= 0.005
            assert row["vs_baseline"]["b1"] == pytest.approx(
                row["latency_ms"]["b1"]["median"] / rows[(trained_run.name, runtime)]["latency_ms"]["b1"]["median"])
        else:
            assert row["accuracy"] == pytest.approx(float_accuracy, abs=1e-9)
        if runtime != "torch":
            assert row["bytes"] > 0 and row["check"]["top1_agreement"] >= 0.99
    assert rows[("int8", "torch")]["simulation"] and rows[("int8", "ort")]["bytes"] < rows[(trained_run.name,
                                                                                               "ort")]["bytes"] / 3
    page = (tmp_path / "bench.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "tflite-int8" in page and "interleaved rounds" in page
    assert cli("bench", trained_run, "--runtimes", "torch,coreml", "--data", "digits").returncode == 2


def test_bench_flags_what_is_slower_than_the_baseline_in_the_same_runtime():
    from slimkit.analyze.bench import _flag_slower

    def row(model, runtime, b1, b8):
        return {"model": model, "runtime": runtime, "latency_ms": {"b1": {"median": b1}, "b8": {"median": b8}}}

    rows = [row("fp32", "ort", 2.0, 8.0), row("fp32", "tflite", 1.0, 4.0), row("int8", "ort", 1.0, 9.0),
            row("int8", "tflite", 1.5, 2.0), {"model": "int8", "runtime": "executorch", "skipped": "not installed"}]
    _flag_slower(rows, [1, 8])
    assert rows[2]["vs_baseline"] == {"b1": 0.5, "b8": 1.125} and rows[2]["slower_than_baseline"] == [8]
    assert rows[3]["vs_baseline"] == {"b1": 1.5, "b8": 0.5} and rows[3]["slower_than_baseline"] == [1]
    assert "vs_baseline" not in rows[0] and "vs_baseline" not in rows[4]


@pytest.mark.parametrize("fmt", formats(["executorch-int8"]))
def test_a_torchvision_residual_network_lowers_to_int8_xnnpack(fmt, tmp_path):
    """resnet18's residual adds read a block's input that its first convolution reads too, in place: one shared
    dequantize node put it into two XNNPACK partitions (dependency cycles) until each reader got its own."""
    task = Task.classification(slimkit.load_data("digits:size=32,channels=3"))
    model = slimkit.new_model({"torchvision": "resnet18", "args": {"num_classes": 10}}, input_shape=[3, 32, 32],
                              num_classes=10).eval()
    quantized = slimkit.quantize(model, {"scheme": "int8-static", "calib": 16}, task)
    x = task.example_inputs[:16]
    export_to(quantized, fmt, tmp_path / "r18.pte", x)
    simulated, deployed = run_torch(quantized, x).numpy(), get_target(fmt).open(tmp_path / "r18.pte", 1)(x)
    assert np.median(np.abs(deployed - simulated)) <= 1e-5 * np.abs(simulated).max()
    assert sqnr_db(simulated, deployed) >= 30
