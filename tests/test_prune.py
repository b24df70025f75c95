import copy

import pytest
import torch
from torch import nn

from slimkit import SlimkitError, Task, load, new_model, parse_recipe, run_recipe
from slimkit.io import dir_bytes
from slimkit.pruning import PruneConfig, get_mask, prune_weights, remove_masks, set_mask, sparsity_of
from slimkit.pruning.mask import original_weight
from slimkit.stages import StageContext
from slimkit.pruning.stage import PruneStage

X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def lenet300():
    torch.manual_seed(0)
    return new_model("lenet300").eval()


def test_all_ones_mask_changes_nothing(lenet300):
    before = lenet300(X)
    for layer in (lenet300.fc1, lenet300.fc2, lenet300.fc3):
        set_mask(layer, torch.ones_like(layer.weight))
    assert torch.equal(lenet300(X), before)


def test_remove_keeps_outputs_and_parameter_identity(lenet300):
    param = lenet300.fc1.weight
    prune_weights(lenet300, PruneConfig(sparsity=0.7))
    assert original_weight(lenet300.fc1) is param
    masked_out = lenet300(X)
    remove_masks(lenet300)
    assert lenet300.fc1.weight is param
    assert torch.equal(lenet300(X), masked_out)
    assert get_mask(lenet300.fc1) is None


def test_per_layer_sparsity_is_exact_and_prunes_the_smallest(lenet300):
    dense = {n: m.weight.detach().clone() for n, m in lenet300.named_modules() if isinstance(m, nn.Linear)}
    result = prune_weights(lenet300, PruneConfig(sparsity=0.6))
    remove_masks(lenet300)
    for name, w in dense.items():
        pruned = dict(lenet300.named_modules())[name].weight
        assert int((pruned == 0).sum()) == round(0.6 * w.numel())
        kept, dropped = w[pruned != 0].abs(), w[pruned == 0].abs()
        assert dropped.max() <= kept.min()
        assert result["layers"][name]["sparsity"] == pytest.approx(0.6, abs=1 / w.numel())


def test_global_sparsity_uses_one_threshold(lenet300):
    weights = torch.cat([m.weight.detach().abs().flatten() for m in (lenet300.fc1, lenet300.fc2, lenet300.fc3)])
    prune_weights(lenet300, PruneConfig(sparsity=0.9, scope="global"))
    remove_masks(lenet300)
    kept = torch.cat([m.weight.detach().abs().flatten() for m in (lenet300.fc1, lenet300.fc2, lenet300.fc3)])
    assert int((kept == 0).sum()) == round(0.9 * weights.numel())
    assert weights[kept == 0].max() <= weights[kept != 0].min()
    layer_sparsity = [sparsity_of(lenet300, [n]) for n in ("fc1", "fc2", "fc3")]
    assert max(layer_sparsity) - min(layer_sparsity) > 0.05  # not uniform: global differs from per-layer


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_nm_pattern_holds_in_every_group(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = new_model("lenet5")
    with pytest.warns(UserWarning, match="skipped layers"):
        result = prune_weights(model, PruneConfig(nm=pattern))
    remove_masks(model)
    assert "conv1" in result["skipped"]  # one input channel: no groups of m
    for name in ("conv2", "fc1", "fc2", "fc3"):
        w = dict(model.named_modules())[name].weight.detach()
        if w.shape[1] % m:
            assert name in result["skipped"]
            continue
        groups = w.movedim(1, -1).reshape(-1, m)
        assert ((groups != 0).sum(1) == n).all()  # random init has no exact zeros: exactly n survive


def test_masks_only_grow(lenet300):
    prune_weights(lenet300, PruneConfig(sparsity=0.5))
    first = get_mask(lenet300.fc2).clone()
    prune_weights(lenet300, PruneConfig(sparsity=0.3, method="random"))
    assert (get_mask(lenet300.fc2) <= first).all()
    assert sparsity_of(lenet300, ["fc2"]) == pytest.approx(0.5)


def test_fine_tuning_keeps_pruned_weights_at_zero(digits):
    task = Task.classification(digits)
    torch.manual_seed(0)
    model = new_model("lenet300")
    prune_weights(model, PruneConfig(sparsity=0.8))
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if get_mask(m) is not None}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in task.train_batches(PruneStage().finetune):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    remove_masks(model)
    for name, mask in masks.items():
        assert (dict(model.named_modules())[name].weight[mask == 0] == 0).all()


def test_taylor_needs_data_and_random_is_seeded(lenet300, digits):
    with pytest.raises(SlimkitError, match="taylor importance needs"):
        prune_weights(lenet300, PruneConfig(method="taylor"))
    a, b = copy.deepcopy(lenet300), copy.deepcopy(lenet300)
    prune_weights(a, PruneConfig(method="random", seed=3))
    prune_weights(b, PruneConfig(method="random", seed=3))
    assert torch.equal(get_mask(a.fc1), get_mask(b.fc1))
    result = prune_weights(lenet300, PruneConfig(method="taylor", sparsity=0.5), Task.classification(digits))
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_selection_and_layer_overrides(lenet300):
    result = prune_weights(lenet300, PruneConfig(sparsity=0.5, exclude=["fc3"], layer_sparsity={"fc1": 0.9}))
    assert set(result["layers"]) == {"fc1", "fc2"}
    assert sparsity_of(lenet300, ["fc1"]) == pytest.approx(0.9, abs=1e-3)
    assert sparsity_of(lenet300, ["fc3"]) == 0
    with pytest.raises(SlimkitError, match="not selected"):
        prune_weights(lenet300, PruneConfig(layer_sparsity={"fc9": 0.5}))
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(nm="4:2")


@pytest.mark.parametrize("schedule", ["one-shot", "iterative", "agp"])
def test_schedules_reach_the_target_and_recover(schedule, digits, trained_run, tmp_path):
    model = load(trained_run)
    task = Task.classification(digits)
    dense_accuracy = task.test_score(model)
    stage = PruneStage(sparsity=0.9, scope="global", schedule=schedule, steps=3,
                       finetune={"epochs": 12, "lr": 3e-3})
    ctx = StageContext(task, tmp_path, tmp_path / "stage", progress=False)
    pruned = stage.apply(model, ctx)
    assert sparsity_of(pruned, ["fc1", "fc2", "fc3"]) == pytest.approx(0.9, abs=1e-4)
    assert not any(get_mask(m) is not None for m in pruned.modules())
    assert task.test_score(pruned) > dense_accuracy - 0.03
    with pytest.raises(ValueError, match="set finetune.epochs"):
        PruneStage(schedule="agp")


def test_prune_recipe_and_cli(cli, trained_run, tmp_path):
    before = {p.name: p.read_bytes() for p in (trained_run / "model").iterdir()}
    proc = cli("prune", str(trained_run), "--sparsity", "0.9", "--global",
               "--finetune-epochs", "3", "--out", str(tmp_path / "p"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in (trained_run / "model").iterdir()} == before
    assert dir_bytes(trained_run / "model") / dir_bytes(tmp_path / "p" / "model") > 5
    model = load(tmp_path / "p")
    assert sparsity_of(model, ["fc1", "fc2", "fc3"]) == pytest.approx(0.9, abs=1e-4)
    recipe = parse_recipe({"model": {"path": str(trained_run)},
                           "stages": [{"type": "prune", "sparsity": 0.5, "nm": "2:4"}],
                           "evaluate": {"latency": False}})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    assert report["stages"][1]["notes"]["prune"]["skipped"] == {}
    assert report["stages"][1]["nonzero_params"] < report["baseline"]["nonzero_params"] * 0.55
