"""Mixed precision (autocast), early stopping, and resuming after a hard kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slimkit import SlimkitError, Task, fit
from slimkit.modelfile.store import read_safetensors
from slimkit.train import TrainConfig, build_seeded


def output_dtypes(model, names):
    seen, hooks = {}, []

    def record(name):
        def hook(_module, _inputs, output):
            if torch.is_grad_enabled():  # training steps, not validation
                seen.setdefault(name, output.dtype)

        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(record(name)))
    return seen, hooks


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_training_keeps_fp32_weights_and_chosen_layers(precision, dtype, digits):
    task = Task.classification(digits)
    model = build_seeded("lenet300", 0, task)
    seen, hooks = output_dtypes(model, ["fc1", "fc3"])
    cfg = TrainConfig(epochs=4, lr=2e-3, precision=precision, fp32_layers=["fc3"])
    fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
    for h in hooks:
        h.remove()
    assert seen == {"fc1": dtype, "fc3": torch.float32}  # autocast ran fc1 low-precision, fc3 was kept fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert "forward" not in vars(model.fc3)  # the fp32 wrapper is gone after training
    reference = build_seeded("lenet300", 0, task)
    fit(reference, task.train_batches(cfg.model_copy(update={"precision": "fp32"})), None, cfg,
        score_fn=task.val_score, progress=False)
    assert task.test_score(model) >= task.test_score(reference) - 0.03
    with pytest.raises(SlimkitError, match="match no module"):
        fit(model, task.train_batches(cfg), None, cfg.model_copy(update={"fp32_layers": ["nope*"]}),
            score_fn=task.val_score, progress=False)


def test_early_stopping_and_its_resume(digits, tmp_path):
    task = Task.classification(digits)
    model = build_seeded("lenet300", 0, task)
    scores = iter([0.5, 0.6, 0.7, 0.65, 0.66, 0.64, 0.9, 0.95])  # start, then one per epoch

    def score(_m):
        return next(scores)

    cfg = TrainConfig(epochs=7, patience=3)
    result = fit(model, task.train_batches(cfg), None, cfg, score_fn=score, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.stopped_early and result.best_epoch == 1 and len(result.history) == 5  # epochs 0-4
    again = fit(model, task.train_batches(cfg), None, cfg, score_fn=lambda m: 0.0, progress=False,
                checkpoint_dir=tmp_path, resume=True)
    assert len(again.history) == 5 and again.stopped_early  # a stopped run stays stopped


def train_cmd(out, *extra):
    return [sys.executable, "-m", "slimkit", "train", "--model", "lenet300", "--epochs", "12", "--batch-size", "8",
            "--seed", "3",
            "--no-progress", "--out", str(out), *extra]


def test_resume_after_kill_9_reaches_the_same_weights(tmp_path):
    reference = subprocess.run(train_cmd(tmp_path / "full"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen(train_cmd(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file():
            try:
                epoch = torch.load(checkpoint, weights_only=True)["epoch"]
            except Exception:  # caught mid-rename: try again
                epoch = -1
            if epoch >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = subprocess.run(train_cmd(tmp_path / "killed", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    full = read_safetensors(tmp_path / "full" / "model" / "model.safetensors")
    after = read_safetensors(tmp_path / "killed" / "model" / "model.safetensors")
    assert full.keys() == after.keys()
    # usually bit-identical; now and then up to ~5e-5 away (float-level, cause not established). A resume that
    # loses state (data order, optimizer moments, schedule) lands orders of magnitude further off.
    for k in full:
        torch.testing.assert_close(after[k], full[k], rtol=1e-3, atol=1e-4, msg=k)
    best = [json.loads((tmp_path / run / "metrics.json").read_text())["best_epoch"] for run in ("full", "killed")]
    assert best[0] == best[1]
