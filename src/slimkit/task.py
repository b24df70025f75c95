"""A task is what a model is trained and measured on; the pipeline and every stage see only this.

``Task.classification(splits)`` covers the built-in data. Any other task
(regression, detection, embeddings) is a ``Task`` built from the user's own
loaders, loss and scores, so it can be compressed and measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .data import Splits, make_loader
from .errors import SlimkitError
from .limits import first_line
from .train.loop import Batch, LossFn, ScoreFn, TrainConfig, evaluate


@dataclass(frozen=True)
class Task:
    """Training batches, validation and test scores (higher is better) and held-out example inputs.

    ``train_batches(cfg)`` returns a re-iterable of ``(x, target)`` batches for a
    training config (its batch size, seed, augmentation); ``example_inputs`` are
    held-out inputs used to verify exports and to time latency.
    """

    name: str
    train_batches: Callable[[TrainConfig], Iterable[Batch]]
    val_score: ScoreFn
    test_score: ScoreFn
    example_inputs: torch.Tensor
    loss_fn: LossFn | None = None
    metric: str = "accuracy"
    splits: Splits | None = None
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_inputs.shape[1:])

    def check_model(self, model: nn.Module) -> None:
        """Refuse, naming both shapes, a model that cannot run on this task's inputs, or (classification)
        has fewer outputs than the data has classes: a clear error before any work, not one deep in a loss."""
        x = self.example_inputs[:2]
        recorded = getattr(model, "slimkit_meta", {}).get("input_shape")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x.to(next((p.device for p in model.parameters()), x.device)))
        except Exception as exc:  # noqa: BLE001 - whatever the model's own code raises on inputs it cannot take
            built_for = f" (it was built for {list(recorded)})" if recorded else ""
            raise SlimkitError(f"the model cannot run on this data: inputs are {list(x.shape[1:])}{built_for}: "
                               f"{type(exc).__name__}: {first_line(exc)}") from None
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
