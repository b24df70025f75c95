import json

import pytest

from slimkit import SlimkitError, Task, load, parse_recipe, run_recipe
from slimkit.pruning import sparsity_of
from slimkit.pruning.sensitivity import allocate_sparsity, sensitivity


def test_unstructured_sweep(trained_run, digits):
    model = load(trained_run)
    task = Task.classification(digits)
    sens = sensitivity(model, task, sparsities=(0.1, 0.5, 0.95))
    assert sens["baseline"] == task.val_score(model)
    assert list(sens["layers"]) == ["fc1", "fc2", "fc3"]
    assert sens["layers"]["fc1"]["params"] == 64 * 300
    for info in sens["layers"].values():
        assert abs(info["scores"][0] - sens["baseline"]) < 0.02  # 10% of one layer barely matters
    assert min(info["scores"][-1] for info in sens["layers"].values()) < sens["baseline"] - 0.05
    assert sparsity_of(model, ["fc1", "fc2", "fc3"]) == 0  # the input model is untouched


def test_structured_sweep_names_groups(trained_run, digits):
    sens = sensitivity(load(trained_run), Task.classification(digits), sparsities=(0.5,), structured=True)
    assert list(sens["layers"]) == ["fc1", "fc2"]
    assert sens["layers"]["fc1"]["params"] == 300 * 64 + 300 + 100 * 300


def test_allocation_spares_the_sensitive_layer_and_hits_the_target():
    sens = {"baseline": 0.98, "sparsities": [0.3, 0.6, 0.9], "structured": False, "layers": {
        "robust": {"params": 900, "scores": [0.98, 0.98, 0.97]},
        "fragile": {"params": 100, "scores": [0.97, 0.80, 0.30]},
    }}
    alloc = allocate_sparsity(sens, 0.8)
    assert alloc["fragile"] < alloc["robust"]
    assert (alloc["robust"] * 900 + alloc["fragile"] * 100) / 1000 == pytest.approx(0.8, abs=1e-5)
    with pytest.raises(SlimkitError, match="reach only"):
        allocate_sparsity({**sens, "sparsities": [0.1, 0.2, 0.3]}, 0.8)


def test_stage_allocates_from_sensitivity_and_reports_it(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.8, "allocate": "sensitivity"}]})
    report = run_recipe(recipe, tmp_path, progress=False)
    notes = report["stages"][1]["notes"]
    layers = notes["prune"]["layers"]
    weights = {n: v["weights"] for n, v in layers.items()}
    overall = sum(layers[n]["sparsity"] * w for n, w in weights.items()) / sum(weights.values())
    assert overall == pytest.approx(0.8, abs=1e-3)
    assert len({round(v["sparsity"], 2) for v in layers.values()}) > 1  # not uniform
    assert "Per-layer sensitivity" in (tmp_path / "report.html").read_text()


def test_cli(cli, trained_run, tmp_path):
    proc = cli("sensitivity", str(trained_run), "--sparsities",
               "0.5,0.9", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert result["sparsities"] == [0.5, 0.9] and set(result["layers"]) == {"fc1", "fc2", "fc3"}
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    bad = cli("sensitivity", str(trained_run), "--sparsities", "a,b",
              "--out", str(tmp_path / "t"))
    assert bad.returncode == 2 and "--sparsities" in bad.stderr
