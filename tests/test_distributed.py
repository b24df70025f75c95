"""Data-parallel training under torchrun (2 CPU processes, gloo) equals one process on the same global batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from slimkit.modelfile.store import read_safetensors
from slimkit.train.distributed import rank_share

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "slimkit"]


def test_rank_shares_partition_every_global_batch():
    for count in (0, 1, 7, 10):
        for size in (1, 2, 3):
            shares = [list(range(count))[rank_share(count, rank, size)] for rank in range(size)]
            assert sum(shares, []) == list(range(count))  # together, exactly the global batch, in order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert shares == [a.tolist() for a in np.array_split(np.arange(count), size)]


def _weights(folder):
    return read_safetensors(folder / "model.safetensors")


def _single(cli, args, out):
    proc = cli(*args, "--out", out)
    assert proc.returncode == 0, proc.stderr


def _assert_same_weights(one, two, what=""):
    """Same global batches, gradients averaged across the ranks: equal up to float rounding."""
    one, two = _weights(one), _weights(two)
    for name in one:
        np.testing.assert_allclose(two[name].numpy(), one[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=what + name)


def test_two_processes_match_one_with_augmentation(cli, tmp_path):
    """lenet5 trains with random shifts: each global batch's shifts are drawn once and shared by the ranks."""
    args = ["train", "--model", "lenet5", "--epochs", "3", "--seed", "1", "--no-progress"]
    _single(cli, args, tmp_path / "one")
    ddp = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    _assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert metrics[0]["config"]["augment"] and metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]


