"""Reports show what was decided: per-layer decisions, exports and their checks, bit maps, warnings, curves."""

from __future__ import annotations

import json
import re

import pytest

from slimkit import parse_recipe, run_recipe
from slimkit.modelfile.store import read_safetensors


@pytest.fixture(scope="module")
def quantized_run(trained_run, tmp_path_factory):
    """AGP pruning, then mixed 4/8-bit quantization (its int8 ONNX checked), with a strict accuracy budget."""
    out = tmp_path_factory.mktemp("q") / "run"
    recipe = parse_recipe({"name": "q", "model": {"path": str(trained_run)},
                           "evaluate": {"latency": False, "max_metric_drop": 0.0},
                           "stages": [{"type": "prune", "sparsity": 0.8, "scope": "global", "schedule": "agp",
                                       "agp_every": 4, "finetune": {"epochs": 4}},
                                      {"type": "quantize", "size_budget": 0.2}]})
    return out, run_recipe(recipe, out, progress=False)


def test_per_layer_decisions_are_read_off_the_models(quantized_run):
    out, report = quantized_run
    rows = {r["layer"]: r for r in report["layer_decisions"]}
    bits = report["stages"][2]["notes"]["mixed_precision"]["layer_bits"]
    widest = 7 if report["stages"][2]["notes"]["quantize"]["reduce_range"] else 8  # 7-bit codes on AVX2 CPUs
    assert set(rows) == {"fc1", "fc2", "fc3"} and {k: rows[k]["bits"] for k in rows} == {
        k: min(b, widest) for k, b in bits.items()}
    assert sorted(set(bits.values())) == [4, 8]
    assert rows["fc1"]["weight_before"] == [300, 64] and rows["fc1"]["weight_after"] == [[300, 64]]
    zeros = sum(r["sparsity"] * r["params_after"] for r in rows.values())  # (weights dominate the parameters)
    assert 0.75 < zeros / sum(r["params_after"] for r in rows.values()) < 0.85
    stored = read_safetensors(out / "model" / "model.safetensors")
    assert sum(r["bytes"] for r in rows.values()) == sum(t.numel() * t.element_size() for t in stored.values())


def test_exports_warnings_bit_map_and_ramp_epochs_are_shown(quantized_run):
    out, report = quantized_run
    export = report["stages"][2]["notes"]["export"]
    assert export["file"] == "model-int8.onnx" and export["bytes"] == (out / "model-int8.onnx").stat().st_size
    assert export["check"]["top1_agreement"] >= 0.99 and export["check"]["against"] == "slimkit's int8 simulation"
    assert report["warnings"] and all("below the baseline" in w for w in report["warnings"])  # budget: 0 points
    history = report["stages"][1]["notes"]["training"]["prune agp"]["history"]
    ramp = [r.get("eligible", True) is False for r in history]
    assert ramp[0] and not ramp[-1] and ramp == sorted(ramp, reverse=True)  # the ramp first, then the target
    assert all(r["val_score"] > 0.5 for r in history)  # ramp epochs scored too (drawn, never chosen)
    html = (out / "report.html").read_text()
    for heading in ("Per-layer decisions", "Exports, checked in their runtime", "Mixed precision of 1:quantize",
                    "Training curves", '<div class="warn">'):
        assert heading in html
    assert 'alt="weight bits per layer"' in html and "x smaller" in html
    assert "fake-quant simulation" not in html  # no latency measured in this run: no torch timing to mark


def test_structure_changes_appear_per_layer(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "structured": True, "sparsity": 0.5},
                                      {"type": "factorize", "rank": 8, "exclude": ["fc3"]},
                                      {"type": "cluster", "bits": 4},
                                      {"type": "export", "format": "slim"}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    rows = {r["layer"]: r for r in report["layer_decisions"]}
    kept = {g["channels"]: g["kept"] for g in report["stages"][1]["notes"]["prune"]["groups"]}
    assert kept == {"300 channels of fc1": 150, "100 channels of fc2": 50}
    assert rows["fc1"]["rank"] == 8 and rows["fc1"]["weight_after"] == [[8, 64], [150, 8]]
    assert rows["fc3"]["weight_after"] == [[10, 50]] and rows["fc3"]["rank"] is None
    assert all(r["shared_values"] and r["shared_values"] <= 16 for r in rows.values())
    exports = [s["notes"]["export"] for s in report["stages"] if "export" in s.get("notes", {})]
    assert exports == [{"file": "model.slim", "format": "slim", "runtime": "slimkit.load",
                        "bytes": (tmp_path / "r" / "model.slim").stat().st_size,
                        "check": {"against": "the model", "identical_outputs": True, "samples": 360}}]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Channel groups of 0:prune" in html and re.search(r"<td>fc1</td><td class=\"t\">Sequential", html) is None
    assert json.loads((tmp_path / "r" / "report.json").read_text())["layer_decisions"] == report["layer_decisions"]
