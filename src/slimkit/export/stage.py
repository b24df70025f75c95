"""The ``export`` recipe stage: write a verified deployment artifact into the run folder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..errors import SlimkitError
from .onnx import DEFAULT_ATOL, export_onnx
from ..quant.ptq import is_quantized
from .qdq import export_int8_verified


@register_stage
class ExportStage(Stage):
    type: Literal["export"] = "export"
    format: Literal["onnx", "onnx-int8"] = "onnx"
    filename: str = Field("model.onnx", min_length=1, pattern=r"^[^/\\]+$")
    atol: float = Field(DEFAULT_ATOL, gt=0)
    changes_model: ClassVar[bool] = False

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        x = ctx.task.example_inputs
        path = ctx.out_dir / self.filename
        if is_quantized(model) != (self.format == "onnx-int8"):
            raise SlimkitError(f"export format {self.format!r} does not fit this "
                               f"{'quantized' if is_quantized(model) else 'float'} model: use "
                               f"{'onnx-int8' if is_quantized(model) else 'onnx'}")
        if self.format == "onnx-int8":
            check = export_int8_verified(model, path, x)
            ctx.artifacts["onnx_int8_top1_agreement"] = f"{check['top1_agreement']:.4f}"
        else:
            result = export_onnx(model, path, x[:2], verify_on=x, atol=self.atol)
            ctx.artifacts["onnx_max_abs_diff"] = f"{result.max_abs_diff:.3g}"
        ctx.artifacts["onnx"] = self.filename
        return model

