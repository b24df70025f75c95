"""Transformer structure: dropping encoder layers (a plan step replayed on load) and exporting a pruned text model
as a Hugging Face directory that transformers itself loads."""

import pytest
import torch
from test_text import tiny_text_dir

import slimkit
from slimkit import SlimkitError
from slimkit.data.text import docstring_corpus
from slimkit.export.huggingface import export_huggingface
from slimkit.models.text import import_transformers, tokenize
from slimkit.pruning.layers import drop_layers, spaced_layers
from slimkit.pruning.structured import prune_channels


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return tiny_text_dir(tmp_path_factory.mktemp("hf") / "four", layers=4)


def test_spaced_layers_end_with_the_last_layer():
    assert spaced_layers(6, 3) == [1, 3, 5] and spaced_layers(12, 4) == [2, 5, 8, 11] and spaced_layers(4, 1) == [3]
    for bad in (0, 6):
        with pytest.raises(SlimkitError, match="fewer than 6"):
            spaced_layers(6, bad)


def test_dropped_layers_are_the_originals_and_replay_on_load(four_layers, tmp_path):
    model = slimkit.load(four_layers)
    x = tokenize(model, docstring_corpus()[:8])
    dropped, step = drop_layers(model, 2)
    assert step == {"op": "drop-layers", "container": "encoder.encoder.layer", "original": 4, "keep": [1, 3]}
    layers = dropped.encoder.encoder.layer
    assert len(layers) == 2 and len(model.encoder.encoder.layer) == 4  # the input model is untouched
    assert torch.equal(layers[0].output.dense.weight, model.encoder.encoder.layer[1].output.dense.weight)
    assert dropped.encoder.config.num_hidden_layers == 2 and model.encoder.config.num_hidden_layers == 4
    with torch.no_grad():  # the same as running the original's layers 1 and 3 only
        hidden = model.encoder.embeddings(input_ids=x[:, 0], token_type_ids=x[:, 2])
        mask = (1.0 - x[:, 1, None, None, :].float()) * torch.finfo(torch.float32).min  # additive, padding masked
        for i in step["keep"]:
            hidden = model.encoder.encoder.layer[i](hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        pooled = (hidden * x[:, 1, :, None]).sum(1) / x[:, 1].sum(1, keepdim=True)
        torch.testing.assert_close(dropped(x), torch.nn.functional.normalize(pooled, dim=-1), rtol=1e-5, atol=1e-6)
    slimkit.save(dropped, tmp_path / "m")
    again = slimkit.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x), dropped(x))
    for keep, message in (([3, 1], "increasing"), ([0, 1, 2, 3], "fewer than all"), ([4], "below 4")):
        with pytest.raises(SlimkitError, match=message):
            drop_layers(model, keep)


def test_drop_layers_stage_in_a_recipe(four_layers, tmp_path):
    recipe = slimkit.parse_recipe({"model": {"path": str(four_layers)}, "data": "docstrings:limit=40",
                                   "evaluate": {"latency": False},
                                   "stages": [{"type": "drop-layers", "keep": 2, "finetune": {"epochs": 1}}]})
    report = slimkit.run_recipe(recipe, tmp_path / "r", progress=False)
    notes = report["stages"][1]["notes"]["drop_layers"]
    assert notes["kept"] == [1, 3] and notes["of"] == 4 and 0 < notes["score_before_finetune"] < 1
    assert len(slimkit.load(tmp_path / "r" / "model").encoder.encoder.layer) == 2


def test_a_pruned_model_with_dropped_layers_loads_with_transformers(four_layers, tmp_path, cli):
    transformers = import_transformers()
    model = slimkit.load(four_layers)
    x = tokenize(model, docstring_corpus()[:8])
    pruned, _ = prune_channels(model, x, 0.5, method="l1", exclude=["*pooler*", "*attention.self.*"])  # FFN only
    small, _ = drop_layers(pruned, 2)
    slimkit.save(small, tmp_path / "small")
    proc = cli("export", tmp_path / "small", "--format", "huggingface", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "2 layers, FFN width 32" in proc.stdout
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.intermediate_size == 32
    with torch.no_grad():
        hidden = loaded(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).last_hidden_state
        pooled = (hidden * x[:, 1, :, None]).sum(1) / x[:, 1].sum(1, keepdim=True)
        torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), small(x), rtol=1e-5, atol=1e-6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("open a file")["input_ids"] == tokenize(small, ["open a file"])[0, 0].tolist()
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    st = sentence_transformers.SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    vectors = st.encode(docstring_corpus()[:8], convert_to_tensor=True)
    torch.testing.assert_close(vectors, small(x), rtol=1e-4, atol=1e-5)


