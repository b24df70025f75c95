"""The ``export`` recipe stage: write a verified deployment artifact into the run folder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..stages import Stage, StageContext, register_stage
from .onnx import DEFAULT_ATOL, export_onnx


@register_stage
class ExportStage(Stage):
    type: Literal["export"] = "export"
    format: Literal["onnx"] = "onnx"
    filename: str = Field("model.onnx", min_length=1, pattern=r"^[^/\\]+$")
    atol: float = Field(DEFAULT_ATOL, gt=0)
    changes_model: ClassVar[bool] = False

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        x = ctx.task.example_inputs
        result = export_onnx(model, ctx.out_dir / self.filename, x[:2], verify_on=x, atol=self.atol)
        ctx.artifacts[self.format] = self.filename
        ctx.artifacts[f"{self.format}_max_abs_diff"] = f"{result.max_abs_diff:.3g}"
        return model
