"""Data-parallel training under torchrun (2 CPU processes, gloo) equals one process on the same global batches."""

import json
import subprocess
import sys

import numpy as np

from slimkit.io import read_safetensors
from slimkit.train.distributed import RankSlices


def test_rank_slices_partition_every_global_batch():
    batches = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]
    for size in (1, 2, 3):
        slices = [list(RankSlices(batches, rank, size)) for rank in range(size)]
        for step, batch in enumerate(batches):
            assert sum((s[step] for s in slices), []) == batch  # together, exactly the global batch, in order
            sizes = [len(s[step]) for s in slices]
            assert max(sizes) - min(sizes) <= 1


def test_two_processes_match_one(tmp_path):
    args = ["train", "--model", "lenet300", "--epochs", "3", "--seed", "1", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "slimkit", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "slimkit", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("test accuracy") == 1  # rank 0 reports; rank 1 is silent
    one = read_safetensors(tmp_path / "one" / "model" / "model.safetensors")
    two = read_safetensors(tmp_path / "two" / "model" / "model.safetensors")
    for name in one:  # same global batches, gradients averaged across the ranks: equal up to float rounding
        np.testing.assert_allclose(two[name].numpy(), one[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert metrics[0]["best_epoch"] == metrics[1]["best_epoch"] and metrics[1]["test_accuracy"] > 0.8


def test_commands_that_are_not_data_parallel_refuse_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "slimkit", "zoo"], capture_output=True, text=True)
    assert proc.returncode != 0 and "does not run under torchrun yet" in proc.stderr