def test_commands_that_are_not_data_parallel_refuse_torchrun(tmp_path):
    proc = subprocess.run([*TORCHRUN, "pack", "x", "--out", str(tmp_path / "x.slim")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "does not train, so it does not run under torchrun" in proc.stderr


def test_a_recipe_runs_data_parallel_and_resumes(cli, trained_run, tmp_path):
    """Pruning with a schedule, then distillation into the pruned model: 2 ranks equal 1; rank 0 alone writes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "ddp", "model": {"path": str(trained_run)}, "evaluate": {"latency": False},
        "stages": [{"type": "prune", "sparsity": 0.8, "schedule": "agp", "agp_every": 5,
                    "finetune": {"epochs": 2, "lr": 1e-3}},
                   {"type": "distill", "train": {"epochs": 2}, "features": {"fc2": "fc2"}}]}))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = ["run", str(recipe), "--no-progress"]
    _single(cli, args, tmp_path / "one")
    ddp = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("report:") == 1 and not list(scratch.glob("slimkit-rank*"))  # rank 1 cleaned up
    for stage in ("stages/00-prune/model", "stages/01-distill/model", "model"):
        _assert_same_weights(tmp_path / "one" / stage, tmp_path / "two" / stage, f"{stage}: ")
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    assert [s["nonzero_params"] for s in reports[0]["stages"]] == [s["nonzero_params"] for s in reports[1]["stages"]]
    assert list(reports[1]["stages"][2]["notes"]["training"]) == ["distill"]
    two = _weights(tmp_path / "two" / "model")
    again = subprocess.run([*TORCHRUN, *args, "--resume", "--out", str(tmp_path / "two")], capture_output=True,
                           text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already done") == 2  # both stages come from rank 0's folder, on both ranks
    resumed = _weights(tmp_path / "two" / "model")
    assert all(np.array_equal(resumed[k].numpy(), two[k].numpy()) for k in two)


def test_two_processes_killed_and_resumed_match_one(cli, tmp_path):
    """Two ranks, killed (kill -9) mid-run and resumed, end where one process ends. Rank 1 has no checkpoint of
    its own: it resumes from the one rank 0 reads and sends."""
    import signal
    import time

    import torch

    args = ["train", "--model", "lenet300", "--epochs", "8", "--batch-size", "16", "--seed", "2", "--no-progress"]
    _single(cli, args, tmp_path / "one")
    proc = subprocess.Popen([*TORCHRUN, *args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / "checkpoint" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(checkpoint, weights_only=True)["epoch"] >= 2:
                break
        except Exception:  # not written yet, or caught mid-rename
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = subprocess.run([*TORCHRUN, *args, "--resume", "--out", str(tmp_path / "killed")], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("test accuracy") == 1  # rank 0 reports; rank 1 is silent
    _assert_same_weights(tmp_path / "one" / "model", tmp_path / "killed" / "model")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "killed")]
    assert metrics[0]["best_epoch"] == metrics[1]["best_epoch"] and metrics[1]["test_accuracy"] > 0.8


def _helpers_on_rank(rank: int, init_file: str, folder: str, results: str) -> None:
    """One rank of the helper test: what each helper gives this rank, written to a JSON file."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from slimkit import SlimkitError
    from slimkit.train.distributed import check_same_model, from_main, mirror_from_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    def fail():
        raise SlimkitError(f"rank {rank} failed")

    out: dict = {"value": from_main(lambda: {"rank": rank})}
    try:
        from_main(fail)
    except SlimkitError as exc:
        out["error"] = str(exc)
    mine = Path(folder) / f"rank{rank}"
    if rank == 0:
        (mine / "model").mkdir(parents=True)
        (mine / "model" / "w.bin").write_bytes(b"\x00\x01weights")
        (mine / "stage.json").write_text("{}")
        (mine / "checkpoint.pt").write_bytes(b"not mirrored")
    out["mirrored"] = mirror_from_main(mine, ("stage.json", "model"))
    out["files"] = sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file())
    out["weights"] = (mine / "model" / "w.bin").read_bytes().hex()
    out["missing"] = mirror_from_main(Path(folder) / f"none{rank}")
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    check_same_model(model, "an equal stage")
    if rank == 1:
        with torch.no_grad():
            model.bias[0] = 1e-7
    try:
        check_same_model(model, "a diverged stage")
    except SlimkitError as exc:
        out["diverged"] = str(exc)
    Path(results, f"{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_distributed_helpers_share_rank_0s_results_files_and_failures(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "results").mkdir()
    mp.spawn(_helpers_on_rank, args=(str(tmp_path / "init"), str(tmp_path), str(tmp_path / "results")), nprocs=2)
    for rank in (0, 1):
        out = json.loads((tmp_path / "results" / f"{rank}.json").read_text())
        assert out["value"] == {"rank": 0} and out["error"] == "rank 0 failed"  # rank 0's result, and its failure
        assert out["mirrored"] and not out["missing"]
        assert out["files"] == (["checkpoint.pt", "model/w.bin", "stage.json"] if rank == 0
                                else ["model/w.bin", "stage.json"])  # only the named entries travel
        assert out["weights"] == b"\x00\x01weights".hex()
        assert "ranks disagree on the model after a diverged stage" in out["diverged"]


def test_text_training_runs_data_parallel(cli, tmp_path):
    """A text model's recovery training under torchrun: each rank trains on its share of every global batch of
    texts (cut to the share's longest text), and 2 ranks end where 1 process ends."""
    pytest.importorskip("transformers")
    from test_text import tiny_text_dir

    model = tiny_text_dir(tmp_path / "hf")
    config = json.loads((model / "config.json").read_text())  # dropout draws differ between 1 and 2 processes
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "ddp-text", "model": {"path": str(model)}, "data": "docstrings:limit=64",
        "evaluate": {"latency": False},
        "stages": [{"type": "prune", "structured": True, "sparsity": 0.5, "exclude": ["*pooler*"],
                    "finetune": {"epochs": 2, "batch_size": 8, "lr": 1e-3}}]}))
    args = ["run", str(recipe), "--no-progress"]
    _single(cli, args, tmp_path / "one")
    ddp = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    one, two = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    # a key bias adds the same score to every key of a query, which softmax ignores: its gradient is rounding
    # noise, which Adam scales up to steps of the learning rate's size, differently in 1 and 2 processes
    noise = {name for name in one if name.endswith("attention.self.key.bias")}
    assert noise and all(float(one[name].abs().max()) < 3e-3 for name in noise)
    for name in set(one) - noise:
        np.testing.assert_allclose(two[name].numpy(), one[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    histories = [json.loads((tmp_path / run / "report.json").read_text())["stages"][1]["notes"]["training"]
                 ["prune step1"]["history"] for run in ("one", "two")]
    assert [len(h) for h in histories] == [2, 2] and histories[0][1]["train_loss"] < histories[0][0]["train_loss"]
    for a, b in zip(*histories):  # the same losses and validation scores, epoch by epoch
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["val_score"] - b["val_score"]) < 1e-4


def test_a_text_batch_is_shared_between_ranks_and_trimmed_per_share():
    from slimkit.task import text_batch_share

    texts = torch.zeros(4, 3, 10, dtype=torch.int64)
    for row, length in enumerate((2, 7, 3, 4)):
        texts[row, :, :length] = 1
    samples = [(texts[i], torch.full((2,), float(i))) for i in range(4)]
    whole = text_batch_share(samples, trim=True)
    assert whole[0].shape == (4, 3, 7)
    shares = [text_batch_share(samples, trim=True, rank=r, size=2) for r in range(2)]
    assert [s[0].shape[-1] for s in shares] == [7, 4] and [s[1][:, 0].tolist() for s in shares] == [[0, 1], [2, 3]]
    assert text_batch_share(samples, trim=False, rank=1, size=2)[0].shape == (2, 3, 10)
