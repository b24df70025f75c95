"""Knowledge distillation: losses against float64 references, frozen teachers, projections, stage, CLI."""

import copy

import pytest
import torch
from torch import nn

from slimkit import SlimkitError, Task, load, parse_recipe, run_recipe
from slimkit.distillation import (DistillConfig, Distiller, attention_loss, build_student, distill, feature_loss,
                             kd_loss)
from slimkit.distillation.run import parse_student_spec
from slimkit.train import TrainConfig


def test_kd_loss_matches_float64_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.0, 4.0):
        p = torch.softmax(t / temperature, -1)
        q = torch.softmax(s / temperature, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
        torch.testing.assert_close(kd_loss(s, t, temperature), expected)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-12)  # a student equal to its teacher: no loss
    # with T^2 the gradient keeps its scale as T grows: it tends to logit matching, (s - t) / classes / batch
    s32 = s.float().requires_grad_(True)
    kd_loss(s32, t.float(), 500.0).backward()
    centered = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(s32.grad, (centered(s.float()) - centered(t.float())) / 10 / 8, rtol=0.05,
                               atol=1e-4)
    assert float(feature_loss(torch.ones(2, 3), torch.zeros(2, 3))) == 1.0
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_loss(torch.ones(2, 3), torch.zeros(2, 4))


def test_student_specs():
    assert parse_student_spec("lenet5:width=0.25") == {"zoo": "lenet5", "args": {"width": 0.25}}
    assert parse_student_spec("lenet300:hidden=[64,32],in_features=64") == {
        "zoo": "lenet300", "args": {"hidden": [64, 32], "in_features": 64}}
    assert parse_student_spec("vit") == {"zoo": "vit", "args": {}}
    with pytest.raises(SlimkitError, match="expected name:key=value"):
        parse_student_spec("vit:depth")


