"""Recovery training keeps compression: pruned zeros, shared values, quantization grids (and still exports)."""

import itertools
import json

import pytest
import torch

from slimkit import SlimkitError, Task, parse_recipe, run_recipe
from slimkit.data import calibration_subset
from slimkit.distillation import DistillConfig, distill
from slimkit.export.qdq import export_int8_verified
from slimkit.pruning.mask import remove_masks
from slimkit.pruning.unstructured import PruneConfig, prune_weights
from slimkit.quant.ops import group_fake_quant
from slimkit.quant.ptq import StaticQuantConfig, quantize_static, weight_scale_buffer
from slimkit.share.cluster import ClusterConfig, cluster
from slimkit.train import TrainConfig, fit
from slimkit.train.compressed import compression_kept


def _train(model, task, epochs=2, lr=1e-3):
    """Fine-tune inside ``compression_kept``; the last epoch always counts as the best (the weights do move)."""
    cfg = TrainConfig(epochs=epochs, lr=lr)
    with compression_kept(model):
        fit(model, task.train_batches(cfg), None, cfg, score_fn=lambda m, c=itertools.count(): next(c),
            progress=False)
    return model


def _quantized(model, digits, **settings):
    gm, step = quantize_static(model, calibration_subset(digits, 256), StaticQuantConfig(**settings))
    gm.slimkit_meta = {**model.slimkit_meta, "plan": [step]}
    return gm, step


def _pruned(model, task, sparsity=0.6):
    prune_weights(model, PruneConfig(sparsity=sparsity), task)
    return remove_masks(model)


def test_a_pruned_quantized_model_trains_on_its_grids(digits, briefly_trained, tmp_path):
    task = Task.classification(digits)
    gm, step = _quantized(_pruned(briefly_trained("lenet300"), task), digits)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    accuracy = task.val_score(gm)
    _train(gm, task)
    after = gm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in ("fc1.weight", "fc2.bias"))  # it did train
    assert not any(p.requires_grad for p in gm.parameters())
    for i, name in enumerate(step["weights"]):
        weight, scale = gm.get_parameter(name), gm.get_buffer(weight_scale_buffer(i))
        assert bool((weight[before[name] == 0] == 0).all()), name  # pruned zeros stay (a weight may round to 0)
        assert torch.equal(weight, torch.fake_quantize_per_channel_affine(
            weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)), name  # on the int8 grid
        bias, (s_x, _) = gm.get_parameter(name.replace("weight", "bias")), step["activations"][step["weights"][name]["input"]]
        unit = scale.double() * s_x
        assert torch.equal(bias, (torch.round(bias.double() / unit) * unit).float()), name  # on the int32 grid
    assert torch.equal(gm.get_buffer(weight_scale_buffer(0)), before[weight_scale_buffer(0)])  # scales fixed
    assert task.val_score(gm) >= accuracy - 0.02
    check = export_int8_verified(gm, tmp_path / "q.onnx", digits.x_test)  # still exactly what the runtime runs
    assert check["top1_agreement"] >= 0.99


def test_int4_group_weights_train_on_their_grids_and_log_levels_refuse(digits, briefly_trained):
    task = Task.classification(digits)
    gm, step = _quantized(briefly_trained("lenet300"), digits, activations="none", weight_bits=4, group_size=32)
    before = gm.get_parameter("fc1.weight").clone()
    _train(gm, task, lr=5e-3)  # a 4-bit step is coarse: smaller moves round back to where they were
    for i, name in enumerate(step["weights"]):
        weight = gm.get_parameter(name)
        assert torch.equal(weight, group_fake_quant(weight, gm.get_buffer(weight_scale_buffer(i)), 32, 7)), name
    assert not torch.equal(before, gm.get_parameter("fc1.weight"))
    log_gm, _ = _quantized(briefly_trained("lenet300"), digits, weight_levels="log", weight_bits=4)
    with pytest.raises(SlimkitError, match="power-of-two weights"):
        _train(log_gm, task, epochs=1)


def test_shared_values_stay_shared_and_half_precision(digits, briefly_trained):
    task = Task.classification(digits)
    model = _pruned(briefly_trained("lenet300"), task, 0.5)
    cluster(model, ClusterConfig(bits=4, codebook_dtype="float16", include=["fc1", "fc2"], biases=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, task)
    for name in ("fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias"):
        weight = model.get_parameter(name)
        assert weight.requires_grad and torch.equal(before[name] == 0, weight == 0), name
        values = torch.unique(weight[weight != 0])
        assert len(values) <= 16 and not torch.equal(values, torch.unique(before[name][before[name] != 0]))
        assert torch.equal(weight.half().float(), weight), name  # the trained codebook is back on fp16
    fc3 = model.get_parameter("fc3.weight")  # pruned, not shared: trained through a mask of its non-zeros
    assert torch.equal(before["fc3.weight"] == 0, fc3 == 0) and not torch.equal(before["fc3.weight"], fc3)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def test_a_quantized_student_distils_in_a_recipe(trained_run, tmp_path, digits, briefly_trained):
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "sparsity": 0.9, "scope": "global"},
                                      {"type": "quantize", "scheme": "int8-static"},
                                      {"type": "distill", "train": {"epochs": 3, "lr": 1e-3}},
                                      {"type": "export", "format": "onnx-int8"}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    quantized, distilled = report["stages"][2:4]
    assert distilled["nonzero_params"] <= quantized["nonzero_params"]  # nothing regrows
    assert distilled["notes"]["training"]["distill"]["best_epoch"] >= 0  # training beat the quantized start
    assert distilled["accuracy"] >= quantized["accuracy"] - 0.01
    assert float(report["artifacts"]["onnx_int8_top1_agreement"]) >= 0.99  # the trained model still exports
    task = Task.classification(digits)
    gm, _ = _quantized(briefly_trained("lenet300"), digits)
    with pytest.raises(SlimkitError, match="did not run in its forward pass"):
        distill(gm, briefly_trained("lenet300"), task, DistillConfig(features={"fc2": "fc2"}), TrainConfig(epochs=1))


def test_a_quantized_input_model_refuses_float_only_stages(digits, briefly_trained, tmp_path):
    from slimkit import save

    gm, _ = _quantized(briefly_trained("lenet300"), digits)
    save(gm, tmp_path / "q")
    recipe = parse_recipe({"model": {"path": str(tmp_path / "q")}, "evaluate": {"latency": False},
                           "stages": [{"type": "factorize"}]})
    with pytest.raises(SlimkitError, match="a factorize stage works on float weights, but the model entering it is "
                                           "quantized"):
        run_recipe(recipe, tmp_path / "r", progress=False)
    # recovery stages do take it (regression: the pipeline's copy of a loaded quantized model lost its metadata)
    recipe = parse_recipe({"model": {"path": str(tmp_path / "q")}, "evaluate": {"latency": False},
                           "stages": [{"type": "finetune", "epochs": 1}]})
    report = run_recipe(recipe, tmp_path / "f", progress=False)
    assert report["final"]["accuracy"] >= report["baseline"]["accuracy"] - 0.02
    meta = json.loads((tmp_path / "f" / "model" / "slimkit.json").read_text())
    assert meta["tensors"]["fc1.weight"]["encoding"] == "int8-channel"