def test_what_a_config_cannot_state_is_refused(four_layers, tmp_path):
    model = slimkit.load(four_layers)
    x = tokenize(model, docstring_corpus()[:8])
    uneven, _ = prune_channels(model, x, 0.5, method="l1", include=["*layer.0.intermediate*"], exclude=["*pooler*"])
    with pytest.raises(SlimkitError, match="different widths"):
        export_huggingface(uneven, tmp_path / "a")
    pooler, _ = prune_channels(model, x, 0.5, method="l1", include=["*pooler*"])
    with pytest.raises(SlimkitError, match="pooler.dense.weight has shape"):
        export_huggingface(pooler, tmp_path / "b")
    quantized = slimkit.quantize(model, scheme="int8-dynamic", calib=x)
    with pytest.raises(SlimkitError, match="ONNX file"):
        export_huggingface(quantized, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_stack_whose_blocks_change_shape_is_refused_by_the_stage(digits, tmp_path):
    """mobilenetv2's blocks are one type but change width and stride: dropping some breaks the forward pass."""
    from slimkit.models import build_model
    from slimkit.pruning.stage import DropLayersStage
    from slimkit.stages import StageContext

    model = build_model({"zoo": "mobilenetv2"})
    ctx = StageContext(slimkit.Task.classification(digits), tmp_path, tmp_path / "s", progress=False,
                       baseline=build_model({"zoo": "mobilenetv2"}))
    with pytest.raises(SlimkitError, match="no longer runs"):
        DropLayersStage(keep=2).apply(model, ctx)


def test_attention_heads_prune_whole_under_sdpa_attention(four_layers):
    """transformers' SDPA path writes a reshape to the shape a tensor already has; it no longer stops the
    analysis: whole heads are removed, and the result equals the original with those heads' outputs cut
    off (their columns of the attention's output projection zeroed)."""
    import copy

    model = slimkit.load(four_layers)
    assert model.encoder.config._attn_implementation == "sdpa"
    x = tokenize(model, docstring_corpus()[:8])
    pruned, notes = prune_channels(model, x, 0.5, method="l1", include=["*attention.self.*"])
    groups = pruned.slimkit_meta["plan"][-1]["groups"]
    assert len(groups) == 4 and all(g["block"] == 8 and len(g["keep"]) == 16 for g in groups)
    reference = copy.deepcopy(model)
    for layer, group in zip(reference.encoder.encoder.layer, groups):
        heads = {c // 8 for c in group["keep"]}
        assert len(heads) == 2 and sorted(group["keep"]) == [h * 8 + i for h in sorted(heads) for i in range(8)]
        cut = [c for c in range(32) if c not in set(group["keep"])]
        layer.attention.output.dense.weight.data[:, cut] = 0
    assert pruned.encoder.encoder.layer[0].attention.self.query.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-6)


def test_attention_maps_of_hugging_face_layers_are_distilled_under_sdpa(four_layers):
    """Naming a BERT layer (no softmax module: SDPA never materialises the maps) distils the attention
    probabilities transformers' eager attention computes, padding masked, with gradients to the student."""
    import copy

    from slimkit.distillation.distiller import DistillConfig, Distiller
    from slimkit.distillation.losses import attention_loss

    transformers = import_transformers()
    teacher = slimkit.load(four_layers)
    texts = [*docstring_corpus()[:3], "A short one."]  # padded rows
    x = tokenize(teacher, texts)
    eager = transformers.AutoModel.from_pretrained(str(four_layers), attn_implementation="eager")
    named = transformers.AutoTokenizer.from_pretrained(str(four_layers))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = eager(**named, output_attentions=True).attentions
    pairs = {"encoder.encoder.layer.0": "encoder.encoder.layer.1",  # a layer, an attention or a self-attention
             "encoder.encoder.layer.1.attention": "encoder.encoder.layer.2.attention.self"}
    distiller = Distiller(copy.deepcopy(teacher), teacher, DistillConfig(attention=pairs), x)
    distiller.train().student.eval()  # the teacher runs (training), the student without dropout
    distiller(x)
    maps = distiller._captured
    assert torch.allclose(maps["teacher"]["attention:encoder.encoder.layer.1"], expected[1], atol=1e-6)
    assert torch.allclose(maps["teacher"]["attention:encoder.encoder.layer.2.attention.self"], expected[2], atol=1e-6)
    assert torch.allclose(maps["student"]["attention:encoder.encoder.layer.0"], expected[0], atol=1e-6)
    assert maps["student"]["attention:encoder.encoder.layer.0"][3, :, :, -1].max() == 0  # padding gets no weight
    loss = attention_loss(maps["student"]["attention:encoder.encoder.layer.1.attention"],
                          maps["teacher"]["attention:encoder.encoder.layer.2.attention.self"])
    assert loss > 1e-3 and attention_loss(expected[2], expected[2]) < 1e-6
    loss.backward()
    assert distiller.student.encoder.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0
    student, _ = drop_layers(teacher, 2)
    with pytest.raises(SlimkitError, match="0 nn.Softmax modules and 4 self-attention modules"):
        Distiller(student, teacher, DistillConfig(attention={"encoder.encoder.layer.0": "encoder"}), x)
