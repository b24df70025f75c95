"""The .slim container: entropy coders, lossless packing, damage detection, accounting."""


import numpy as np
import pytest
import torch

from slimkit import SlimkitError, load, parse_recipe, run_recipe, save
from slimkit.codec.container import read_container
from slimkit.codec.entropy import CODERS, decode, encode, encode_with, entropy_bits
from slimkit.data import calibration_subset
from slimkit.modelfile.store import read_safetensors
from slimkit.modelfile import pack, unpack
from slimkit.pruning import PruneConfig, prune_weights, remove_masks
from slimkit.quant.ptq import quantize_static
from slimkit.share import ClusterConfig, cluster


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("alphabet, n", [(2, 1), (5, 7), (32, 3000), (256, 20000)])
def test_coders_are_lossless(coder, alphabet, n):
    rng = np.random.default_rng(alphabet)
    p = rng.dirichlet(np.full(alphabet, 0.3))
    symbols = rng.choice(alphabet, size=n, p=p)
    coded = encode_with(symbols, coder)
    assert np.array_equal(decode(coded.coder, coded.data, n), symbols)


def test_entropy_coders_approach_the_entropy():
    rng = np.random.default_rng(0)
    symbols = rng.choice(32, size=50000, p=rng.dirichlet(np.full(32, 0.5)))
    limit = entropy_bits(symbols) / 8
    rans, huffman, packed = (len(encode_with(symbols, c).data) for c in ("rans", "huffman", "packed"))
    assert limit < rans < 1.02 * limit + 64  # within 2% of the order-0 entropy, model bytes included
    assert limit < huffman < 1.06 * limit + 64
    assert packed == 1 + 50000 * 5 // 8  # 5 bits per symbol plus the alphabet size
    assert len(encode(symbols).data) == min(rans, huffman, packed)
    skewed = (rng.random(50000) < 0.01).astype(np.int64)  # far below 1 bit per symbol: only rANS gets there
    assert len(encode(skewed).data) < 0.2 * 50000 / 8 and encode(skewed).coder == "rans"
    constant = encode(np.full(1000, 7))
    assert constant.coder == "constant" and np.array_equal(decode("constant", constant.data, 1000), np.full(1000, 7))


@pytest.fixture
def deep_compressed(digits, briefly_trained):
    model = briefly_trained("lenet300")
    prune_weights(model, PruneConfig(sparsity=0.92, scope="global"))
    remove_masks(model)
    cluster(model, ClusterConfig(bits=5, biases=True))
    return model


def test_pack_and_unpack_are_lossless(deep_compressed, digits, tmp_path):
    save(deep_compressed, tmp_path / "m")
    table = pack(tmp_path / "m", tmp_path / "m.slim")
    assert table["file_bytes"] == (tmp_path / "m.slim").stat().st_size
    assert sum(r["compressed_bytes"] for r in table["layers"]) + table["header_bytes"] == table["file_bytes"]
    kept = {r["layer"]: r["weights_kept"] for r in table["layers"]}
    assert kept["fc1"] == pytest.approx(float((deep_compressed.fc1.weight != 0).float().mean()))
    expected = deep_compressed(digits.x_test)
    assert torch.equal(load(tmp_path / "m.slim")(digits.x_test), expected)
    unpack(tmp_path / "m.slim", tmp_path / "back")
    assert torch.equal(load(tmp_path / "back")(digits.x_test), expected)
    original, restored = load(tmp_path / "m").state_dict(), load(tmp_path / "back").state_dict()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    save(deep_compressed, tmp_path / "direct.slim")  # save() writes a .slim file when asked to
    assert torch.equal(load(tmp_path / "direct.slim")(digits.x_test), expected)
    assert (tmp_path / "m.slim").stat().st_size < 0.04 * 4 * sum(p.numel() for p in deep_compressed.parameters())


