import json

import pytest
import torch

from slimkit import SlimkitError, load, new_model, save
from slimkit.codec import decode_state, encode_state
from slimkit.codec.state import MAX_GAP
from slimkit.io import dir_bytes


def sparse_tensor(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    return t * (torch.rand(shape, generator=g) < density)


@pytest.mark.parametrize("density, expected", [(1.0, None), (0.5, "bitmask"), (0.05, "indices"), (0.0, "indices")])
def test_round_trip_is_exact_and_picks_the_smallest_encoding(density, expected):
    state = {"w": sparse_tensor((300, 64), density), "b": torch.randn(300)}
    tensors, encodings = encode_state(state)
    assert encodings.get("w", {}).get("encoding") == expected
    decoded = decode_state(tensors, encodings, "test")
    assert decoded.keys() == state.keys()
    for k in state:
        assert torch.equal(decoded[k], state[k])
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    nnz = int((state["w"] != 0).sum())
    if expected == "bitmask":
        assert stored == 300 * 4 + (300 * 64) // 8 + 4 * nnz
    elif expected == "indices":
        assert stored <= 300 * 4 + 5 * nnz + 5 * (300 * 64 // MAX_GAP + 1)


def test_long_gaps_use_fillers():
    t = torch.zeros(2000)
    t[[3, 1000, 1999]] = torch.tensor([1.5, -2.0, 3.0])
    tensors, encodings = encode_state({"w": t})
    assert encodings["w"]["encoding"] == "indices"
    assert int(tensors["w::gaps"].max()) <= MAX_GAP
    assert torch.equal(decode_state(tensors, encodings, "test")["w"], t)


def test_corrupt_sparse_tensor_is_a_clear_error():
    tensors, encodings = encode_state({"w": sparse_tensor((100, 10), 0.3)})
    tensors["w::values"] = tensors["w::values"][:-1]
    with pytest.raises(SlimkitError, match="sparse tensor 'w' is corrupt"):
        decode_state(tensors, encodings, "test")


def test_pruned_model_file_really_shrinks_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = new_model("lenet300").eval()
    save(model, tmp_path / "dense")
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            layer.weight.mul_(sparse_tensor(layer.weight.shape, 0.08, seed=1) != 0)
    save(model, tmp_path / "sparse")
    assert dir_bytes(tmp_path / "dense") / dir_bytes(tmp_path / "sparse") > 5
    meta = json.loads((tmp_path / "sparse" / "slimkit.json").read_text())
    assert set(meta["tensors"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    again = load(tmp_path / "sparse")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("density, bits", [(1.0, 8), (0.3, 8), (0.03, 8), (0.3, 4)])
def test_quantized_codes_are_stored_at_sparse_positions_when_smaller(density, bits):
    """A pruned, then quantized weight: its non-zero int8/int4 codes only, exactly as many bytes as counted."""
    g = torch.Generator().manual_seed(0)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (300, 64), generator=g) * (torch.rand(300, 64, generator=g) < density)
    scale = torch.rand(300, generator=g) * 0.01 + 1e-3
    weight = codes.float() * scale[:, None]
    tensors, encodings = encode_state({"w": weight}, {"w": (scale, None)})
    enc = encodings["w"]
    assert enc["encoding"] == f"int{bits}-channel"
    assert torch.equal(decode_state(tensors, encodings, "test")["w"], weight)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    nnz, numel = int((codes != 0).sum()), codes.numel()
    value_bytes = (lambda n: n) if bits == 8 else (lambda n: (n + 1) // 2)
    dense = 4 * 300 + value_bytes(numel)
    if density == 1.0:
        assert "positions" not in enc and stored == dense
    elif density == 0.3:
        assert enc["positions"] == "bitmask" and stored == 4 * 300 + numel // 8 + value_bytes(nnz) < dense
    else:
        assert enc["positions"] == "indices" and stored < 4 * 300 + 2 * nnz + numel // MAX_GAP + 1
    tensors[f"w::int{bits}"] = tensors[f"w::int{bits}"][:-1]
    with pytest.raises(SlimkitError, match="sparse tensor 'w' is corrupt"):
        decode_state(tensors, encodings, "test")
