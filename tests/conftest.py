import pytest
import torch

from slimkit import Task, load_data, new_model, save
from slimkit.train import TrainConfig, build_seeded, train_model


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


@pytest.fixture
def small_model_dir(tmp_path):
    torch.manual_seed(0)
    model = new_model("lenet300", input_shape=[1, 8, 8], num_classes=10, data="digits")
    return save(model, tmp_path / "model")
