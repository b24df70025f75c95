"""A task is what a model is trained and measured on; the pipeline and every stage see only this.

``Task.classification(splits)`` covers the built-in data, ``Task.from_loaders`` a classifier's own
DataLoaders (or any re-iterable of batches), and ``as_task`` turns whatever a verb is given (a
``Task``, ``Splits``, loaders, a tensor of inputs, nothing) into one. Any other task (regression,
detection, embeddings) is a ``Task`` built from the user's own loaders, loss and scores, so it can
be compressed and measured the same way. A task without labels (calibration inputs only) cannot
score a model: its scores are NaN and training on it is refused.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import Splits, first_samples, make_loader
from .data.datasets import global_batch_share
from .errors import SlimkitError
from .inputs import InputSpec, Inputs, MultiInput, as_inputs, call, describe, recorded_signature, signature
from .models.outputs import prediction
from .models.text import is_embedder, pack_named_batch, synthetic_inputs, text_spec, trim_padding
from .limits import first_line
from .train.distributed import world
from .train.loop import Batch, LossFn, ScoreFn, TrainConfig, evaluate

if TYPE_CHECKING:
    from .data.text import TextSplits


@dataclass(frozen=True)
class Task:
    """Training batches, validation and test scores (higher is better) and held-out example inputs.

    ``train_batches(cfg)`` returns a re-iterable of ``(x, target)`` batches for a
    training config (its batch size, seed, augmentation); ``example_inputs`` are
    held-out inputs used to verify exports and to time latency (a ``MultiInput`` for a
    model that takes several tensors).
    """

    name: str
    train_batches: Callable[[TrainConfig], Iterable[Batch]]
    val_score: ScoreFn
    test_score: ScoreFn
    example_inputs: Inputs
    loss_fn: LossFn | None = None
    metric: str = "accuracy"
    splits: Splits | None = None
    describe: dict[str, Any] = field(default_factory=dict)
    can_score: bool = True  # False for inputs without labels: nothing to train on or to score
    extra_scores: Callable[[nn.Module], dict[str, float]] | None = None  # more test-split measures, per stage

    @property
    def input_shape(self) -> tuple[int, ...] | InputSpec:
        """One input's per-sample shape, or the spec of several inputs."""
        return signature(self.example_inputs)

    def check_model(self, model: nn.Module) -> None:
        """Refuse, naming both shapes, a model that cannot run on this task's inputs, or (classification)
        has fewer outputs than the data has classes: a clear error before any work, not one deep in a loss."""
        x = self.example_inputs[:2]
        recorded = recorded_signature(getattr(model, "slimkit_meta", {}))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = prediction(call(model, x.to(next((p.device for p in model.parameters()), torch.device("cpu")))))
        except Exception as exc:  # noqa: BLE001 - whatever the model's own code raises on inputs it cannot take
            built_for = f" (it was built for {_describe_signature(recorded)})" if recorded else ""
            raise SlimkitError(f"the model cannot run on this data: inputs are {describe(x)}{built_for}: "
                               f"{type(exc).__name__}: {first_line(exc)}{_several_inputs_hint(model, x)}") from None
        finally:
            model.train(was_training)
        if self.splits is None:
            return
        classes = self.splits.num_classes
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SlimkitError(f"a classification model must return logits of shape [batch, classes], got {got}")
        if out.shape[1] < classes:
            raise SlimkitError(f"the data's labels go up to {classes - 1}, but the model has {out.shape[1]} outputs "
                               f"(classes 0..{out.shape[1] - 1})")

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Accuracy and loss per split for classification; the two scores otherwise."""
        if self.splits is None:
            return {"val_score": self.val_score(model), "test_score": self.test_score(model)}
        out: dict[str, float] = {}
        for which in ("train", "val", "test"):
            for key, value in evaluate(model, make_loader(self.splits, which, 256)).items():
                out[f"{which}_{key}"] = value
        return out

    @classmethod
    def classification(cls, splits: Splits) -> "Task":
        val, test = make_loader(splits, "val", 256), make_loader(splits, "test", 256)

        def train_batches(cfg: TrainConfig):
            return make_loader(splits, "train", cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment)

        return cls(
            name=splits.name,
            train_batches=train_batches,
            val_score=lambda m: evaluate(m, val)["accuracy"],
            test_score=lambda m: evaluate(m, test)["accuracy"],
            example_inputs=splits.x_test,
            splits=splits,
            describe={"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test),
                      "num_classes": splits.num_classes},
        )

    @classmethod
    def text(cls, splits: "TextSplits", model: nn.Module) -> "Task":
        """A task for a text model on text data, measured against ``model`` itself as it is now (the uncompressed
        reference). A sentence embedder (or a base encoder) is scored by cosine similarity to the reference's
        outputs and trained towards them; a classifier by accuracy on the data's labels, or without labels by
        agreement with the reference's predictions."""
        from .analyze.embedding import embed, embedding_scores, cosine_to_reference
        from .data.datasets import Splits
        from .models.text import pools_tokens, tokenize

        spec = text_spec(model)
        if spec is None:
            raise SlimkitError(f"text data ({splits.name}) needs a text model (a Hugging Face directory); this "
                               f"model is a {type(model).__name__}")
        x = [tokenize(model, splits.split(which)) for which in ("train", "val", "test")]
        reference = [embed(model, part) for part in x]
        describe = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                    "tokens": max(part.shape[-1] for part in x)}
        if spec["task"] == "sequence-classification":
            labels = splits.labels or tuple(r.argmax(dim=-1) for r in reference)
            labelled = Splits(splits.name, x[0], torch.as_tensor(labels[0]), x[1], torch.as_tensor(labels[1]),
                              x[2], torch.as_tensor(labels[2]))
            task = cls.classification(labelled)
            metric = "accuracy" if splits.labels else "agreement"
            return replace(task, metric=metric, describe={**task.describe, **describe})
        by_split = dict(zip(("val", "test"), zip(x[1:], reference[1:])))

        def score(which: str) -> ScoreFn:
            inputs, ref = by_split[which]
            return lambda m: float(cosine_to_reference(embed(m, inputs), ref).mean())

        def train_batches(cfg: TrainConfig):
            generator = torch.Generator().manual_seed(cfg.seed)
            rank, size = world()
            collate = functools.partial(text_batch_share, trim=pools_tokens(model), rank=rank, size=size)
            return DataLoader(TensorDataset(x[0], reference[0]), batch_size=cfg.batch_size, shuffle=True,
                              generator=generator, collate_fn=collate)

        return cls(name=splits.name, train_batches=train_batches, val_score=score("val"), test_score=score("test"),
                   example_inputs=x[2], loss_fn=_cosine_distance, metric="cosine", describe=describe,
                   extra_scores=lambda m: embedding_scores(embed(m, x[2]), reference[2]))

    @classmethod
    def from_loaders(cls, train: Iterable, val: Iterable | None = None, test: Iterable | None = None, *,
                     transform_fn: Callable[[Any], Any] | None = None, loss_fn: LossFn | None = None,
                     name: str = "loaders") -> "Task":
        """A classification task from the user's own batches: DataLoaders, or any re-iterable of batches that
        are ``(inputs, labels)`` (or become that through ``transform_fn``, for dict batches). Validation and
        test accuracy come from ``val`` and ``test`` (``test`` defaults to ``val``); the loaders keep their
        own batch size and order (a training config's ``batch_size``/``seed``/``augment`` do not apply)."""
        train, val, test = (_Batches(b, transform_fn) if b is not None else None for b in (train, val, test or val))
        example = train.example_inputs()
        if not train.labelled:
            raise SlimkitError("Task.from_loaders needs labelled training batches: (inputs, labels), or a "
                               "transform_fn that returns them")
        score = (lambda batches: lambda m: evaluate(m, batches, loss_fn)["accuracy"])
        return cls(name=name, train_batches=lambda cfg: train, example_inputs=example, loss_fn=loss_fn,
                   val_score=score(val) if val is not None else _cannot_score,
                   test_score=score(test) if test is not None else _cannot_score,
                   can_score=val is not None, describe={"source": "loaders"})

    @classmethod
    def from_inputs(cls, inputs: Inputs | Mapping | Iterable, transform_fn: Callable[[Any], Any] | None = None,
                    name: str = "inputs") -> "Task":
        """Inputs without labels: calibration data and example inputs, nothing to train on or to score. One
        batch (a tensor, or a dict of a model's named inputs) or batches of them."""
        batches = _Batches(_one_batch_or_many(inputs), transform_fn)
        return cls(name=name, train_batches=lambda cfg: batches, val_score=_cannot_score, test_score=_cannot_score,
                   example_inputs=batches.example_inputs(), can_score=False, describe={"source": "inputs"})


