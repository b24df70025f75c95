"""Hugging Face text encoders as slimkit models: real inputs in, one tensor out.

Every slimkit method feeds a model one tensor per batch. A text model takes three (token ids,
attention mask, token type ids), so slimkit carries them packed as one integer tensor
``[batch, 3, tokens]``; ``TextModel`` unpacks it, runs the encoder with the mask, and applies the
head its task needs: ``sentence-embedding`` (mean or CLS pooling over the real tokens, then L2
normalisation, as a sentence-transformers model card prescribes), ``sequence-classification``
(logits) or ``base`` (the last hidden states). Called from Python it also takes the inputs by
name, as a tokenizer returns them: ``model(**tokenizer(texts, return_tensors="pt", padding=True))``.

The architecture spec stores the Hugging Face config itself, not a path, so a compressed model
directory is self-contained. The tokenizer travels with the model in ``slimkit_meta`` (every verb keeps
it, a quantized graph included) and is saved beside the weights (``tokenizer/``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import InputSpec, Inputs
from ..limits import MAX_MODEL_ELEMENTS, echo_text

TASKS = ("sentence-embedding", "sequence-classification", "base")
POOLINGS = ("mean", "cls")
TOKENIZER_DIR = "tokenizer"  # beside the weights in a model directory
TOKENIZER_META = "tokenizer"  # slimkit_meta key holding its files while the model is in memory
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the packed batch's rows, in order
PACKED_ROWS = len(TEXT_INPUTS)


class TextModel(nn.Module):
    """A Hugging Face encoder with its task's head, taking slimkit's packed batch or named inputs."""

    def __init__(self, encoder: nn.Module, task: str, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 128):
        super().__init__()
        self.encoder = encoder
        self.task, self.pooling, self.normalize, self.max_length = task, pooling, normalize, max_length
        self.uses_token_types = getattr(encoder.config, "type_vocab_size", 0) > 0
        pooler = getattr(encoder, "pooler", None)
        if task != "sequence-classification" and isinstance(pooler, nn.Module):
            # the head reads the hidden states, never the pooler: it gets no gradient, and data-parallel
            # training (DDP) would wait for one forever unless it is frozen
            pooler.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() == 3:  # slimkit's packed batch
            input_ids, attention_mask, token_type_ids = input_ids.unbind(1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if self.uses_token_types and token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.task == "sequence-classification":
            return out.logits
        hidden = out.last_hidden_state
        if self.task == "base":
            return hidden
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def spec(self) -> dict[str, Any]:
        """The architecture spec that rebuilds this model (its current config: a pruned model's sizes)."""
        return {"huggingface": self.encoder.config.to_dict(), "task": self.task, "pooling": self.pooling,
                "normalize": self.normalize, "max_length": self.max_length}


class NamedInputs(nn.Module):
    """A text model taking its three inputs by name, as an exported graph should (the packed batch is
    slimkit's internal form only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(torch.stack([input_ids, attention_mask, token_type_ids], dim=1))


def text_spec(model: nn.Module) -> dict[str, Any] | None:
    """The architecture spec of a text model (a ``TextModel``, or what a verb made of one: a quantized graph
    carries its spec in ``slimkit_meta``), else None."""
    spec = getattr(model, "slimkit_meta", {}).get("architecture", {})
    if isinstance(spec.get("huggingface"), dict):
        return spec
    return model.spec() if isinstance(model, TextModel) else None


def is_embedder(model: nn.Module) -> bool:
    """Whether ``model`` is a text model whose outputs are vectors (an embedding or hidden states), not class
    scores."""
    spec = text_spec(model)
    return spec is not None and spec.get("task", "sentence-embedding") != "sequence-classification"


def tokenize(model: nn.Module, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    """``texts`` as one packed batch for ``model``, padded to its longest text (at most ``max_length`` tokens,
    by default the model's)."""
    spec = text_spec(model)
    files = getattr(model, "slimkit_meta", {}).get(TOKENIZER_META)
    if spec is None or not files:
        raise SlimkitError("this model has no tokenizer: load it from its model directory or its Hugging Face "
                           "directory (a .slim file holds none)")
    tokenizer = _tokenizer(tuple(sorted(files.items())))
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or spec["max_length"],
                    return_tensors="pt")
    types = enc.get("token_type_ids")
    types = torch.zeros_like(enc["input_ids"]) if types is None else types
    return torch.stack([enc["input_ids"], enc["attention_mask"], types], dim=1)


def pack_named_batch(batch: Any, labels: bool = True) -> Any:
    """A tokenizer's or data collator's dict batch (``input_ids``, optional ``attention_mask`` and
    ``token_type_ids``, optional ``labels`` or ``label``) as slimkit's packed batch, or ``(packed, labels)``
    where it has labels and ``labels`` keeps them (a classifier's, not an embedder's); anything else as it is."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return batch
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() != 2 or ids.is_floating_point():
        raise SlimkitError(f"input_ids must be integer token ids [batch, tokens], got {ids.dtype} {list(ids.shape)}")
    rows = [ids]
    for name, default in (("attention_mask", torch.ones_like(ids)), ("token_type_ids", torch.zeros_like(ids))):
        part = torch.as_tensor(batch[name]) if batch.get(name) is not None else default
        if part.shape != ids.shape:
            raise SlimkitError(f"{name} has shape {list(part.shape)}, input_ids {list(ids.shape)}")
        rows.append(part.to(ids.dtype))
    packed = torch.stack(rows, dim=1)
    target = batch.get("labels", batch.get("label"))
    return (packed, torch.as_tensor(target)) if labels and target is not None else packed


def trim_padding(batch: torch.Tensor) -> torch.Tensor:
    """A packed text batch without the trailing token positions no text of it uses (its attention mask is 0 in
    every row): a batch taken from texts padded to the longest of thousands runs at its own longest."""
    used = int(batch[:, 1].ne(0).any(0).nonzero().max()) + 1 if batch[:, 1].any() else batch.shape[-1]
    return batch[..., :max(used, 2)]


def concat_text_batches(batches: list[torch.Tensor]) -> torch.Tensor:
    """Packed text batches of different lengths (each cut to its own longest text) as one, padded to the longest
    with id 0 and attention mask 0: masked positions, which a pooled model's outputs do not depend on."""
    longest = max(batch.shape[-1] for batch in batches)
    return torch.cat([nn.functional.pad(batch, (0, longest - batch.shape[-1])) for batch in batches])


def pools_tokens(model: nn.Module) -> bool:
    """Whether a text model's output has no token axis (a pooled embedding or class scores), so that padding
    positions, masked everywhere, can be cut from its inputs without changing its outputs."""
    spec = text_spec(model)
    return spec is not None and spec.get("task", "sentence-embedding") != "base"


def synthetic_inputs(model: nn.Module, shape: tuple[int, ...] | InputSpec, batch: int,
                     generator: torch.Generator | None = None) -> Inputs:
    """Inputs of ``shape`` that ``model`` can run on, for tracing, counting and timing: for a text model, a
    packed batch of random token ids without padding; for several inputs, ``InputSpec.synthetic``; otherwise
    standard normal floats."""
    generator = generator or torch.Generator().manual_seed(0)
    if isinstance(shape, InputSpec):
        return shape.synthetic(batch, generator)
    spec = text_spec(model)
    if spec is None:
        return torch.randn(batch, *shape, generator=generator)
    ids = torch.randint(0, spec["huggingface"].get("vocab_size", 2), (batch, shape[-1]), generator=generator)
    return torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)


