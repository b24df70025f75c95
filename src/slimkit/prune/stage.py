"""The ``prune`` recipe stage: one-shot, iterative or gradual (AGP) magnitude/Taylor/N:M pruning.

* ``one-shot``: prune to the target, then fine-tune ``finetune.epochs`` (0 = none).
* ``iterative``: ``steps`` rounds of prune-a-step then fine-tune, sparsity rising linearly.
* ``agp``: Zhu & Gupta's gradual pruning during fine-tuning: sparsity follows
  ``s_t = s_f * (1 - (1 - t / T)^3)``, updated every ``agp_every`` optimizer steps,
  reaching the target after ``agp_ramp`` of the training; the rest recovers.

Masks are removed at the end: the stage returns a model with real zeros,
which the model directory then stores sparse.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..train.loop import TrainConfig, fit
from ..train.run import CHECKPOINT_SUBDIR
from .mask import remove_masks
from .unstructured import PruneConfig, prune_weights


class PruneFinetune(TrainConfig):
    epochs: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)


@register_stage
class PruneStage(Stage, PruneConfig):
    type: Literal["prune"] = "prune"
    schedule: Literal["one-shot", "iterative", "agp"] = "one-shot"
    steps: int = Field(3, ge=1)
    agp_every: int = Field(10, ge=1)
    agp_ramp: float = Field(0.75, gt=0, le=1)
    finetune: PruneFinetune = PruneFinetune()

    @model_validator(mode="after")
    def _needs_training(self) -> "PruneStage":
        if self.schedule != "one-shot" and self.finetune.epochs == 0:
            raise ValueError(f"schedule {self.schedule!r} prunes while training: set finetune.epochs > 0")
        return self

    def prune_config(self) -> PruneConfig:
        return PruneConfig(**self.model_dump(include=set(PruneConfig.model_fields)))

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg, task = self.prune_config(), ctx.task
        train_cfg = TrainConfig(**self.finetune.model_dump())

        def recover(tag: str, on_step=None, score_fn=task.val_score) -> None:
            if train_cfg.epochs:
                fit(model, task.train_batches(train_cfg), None, train_cfg, score_fn=score_fn,
                    loss_fn=task.loss_fn, checkpoint_dir=ctx.stage_dir / CHECKPOINT_SUBDIR / tag,
                    resume=ctx.resume, progress=ctx.progress, description=f"prune {tag}", on_step=on_step)

        if self.schedule == "one-shot":
            result = prune_weights(model, cfg, task)
            recover("finetune")
        elif self.schedule == "iterative":
            for k in range(1, self.steps + 1):
                result = prune_weights(model, cfg, task, sparsity=self.sparsity * k / self.steps)
                recover(f"step{k}")
        else:
            prune_weights(model, cfg, task, sparsity=0.0)
            reached = []

            def agp(step: int, total: int) -> None:
                if step % self.agp_every == 0 or step == total:
                    progress = min(1.0, step / (self.agp_ramp * total))
                    prune_weights(model, cfg, task, sparsity=self.sparsity * (1 - (1 - progress) ** 3))
                    if progress == 1.0:
                        reached.append(step)

            def score_at_target(m: nn.Module) -> float:
                """Only epochs that end at the target sparsity may be chosen as the best."""
                return task.val_score(m) if reached else float("-inf")

            recover("agp", on_step=agp, score_fn=score_at_target)
            result = prune_weights(model, cfg, task)  # exact target, whatever the step count
        ctx.notes["prune"] = result
        return remove_masks(model)
