"""Recipe stages: a registry keyed on the ``type`` of each stage config.

A stage is a frozen config class with a ``type`` literal and an ``apply``
method. Adding a compression method to recipes is one class plus
``@register_stage``; the recipe loader, the runner and the report need no
change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError, model_validator
from torch import nn

from .config import Config

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


RECOVERY_TYPES = ("finetune", "distill")


class Stage(Config):
    type: str
    # a finetune or distill stage (as a mapping) that the runner applies right after this one
    recovery: dict[str, Any] | None = None
    # True when the stage writes an artifact instead of changing the model (the runner skips re-measuring).
    changes_model: ClassVar[bool] = True

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
    from .prune import stage as _prune_stage  # noqa: F401
    from .quant import stage as _quant_stage  # noqa: F401
    from .distill import stage as _distill_stage  # noqa: F401
    from .lowrank import stage as _lowrank_stage  # noqa: F401
    from .share import stage as _share_stage  # noqa: F401
    from .train import stage as _train_stage  # noqa: F401

    return dict(_STAGES)

