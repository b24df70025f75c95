import json
import re

import pytest

from slimkit import load, parse_recipe, run_recipe

RECIPE = {
    "name": "tiny",
    "data": "digits",
    "model": {"zoo": "lenet300", "train": {"epochs": 3, "lr": 2e-3}},
    "stages": [{"type": "finetune", "epochs": 1}, {"type": "export", "format": "onnx"}],
    "evaluate": {"latency": True, "threads": 1},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    run_recipe(parse_recipe(RECIPE), out, progress=False)
    return out


def test_run_writes_model_report_and_onnx(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "0:finetune", "1:export"]
    assert report["final"]["file_bytes"] == sum(p.stat().st_size for p in (run_dir / "model").iterdir())
    assert report["summary"]["compression_ratio"] == pytest.approx(
        report["baseline"]["file_bytes"] / report["final"]["file_bytes"])
    assert set(report["summary"]["speedup"]) == {"torch_b1", "torch_b64", "ort_b1", "ort_b64"}
    assert (run_dir / "model.onnx").is_file() and report["artifacts"]["onnx"] == "model.onnx"
    assert load(run_dir / "model") is not None
    assert sum(h["counts"] and sum(h["counts"]) for h in report["histograms"]) == 64 * 300 + 300 * 100 + 100 * 10


def test_html_report_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "baseline vs final" in html and "<table>" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4  # + the fine-tuning curve
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network


def test_resume_reuses_finished_stages(run_dir):
    before = (run_dir / "stages" / "00-finetune" / "model" / "model.safetensors").stat().st_mtime_ns
    messages = []
    report = run_recipe(parse_recipe({**RECIPE, "evaluate": {"latency": False}}), run_dir, resume=True,
                        progress=False, log=messages.append)
    assert "baseline: already trained, loading it" in messages
    assert any("stage 0 (finetune): already done" in m for m in messages)
    assert (run_dir / "stages" / "00-finetune" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert report["stages"][1]["accuracy"] == json.loads((run_dir / "stages/00-finetune/stage.json").read_text())["metrics"]["accuracy"]


def test_loaded_baseline_is_not_modified(run_dir, tmp_path):
    model_dir = run_dir / "baseline" / "model"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    recipe = parse_recipe({"model": {"path": str(model_dir)}, "stages": [{"type": "finetune", "epochs": 1}],
                           "evaluate": {"latency": False}})
    report = run_recipe(recipe, tmp_path / "out", progress=False)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert report["baseline"]["model_dir"] == str(model_dir)


def test_custom_regression_task_runs_through_the_pipeline(tmp_path):
    """Not classification: user batches, MSE loss, score = -MSE; the same recipe machinery applies."""
    import torch
    from torch import nn

    from slimkit import Task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=g)
    y = x.flatten(1)[:, :8].sum(1, keepdim=True)
    train, val, test = (x[:384], y[:384]), (x[384:448], y[384:448]), (x[448:], y[448:])

    def neg_mse(split):
        def score(model):
            with torch.no_grad():
                return -nn.functional.mse_loss(model(split[0]), split[1]).item()
        return score

    task = Task(name="sum-regression", train_batches=lambda cfg: [(train[0][i:i + 32], train[1][i:i + 32])
                                                                 for i in range(0, 384, 32)],
                val_score=neg_mse(val), test_score=neg_mse(test), example_inputs=test[0],
                loss_fn=nn.MSELoss(), metric="negative MSE")
    recipe = parse_recipe({
        "model": {"zoo": "lenet300", "args": {"num_classes": 1}, "train": {"epochs": 15, "lr": 2e-3}},
        "stages": [{"type": "finetune", "epochs": 2}, {"type": "export"}],
        "evaluate": {"latency": False},
    })
    report = run_recipe(recipe, tmp_path, task=task, progress=False)
    baseline_mse = -report["baseline"]["accuracy"]
    assert baseline_mse < 0.5 * y.var().item()  # it learned the task
    assert report["final"]["accuracy"] == pytest.approx(neg_mse(test)(load(tmp_path / "model")))
    assert report["data"]["metric"] == "negative MSE"
    assert "test negative MSE" in (tmp_path / "report.html").read_text()


def test_an_export_before_a_model_changing_stage_is_not_timed_as_the_final_model(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "export"}, {"type": "finetune", "epochs": 1}]})
    report = run_recipe(recipe, tmp_path, progress=False)
    assert "onnx" not in report["artifacts"]


def test_every_training_stage_records_its_history_and_runs_on_the_chosen_device(cli, trained_run, tmp_path):
        
    import torch

    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False}, "stages": [
        {"type": "prune", "sparsity": 0.7, "schedule": "iterative", "steps": 2, "finetune": {"epochs": 1}},
        {"type": "factorize", "energy": 0.95, "finetune": {"epochs": 2}},
        {"type": "cluster", "bits": 5, "finetune": {"epochs": 1}},
        {"type": "quantize", "qat": {"epochs": 1}}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False, device=torch.device("cpu"))
    runs = {stage["name"]: stage["notes"]["training"] for stage in report["stages"][1:]}
    assert {name: list(r) for name, r in runs.items()} == {
        "0:prune": ["prune step1", "prune step2"], "1:factorize": ["factorize finetune"],
        "2:cluster": ["centroid finetune"], "3:quantize": ["QAT"]}
    assert [len(r["history"]) for r in runs["1:factorize"].values()] == [2]
    assert all(r["best_val_score"] > 0.5 for stage in runs.values() for r in stage.values())
    assert (tmp_path / "r" / "stages" / "00-prune" / "checkpoint" / "step2" / "last.pt").is_file()
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("Training curves") == 1
    if not torch.cuda.is_available():
        proc = cli("prune", str(trained_run), "--sparsity", "0.5",
                   "--device", "cuda", "--out", str(tmp_path / "c"))
        assert proc.returncode == 2 and "no CUDA device is available" in proc.stderr
