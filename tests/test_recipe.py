from pathlib import Path

import pytest

from slimkit import SlimkitError, load_recipe, parse_recipe
from slimkit.stages import stage_types

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_are_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert parse_recipe(recipe.to_dict()) == recipe


def test_misspelled_keys_are_named_with_their_path(tmp_path):
    path = write(tmp_path, """
model: {zoo: lenet5, train: {epcohs: 3}}
stages:
  - {type: finetune, lrr: 0.1}
evaluat: {latency: false}
""")
    with pytest.raises(SlimkitError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "model.train.epcohs: unknown key (did you mean 'epochs'?)" in text
    assert "stages[0].lrr: unknown key (did you mean 'lr'?)" in text
    assert "evaluat: unknown key (did you mean 'evaluate'?)" in text


def test_wrong_types_name_the_expected_type(tmp_path):
    path = write(tmp_path, "model: {zoo: lenet5}\nstages: [{type: finetune, epochs: ten}]\nseed: [1]\n")
    with pytest.raises(SlimkitError) as err:
        load_recipe(path)
    assert "stages[0].epochs: Input should be a valid integer, got 'ten'" in str(err.value)
    assert "seed: Input should be a valid integer" in str(err.value)


def test_unknown_stage_type_and_missing_model(tmp_path):
    with pytest.raises(SlimkitError, match=r"stages\[0\].type: unknown stage type 'exprot' \(did you mean 'export'\?\)"):
        parse_recipe({"model": {"zoo": "lenet5"}, "stages": [{"type": "exprot"}]})
    with pytest.raises(SlimkitError, match="model: required key is missing"):
        parse_recipe({"stages": []})
    with pytest.raises(SlimkitError, match="exactly one of 'zoo'"):
        parse_recipe({"model": {"zoo": "lenet5", "path": "x"}})


def test_scientific_notation_is_a_float(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: {zoo: lenet5}\nstages: [{type: finetune, lr: 1e-4}]\n"))
    assert recipe.stages[0].lr == 1e-4


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(SlimkitError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(SlimkitError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_registry_has_the_spine_stages():
    assert {"finetune", "export"} <= set(stage_types())


def test_stages_that_need_float_weights_cannot_follow_quantize():
    with pytest.raises(SlimkitError) as err:
        parse_recipe({"model": {"zoo": "lenet5"}, "stages": [
            {"type": "prune", "sparsity": 0.5}, {"type": "quantize"}, {"type": "prune", "sparsity": 0.5},
            {"type": "finetune"}, {"type": "cluster"}, {"type": "export", "format": "onnx-int8"}]})
    message = str(err.value)
    assert "stages[2]: a prune stage works on float weights, but stages[1] (quantize)" in message
    assert "stages[4]: a cluster stage" in message
    assert "stages[0]" not in message and "stages[3]" not in message and "stages[5]" not in message
