import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from slimkit import SlimkitError, load, new_model, save
from slimkit.io import atomic_dir, dir_bytes

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes() + str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["lenet300", "resnet8", "vit"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = new_model(name, input_shape=[1, 8, 8]).eval()
    save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "slimkit.json"]
    again = load(tmp_path / "m")
    assert torch.equal(model(X), again(X))
    meta = json.loads((tmp_path / "m" / "slimkit.json").read_text())
    assert meta["architecture"] == {"zoo": name, "args": {}} and meta["plan"] == []


def test_dir_bytes_is_the_sum_of_file_sizes(small_model_dir):
    files = list(small_model_dir.iterdir())
    assert dir_bytes(small_model_dir) == sum(os.path.getsize(f) for f in files)
    assert dir_bytes(small_model_dir) > 4 * 50_610  # the weights really are on disk


def test_load_never_modifies_input(small_model_dir):
    before = tree_digest(small_model_dir)
    load(small_model_dir)
    assert tree_digest(small_model_dir) == before


def test_truncated_safetensors_is_a_clear_error(small_model_dir):
    weights = small_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimkitError, match="model.safetensors is damaged: its SHA-256 differs"):
        load(small_model_dir)
    with pytest.raises(SlimkitError, match="model.safetensors: not a readable safetensors file"):
        load(small_model_dir, verify=False)  # past the digest, the reader still refuses it


def test_wrong_shapes_and_keys_are_named(tmp_path, small_model_dir):
    model = load(small_model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc1.weight"] = torch.zeros(300, 63)
    save_file(state, str(small_model_dir / "model.safetensors"))
    with pytest.raises(SlimkitError, match=r"'fc1.weight' has shape \(300, 63\).*expects \(300, 64\)"):
        load(small_model_dir, verify=False)  # hand-edited: past the digest check, the shapes are checked
    del state["fc1.weight"]
    save_file(state, str(small_model_dir / "model.safetensors"))
    with pytest.raises(SlimkitError, match="missing fc1.weight"):
        load(small_model_dir, verify=False)


def test_nan_weights_are_refused(small_model_dir):
    model = load(small_model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc2.bias"][3] = float("nan")
    save_file(state, str(small_model_dir / "model.safetensors"))
    with pytest.raises(SlimkitError, match="'fc2.bias' has 1 NaN/Inf"):
        load(small_model_dir, verify=False)


class CodePayload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"fc1.weight": CodePayload(str(marker))}, f)
    digest = evil.read_bytes()
    with pytest.raises(SlimkitError, match="evil.pt: refused: not a plain tensor state dict"):
        load(evil, arch="lenet300")
    assert not marker.exists()
    assert evil.read_bytes() == digest


def test_pickled_state_dict_loads_with_weights_only(tmp_path):
    torch.manual_seed(1)
    model = new_model("lenet5").eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = load(tmp_path / "w.pt", arch="lenet5")
    assert torch.equal(model(X), again(X))
    with pytest.raises(SlimkitError, match="needs its architecture"):
        load(tmp_path / "w.pt")


def test_pickled_whole_module_is_refused(tmp_path):
    torch.save(new_model("lenet300"), tmp_path / "whole.pt")
    with pytest.raises(SlimkitError, match="refused"):
        load(tmp_path / "whole.pt", arch="lenet300")


def test_factory_architecture_needs_trust(tmp_path):
    model = new_model({"factory": "torch.nn:Linear", "args": {"in_features": 4, "out_features": 2}}, trust_code=True)
    save(model, tmp_path / "f")
    with pytest.raises(SlimkitError, match="--trust-code"):
        load(tmp_path / "f")
    assert torch.equal(load(tmp_path / "f", trust_code=True).weight, model.weight)


def test_factory_naming_os_system_is_not_run_without_trust(tmp_path):
    marker = tmp_path / "ran"
    meta = {"format": "slimkit-model", "version": 1, "plan": [],
            "architecture": {"factory": "os:system", "args": {"command": f"touch {marker}"}}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "slimkit.json").write_text(json.dumps(meta))
    save_file({}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(SlimkitError, match="names Python code 'os:system'"):
        load(tmp_path / "m")
    assert not marker.exists()


def test_unknown_plan_op_is_a_clear_error(small_model_dir):
    meta_path = small_model_dir / "slimkit.json"
    meta = json.loads(meta_path.read_text())
    meta["plan"] = [{"op": "prune-channels-v9"}]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SlimkitError, match="unknown op 'prune-channels-v9'"):
        load(small_model_dir)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(SlimkitError, match="not a slimkit model directory"):
        load(tmp_path)
    (tmp_path / "slimkit.json").write_text("{broken")
    with pytest.raises(SlimkitError, match="not valid JSON"):
        load(tmp_path)


def test_run_directory_resolves_to_its_model(trained_run):
    assert isinstance(load(trained_run), torch.nn.Module)


def test_failed_write_leaves_previous_directory_intact(small_model_dir):
    before = tree_digest(small_model_dir)
    with pytest.raises(RuntimeError):
        with atomic_dir(small_model_dir) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert tree_digest(small_model_dir) == before
    assert [p.name for p in small_model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_saving_nan_model_is_refused_and_nothing_written(tmp_path):
    model = new_model("lenet300")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(SlimkitError, match="fc1.weight"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
