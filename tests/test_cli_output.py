"""What the command line prints when it is not on a terminal (CI logs, pipes), and recipe overrides."""

from __future__ import annotations

import json

import pytest
import torch

from slimkit import new_model, save
from slimkit.console import plain_table
from slimkit.report.summary import summary_rows


def test_tables_off_a_terminal_are_plain_and_never_cut(cli, trained_run, tmp_path):
    proc = cli("analyze", trained_run, "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "\u2500" not in proc.stdout  # no ellipsis, no box drawing
    assert "dense fp32 bytes (computed)" in proc.stdout and "202,440" in proc.stdout
    proc = cli("pack", trained_run, "--out", tmp_path / "m.slim")
    assert proc.returncode == 0 and "…" not in proc.stdout
    assert any(line.startswith("fc1 ") and line.rstrip().endswith("x smaller") for line in proc.stdout.splitlines())
    as_json = cli("pack", trained_run, "--out", tmp_path / "m.slim", "--json")
    assert json.loads(as_json.stdout)["file_bytes"] == (tmp_path / "m.slim").stat().st_size


def test_a_plain_table_keeps_every_cell_whole():
    text = plain_table("t", ["layer", "value"], [["blocks.0.attn.a_very_long_layer_name", "0.123456789"], ["x", "1"]])
    lines = text.splitlines()
    assert lines[0] == "t" and "blocks.0.attn.a_very_long_layer_name  0.123456789" in lines
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule as wide as the widest cell


def test_run_takes_a_model_data_and_field_overrides(cli, trained_run, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: over\nmodel: {zoo: lenet5}\nstages:\n  - {type: prune, sparsity: 0.9}\n")
    proc = cli("run", recipe, "--model", trained_run, "--data", "digits", "--set", "stages.0.sparsity=0.5",
               "--set", "evaluate.latency=false", "--out", tmp_path / "o", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["baseline"]["params"] == 50_610  # the given lenet300, not a freshly trained lenet5
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["recipe"]["stages"][0]["sparsity"] == 0.5 and report["recipe"]["model"]["path"] == str(trained_run)
    bad = cli("run", recipe, "--set", "stages.0.sparsty=0.5", "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "stages[0].sparsty: unknown key (did you mean 'sparsity'?)" in bad.stderr
    bad = cli("run", recipe, "--set", "stages.4.sparsity=0.5", "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "stages is a list of 1" in bad.stderr
    bad = cli("run", recipe, "--set", "stages.0.sparsity", "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr
    assert not (tmp_path / "o2").exists()


def test_help_shows_flags_as_flags(cli):
    proc = cli("prune", "--help")
    assert proc.returncode == 0
    flags = [line for line in proc.stdout.splitlines() if line.strip().startswith(("--structured", "--overwrite"))]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags)
    assert "--exclude GLOB" in proc.stdout and "--latency / --no-latency" in proc.stdout


def test_slimkit_warnings_are_one_line_and_progress_is_logged(cli, tmp_path):
    torch.manual_seed(0)
    save(new_model("lenet5", input_shape=[1, 8, 8], num_classes=10, data="digits"), tmp_path / "l5")
    proc = cli("prune", tmp_path / "l5", "--nm", "2:4", "--out", tmp_path / "o", "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert "warning: N:M 2:4 skipped layers: {'conv1': 'input dimension 1 is not a multiple of 4'}" in proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    proc = cli("train", "--model", "lenet300", "--epochs", "3", "--out", tmp_path / "t")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train lenet300: epoch")]
    assert lines[0].startswith("train lenet300: epoch 1/3  loss ") and lines[-1].startswith("train lenet300: epoch 3/3")
    assert all("elapsed, about" in line and line.endswith("left)") for line in lines)


def fake_report(quantized: bool) -> dict:
    entry = {"accuracy": 0.98, "params": 1000, "nonzero_params": 1000, "macs": 5000, "file_bytes": 4000,
             "latency_ms": {"torch_b1": 1.0, "ort_b64": 2.0}}
    final = {**entry, "accuracy": 0.975, "nonzero_params": 100, "file_bytes": 1000, "simulated_in_torch": quantized,
             "latency_ms": {"torch_b1": 4.0, "ort_b64": 1.0}}
    return {"baseline": entry, "final": final, "data": {"metric": "accuracy"},
            "summary": {"accuracy_delta": -0.005, "speedup": {"torch_b1": 0.25, "ort_b64": 2.0}}}


@pytest.mark.parametrize("quantized", [False, True])
def test_summary_rows_say_what_changed_and_which_runtime_ran(quantized):
    rows = {row[0]: row for row in summary_rows(fake_report(quantized))}
    assert rows["test accuracy"][3] == "-0.50 pts"
    assert rows["non-zero params"][3] == "10.00x fewer" and rows["params"][3] == "same"
    assert summary_rows({**fake_report(quantized), "final": {**fake_report(quantized)["final"], "params": 970}})[1][3] \
        == "3.1% fewer"  # small changes in percent
    assert rows["file bytes (model directory)"][3] == "4.00x smaller"
    assert rows["latency ONNX Runtime, batch 64 (ms)"][3] == "2.00x faster"
    torch_row = [r for r in rows if r.startswith("latency torch eager, batch 1")][0]
    assert rows[torch_row][3] == "4.00x slower"
    assert ("fake-quant simulation" in torch_row) == quantized


def test_a_slower_model_is_flagged_with_its_likely_cause():
    from slimkit.report.summary import report_warnings

    report = fake_report(True)
    report["summary"]["speedup"] = {"torch_b1": 0.25, "ort_b64": 0.75}  # the torch time of a quantized model is
    report["stages"] = [{"name": "baseline", "accuracy": 0.98}, {"name": "0:quantize", "accuracy": 0.975}]  # its sim
    assert report_warnings(report, 0.01) == [
        "the final model is 1.33x slower than the baseline in ONNX Runtime at batch 64; likely cause: at 5,000 MACs "
        "per sample the model is bound by per-operator overhead, not arithmetic, so fewer or cheaper operations do "
        "not show (real-size models do)"]
    report["final"]["macs"] = 50_000_000
    assert "quantize/dequantize steps around operators that stay float" in report_warnings(report, 0.01)[0]
    assert report_warnings(report, 0.001)[0] == ("stage 0:quantize accuracy is 0.50 points below the baseline "
                                                 "(allowed: 0.1 points; evaluate.max_metric_drop)")
