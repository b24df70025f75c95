import json
import os
import pickle
import subprocess
import sys

import numpy as np

import slimkit


def slimkit_cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "slimkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in proc.stderr


def test_version_and_help():
    proc = slimkit_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"slimkit {slimkit.__version__}"
    proc = slimkit_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "analyze", "export", "run", "zoo"):
        assert command in proc.stdout


def test_unknown_option_is_a_usage_error(cli):
    proc = cli("analyze", "x", "--bogus")
    assert proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr


def test_train_writes_run_directory(cli, tmp_path):
    proc = cli("train", "--model", "lenet300", "--epochs", "2", "--seed", "3", "--out", tmp_path / "r",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert {"train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss"} <= set(metrics)
    assert metrics["config"]["seed"] == 3 and len(metrics["history"]) == 2
    assert (tmp_path / "r" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "r" / "checkpoint" / "last.pt").is_file()


def test_analyze_json(cli, trained_run):
    proc = cli("analyze", trained_run, "--data", "digits", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["file_bytes"] == sum(p.stat().st_size for p in (trained_run / "model").iterdir())
    assert result["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert set(result["latency_ms"]) == {"torch_b1", "torch_b64", "ort_b1", "ort_b64"}
    machine = result["machine"]  # where it was measured: CPU extensions, cores, runtime versions, threads
    assert machine["threads"] == 1 and machine["cores"] >= 1 and machine["torch"] == __import__("torch").__version__
    assert isinstance(machine["isa"], list) and machine["onnxruntime_provider"] == "CPUExecutionProvider"
    assert result["accuracy"] > 0.9


def test_analyze_table(cli, trained_run):
    proc = cli("analyze", trained_run, "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert "MACs per sample" in proc.stdout and "50,200" in proc.stdout


def test_export_onnx(cli, trained_run, tmp_path):
    proc = cli("export", trained_run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff" in proc.stdout and (tmp_path / "m.onnx").stat().st_size > 4 * 50_000
    assert_user_error(cli("export", trained_run, "--format", "tflite-int4", "--out", tmp_path / "m.tfl"),
                      "unknown format 'tflite-int4'; known: ")


def test_misspelled_recipe_key(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {zoo: lenet300}\nstages:\n  - {type: finetune, epohcs: 1}\n")
    proc = cli("run", recipe, "--out", tmp_path / "out")
    assert_user_error(proc, "stages[0].epohcs: unknown key (did you mean 'epochs'?)")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(cli, trained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = weights.read_bytes()
    assert_user_error(cli("analyze", broken), "model.safetensors is damaged")
    assert_user_error(cli("--no-verify", "analyze", broken), "model.safetensors: not a readable safetensors file")
    assert weights.read_bytes() == before


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload(cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc1.weight": Payload(marker)}))
    assert_user_error(cli("analyze", evil, "--arch", "lenet300", "--no-latency"), "evil.pth: refused")
    assert not marker.exists()


def test_npz_missing_y_test(cli, tmp_path):
    arrays = {k: np.zeros((6, 8, 8)) if k[0] == "x" else np.arange(6) % 2
              for k in ("x_train", "y_train", "x_val", "y_val", "x_test")}
    np.savez(tmp_path / "d.npz", **arrays)
    proc = cli("train", "--model", "lenet300", "--data", tmp_path / "d.npz", "--out", tmp_path / "o")
    assert_user_error(proc, "d.npz: missing y_test")
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path):
    proc = slimkit_cli("--debug", "analyze", tmp_path / "nothing")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "SlimkitError" in proc.stderr
