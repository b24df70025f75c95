"""The ``finetune`` recipe stage: recover accuracy with the shared training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..prune.mask import zeros_kept
from .loop import TrainConfig, fit
from .run import CHECKPOINT_SUBDIR


@register_stage
class FinetuneStage(Stage, TrainConfig):
    type: Literal["finetune"] = "finetune"
    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-4, gt=0)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(exclude={"type", "recovery"}))

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = self.train_config()
        task = ctx.task
        with zeros_kept(model):  # fine-tuning a pruned model must not regrow it
            result = fit(model, task.train_batches(cfg), None, cfg, score_fn=task.val_score, loss_fn=task.loss_fn,
                         checkpoint_dir=ctx.stage_dir / CHECKPOINT_SUBDIR, resume=ctx.resume,
                         progress=ctx.progress, description="finetune")
        ctx.notes["finetune"] = {"best_epoch": result.best_epoch, "history": result.history}
        return model