def _describe_signature(sig: tuple[int, ...] | InputSpec) -> str:
    if isinstance(sig, InputSpec):
        return ", ".join(f"{t.name} {t.shape}" for t in sig.tensors)
    return str(list(sig))


def _several_inputs_hint(model: nn.Module, x: Inputs) -> str:
    """How to give a model that takes several tensors its batches, when it was given one tensor."""
    if isinstance(x, MultiInput):
        return ""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) < 2:
        return ""
    names = ", ".join(required)
    return (f" (the model takes {len(required)} inputs, {names}: give batches as (({names}), labels), "
            f"a dict of them by name, or a transform_fn that returns one of those)")


def text_batch_share(samples: list[tuple[torch.Tensor, torch.Tensor]], trim: bool, rank: int = 0,
                     size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch of texts and reference outputs (all of it when alone; under torchrun
    every rank draws the same global batches), the texts cut to the share's longest where ``trim`` (a pooled
    model's outputs do not change)."""
    texts, targets = global_batch_share(samples, augment=False, rank=rank, size=size)
    return (trim_padding(texts) if trim else texts), targets


def _cosine_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1 - nn.functional.cosine_similarity(output.flatten(1), target.flatten(1), dim=1)).mean()


def _cannot_score(model: nn.Module) -> float:
    return float("nan")


