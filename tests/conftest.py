import os
import subprocess

import pytest
import torch

from slimkit import SlimkitError, Task, load_data, new_model, save
from slimkit.models.vision import import_torchvision
from slimkit.train import TrainConfig, build_seeded, train_model

try:  # as slimkit does before it loads a Hugging Face model: transformers imports torchvision when installed
    import_torchvision()
except SlimkitError:
    pass


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores (and so do the processes it starts): two
    workers each running torch on every core spin against each other, measured 4x slower training here."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@pytest.fixture(scope="session")
def digits():
    return load_data("digits")


@pytest.fixture(scope="session")
def trained_run(digits, tmp_path_factory):
    """A lenet300 trained briefly into a run directory (run/model, run/metrics.json)."""
    out = tmp_path_factory.mktemp("run")
    task = Task.classification(digits)
    model = build_seeded("lenet300", 0, task)
    train_model(model, task, TrainConfig(epochs=8, lr=2e-3), out, progress=False)
    return out


@pytest.fixture(scope="session")
def briefly_trained(digits):
    """``briefly_trained(name)``: a fresh copy of a zoo model trained 3 epochs (calibration needs real activations)."""
    import copy

    from slimkit import fit

    task, cache = Task.classification(digits), {}

    def get(name: str):
        if name not in cache:
            model = build_seeded(name, 0, task)
            cfg = TrainConfig(epochs=3, lr=3e-3)
            fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
            cache[name] = model.eval()
        return copy.deepcopy(cache[name])

    return get


@pytest.fixture
def small_model_dir(tmp_path):
    torch.manual_seed(0)
    model = new_model("lenet300", input_shape=[1, 8, 8], num_classes=10, data="digits")
    return save(model, tmp_path / "model")


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: slimkit's command line, in process, with stdout and stderr captured (neither a terminal)."""
    from slimkit.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


@pytest.fixture
def ort_ops(tmp_path):
    """``ort_ops(path)``: the op types of the graph ONNX Runtime actually runs for an ONNX file (after its fusions)."""
    from collections import Counter

    import onnx

    from slimkit.export.onnx import ort_session, ort_session_options

    def ops(path, nodes: list | None = None) -> Counter:
        """``nodes``: a list that receives the optimized graph's nodes."""
        opts = ort_session_options()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort_session(path, opts=opts)
        graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
        if nodes is not None:
            nodes.extend(graph.node)
        return Counter(n.op_type for n in graph.node)
    return ops
