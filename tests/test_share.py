"""Weight sharing: 1-D clustering, shared-centroid training, codebook storage."""

import itertools
import json

import numpy as np
import pytest
import torch

from slimkit import SlimkitError, Task, fit, load, parse_recipe, run_recipe, save
from slimkit.codec import decode_state, encode_state
from slimkit.codec.bits import pack_bits, unpack_bits
from slimkit.io import dir_bytes
from slimkit.pruning import PruneConfig, prune_weights, remove_masks
from slimkit.share import ClusterConfig, cluster, remove_sharing, share_centroids
from slimkit.share.kmeans import INITS, cluster_1d, sse
from slimkit.train import TrainConfig


def brute_force_sse(x: np.ndarray, k: int) -> float:
    s = np.sort(x)
    cuts_options = itertools.combinations(range(1, len(s)), k - 1)
    return min(sum(((seg := s[a:b]) - seg.mean()) @ (seg - seg.mean()) for a, b in zip((0, *cuts), (*cuts, len(s))))
               for cuts in cuts_options)


@pytest.mark.parametrize("seed", range(8))
def test_optimal_clustering_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(rng.integers(4, 11)))
    k = int(rng.integers(1, 5))
    centroids, labels = cluster_1d(x, k, "optimal")
    assert sse(x, centroids, labels) == pytest.approx(brute_force_sse(x, k), abs=1e-12)
    assert np.all(np.diff(centroids) > 0)


def test_every_init_clusters_and_optimal_is_best():
    x = np.random.default_rng(0).standard_normal(5000) * 0.05
    results = {init: cluster_1d(x, 16, init, seed=1) for init in INITS}
    for init, (centroids, labels) in results.items():
        assert len(centroids) <= 16 and labels.min() >= 0 and labels.max() < len(centroids)
        for j, c in enumerate(centroids):  # every centroid is the mean of its members (a k-means fixed point)
            assert c == pytest.approx(x[labels == j].mean(), abs=1e-12)
    errors = {init: sse(x, *r) for init, r in results.items()}
    assert errors["optimal"] <= min(errors.values()) + 1e-12
    assert errors["optimal"] < 0.99 * errors["linear"]  # Lloyd from linear spacing stops at a worse fixed point
    with pytest.raises(ValueError, match="init must be one of"):
        cluster_1d(x, 4, "kmeans++")


def test_fewer_distinct_values_than_clusters():
    centroids, labels = cluster_1d(np.array([1.0, 1.0, 2.0]), 8, "linear")
    assert centroids.tolist() == [1.0, 2.0] and labels.tolist() == [0, 0, 1]


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 1001)
    packed = pack_bits(codes, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits, 1001), codes)
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(np.array([1 << bits]), bits)


def pruned_lenet300(digits, briefly_trained, sparsity=0.9):
    model = briefly_trained("lenet300")
    prune_weights(model, PruneConfig(sparsity=sparsity, scope="global"))
    return remove_masks(model)


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_cluster_keeps_zeros_and_shares_values(method, digits, briefly_trained):
    model = pruned_lenet300(digits, briefly_trained)
    zeros = {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    result = cluster(model, ClusterConfig(bits=3, method=method, layer_bits={"fc3": 2}))
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(p == 0, zeros[name]) or method == "uniform"  # uniform may round tiny weights to 0
            assert (p[zeros[name]] == 0).all()
            limit = 4 if name.startswith("fc3") else 8
            assert torch.unique(p[p != 0]).numel() <= limit
    if method == "uniform":
        w = model.fc1.weight[model.fc1.weight != 0].double()
        step = w.abs().max() / 4
        assert torch.allclose(w / step, torch.round(w / step), atol=1e-5)
    assert [row["bits"] for row in result["layers"]] == [3, 3, 2]


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0])[torch.randint(0, 4, (4, 6))])
    plain = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(5, 6)
    (x @ plain.T).pow(2).sum().backward()
    share_centroids(layer, ["weight"])
    (layer(x) - layer.bias).pow(2).sum().backward()
    centroids = layer.parametrizations.weight[0].centroids
    expected = torch.stack([plain.grad[plain.detach() == v].sum() for v in centroids.detach()])
    torch.testing.assert_close(centroids.grad, expected)


def test_trained_centroids_keep_assignments_zeros_and_count(digits, briefly_trained):
    task = Task.classification(digits)
    model = pruned_lenet300(digits, briefly_trained)
    result = cluster(model, ClusterConfig(bits=2, init="density"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    clustered_score = task.val_score(model)
    share_centroids(model, [row["tensor"] for row in result["layers"]])
    cfg = TrainConfig(epochs=3, lr=1e-3)
    fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, progress=False)
    remove_sharing(model)
    assert task.val_score(model) >= clustered_score
    for name, old in before.items():
        new = model.get_parameter(name)
        assert torch.equal(new == 0, old == 0)
        values, groups = torch.unique(old, return_inverse=True)
        for j in range(len(values)):  # weights that shared a value still share one
            assert torch.unique(new[groups == j]).numel() == 1
    with pytest.raises(SlimkitError, match="distinct values"):
        share_centroids(briefly_trained("lenet300"), ["fc1.weight"])


def test_codebook_storage_is_exact_and_small(digits, briefly_trained, tmp_path):
    model = pruned_lenet300(digits, briefly_trained, sparsity=0.92)
    save(model, tmp_path / "pruned")
    cluster(model, ClusterConfig(bits=4, init="optimal"))
    save(model, tmp_path / "clustered")
    meta = json.loads((tmp_path / "clustered" / "slimkit.json").read_text())["tensors"]
    # 16 centroids, plus zero where a long gap needs a filler value
    assert {meta[f"fc{i}.weight"]["codebook_bits"] for i in (1, 2, 3)} <= {4, 5}
    assert torch.equal(load(tmp_path / "clustered")(digits.x_test), model(digits.x_test))
    # positions stay as they were; 32-bit values become 4-bit codes (plus a 16-entry codebook)
    assert dir_bytes(tmp_path / "clustered") < 0.75 * dir_bytes(tmp_path / "pruned")
    dense_clustered = {"w": torch.tensor([0.5, -1.25, 3.0, 0.0])[torch.randint(0, 4, (64, 64))]}
    tensors, encodings = encode_state(dense_clustered)
    assert encodings["w"] == {"encoding": "dense", "shape": [64, 64], "codebook_bits": 2}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 4 * 4 + 64 * 64 // 4
    tensors["w::codebook"] = tensors["w::codebook"][:2]
    with pytest.raises(SlimkitError, match="past the codebook"):
        decode_state(tensors, encodings, "test")


def test_cluster_stage_in_a_recipe(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.9, "scope": "global"},
                                      {"type": "cluster", "bits": 4, "finetune": {"epochs": 2}}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][2]["notes"]["cluster"]
    assert [row["layer"] for row in notes["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(row["clusters"] <= 16 for row in notes["layers"])
    final = load(tmp_path / "r")
    assert all(torch.unique(p[p != 0]).numel() <= 16 for n, p in final.named_parameters() if n.endswith("weight"))
    with pytest.raises(SlimkitError, match="init must be one of"):
        parse_recipe({"model": {"path": str(trained_run)}, "stages": [{"type": "cluster", "init": "kmeans++"}]})
