"""The ``finetune`` recipe stage: recover accuracy with the shared training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..stages import Stage, StageContext, register_stage
from .compressed import compression_kept
from .loop import TrainConfig


@register_stage
class FinetuneStage(Stage, TrainConfig):
    type: Literal["finetune"] = "finetune"
    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-4, gt=0)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(exclude={"type", "recovery"}))

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        with compression_kept(model):  # no regrown zeros, no drifting shared values, weights on their grids
            ctx.fit(model, self.train_config(), "finetune")
        return model
