"""The ``distill`` recipe stage: a teacher trains a student, as a model of its own or as recovery.

* ``student: null`` (the default): the model entering the stage (pruned, factorized,
  quantized-aware...) is the student, so distillation is the recovery step after any
  compression stage; the teacher defaults to the recipe's starting model.
* ``student: "lenet5:width=0.25"`` (or an architecture mapping, or a model path): a new,
  smaller model replaces the one entering the stage and is trained from the teacher.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from ..errors import SlimkitError
from ..stages import Stage, StageContext, register_stage
from ..train.loop import TrainConfig, on_device
from ..train.run import CHECKPOINT_SUBDIR
from .distiller import DistillConfig
from .run import build_student, distill


class DistillTrain(TrainConfig):
    epochs: int = Field(30, ge=0)
    lr: float = Field(1e-3, gt=0)


@register_stage
class DistillStage(Stage, DistillConfig):
    type: Literal["distill"] = "distill"
    teacher: str = "baseline"  # baseline (the recipe's starting model), input (the model entering) or a path
    student: str | dict[str, Any] | None = None
    train: DistillTrain = DistillTrain()
    trust_code: bool = False

    def model_post_init(self, __context: Any) -> None:
        if self.teacher == "input" and self.student is None:
            raise ValueError("teacher 'input' needs a student spec: the model cannot teach itself")

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        from ..modelfile import load

        if self.teacher == "baseline":
            if ctx.baseline is None:
                raise SlimkitError("distill: no baseline model to teach (run it in a recipe, or give a teacher path)")
            teacher = ctx.baseline
        elif self.teacher == "input":
            teacher = model
        else:
            teacher = load(self.teacher, trust_code=self.trust_code)
        student = model if self.student is None else build_student(self.student, ctx.task, self.train.seed,
                                                                   self.trust_code)
        cfg = DistillConfig(**self.model_dump(include=set(DistillConfig.model_fields)))
        with on_device(student, ctx.device):
            trained, result = distill(student, teacher, ctx.task, cfg, TrainConfig(**self.train.model_dump()),
                                      checkpoint_dir=ctx.stage_dir / CHECKPOINT_SUBDIR, resume=ctx.resume,
                                      progress=ctx.progress)
        ctx.record("distill", result)
        ctx.notes["distill"] = {"teacher_val_score": ctx.task.val_score(teacher)}
        return trained
