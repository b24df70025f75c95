"""The ``factorize`` recipe stage: truncated SVD of the selected layers, then fine-tuning."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..train.loop import RecoveryConfig, TrainConfig, fit
from ..train.run import CHECKPOINT_SUBDIR
from .svd import FactorizeConfig, factorize


@register_stage
class FactorizeStage(Stage, FactorizeConfig):
    type: Literal["factorize"] = "factorize"
    finetune: RecoveryConfig = RecoveryConfig()

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = FactorizeConfig(**self.model_dump(include=set(FactorizeConfig.model_fields)))
        model, _, rows = factorize(model, ctx.task.example_inputs, cfg)
        task = ctx.task
        ctx.notes["factorize"] = {"layers": rows, "score_before_finetune": task.val_score(model)}
        if self.finetune.epochs:
            train = TrainConfig(**self.finetune.model_dump())
            fit(model, task.train_batches(train), None, train, score_fn=task.val_score, loss_fn=task.loss_fn,
                checkpoint_dir=ctx.stage_dir / CHECKPOINT_SUBDIR, resume=ctx.resume, progress=ctx.progress,
                description="factorize finetune")
        return model
