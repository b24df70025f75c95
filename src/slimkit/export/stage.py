"""The ``export`` recipe stage: write a verified deployment artifact into the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator
from torch import nn

from ..stages import Stage, StageContext, register_stage
from ..errors import SlimkitError
from ..io import atomic_path
from .onnx import DEFAULT_ATOL, DEFAULT_RTOL, export_onnx, onnx_bytes, run_torch
from ..quant.ptq import is_quantized
from .qdq import export_int8_verified


@register_stage
class ExportStage(Stage):
    type: Literal["export"] = "export"
    format: Literal["onnx", "onnx-int8", "slim"] = "onnx"  # slim: the one-file compressed container
    filename: Optional[str] = Field(None, min_length=1, pattern=r"^[^/\\]+$")  # model.onnx / model.slim
    atol: float = Field(DEFAULT_ATOL, ge=0)  # fp32 export: allowed difference atol + rtol x max |output|
    rtol: float = Field(DEFAULT_RTOL, ge=0)
    changes_model: ClassVar[bool] = False

    @model_validator(mode="after")
    def _slim_suffix(self) -> "ExportStage":
        if self.format == "slim" and self.filename and not self.filename.endswith(".slim"):
            raise ValueError(f"a slim export's filename must end in .slim, got {self.filename!r}")
        return self

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        x = ctx.task.example_inputs
        if self.format == "slim":
            return self._slim(model, ctx)
        filename = self.filename or "model.onnx"
        path = ctx.out_dir / filename
        if is_quantized(model) != (self.format == "onnx-int8"):
            raise SlimkitError(f"export format {self.format!r} does not fit this "
                               f"{'quantized' if is_quantized(model) else 'float'} model: use "
                               f"{'onnx-int8' if is_quantized(model) else 'onnx'}")
        if self.format == "onnx-int8":
            check = export_int8_verified(model, path, x)
            ctx.artifacts["onnx_int8_top1_agreement"] = f"{check['top1_agreement']:.4f}"
            verified = {"against": "slimkit's int8 simulation", **check}
        else:
            result = export_onnx(model, path, x[:2], verify_on=x, atol=self.atol, rtol=self.rtol)
            ctx.artifacts["onnx_max_abs_diff"] = f"{result.max_abs_diff:.3g}"
            verified = {"against": "the torch model", "max_abs_diff": result.max_abs_diff,
                        "allowed": result.allowed_diff, "samples": result.samples_checked}
        ctx.artifacts["onnx"] = filename
        ctx.notes["export"] = {"file": filename, "format": self.format, "runtime": "ONNX Runtime",
                               "bytes": onnx_bytes(path), "check": verified}
        return model

    def _slim(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        """Pack the model; reload the file and require bit-identical outputs before keeping it."""
        import tempfile

        import torch

        from ..modelfile import load, pack, save

        filename = self.filename or "model.slim"
        x = ctx.task.example_inputs
        with tempfile.TemporaryDirectory() as tmp:
            save(model, Path(tmp) / "model")
            with atomic_path(ctx.out_dir / filename) as packed:
                table = pack(Path(tmp) / "model", packed)
                if not torch.equal(run_torch(load(packed), x), run_torch(model, x)):
                    raise SlimkitError(f"{filename}: the packed model's outputs differ from the model's")
        table.pop("streams")
        ctx.notes["slim"] = table
        ctx.notes["export"] = {"file": filename, "format": "slim", "runtime": "slimkit.load",
                               "bytes": table["file_bytes"],
                               "check": {"against": "the model", "identical_outputs": True, "samples": len(x)}}
        ctx.artifacts["slim"] = filename
        return model

