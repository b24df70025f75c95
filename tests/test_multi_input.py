"""Models that take several tensors (positional or by name) through every verb, save/load, export and the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit import SlimkitError, Task, load, new_model, save
from slimkit.cli import main
from slimkit.export import ort_session, run_ort
from slimkit.export.qdq import sqnr_db
from slimkit.export.targets import export_to, get_target
from slimkit.inputs import MultiInput, call, concat
from slimkit.task import as_task
from test_deploy import FLOAT_FORMATS, INT8_FORMATS, formats

MODULE = '''
import torch
from torch import nn


class ImageAndSide(nn.Module):
    """An image and a vector of side features, joined before the classifier."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.head = nn.Linear(3 * width, 10)

    def forward(self, image, side):
        return self.head(torch.cat([self.features(image), self.side(side)], dim=1))
'''
FACTORY = {"factory": "twoinputs:ImageAndSide", "args": {"width": 16}}
# conv 16x8x8x9 + conv 32x4x4x144 + side 4x16 + head 48x10
MACS = 16 * 64 * 9 + 32 * 16 * 144 + 4 * 16 + 48 * 10


def quadrant_ink(x: torch.Tensor) -> torch.Tensor:
    """Mean ink per image quadrant: a second input that carries real signal about the digit."""
    return torch.stack([x[:, 0, r:r + 4, c:c + 4].mean((1, 2)) for r in (0, 4) for c in (0, 4)], dim=1)


def loader(x, y, keyword: bool = False, shuffle: bool = False) -> DataLoader:
    """Batches as ((image, side), labels), or as a dict by name with "labels" (Hugging Face's way)."""
    def collate(rows):
        image, side, labels = (torch.stack(column) for column in zip(*rows))
        return {"image": image, "side": side, "labels": labels} if keyword else ((image, side), labels)

    return DataLoader(TensorDataset(x, quadrant_ink(x), y), batch_size=64, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


def two_input_task(digits, keyword: bool = False) -> Task:
    return Task.from_loaders(loader(digits.x_train, digits.y_train, keyword, shuffle=True),
                             loader(digits.x_val, digits.y_val, keyword), loader(digits.x_test, digits.y_test, keyword))


@pytest.fixture(scope="module")
def factory_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twoinputs")
    (folder / "twoinputs.py").write_text(MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("twoinputs", None)


@pytest.fixture(scope="module")
def trained(factory_path, digits, tmp_path_factory):
    """(model, task): the two-input model trained on digits, its batches positional."""
    task = two_input_task(digits)
    torch.manual_seed(0)
    model = new_model(FACTORY, trust_code=True)
    slimkit.train_model(model, task, slimkit.TrainConfig(epochs=12, lr=1e-2), tmp_path_factory.mktemp("run") / "r",
                        progress=False)
    return model, task


def test_several_inputs_slice_concatenate_and_refuse_what_does_not_fit():
    a, b = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    x = MultiInput({"image": a, "side": b})
    assert len(x) == 5 and x.names == ("image", "side")
    assert torch.equal(x[1:3].tensors[0], a[1:3]) and torch.equal(x[1:3].tensors[1], b[1:3])
    joined = concat([x[:2], x[2:]])
    assert all(torch.equal(p, q) for p, q in zip(joined.tensors, x.tensors)) and joined.keyword
    assert call(lambda image, side: image.sum(1) + side, x).tolist() == [1.0, 6.0, 11.0, 16.0, 21.0]
    assert call(lambda p, q: p.sum(1) - q, MultiInput((a, b))).tolist() == [1.0, 4.0, 7.0, 10.0, 13.0]
    with pytest.raises(SlimkitError, match="share the batch size.*image: 5, side: 4"):
        MultiInput({"image": a, "side": b[:4]})
    with pytest.raises(SlimkitError, match="identifiers"):
        MultiInput({"not a name": a})
    with pytest.raises(SlimkitError, match="input_1 is a 0-d tensor"):
        MultiInput((a, torch.tensor(1.0)))
    with pytest.raises(SlimkitError, match="differ in their inputs"):
        concat([x, MultiInput({"image": a, "other": b})])


def test_batches_of_several_inputs_are_read_as_tuples_or_dicts(digits):
    x, y = digits.x_train[:70], digits.y_train[:70]
    positional = as_task(loader(x, y))
    by_name = as_task(loader(x, y, keyword=True))
    for task, keyword in ((positional, False), (by_name, True)):
        inputs, labels = next(iter(task.train_batches(slimkit.TrainConfig())))
        assert torch.equal(labels, y[:64]) and torch.equal(inputs.tensors[1], quadrant_ink(x[:64]))
        assert isinstance(task.example_inputs, MultiInput)
        assert task.example_inputs.keyword is keyword and len(task.example_inputs) == 64
        assert [t.shape for t in task.input_shape.tensors] == [[1, 8, 8], [4]]
    assert [t.name for t in by_name.input_shape.tensors] == ["image", "side"]
    unlabelled = as_task({"image": x, "side": quadrant_ink(x)})  # one dict batch: calibration inputs
    assert not unlabelled.can_score and len(unlabelled.example_inputs) == 64
    with pytest.raises(SlimkitError, match=r"a batch is a tuple of 3.*transform_fn"):
        as_task([(x, quadrant_ink(x), y)])


def test_a_model_given_one_tensor_for_two_inputs_is_told_how(trained, digits):
    model, _ = trained
    with pytest.raises(SlimkitError, match=r"takes 2 inputs, image, side: give batches as \(\(image, side\), labels\)"):
        slimkit.prune(model, {"sparsity": 0.5}, digits)


def test_positional_and_named_batches_train_the_same_weights(factory_path, digits, tmp_path):
    weights = []
    for keyword in (False, True):
        torch.manual_seed(0)
        model = new_model(FACTORY, trust_code=True)
        slimkit.train_model(model, two_input_task(digits, keyword), slimkit.TrainConfig(epochs=1, lr=1e-2),
                            tmp_path / str(keyword), progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("verb, config, keep", [
    ("prune", {"structured": True, "sparsity": 0.3, "finetune": {"epochs": 3, "lr": 3e-3}}, 0.9),
    ("prune", {"nm": "2:4", "finetune": {"epochs": 2, "lr": 3e-3}}, 0.9),
    ("quantize", {"scheme": "int8-static", "calib": 128}, 0.97),
    ("quantize", {"scheme": "int4-weight"}, 0.9),
    ("cluster", {"bits": 4}, 0.95),
    ("factorize", {"energy": 0.9, "finetune": {"epochs": 3, "lr": 3e-3}}, 0.9),
])
def test_verbs_on_a_two_input_model_save_load_and_keep_accuracy(verb, config, keep, trained, tmp_path):
    model, task = trained
    baseline = task.test_score(model)
    result = getattr(slimkit, verb)(model, config, task)
    save(result, tmp_path / "m")
    again = load(tmp_path / "m", trust_code=True)
    x = task.example_inputs
    with torch.no_grad():
        assert torch.equal(call(again, x), call(result, x))
    assert again.slimkit_meta["inputs"]["tensors"][1] == {"name": "side", "shape": [4], "dtype": "float32"}
    assert task.test_score(again) >= keep * baseline
    if verb == "quantize":  # its ONNX file, one graph input per tensor, was run by ONNX Runtime and checked
        assert result.slimkit_notes["export"]["check"]["top1_agreement"] >= 0.99
    if verb == "prune" and config.get("structured"):
        reached = result.slimkit_notes["prune"]["reached"]
        assert reached["params"][1] < 0.85 * reached["params"][0]


def test_distilling_a_two_input_student(trained, factory_path):
    teacher, task = trained
    torch.manual_seed(0)
    student = new_model({"factory": "twoinputs:ImageAndSide", "args": {"width": 8}}, trust_code=True)
    result = slimkit.distill(student, teacher, task, {"train": {"epochs": 10, "lr": 1e-2}})
    assert sum(p.numel() for p in result.parameters()) < 0.3 * sum(p.numel() for p in teacher.parameters())
    assert task.test_score(result) > 0.7


def test_the_onnx_graph_takes_each_input_by_name_at_any_batch(trained, tmp_path):
    model, task = trained
    result = slimkit.export_onnx(model, tmp_path / "m.onnx", task.example_inputs[:2], verify_on=task.example_inputs)
    assert result.max_abs_diff <= result.allowed_diff
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["image", "side"]
    session = ort_session(tmp_path / "m.onnx")
    for n in (1, 5, 64):
        x = task.example_inputs[:n]
        with torch.no_grad():
            np.testing.assert_allclose(run_ort(session, x), call(model, x).numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def quantized(trained):
    model, task = trained
    return slimkit.quantize(model, {"scheme": "int8-static", "calib": 128}, task)


@pytest.mark.parametrize("fmt", formats([f for f in FLOAT_FORMATS if f != "tflite-fp16"] + INT8_FORMATS))
def test_each_runtime_file_takes_both_inputs(fmt, trained, quantized, digits, tmp_path):
    model, task = trained
    source = quantized if fmt.endswith("-int8") else model
    target = get_target(fmt)
    path = tmp_path / f"m{target.suffix}"
    export_to(source, fmt, path, task.example_inputs, batch=4)
    images = digits.x_test[:150]  # not the inputs it was verified on; 150 = 37 batches of 4 and a padded one
    x, y = MultiInput((images, quadrant_ink(images))), digits.y_test[:150].numpy()
    with torch.no_grad():
        expected = call(source, x).numpy()
    runner = target.open(path, 1)
    got = runner(x)
    if source is model:
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        assert (got.argmax(1) == expected.argmax(1)).all()
    else:  # slimkit's grids in the runtime's integer arithmetic
        assert sqnr_db(expected, got) >= 30 and (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
        assert abs((got.argmax(1) == y).mean() - (expected.argmax(1) == y).mean()) <= 0.01
    with torch.no_grad():  # the side input reaches the file: changing only it changes the outputs as in torch
        bright = MultiInput((images, quadrant_ink(images) + 1.0))
        moved = call(source, bright).numpy() - expected
    assert np.abs(moved).max() > 0.1 and sqnr_db(moved, runner(bright) - got) >= 20


def test_a_saved_two_input_model_is_analyzed_and_exported_without_data(trained, tmp_path, capsys):
    model, task = trained
    quantized = slimkit.quantize(model, {"scheme": "int8-static", "calib": 64}, task)
    save(quantized, tmp_path / "q")
    save(slimkit.prune(model, {"sparsity": 0.5}, task), tmp_path / "p")
    assert slimkit.count_macs(model, task.input_shape)[0] == MACS
    assert main(["analyze", str(tmp_path / "q"), "--trust-code", "--json", "--no-latency"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == MACS
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "p.onnx"), "--trust-code"]) == 0
    assert [i.name for i in onnx.load(str(tmp_path / "p.onnx")).graph.input] == ["image", "side"]


def test_malformed_recorded_inputs_are_named_errors(trained, tmp_path):
    model, _ = trained
    save(model, tmp_path / "m")
    meta_file = tmp_path / "m" / "slimkit.json"
    meta = json.loads(meta_file.read_text())
    for inputs, message in [
        ({"keyword": True, "tensors": []}, "inputs.tensors"),
        ({"keyword": True, "tensors": [{"name": "a b", "shape": [3], "dtype": "float32"}]}, r"inputs.tensors\[0\].name"),
        ({"keyword": True, "tensors": [{"name": "a", "shape": [3], "dtype": "complex64"}]}, r"inputs.tensors\[0\].dtype"),
        ({"keyword": False, "tensors": [{"name": "a", "shape": [4096, 4097], "dtype": "float32"}]}, "elements"),
    ]:
        meta_file.write_text(json.dumps({**meta, "inputs": inputs}))
        with pytest.raises(SlimkitError, match=message):
            load(tmp_path / "m", trust_code=True, verify=False)


def test_a_recipe_on_a_two_input_model_reports_and_times_it(trained, tmp_path):
    model, task = trained
    save(model, tmp_path / "m")
    recipe = slimkit.parse_recipe({
        "model": {"path": str(tmp_path / "m"), "trust_code": True},
        "stages": [{"type": "prune", "structured": True, "sparsity": 0.3, "finetune": {"epochs": 2, "lr": 3e-3}},
                   {"type": "quantize", "scheme": "int8-static", "calib": 64}],
        "evaluate": {"latency": True, "threads": 1}})
    report = slimkit.run_recipe(recipe, tmp_path / "run", task=task, progress=False)
    assert report["data"]["input_shape"]["tensors"][0] == {"name": "image", "shape": [1, 8, 8], "dtype": "float32"}
    assert report["final"]["macs"] < report["baseline"]["macs"] == MACS
    assert {"ort_b1", "torch_b1"} <= set(report["final"]["latency_ms"])
    assert report["final"]["accuracy"] >= 0.9 * report["baseline"]["accuracy"]
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000


def test_a_quantization_step_records_one_kind_of_inputs(trained, tmp_path):
    model, task = trained
    save(slimkit.quantize(model, {"scheme": "int8-static", "calib": 32}, task), tmp_path / "q")
    meta_file = tmp_path / "q" / "slimkit.json"
    meta = json.loads(meta_file.read_text())
    step = meta["plan"][-1]
    assert "input_shape" not in step and [t["name"] for t in step["inputs"]["tensors"]] == ["input_0", "input_1"]
    for broken, message in [({**step, "input_shape": [1, 8, 8]}, "exactly one of them"),
                            ({k: v for k, v in step.items() if k != "inputs"}, "exactly one of them")]:
        meta_file.write_text(json.dumps({**meta, "plan": [*meta["plan"][:-1], broken]}))
        with pytest.raises(SlimkitError, match=message):
            load(tmp_path / "q", trust_code=True, verify=False)
