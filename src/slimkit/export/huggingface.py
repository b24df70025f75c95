"""A compressed text model as a Hugging Face directory, which ``transformers`` (and, for a sentence embedder,
sentence-transformers) loads without slimkit.

The config states the sizes the model now has: ``num_hidden_layers`` after layer dropping, and
``intermediate_size`` after FFN neurons were pruned, when every layer kept the same number (a
BERT-family config has one size for all layers). Narrower or fewer attention heads cannot be
stated: transformers derives a head's width from ``hidden_size / num_attention_heads`` for every
layer, so such a model is refused with the reason, as is a quantized one (its integer form is an
ONNX file). The directory is checked before it appears: transformers loads it and its outputs
must equal slimkit's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ..io import atomic_dir
from ..models.text import TOKENIZER_META, TextModel, import_transformers, quiet
from ..outputs import OUTPUT_MARKER, claim_output


def huggingface_config(model: TextModel) -> dict[str, Any]:
    """The encoder's config with the sizes its layers have now; refuses what a config cannot state."""
    config = model.encoder.config.to_dict()
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    widths, attention = set(), []
    for name, module in model.encoder.named_modules():
        if name.endswith("intermediate.dense") and isinstance(module, nn.Linear):
            widths.add(module.out_features)
        if name.endswith("attention.self.query") and isinstance(module, nn.Linear) and module.out_features != hidden:
            attention.append(f"{name} ({module.out_features} of {hidden})")
    if attention:
        raise SlimkitError(f"attention heads were pruned ({', '.join(attention[:3])}): a {config.get('model_type')} "
                           f"config states {heads} heads of hidden_size / heads = {hidden // heads} values in every "
                           "layer, so transformers cannot load it; export ONNX, or prune FFN neurons and layers only")
    if len(widths) > 1:
        raise SlimkitError(f"the layers' FFNs have different widths ({sorted(widths)}): a {config.get('model_type')} "
                           "config has one intermediate_size; prune each layer by the same ratio (scope: local)")
    if widths:
        config["intermediate_size"] = widths.pop()
    return config  # (num_hidden_layers already counts the layers: dropping them updates it)


def export_huggingface(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (a float text model: pruned, layers dropped, distilled) as a Hugging Face directory
    with its tokenizer, and a sentence embedder's pooling as sentence-transformers reads it."""
    from ..quant.ptq import is_quantized

    if is_quantized(model):
        raise SlimkitError("a quantized model's integer form is an ONNX file (--format onnx-int8); export the float "
                           "model as a Hugging Face directory")
    if not isinstance(model, TextModel):
        raise SlimkitError("only a Hugging Face text model exports as a Hugging Face directory")
    tokenizer = getattr(model, "slimkit_meta", {}).get(TOKENIZER_META)
    if not tokenizer:
        raise SlimkitError("this model has no tokenizer to write beside it: load it from its model directory")
    config = huggingface_config(model)
    out = Path(out)
    with claim_output(out, "huggingface", overwrite=overwrite), atomic_dir(out) as tmp:
        _write(model, config, tokenizer, tmp)
        difference = _check(model, tmp)
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": "huggingface"}) + "\n", encoding="utf-8")
    return {"layers": config["num_hidden_layers"], "intermediate_size": config.get("intermediate_size"),
            "max_abs_diff": difference}


def _write(model: TextModel, config: dict[str, Any], tokenizer: dict[str, str], folder: Path) -> None:
    transformers = import_transformers()
    encoder = model.encoder
    hf_config = transformers.AutoConfig.for_model(**config)
    rebuilt = type(encoder)(hf_config)
    expected, state = rebuilt.state_dict(), encoder.state_dict()
    for name, value in state.items():
        if name in expected and expected[name].shape != value.shape:
            raise SlimkitError(f"{name} has shape {list(value.shape)} where a {config.get('model_type')} config can "
                               f"only state {list(expected[name].shape)}: exclude that layer from pruning")
    rebuilt.load_state_dict(state)
    with quiet(transformers):
        rebuilt.save_pretrained(folder)
    for name, text in tokenizer.items():
        if Path(name).name != name or name.startswith("."):
            raise SlimkitError(f"tokenizer file name {name!r} is not a plain file name")
        (folder / name).write_text(text, encoding="utf-8")
    if model.task == "sentence-embedding":
        pooling = folder / "1_Pooling"
        pooling.mkdir()
        (pooling / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": model.pooling == "cls",
            "pooling_mode_mean_tokens": model.pooling == "mean"}, indent=2) + "\n", encoding="utf-8")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if model.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (folder / "2_Normalize").mkdir()
        (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": model.max_length}) + "\n",
                                                           encoding="utf-8")


def _check(model: TextModel, folder: Path) -> float:
    """transformers loads the directory, and its encoder's outputs equal slimkit's on a few texts' tokens."""
    transformers = import_transformers()
    cls = type(model.encoder)
    with quiet(transformers):
        loaded = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.encoder.config.vocab_size, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    was_training = model.encoder.training
    try:
        with torch.no_grad():
            ours = model.encoder.eval()(input_ids=ids, attention_mask=mask)[0]
            theirs = loaded(input_ids=ids, attention_mask=mask)[0]
    finally:
        model.encoder.train(was_training)
    difference = float((ours - theirs).abs().max())
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise SlimkitError(f"transformers loads the exported directory with outputs {difference:.3g} away from "
                           "slimkit's; nothing was written")
    return difference
