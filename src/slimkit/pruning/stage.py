"""The ``prune`` recipe stage: one-shot, iterative or gradual (AGP) magnitude/Taylor/N:M pruning.

* ``one-shot``: prune to the target, then fine-tune ``finetune.epochs`` (0 = none).
* ``iterative``: ``steps`` rounds of prune-a-step then fine-tune, sparsity rising linearly.
* ``agp``: Zhu & Gupta's gradual pruning during fine-tuning: sparsity follows
  ``s_t = s_f * (1 - (1 - t / T)^3)``, updated every ``agp_every`` optimizer steps,
  reaching the target after ``agp_ramp`` of the training; the rest recovers.

Unstructured masks are removed at the end: the stage returns a model with real
zeros, which the model directory then stores sparse. With ``structured: true``
``sparsity`` is the fraction of channels, neurons or heads removed from each
prunable group, and the model itself shrinks (one-shot or iterative).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import SlimkitError
from ..inputs import call
from ..stages import Stage, StageContext, register_stage
from ..train.loop import RecoveryConfig, TrainConfig
from .layers import drop_layers
from .mask import remove_masks
from .sensitivity import allocate_sparsity, sensitivity
from .structured import prune_channels
from .unstructured import PruneConfig, prune_weights


@register_stage
class PruneStage(Stage, PruneConfig):
    type: Literal["prune"] = "prune"
    needs_float_model: ClassVar[bool] = True
    schedule: Literal["one-shot", "iterative", "agp"] = "one-shot"
    steps: int = Field(3, ge=1)
    agp_every: int = Field(10, ge=1)
    agp_ramp: float = Field(0.75, gt=0, le=1)
    structured: bool = False
    max_group_sparsity: float = Field(0.9, gt=0, lt=1)  # structured, scope global: at most this much of a group
    allocate: Literal["uniform", "sensitivity"] = "uniform"
    finetune: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStage":
        if self.schedule != "one-shot" and self.finetune.epochs == 0:
            raise ValueError(f"schedule {self.schedule!r} prunes while training: set finetune.epochs > 0")
        if self.structured and (self.nm or self.schedule == "agp" or self.layer_sparsity):
            raise ValueError("structured pruning takes one ratio (per group, or global): no nm, agp or layer_sparsity")
        if self.allocate == "sensitivity" and (self.structured or self.nm or self.scope == "global"):
            raise ValueError("allocate: sensitivity sets per-layer sparsities: not with structured, nm or global")
        return self

    def prune_config(self) -> PruneConfig:
        return PruneConfig(**self.model_dump(include=set(PruneConfig.model_fields)))

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg, task = self.prune_config(), ctx.task
        train_cfg = TrainConfig(**self.finetune.model_dump())

        def recover(tag: str, on_step=None, eligible=None, model: nn.Module = model) -> None:
            if train_cfg.epochs:
                ctx.fit(model, train_cfg, f"prune {tag}", checkpoint=tag, on_step=on_step, eligible=eligible)

        if self.structured:
            return self._apply_structured(model, ctx, recover)
        if self.allocate == "sensitivity":
            sens = sensitivity(model, task, method=self.method, include=self.include, exclude=self.exclude)
            ctx.notes["sensitivity"] = sens
            cfg = cfg.model_copy(update={"layer_sparsity": allocate_sparsity(sens, self.sparsity)})
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

            recover("agp", on_step=agp, eligible=lambda: bool(reached))  # only epochs at the target may win
            result = prune_weights(model, cfg, task)  # exact target, whatever the step count
        ctx.notes["prune"] = result
        return remove_masks(model)

    def _apply_structured(self, model: nn.Module, ctx: StageContext, recover) -> nn.Module:
        task = ctx.task
        steps = self.steps if self.schedule == "iterative" else 1
        per_step = 1 - (1 - self.sparsity) ** (1 / steps)  # equal fractions compound to the target
        kwargs = dict(include=self.include, exclude=self.exclude, loss_fn=task.loss_fn, seed=self.seed,
                      scope=self.scope, max_ratio=self.max_group_sparsity,
                      batches=task.train_batches(TrainConfig(seed=self.seed)) if self.method == "taylor" else None)
        notes = []
        for k in range(1, steps + 1):
            model, step_notes = prune_channels(model, task.example_inputs[:8], per_step, self.method, **kwargs)
            notes.append(step_notes)
            recover(f"step{k}", model=model)
        ctx.notes["prune"] = notes[-1] if steps == 1 else notes
        return model


@register_stage
class DropLayersStage(Stage):
    """Remove whole blocks of a layer stack (a transformer's encoder layers), then recover."""

    type: Literal["drop-layers"] = "drop-layers"
    needs_float_model: ClassVar[bool] = True
    keep: int | list[int] | None = None  # how many blocks to keep (evenly spaced, the last one kept), which, or half
    container: str | None = None  # the stack of blocks; default: the longest stack of one block type
    finetune: RecoveryConfig = RecoveryConfig()

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        model, step = drop_layers(model, self.keep, self.container)
        try:
            with torch.no_grad():
                call(model.eval(), ctx.task.example_inputs[:2])
        except (RuntimeError, ValueError, IndexError) as exc:
            raise SlimkitError(f"without blocks {sorted(set(range(step['original'])) - set(step['keep']))} of "
                               f"{step['container']} the model no longer runs (its blocks change the shape they "
                               f"pass on): {str(exc).splitlines()[0]}") from None
        ctx.notes["drop_layers"] = {"container": step["container"], "kept": step["keep"], "of": step["original"]}
        if ctx.task.can_score:
            ctx.notes["drop_layers"]["score_before_finetune"] = ctx.task.val_score(model)
        if self.finetune.epochs:
            ctx.fit(model, TrainConfig(**self.finetune.model_dump()), "drop-layers finetune")
        return model
