"""The ``cluster`` recipe stage: weight sharing, then (optionally) training the shared centroids."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..train.loop import RecoveryConfig, TrainConfig
from .cluster import ClusterConfig, cluster, remove_sharing, round_to_half, share_centroids


@register_stage
class ClusterStage(Stage, ClusterConfig):
    type: Literal["cluster"] = "cluster"
    needs_float_model: ClassVar[bool] = True
    finetune: RecoveryConfig = RecoveryConfig()  # trains the centroids; assignments stay fixed

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        result = cluster(model, ClusterConfig(**self.model_dump(include=set(ClusterConfig.model_fields))))
        result["score_after_clustering"] = ctx.task.val_score(model)
        if self.finetune.epochs:
            share_centroids(model, [row["tensor"] for row in result["layers"]])
            ctx.fit(model, TrainConfig(**self.finetune.model_dump()), "centroid finetune")
            remove_sharing(model)
            if self.codebook_dtype == "float16":  # the trained centroids, back on the half-precision grid
                with torch.no_grad():
                    for row in result["layers"]:
                        tensor = model.get_parameter(row["tensor"])
                        tensor.copy_(round_to_half(tensor))
        ctx.notes["cluster"] = result
        return model
