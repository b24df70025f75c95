import pytest
import torch
from torch import nn

from slimkit import SlimkitError, Task, TrainConfig, evaluate, fit, make_loader
from slimkit.train import build_seeded, default_train_config, train_model


def _fit(digits, cfg, **kw):
    task = Task.classification(digits)
    model = build_seeded("lenet5", 0, task)
    result = fit(model, task.train_batches(cfg), make_loader(digits, "val", 256), cfg, progress=False, **kw)
    return model, result


def test_training_is_deterministic_and_leaves_global_rng_alone(digits):
    cfg = TrainConfig(epochs=2, lr=2e-3, augment=True, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = _fit(digits, cfg)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = _fit(digits, cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


class Interrupt(Exception):
    pass


def test_resume_after_interruption_reaches_identical_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=4, lr=2e-3, augment=True, seed=1)
    reference, ref_result = _fit(digits, cfg, checkpoint_dir=tmp_path / "ref")

    val = make_loader(digits, "val", 256)
    calls = {"n": 0}

    def dies_in_epoch_three(model):
        calls["n"] += 1  # call 1 scores the starting weights, call k + 1 ends epoch k - 1
        if calls["n"] == 4:
            raise Interrupt
        return evaluate(model, val)["accuracy"]

    with pytest.raises(Interrupt):
        _fit(digits, cfg, checkpoint_dir=tmp_path / "run", score_fn=dies_in_epoch_three)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed, result = _fit(digits, cfg, checkpoint_dir=tmp_path / "run", resume=True)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert result.history == ref_result.history
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_model_ends_with_best_validation_weights(digits):
    cfg = TrainConfig(epochs=3, lr=2e-3)
    model, result = _fit(digits, cfg)
    best = max(h["val_score"] for h in result.history)
    assert result.best_score == best and result.best_epoch >= 0
    assert evaluate(model, make_loader(digits, "val", 256))["accuracy"] == pytest.approx(best)


def test_fine_tuning_never_returns_worse_weights_than_it_started_with(digits):
    model, _ = _fit(digits, TrainConfig(epochs=3, lr=2e-3))
    val = make_loader(digits, "val", 256)
    start = evaluate(model, val)["accuracy"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, Task.classification(digits).train_batches(TrainConfig()), val,
                 TrainConfig(epochs=2, lr=5.0, optimizer="sgd", grad_clip=1.0), progress=False)
    assert all(h["val_score"] < start for h in result.history)  # a destructive learning rate
    assert result.best_epoch == -1 and result.best_score == start
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_evaluate_matches_float64_reference(digits):
    model = build_seeded("lenet300", 0, Task.classification(digits)).eval()
    got = evaluate(model, make_loader(digits, "test", 100))
    with torch.no_grad():
        logits = model.double()(digits.x_test.double())
    model.float()
    ref_loss = nn.functional.cross_entropy(logits, digits.y_test).item()
    ref_acc = (logits.argmax(1) == digits.y_test).double().mean().item()
    assert got["accuracy"] == pytest.approx(ref_acc, abs=1 / 360)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)


def test_user_loaders_loss_and_score_function():
    """A regression task: user data loader, MSE loss, score = negative MSE."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    model = nn.Linear(3, 1)

    def neg_mse(m):
        with torch.no_grad():
            return -nn.functional.mse_loss(m(x), y).item()

    before = neg_mse(model)
    fit(model, batches, None, TrainConfig(epochs=40, lr=0.05), loss_fn=nn.MSELoss(), score_fn=neg_mse, progress=False)
    assert neg_mse(model) > -1e-3 > before


def test_divergence_is_reported(digits):
    with pytest.raises(SlimkitError, match="training diverged"):
        _fit(digits, TrainConfig(epochs=1, lr=1e12, optimizer="sgd"))


def test_a_model_without_trainable_parameters_is_a_named_error(digits):
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False)
    with pytest.raises(SlimkitError, match="nothing to train: Sequential has no trainable parameters"):
        fit(frozen, [(digits.x_train[:8], digits.y_train[:8])], None, TrainConfig(epochs=1), score_fn=lambda m: 0.0,
            progress=False)


def test_train_config_validation_names_field():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adagrad")
    assert TrainConfig.from_dict(TrainConfig(lr=0.5).to_dict()) == TrainConfig(lr=0.5)


def test_default_training_meets_the_accuracy_floor(digits, tmp_path):
    """lenet300 only: benchmarks/zoo.py checks every zoo model's floor (the other four add about 70 s of training)."""
    task = Task.classification(digits)
    model = build_seeded("lenet300", 0, task)
    metrics = train_model(model, task, default_train_config("lenet300", seed=0), tmp_path, progress=False)
    assert metrics["test_accuracy"] >= 0.95
