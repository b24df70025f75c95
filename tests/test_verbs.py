"""The verbs on any nn.Module: compress -> save -> load gives the same model, and the same bytes as the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import slimkit
from slimkit import SlimkitError, Task, load, new_model, save
from slimkit.cli import main

# one config per verb, small enough for the test suite; the recipe stage of the same type is the CLI's twin
CONFIGS = {
    "prune": {"sparsity": 0.8, "scope": "global"},
    "quantize": {"scheme": "int8-static", "calib": 128},
    "cluster": {"bits": 4, "biases": True},
    "factorize": {"energy": 0.8, "exclude": ["fc3"]},
    "distill": {"student": "lenet300:hidden=[64,32]", "train": {"epochs": 1, "lr": 3e-3}},
}


def run_verb(verb: str, model, data):
    if verb == "distill":
        return slimkit.distill(model, model, data, CONFIGS[verb])
    data_arg = "calib" if verb == "quantize" else "data"
    return getattr(slimkit, verb)(model, CONFIGS[verb], **{data_arg: data})


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("verb", list(CONFIGS))
def test_a_verb_equals_its_recipe_stage_run_by_the_cli(verb, trained_run, digits, tmp_path):
    model = load(trained_run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_verb(verb, model, digits)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is not changed
    save(result, tmp_path / "python")
    again = load(tmp_path / "python")
    x = digits.x_test[:64]
    with torch.no_grad():
        assert torch.equal(again(x), result(x))
    stage = {"type": verb, **({"teacher": "baseline"} if verb == "distill" else {}), **CONFIGS[verb]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(trained_run)}, "stages": [stage],
                                      "evaluate": {"latency": False}}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert files(tmp_path / "cli" / "model") == files(tmp_path / "python")  # byte for byte
    assert result.slimkit_notes  # what the stage decided


MODULE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.bn(self.conv(x))), 2)
        return self.fc2(nn.functional.relu(self.fc1(x.flatten(1))))
'''


@pytest.fixture
def factory_model(tmp_path, monkeypatch, digits):
    (tmp_path / "usermodels.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = new_model({"factory": "usermodels:Net", "args": {"width": 24}}, trust_code=True, input_shape=[1, 8, 8],
                      num_classes=10)
    cfg = slimkit.TrainConfig(epochs=3, lr=3e-3)
    task = Task.classification(digits)
    slimkit.fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
    return model


@pytest.mark.parametrize("verb, config", [
    ("prune", {"structured": True, "sparsity": 0.5}),
    ("prune", {"nm": "2:4"}),
    ("quantize", {"scheme": "int8-static", "calib": 64}),
    ("quantize", {"scheme": "int4-weight"}),
    ("cluster", {"bits": 3}),
    ("factorize", {"rank": 8}),
])
def test_verbs_on_a_users_own_model_save_and_load(verb, config, factory_model, digits, tmp_path):
    data_arg = "calib" if verb == "quantize" else "data"
    result = getattr(slimkit, verb)(factory_model, config, **{data_arg: digits})
    save(result, tmp_path / "m")
    again = load(tmp_path / "m", trust_code=True)
    x = digits.x_test[:64]
    with torch.no_grad():
        assert torch.equal(again(x), result(x))
    assert Task.classification(digits).test_score(again) > 0.5


def test_distilling_into_a_users_own_student(factory_model, digits, tmp_path):
    student = new_model({"factory": "usermodels:Net", "args": {"width": 4}}, trust_code=True, input_shape=[1, 8, 8])
    trained = slimkit.distill(student, factory_model, digits, slimkit.DistillStage(train={"epochs": 3, "lr": 5e-3}))
    save(trained, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "s", trust_code=True)(digits.x_test), trained(digits.x_test))
    assert trained.slimkit_notes["training"]["distill"]["best_val_score"] > 0.5


class DictDataset(torch.utils.data.Dataset):
    """Hugging Face style samples: a dict per sample."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_calibration_from_a_dataloader_of_dict_batches(trained_run, digits):
    model = load(trained_run)
    loader = DataLoader(DictDataset(digits.x_train, digits.y_train), batch_size=32)
    from_dicts = slimkit.quantize(model, {"calib": 96}, calib=loader, transform_fn=lambda b: b["pixel_values"])
    from_tensor = slimkit.quantize(model, {"calib": 96}, calib=digits.x_train[:96])
    assert from_dicts.slimkit_notes["quantize"]["calibration_samples"] == 96
    with torch.no_grad():
        assert torch.equal(from_dicts(digits.x_test), from_tensor(digits.x_test))  # the same 96 samples