def test_quantized_models_pack_too(digits, briefly_trained, tmp_path):
    model = briefly_trained("lenet5")
    quantized, step = quantize_static(model, calibration_subset(digits, 64))
    quantized.slimkit_meta = {**model.slimkit_meta, "plan": [*model.slimkit_meta["plan"], step]}
    save(quantized, tmp_path / "q")
    pack(tmp_path / "q", tmp_path / "q.slim")
    assert torch.equal(load(tmp_path / "q.slim")(digits.x_test), load(tmp_path / "q")(digits.x_test))
    _, stored = read_container(tmp_path / "q.slim")
    assert stored.keys() == read_safetensors(tmp_path / "q" / "model.safetensors").keys()
    with torch.no_grad():  # pruned, then quantized: each weight's code layout chosen by coded size
        for layer in (model.conv2, model.fc1, model.fc2):
            layer.weight.mul_(layer.weight.abs() > layer.weight.abs().flatten().quantile(0.85))
    sparse, step = quantize_static(model, calibration_subset(digits, 64))
    sparse.slimkit_meta = {**model.slimkit_meta, "plan": [*model.slimkit_meta["plan"], step]}
    save(sparse, tmp_path / "s")
    pack(tmp_path / "s", tmp_path / "s.slim")
    assert torch.equal(load(tmp_path / "s.slim")(digits.x_test), sparse(digits.x_test))
    assert (tmp_path / "s.slim").stat().st_size < 0.6 * (tmp_path / "q.slim").stat().st_size


def damaged(source, tmp_path, how):
    blob = bytearray(source.read_bytes())
    if how == "payload":
        blob[-20] ^= 0x40
    elif how == "header":
        blob[20] ^= 0x01
    elif how == "truncated":
        blob = blob[:-7]
    elif how == "trailing":
        blob += b"\0"
    elif how == "signature":
        blob[:4] = b"PK\3\4"
    path = tmp_path / f"{how}.slim"
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("how, message", [("payload", "is corrupt"), ("header", "header is truncated or corrupt"),
                                          ("truncated", "truncated"), ("trailing", "trailing data"),
                                          ("signature", "not a .slim file")])
def test_damaged_files_are_clear_errors(cli, deep_compressed, tmp_path, how, message):
    save(deep_compressed, tmp_path / "m.slim")
    path = damaged(tmp_path / "m.slim", tmp_path, how)
    before = path.read_bytes()
    with pytest.raises(SlimkitError, match=message):
        load(path)
    proc = cli("unpack", str(path), "--out", str(tmp_path / "u"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and not (tmp_path / "u").exists()
    assert path.read_bytes() == before


def test_pack_cli_and_slim_export_stage(cli, trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.9, "scope": "global"},
                                      {"type": "cluster", "bits": 4, "biases": True},
                                      {"type": "export", "format": "slim"}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][3]["notes"]["slim"]
    assert notes["file_bytes"] == (tmp_path / "r" / "model.slim").stat().st_size
    assert notes["ratio_vs_fp32"] > 25
    proc = cli("pack", str(tmp_path / "r"), "--out",
               str(tmp_path / "again.slim"))
    assert proc.returncode == 0, proc.stderr
    assert "smaller than fp32" in proc.stdout and "fc1" in proc.stdout
    assert (tmp_path / "again.slim").read_bytes() == (tmp_path / "r" / "model.slim").read_bytes()
    proc = cli("analyze", str(tmp_path / "again.slim"), "--json",
               "--no-latency")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(SlimkitError, match="must end in .slim"):
        parse_recipe({"model": {"path": str(trained_run)}, "stages": [{"type": "export", "format": "slim",
                                                                        "filename": "m.onnx"}]})


def test_deep_compression_recipe_is_the_demo(tmp_path):
    """`make demo` runs this recipe: train, AGP-prune, share weights, pack; the file is >35x smaller."""
    from pathlib import Path

    from slimkit import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "deep-compression.yaml")
    report = run_recipe(recipe, tmp_path / "demo", progress=False)
    assert report["packed"]["ratio_vs_baseline"] > 35 and report["summary"]["accuracy_delta"] >= -0.01
    assert report["packed"]["file_bytes"] == (tmp_path / "demo" / "model.slim").stat().st_size
    assert "Where the bytes of model.slim go" in (tmp_path / "demo" / "report.html").read_text()


@pytest.mark.parametrize("field, value", [(1, "save"), (2, [-1, 4]), (4, 1 << 40), (5, "gzip"), (0, None)])
def test_hostile_headers_are_refused_before_any_allocation(deep_compressed, tmp_path, field, value):
    import json
    import struct
    import zlib

    save(deep_compressed, tmp_path / "m.slim")
    blob = (tmp_path / "m.slim").read_bytes()
    magic, version, length, _ = struct.unpack_from("<4sHII", blob)
    content = json.loads(zlib.decompress(blob[14 : 14 + length]))
    content["streams"][0][field] = value
    header = zlib.compress(json.dumps(content).encode())
    hostile = struct.pack("<4sHII", magic, version, len(header), zlib.crc32(header)) + header + blob[14 + length:]
    (tmp_path / "h.slim").write_bytes(hostile)
    with pytest.raises(SlimkitError, match="header cannot be read"):
        load(tmp_path / "h.slim")
