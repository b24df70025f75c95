"""The ``factorize`` recipe stage: truncated SVD of the selected layers, then fine-tuning."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..train.loop import RecoveryConfig, TrainConfig
from .svd import FactorizeConfig, factorize


@register_stage
class FactorizeStage(Stage, FactorizeConfig):
    type: Literal["factorize"] = "factorize"
    needs_float_model: ClassVar[bool] = True
    finetune: RecoveryConfig = RecoveryConfig()

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = FactorizeConfig(**self.model_dump(include=set(FactorizeConfig.model_fields)))
        model, _, rows = factorize(model, ctx.task.example_inputs, cfg)
        ctx.notes["factorize"] = {"layers": rows, "score_before_finetune": ctx.task.val_score(model)}
        if self.finetune.epochs:
            ctx.fit(model, TrainConfig(**self.finetune.model_dump()), "factorize finetune")
        return model
