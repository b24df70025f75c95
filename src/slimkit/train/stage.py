"""The ``finetune`` recipe stage: recover accuracy with the shared training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..stages import Stage, StageContext, register_stage
from .loop import TrainConfig, fit
from .run import CHECKPOINT_SUBDIR, train_loaders


@register_stage
class FinetuneStage(Stage, TrainConfig):
    type: Literal["finetune"] = "finetune"
    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-4, gt=0)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(exclude={"type"}))

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = self.train_config()
        train, val = train_loaders(ctx.splits, cfg)
        fit(model, train, val, cfg, score_fn=ctx.score_fn, checkpoint_dir=ctx.stage_dir / CHECKPOINT_SUBDIR,
            resume=ctx.resume, progress=ctx.progress, description="finetune")
        return model
