"""Recipe stages: a registry keyed on the ``type`` of each stage config.

A stage is a frozen config class with a ``type`` literal and an ``apply``
method. Adding a compression method to recipes is one class plus
``@register_stage``; the recipe loader, the runner and the report need no
change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import ValidationError, model_validator
from torch import nn

from .config import Config
from .train.loop import TrainConfig, TrainResult, fit, on_device
from .train.run import CHECKPOINT_SUBDIR

if TYPE_CHECKING:
    from .task import Task

_STAGES: dict[str, type["Stage"]] = {}


@dataclass
class StageContext:
    """What a stage may use besides the model: the task, the run folder, and the run's settings."""

    task: "Task"
    out_dir: Path
    stage_dir: Path
    resume: bool = False
    progress: bool = True
    artifacts: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # what the stage decided, for the report
    baseline: nn.Module | None = None  # the recipe's starting model (a distillation teacher), never modified
    device: torch.device | None = None  # where training runs (None: where the model is); the model comes back

    def fit(self, model: nn.Module, cfg: TrainConfig, name: str, *, checkpoint: str | None = None,
            **kwargs: Any) -> TrainResult:
        """Train ``model`` on the task with the shared loop, checkpointed (resumable) in this stage's folder,
        on the run's device; its history goes to the report under ``name``. ``kwargs`` go to ``fit``."""
        if not self.task.can_score:
            from .errors import SlimkitError

            raise SlimkitError(f"{name} trains the model, which needs labelled data with a validation score: pass "
                               "Splits, a Task, or Task.from_loaders(train, val)")
        kwargs = {"score_fn": self.task.val_score, "loss_fn": self.task.loss_fn, **kwargs}
        folder = self.stage_dir / CHECKPOINT_SUBDIR / (checkpoint or "")
        with on_device(model, self.device):
            result = fit(model, self.task.train_batches(cfg), None, cfg, checkpoint_dir=folder, resume=self.resume,
                         progress=self.progress, description=name, **kwargs)
        self.record(name, result)
        return result

    def record(self, name: str, result: TrainResult) -> None:
        """Keep a training run's per-epoch history for the report (plotted as a training curve)."""
        self.notes.setdefault("training", {})[name] = {
            "best_epoch": result.best_epoch, "best_val_score": result.best_score,
            "stopped_early": result.stopped_early, "history": result.history}


RECOVERY_TYPES = ("finetune", "distill")


class Stage(Config):
    type: str
    # a finetune or distill stage (as a mapping) that the runner applies right after this one
    recovery: dict[str, Any] | None = None
    # True when the stage writes an artifact instead of changing the model (the runner skips re-measuring).
    changes_model: ClassVar[bool] = True
    # True when the stage works on float weights (pruning, sharing, factorizing, quantizing): not after quantize.
    needs_float_model: ClassVar[bool] = False

    @model_validator(mode="after")
    def _valid_recovery(self) -> "Stage":
        if self.recovery is not None:
            if not self.changes_model:
                raise ValueError(f"recovery: a {self.type} stage does not change the model")
            self.recovery_stage()  # raises ValueError on a bad section
        return self

    def recovery_stage(self) -> "Stage | None":
        """The recovery section as a stage (None without one)."""
        if self.recovery is None:
            return None
        kind = self.recovery.get("type")
        if kind not in RECOVERY_TYPES:
            raise ValueError(f"recovery: type must be one of {', '.join(RECOVERY_TYPES)}, got {kind!r}")
        if self.recovery.get("recovery") is not None:
            raise ValueError("recovery: a recovery section has no recovery of its own")
        try:
            return stage_types()[kind].model_validate(self.recovery)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or kind}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"recovery ({kind}): {problems}") from None

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        raise NotImplementedError


def register_stage(cls: type[Stage]) -> type[Stage]:
    name = cls.model_fields["type"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.type needs a string default naming the stage")
    if name in _STAGES:
        raise ValueError(f"stage type {name!r} is already registered by {_STAGES[name].__name__}")
    _STAGES[name] = cls
    return cls


def stage_types() -> dict[str, type[Stage]]:
    """All registered stage types (importing the built-in ones on first use)."""
    from .export import stage as _export_stage  # noqa: F401
    from .pruning import stage as _prune_stage  # noqa: F401
    from .quant import stage as _quant_stage  # noqa: F401
    from .distillation import stage as _distill_stage  # noqa: F401
    from .lowrank import stage as _lowrank_stage  # noqa: F401
    from .share import stage as _share_stage  # noqa: F401
    from .train import stage as _train_stage  # noqa: F401

    return dict(_STAGES)


def apply_stage(stage: Stage, model: nn.Module, ctx: StageContext) -> nn.Module:
    """The stage, then its own recovery training (in the stage's folder, noted with the scores around it)."""
    from .errors import SlimkitError
    from .quant.ptq import is_quantized

    if stage.needs_float_model and is_quantized(model):  # a quantized input model (recipes check their own order)
        raise SlimkitError(f"a {stage.type} stage works on float weights, but the model entering it is quantized "
                           "(integer codes): start from the float model")
    model = stage.apply(model, ctx)
    recovery = stage.recovery_stage()
    if recovery is not None:
        recovery_ctx = dataclasses.replace(ctx, stage_dir=ctx.stage_dir / "recovery", notes={})
        before = ctx.task.val_score(model)
        model = recovery.apply(model, recovery_ctx)
        ctx.notes["recovery"] = {"type": recovery.type, "val_score_before": before,
                                 "val_score_after": ctx.task.val_score(model), **recovery_ctx.notes}
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that keeps slimkit's metadata (a GraphModule's deepcopy drops added attributes)."""
    import copy

    clone = copy.deepcopy(model)
    if hasattr(model, "slimkit_meta"):
        clone.slimkit_meta = copy.deepcopy(model.slimkit_meta)
    return clone
