"""The ``factorize`` recipe stage: truncated SVD of the selected layers, then fine-tuning."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from ..errors import SlimkitError
from ..stages import Stage, StageContext, register_stage
from ..train.loop import RecoveryConfig, TrainConfig
from .search import factorize_for_score
from .svd import FactorizeConfig, factorize


@register_stage
class FactorizeStage(Stage, FactorizeConfig):
    type: Literal["factorize"] = "factorize"
    needs_float_model: ClassVar[bool] = True
    finetune: RecoveryConfig = RecoveryConfig()

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = FactorizeConfig(**self.model_dump(include=set(FactorizeConfig.model_fields)))
        if cfg.min_score is None:
            model, _, rows = factorize(model, ctx.task.example_inputs, cfg)
            ctx.notes["factorize"] = {"layers": rows, "score_before_finetune": ctx.task.val_score(model)}
        else:
            if not ctx.task.can_score:
                raise SlimkitError("min_score needs data with a validation score (labelled data or a Task)")
            model, _, rows, search = factorize_for_score(model, ctx.task.example_inputs, cfg, ctx.task.val_score,
                                                         cfg.min_score)
            ctx.notes["factorize"] = {"layers": rows, "score_before_finetune": search["score"],
                                      "energy": search["energy"], "energies_tried": search["tried"]}
        if self.finetune.epochs:
            ctx.fit(model, TrainConfig(**self.finetune.model_dump()), "factorize finetune")
        return model