def dynamic_dims(model: nn.Module, sample: torch.Tensor) -> dict[int, Any]:
    """The dimensions of ``sample`` an export or capture of ``model`` keeps dynamic: the batch, and a text
    model's tokens, the last (a graph fixed to one sequence length would refuse every other)."""
    dims = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
    spec = text_spec(model)
    if spec is not None:
        dims[sample.dim() - 1] = torch.export.Dim("tokens", min=2, max=spec["max_length"])
    return dims


def read_tokenizer_files(folder: Path) -> dict[str, str]:
    """The files (name -> text) of the tokenizer saved in ``folder``, as the tokenizer itself saves them, or
    none when ``folder`` holds no tokenizer."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json")):
        return {}
    transformers = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise SlimkitError(f"{folder}: unreadable tokenizer ({echo_text(str(exc))})") from None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


@functools.lru_cache(maxsize=4)
def _tokenizer(files: tuple[tuple[str, str], ...]) -> Any:
    transformers = import_transformers()
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files:
            (Path(folder) / name).write_text(text, encoding="utf-8")
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise SlimkitError(f"unreadable tokenizer ({echo_text(str(exc))})") from None


def build_text_model(arch: dict[str, Any]) -> TextModel:
    """A ``TextModel`` from its spec: ``huggingface`` is a local directory (pretrained weights loaded) or a
    config mapping (the architecture only: the weights come from slimkit's file)."""
    transformers = import_transformers()
    task = arch.get("task", "sentence-embedding")
    pooling, normalize = arch.get("pooling", "mean"), arch.get("normalize", True)
    max_length = arch.get("max_length", 128)
    if task not in TASKS:
        raise SlimkitError(f"huggingface task {echo_text(str(task))!r}: choose one of {', '.join(TASKS)}")
    if pooling not in POOLINGS:
        raise SlimkitError(f"huggingface pooling {echo_text(str(pooling))!r}: choose one of {', '.join(POOLINGS)}")
    if not isinstance(normalize, bool) or not isinstance(max_length, int) or not 1 <= max_length <= 8192:
        raise SlimkitError("huggingface 'normalize' must be true or false and 'max_length' a whole number, 1 to 8192")
    source = arch["huggingface"]
    cls = transformers.AutoModelForSequenceClassification if task == "sequence-classification" \
        else transformers.AutoModel
    if isinstance(source, dict):
        config = _config(transformers, source)
        with torch.device("meta"):  # sizes checked before anything is allocated
            params = sum(p.numel() for p in cls.from_config(config).parameters())
        if params > MAX_MODEL_ELEMENTS:
            raise SlimkitError(f"huggingface config describes {params:,} parameters; at most {MAX_MODEL_ELEMENTS:,} "
                               "are built")
        encoder = cls.from_config(config)
    else:
        with quiet(transformers):
            encoder = cls.from_pretrained(str(_directory(source)), local_files_only=True, trust_remote_code=False)
    return TextModel(encoder, task, pooling, normalize, max_length)


def directory_spec(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """The spec of a local Hugging Face directory: a sentence-transformers directory is a sentence embedder
    with its own pooling, normalisation and length; a directory of a ``...ForSequenceClassification`` is a
    classifier; any other encoder a sentence embedder with mean pooling."""
    path = _directory(path)
    config = _read_json(path / "config.json")
    spec: dict[str, Any] = {"huggingface": str(path)}
    modules = _read_json(path / "modules.json") if (path / "modules.json").is_file() else None
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        pooling_dir = next((m.get("path") for m in modules if isinstance(m, dict)
                            and str(m.get("type", "")).endswith("Pooling")), None)
        pool = _read_json(path / str(pooling_dir) / "config.json") if pooling_dir else {}
        unsupported = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v
                       and k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token")]
        if unsupported:
            raise SlimkitError(f"{path}: pooling {unsupported[0].removeprefix('pooling_mode_')} is not supported "
                               "(mean tokens and CLS token are)")
        st = _read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() else {}
        spec.update(task="sentence-embedding", pooling="cls" if pool.get("pooling_mode_cls_token") else "mean",
                    normalize=any(t.endswith("Normalize") for t in types),
                    max_length=int(st.get("max_seq_length", 128)))
    elif any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        spec.update(task="sequence-classification", max_length=_model_max_length(config))
    else:
        spec.update(task="sentence-embedding", pooling="mean", normalize=True, max_length=_model_max_length(config))
    if task is not None:
        spec["task"] = task
    return spec


def is_huggingface_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def import_transformers():
    from .vision import import_torchvision

    try:
        import_torchvision()  # transformers imports torchvision when it is installed; make that import work
    except SlimkitError:
        pass  # not installed: transformers does without it
    try:
        import transformers
    except ImportError:
        raise SlimkitError("Hugging Face models need the 'hf' extra: pip install 'slimkit[hf]'") from None
    return transformers


@contextlib.contextmanager
def quiet(transformers) -> Iterator[None]:
    """Without transformers' progress bars (loading a small model's weights draws one per call); their
    setting is restored afterwards."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def _config(transformers, source: dict[str, Any]):
    kind = source.get("model_type")
    try:
        return transformers.AutoConfig.for_model(**source)
    except (ValueError, TypeError, KeyError) as exc:
        raise SlimkitError(f"huggingface config (model_type {echo_text(str(kind))!r}) cannot be built: "
                           f"{echo_text(str(exc))}") from None


def _directory(source: Any) -> Path:
    path = Path(str(source))
    if not (path / "config.json").is_file():
        raise SlimkitError(f"{path}: not a local Hugging Face model directory (no config.json)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SlimkitError(f"{path}: unreadable JSON ({echo_text(str(exc))})") from None


def _model_max_length(config: dict[str, Any]) -> int:
    return int(min(512, config.get("max_position_embeddings", 128)))