def task_from_spec(spec: str, seed: int = 0, model: nn.Module | None = None) -> Task:
    """The task a ``--data`` spec names: image data is classification; text data (``docstrings``, ``.txt``,
    ``.jsonl``) is measured against ``model``, the uncompressed text model."""
    from .data import load_data
    from .data.text import is_text_spec, load_text

    if not is_text_spec(spec):
        return Task.classification(load_data(spec, seed=seed))
    if model is None:
        raise SlimkitError(f"text data {spec!r} is measured against the model it compresses: name a model "
                           "(a Hugging Face directory or a slimkit model directory), not a zoo model to train")
    return Task.text(load_text(spec, seed=seed), model)


def as_task(data: Any, transform_fn: Callable[[Any], Any] | None = None, model: nn.Module | None = None) -> Task:
    """The task a verb works with: a ``Task`` as it is, ``Splits`` (classification), labelled batches
    (``Task.from_loaders``: validation scores need a ``Task``), a tensor or batches of inputs only, or
    nothing (inputs of the model's recorded shape, random: enough to trace it, not to measure it)."""
    if isinstance(data, Task):
        return data
    if isinstance(data, Splits):
        return Task.classification(data)
    if data is None:
        recorded = recorded_signature(getattr(model, "slimkit_meta", {}))
        if not recorded:
            raise SlimkitError("no data given and the model records no input_shape: pass data (a Task, Splits, "
                               "a DataLoader or a tensor of inputs)")
        return Task.from_inputs(synthetic_inputs(model, recorded, 8), name="random inputs")
    if model is not None and text_spec(model) is not None:
        transform_fn = _then_packed(transform_fn, labels=not is_embedder(model))
    batches = _Batches(_one_batch_or_many(data), transform_fn)
    if batches.labelled:
        return Task.from_loaders(data, transform_fn=transform_fn, name="batches")
    return Task.from_inputs(data, transform_fn)


def _one_batch_or_many(data: Any) -> Iterable:
    """``data`` as batches: a tensor or a dict of named tensors is one batch, anything else holds batches."""
    return [data] if isinstance(data, (torch.Tensor, MultiInput, Mapping)) else data


def _then_packed(transform_fn: Callable[[Any], Any] | None, labels: bool) -> Callable[[Any], Any]:
    """``transform_fn`` (if any), then a dict batch of named text inputs packed for a text model."""
    def transform(batch: Any) -> Any:
        return pack_named_batch(transform_fn(batch) if transform_fn is not None else batch, labels)
    return transform


class _Batches:
    """A re-iterable view of the user's batches as ``(inputs, target)``: a batch may be a tensor (inputs only),
    an ``(inputs, target)`` pair, or anything ``transform_fn`` turns into one of those."""

    def __init__(self, source: Iterable, transform_fn: Callable[[Any], Any] | None):
        if isinstance(source, Iterator):  # a generator can be read once: keep what it gives
            source = list(source)
        try:
            iter(source)
        except TypeError:
            raise SlimkitError(f"data must be batches (a DataLoader or any iterable), got "
                               f"{type(source).__name__}") from None
        self.source, self.transform_fn = source, transform_fn

    def __iter__(self) -> Iterator[tuple[Inputs, Any]]:
        return (self._split(batch) for batch in self.source)

    def __len__(self) -> int:
        try:
            return len(self.source)
        except TypeError:
            return sum(1 for _ in self.source)

    @property
    def labelled(self) -> bool:
        return next(iter(self), (None, None))[1] is not None

    def example_inputs(self, limit: int = 64) -> Inputs:
        return first_samples((x for x, _ in self), limit)

    def _split(self, batch: Any) -> tuple[Inputs, Any]:
        if self.transform_fn is not None:
            batch = self.transform_fn(batch)
        if isinstance(batch, (torch.Tensor, MultiInput)):
            return batch, None
        if isinstance(batch, Mapping):  # named inputs, labels under "labels" or "label" (Hugging Face's way)
            label_keys = [key for key in LABEL_KEYS if key in batch]
            inputs = {key: value for key, value in batch.items() if key not in label_keys}
            return MultiInput(inputs), batch[label_keys[0]] if label_keys else None
        if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and _is_inputs(batch[0]):
            return as_inputs(batch[0]), batch[1] if len(batch) == 2 else None
        raise SlimkitError(f"a batch is a {type(batch).__name__}{_sizes(batch)}, not inputs or (inputs, target): "
                           "inputs are a tensor, a tuple of tensors or a dict of them (by name); pass "
                           "transform_fn=... that returns inputs or (inputs, target), e.g. lambda b: ((b[0], b[1]), "
                           "b[2]) for a model taking two tensors, or lambda b: (b['pixel_values'], b['labels'])")


LABEL_KEYS = ("labels", "label")


def _is_inputs(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, MultiInput)):
        return True
    values = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def _sizes(batch: Any) -> str:
    return f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""
