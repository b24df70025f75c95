"""Low-rank factorization: exactness at full rank, Eckart-Young truncation, rank choice, reload."""

import pytest
import torch
from torch import nn

import slimkit
from slimkit import SlimkitError, Task, count_macs, count_params, load, parse_recipe, run_recipe, save
from slimkit.lowrank import FactorizeConfig, factorize
from slimkit.lowrank.svd import _factors, _matrix


def full_rank_factors(module, kind):
    u, s, vh = torch.linalg.svd(_matrix(module, kind), full_matrices=False)
    return _factors(module, kind, u, s, vh, len(s)), s


@pytest.mark.parametrize("kind, module, shape", [
    ("linear", nn.Linear(20, 12), (5, 20)),
    ("channel", nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 9, 9)),
    ("spatial", nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), (2, 4, 9, 11)),
    ("spatial", nn.Conv2d(2, 5, 3, stride=(1, 2), padding=(0, 1), dilation=(2, 1)), (2, 2, 10, 10)),
])
def test_full_rank_factorization_is_exact(kind, module, shape):
    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(shape, dtype=torch.float64)
    factors, _ = full_rank_factors(module, kind)
    with torch.no_grad():
        torch.testing.assert_close(factors(x), module(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, module", [("linear", nn.Linear(30, 20)), ("channel", nn.Conv2d(6, 10, 3))])
def test_truncation_error_is_the_dropped_singular_energy(kind, module):
    module = module.double()
    u, s, vh = torch.linalg.svd(_matrix(module, kind), full_matrices=False)
    for r in (1, 3, 5):
        factors = _factors(module, kind, u, s, vh, r)
        first, second_w = factors[0].weight.reshape(r, -1), factors[1].weight.reshape(-1, r)
        approx = (second_w @ first).detach()
        error = float(((_matrix(module, kind) - approx) ** 2).sum())
        assert error == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)  # Eckart-Young: nothing better exists


def test_rank_choice_by_energy_and_budget(digits, briefly_trained):
    model = briefly_trained("lenet300")
    _, step, rows = factorize(model, digits.x_test, FactorizeConfig(energy=0.8))
    for row in rows:
        if row["rank"] is not None:
            assert row["energy"] >= 0.8 and row["params_after"] < row["params_before"]
            assert row["macs_after"] < row["macs_before"]
    model = briefly_trained("lenet300")
    before = count_params(model)[0]
    _, step, rows = factorize(model, digits.x_test, FactorizeConfig(budget=0.3))
    assert sum(r["params_after"] for r in rows) <= 0.3 * sum(r["params_before"] for r in rows)
    assert count_params(model)[0] == before - sum(r["params_before"] - r["params_after"] for r in rows)
    assert count_macs(model, (1, 8, 8))[0] == sum(r["macs_after"] for r in rows)
    model = briefly_trained("lenet5")
    _, step, rows = factorize(model, digits.x_test, FactorizeConfig(budget=0.5, budget_of="macs"))
    assert sum(r["macs_after"] for r in rows) <= 0.5 * sum(r["macs_before"] for r in rows)
    with pytest.raises(ValueError, match="exactly one of rank, energy, budget or min_score"):
        FactorizeConfig(rank=4, energy=0.9)
    with pytest.raises(SlimkitError, match="no layer got smaller"):
        factorize(briefly_trained("lenet300"), digits.x_test, FactorizeConfig(energy=1.0))
    _, _, rows = factorize(briefly_trained("lenet5"), digits.x_test, FactorizeConfig(energy=0.8))
    ratios = sorted(r["macs_after"] / r["macs_before"] for r in rows if r["rank"] is not None)
    assert ratios[0] < ratios[-1]
    threshold = (ratios[0] + ratios[-1]) / 2
    _, _, thrifty = factorize(briefly_trained("lenet5"), digits.x_test,
                              FactorizeConfig(energy=0.8, min_saving=1 - threshold))
    for row, kept in zip(rows, thrifty):  # the same ranks where the MACs fall below the threshold; the rest whole
        saves = row["rank"] is not None and row["macs_after"] <= threshold * row["macs_before"]
        assert kept["rank"] == (row["rank"] if saves else None)


@pytest.mark.parametrize("name, cfg", [("vit", FactorizeConfig(energy=0.9)),
                                       ("resnet8", FactorizeConfig(rank=8)),
                                       ("lenet5", FactorizeConfig(rank=6, conv="spatial"))])
def test_factorized_models_reload_from_their_directory(name, cfg, digits, briefly_trained, tmp_path):
    model = briefly_trained(name)
    factorized, step, _ = factorize(model, digits.x_test, cfg)
    assert step["layers"] and factorized.slimkit_meta["plan"][-1] is step
    save(factorized, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m")(digits.x_test), factorized(digits.x_test))


def test_factorize_stage_with_finetuning(trained_run, digits, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "factorize", "energy": 0.85, "finetune": {"epochs": 3}}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][1]["notes"]["factorize"]
    assert {row["layer"] for row in notes["layers"]} == {"fc1", "fc2", "fc3"}
    assert report["summary"]["params_ratio"] > 1.1 and report["summary"]["macs_ratio"] > 1.1
    assert report["final"]["accuracy"] >= notes["score_before_finetune"] - 0.05
    assert Task.classification(digits).test_score(load(tmp_path / "r")) == pytest.approx(report["final"]["accuracy"])


def test_min_score_takes_the_lowest_energy_that_keeps_the_measured_score(digits, briefly_trained):
    """Bisection on the validation score: the chosen factorization scores at least min_score, one bisection step
    lower it would not have, and an unreachable score is an error that lists what was tried."""
    from slimkit.lowrank.search import factorize_for_score

    model, task = briefly_trained("lenet300"), Task.classification(digits)
    baseline = task.val_score(model)
    target = baseline - 0.08  # lenet300 at 90% energy loses about 0.03-0.09 before fine-tuning
    factorized, step, rows, search = factorize_for_score(model, digits.x_test, FactorizeConfig(min_score=target),
                                                         task.val_score, target)
    assert search["score"] == task.val_score(factorized) >= target and step["layers"]
    assert sum(r["params_after"] for r in rows) < sum(r["params_before"] for r in rows)
    scored = [t for t in search["tried"] if t["score"] is not None]
    assert all(t["score"] < target for t in scored if t["energy"] < search["energy"])
    assert all(r["energy"] >= search["energy"] - 1e-9 for r in rows)
    assert count_params(model)[0] > count_params(factorized)[0]  # the model passed in is not changed
    with pytest.raises(SlimkitError, match="no factorization keeps the validation score >= 1.5"):
        factorize_for_score(model, digits.x_test, FactorizeConfig(min_score=1.5), task.val_score, 1.5)
    with pytest.raises(SlimkitError, match="min_score chooses ranks by a measured score"):
        factorize(model, digits.x_test, FactorizeConfig(min_score=0.9))
    stage = slimkit.factorize(model, min_score=target, data=task)
    assert stage.slimkit_notes["factorize"]["energy"] == search["energy"]