def test_training_needs_labels_and_configs_are_checked(trained_run, digits):
    model = load(trained_run)
    with pytest.raises(SlimkitError, match="needs labelled data with a validation score"):
        slimkit.prune(model, sparsity=0.5, finetune={"epochs": 1}, data=digits.x_train)
    with pytest.raises(SlimkitError, match="sparsty: unknown key \\(did you mean 'sparsity'\\?\\)"):
        slimkit.prune(model, sparsty=0.5)
    with pytest.raises(SlimkitError, match="inputs are pixel_values .* unexpected keyword argument 'pixel_values'"):
        slimkit.quantize(model, calib=[{"pixel_values": digits.x_train[:8]}])  # dict keys name forward's arguments
    with pytest.raises(SlimkitError, match="a batch is a str"):
        slimkit.quantize(model, calib=["not a batch"])
    with pytest.raises(SlimkitError, match="expected a torch.nn.Module"):
        slimkit.prune("runs/model", sparsity=0.5)
    with pytest.raises(SlimkitError, match="records no input_shape"):
        slimkit.prune(torch.nn.Linear(4, 4), sparsity=0.5)
    assert slimkit.prune(torch.nn.Linear(4, 4), sparsity=0.5, data=torch.randn(3, 4)).weight.eq(0).sum() == 8


def test_train_model_takes_splits_a_task_or_loaders(digits, tmp_path):
    from torch.utils.data import TensorDataset

    train = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(digits.x_val, digits.y_val), batch_size=256)
    cfg = slimkit.TrainConfig(epochs=2, lr=2e-3)
    for name, data in [("splits", digits), ("task", Task.classification(digits)),
                       ("loaders", Task.from_loaders(train, val))]:
        metrics = slimkit.train_model(new_model("lenet300", input_shape=[1, 8, 8]), data, cfg, tmp_path / name,
                                      progress=False)
        assert metrics["best_epoch"] >= 0
    with pytest.raises(SlimkitError, match="chooses the best epoch on validation data"):
        slimkit.train_model(new_model("lenet300"), train, cfg, tmp_path / "no-val", progress=False)


def tiny_bert(folder, layers: int = 2):
    """A small BERT classifier in a local Hugging Face directory (random weights: nothing is downloaded)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return new_model({"huggingface": str(folder), "task": "sequence-classification"}).eval()


IDS = torch.randint(0, 50, (96, 12), generator=torch.Generator().manual_seed(0))
LABELS = IDS[:, :4].sum(1) % 3  # a learnable rule


@pytest.mark.parametrize("verb, config", [("prune", {"sparsity": 0.5}), ("quantize", {"scheme": "int8-static"}),
                                          ("cluster", {"bits": 4}), ("factorize", {"energy": 0.8}),
                                          ("distill", {"train": {"epochs": 2, "lr": 1e-3}})])
def test_verbs_on_a_hugging_face_model_save_and_load(verb, config, tmp_path):
    teacher = tiny_bert(tmp_path / "hf")
    if verb == "distill":
        batches = [(IDS[i:i + 32], LABELS[i:i + 32]) for i in range(0, 96, 32)]
        task = Task.from_loaders(batches, batches)
        result = slimkit.distill(tiny_bert(tmp_path / "small", layers=1), teacher, task, config)
    else:
        result = getattr(slimkit, verb)(teacher, config, **{"calib" if verb == "quantize" else "data": IDS})
    save(result, tmp_path / "m")
    again = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(IDS), result(IDS))  # the file holds exactly the result
        assert not torch.equal(result(IDS), teacher(IDS))  # and the result is compressed
    if verb == "quantize":
        assert result.slimkit_notes["quantize"]["top1_agreement"] >= 0.99  # ONNX Runtime's int8 model agrees


def test_a_verb_on_a_users_own_model_equals_the_cli(factory_model, digits, tmp_path):
    """The same structured pruning through Python and through `slimkit run --trust-code`: the same bytes."""
    save(factory_model, tmp_path / "mine")
    result = slimkit.prune(load(tmp_path / "mine", trust_code=True), structured=True, sparsity=0.5, data=digits)
    save(result, tmp_path / "python")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "mine"), "trust_code": True},
                                      "stages": [{"type": "prune", "structured": True, "sparsity": 0.5}],
                                      "evaluate": {"latency": False}}))
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}  # where usermodels.py is importable
    proc = subprocess.run([sys.executable, "-m", "slimkit", "run", str(recipe), "--out", str(tmp_path / "cli"),
                           "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert files(tmp_path / "cli" / "model") == files(tmp_path / "python")