def test_teacher_is_frozen_and_projections_bridge_widths(digits, briefly_trained):
    task = Task.classification(digits)
    teacher = briefly_trained("lenet5")
    before = copy.deepcopy(teacher.state_dict())
    student = build_student("lenet5:width=0.5", task)
    cfg = DistillConfig(features={"conv2": "conv2", "fc2": "fc2"})
    distiller = Distiller(student, copy.deepcopy(teacher), cfg, digits.x_test)
    assert set(distiller.projections) == {"conv2"}  # 16 -> 32 channels; fc2 has the same width in both
    assert isinstance(distiller.projections["conv2"], nn.Conv2d)
    distiller.train()
    assert not distiller.teacher.training and distiller.student.training
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    x, y = digits.x_train[:32], digits.y_train[:32]
    distiller.loss(distiller(x), y).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert distiller.projections["conv2"].weight.grad is not None and student.conv1.weight.grad is not None
    trained, result = distill(build_student("lenet5:width=0.5", task), teacher, task, cfg,
                              TrainConfig(epochs=2, lr=3e-3), progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    assert not trained.training and len(result.history) == 2
    assert not trained._forward_hooks and not trained.conv2._forward_hooks  # hooks removed
    with pytest.raises(SlimkitError, match="has no layer"):
        Distiller(student, teacher, DistillConfig(features={"conv9": "conv2"}), digits.x_test)
    with pytest.raises(SlimkitError, match="differ beyond their width"):
        Distiller(student, teacher, DistillConfig(features={"conv1": "fc1"}), digits.x_test)


def test_a_student_equal_to_its_teacher_has_only_the_label_loss(digits, briefly_trained):
    teacher = briefly_trained("lenet300")
    distiller = Distiller(copy.deepcopy(teacher), teacher, DistillConfig(alpha=0.5, features={"fc2": "fc2"}),
                          digits.x_test)
    distiller.train()
    x, y = digits.x_train[:64], digits.y_train[:64]
    logits = distiller(x)
    expected = 0.5 * nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(distiller.loss(logits, y), expected, rtol=1e-5, atol=1e-6)


def test_mutual_distillation_trains_both_peers(digits, briefly_trained):
    task = Task.classification(digits)
    peer = briefly_trained("lenet300")
    student = build_student("lenet300:hidden=[32,16]", task)
    distiller = Distiller(student, copy.deepcopy(peer), DistillConfig(mutual=True), digits.x_test)
    distiller.train()
    assert distiller.teacher.training
    distiller.loss(distiller(digits.x_train[:32]), digits.y_train[:32]).backward()
    assert distiller.teacher.fc1.weight.grad is not None and distiller.student.fc1.weight.grad is not None
    trained, _ = distill(student, peer, task, DistillConfig(mutual=True), TrainConfig(epochs=2), progress=False)
    assert trained.fc1.out_features == 32


def test_distill_stage_recovers_a_pruned_model_and_trains_new_students(cli, trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.95, "scope": "global"},
                                      {"type": "finetune", "epochs": 2, "lr": 1e-3},
                                      {"type": "distill", "train": {"epochs": 3}}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    pruned, finetuned, recovered = report["stages"][1:4]
    assert finetuned["nonzero_params"] == pruned["nonzero_params"]  # recovery never regrows pruned weights
    assert recovered["nonzero_params"] == pruned["nonzero_params"]
    assert recovered["accuracy"] >= pruned["accuracy"]
    assert recovered["notes"]["distill"]["teacher_val_score"] > 0.9
    assert len(finetuned["notes"]["training"]["finetune"]["history"]) == 2
    assert (tmp_path / "r" / "report.html").read_text().count("Training curves") == 1
    with pytest.raises(SlimkitError, match="cannot teach itself"):
        parse_recipe({"model": {"path": str(trained_run)}, "stages": [{"type": "distill", "teacher": "input"}]})
    proc = cli("distill", "--teacher", str(trained_run), "--student",
               "lenet300:hidden=[64,32]", "--epochs", "3", "--feature", "fc2=fc2", "--no-latency",
               "--no-progress", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    student = load(tmp_path / "c")
    assert student.fc1.out_features == 64 and student.fc2.out_features == 32
    proc = cli("distill", "--teacher", str(trained_run), "--student",
               "lenet300:hidden=[64,32]", "--feature", "fc2", "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "STUDENT_LAYER=TEACHER_LAYER" in proc.stderr
    proc = cli("distill", "--teacher", str(trained_run), "--student",
               "lenet300", "--attention", "fc1=fc1", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "holds 0 nn.Softmax modules" in proc.stderr  # an MLP has no attention maps


def test_recovery_section_on_a_compression_stage(trained_run, tmp_path):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.95, "scope": "global",
                                       "recovery": {"type": "distill", "train": {"epochs": 2}}}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][1]["notes"]["recovery"]
    assert notes["type"] == "distill" and notes["val_score_after"] >= notes["val_score_before"]
    assert report["stages"][1]["nonzero_params"] < 0.1 * report["stages"][0]["nonzero_params"]  # still pruned
    assert (tmp_path / "r" / "stages" / "00-prune" / "recovery" / "checkpoint" / "last.pt").is_file()
    for bad, message in (({"type": "prune"}, "type must be one of finetune, distill"),
                         ({"type": "finetune", "epochs": -1}, "recovery \\(finetune\\)"),
                         ({"type": "finetune", "recovery": {"type": "finetune"}}, "no recovery of its own")):
        with pytest.raises(SlimkitError, match=message):
            parse_recipe({"model": {"path": str(trained_run)},
                          "stages": [{"type": "prune", "sparsity": 0.5, "recovery": bad}]})
    with pytest.raises(SlimkitError, match="does not change the model"):
        parse_recipe({"model": {"path": str(trained_run)},
                      "stages": [{"type": "export", "recovery": {"type": "finetune"}}]})


def test_attention_loss_matches_float64_kl():
    g = torch.Generator().manual_seed(0)
    maps = lambda *shape: torch.softmax(3 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)  # noqa: E731
    s, t = maps(2, 4, 5, 5), maps(2, 4, 5, 5)
    torch.testing.assert_close(attention_loss(s, t), (t * (t.log() - s.log())).sum(-1).mean())
    assert float(attention_loss(t, t)) == pytest.approx(0.0, abs=1e-12)
    s2 = maps(2, 2, 5, 5)  # two student heads against four teacher heads: the mean maps are compared
    ms, mt = s2.mean(1, keepdim=True), t.mean(1, keepdim=True)
    torch.testing.assert_close(attention_loss(s2, t), (mt * (mt.log() - ms.log())).sum(-1).mean())
    one_hot = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    one_hot[..., 0] = 1.0  # a teacher that gives keys no weight, a student that underflowed to zero: finite
    assert torch.isfinite(attention_loss(one_hot.flip(-1), one_hot))
    with pytest.raises(ValueError, match="beyond their head count"):
        attention_loss(maps(2, 4, 5, 5), maps(2, 4, 3, 3))


def test_attention_maps_distil_from_a_deeper_teacher(digits):
    task = Task.classification(digits)
    teacher = build_student("vit", task, seed=1)
    student = build_student("vit:depth=2,heads=2", task)
    pairs = {"blocks.0.attn": "blocks.1.attn", "blocks.1.attn": "blocks.3.attn"}
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).softmax.register_forward_hook(
        lambda _m, _i, out, key=f"{side}:{name}": seen.__setitem__(key, out.double()))
        for side, model, names in (("s", student, pairs), ("t", teacher, pairs.values())) for name in names]
    x, y = digits.x_train[:16], digits.y_train[:16]
    losses = {}
    for weight in (0.0, 2.0):
        distiller = Distiller(student, teacher, DistillConfig(attention=pairs, attention_weight=weight), digits.x_test)
        distiller.train()
        losses[weight] = distiller.loss(distiller(x), y)
        distiller.close()
    expected = sum(attention_loss(seen[f"s:{s}"], seen[f"t:{t}"]) for s, t in pairs.items())
    torch.testing.assert_close(losses[2.0].double() - losses[0.0].double(), 2 * expected, rtol=1e-5, atol=1e-6)
    losses[2.0].backward()
    for hook in hooks:
        hook.remove()
    assert student.blocks[0].attn.q.weight.grad.abs().sum() > 0
    with pytest.raises(SlimkitError, match="holds 0 nn.Softmax"):
        Distiller(student, teacher, DistillConfig(attention={"blocks.0.fc1": "blocks.1.attn"}), digits.x_test)
    with pytest.raises(SlimkitError, match="over the same tokens"):
        Distiller(build_student("vit:patch=4,depth=1", task), teacher,
                  DistillConfig(attention={"blocks.0.attn": "blocks.0.attn"}), digits.x_test)
    trained, result = distill(student, teacher, task, DistillConfig(attention=pairs), TrainConfig(epochs=1),
                              progress=False)
    assert len(result.history) == 1 and not trained.blocks[0].attn.softmax._forward_hooks
