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


RUNTIME_FORMATS = ("onnx-tensorrt", "openvino", "openvino-int8", "executorch", "executorch-int8", "tflite",
                   "tflite-fp16", "tflite-int8")  # export/targets.py
Format = Literal["onnx", "onnx-int8", "onnx-tensorrt", "slim", "openvino", "openvino-int8", "executorch",
                 "executorch-int8", "tflite", "tflite-fp16", "tflite-int8"]


@register_stage
class ExportStage(Stage):
    type: Literal["export"] = "export"
    format: Format | list[Format] = "onnx"  # slim: the one-file compressed container; a list: one file each
    filename: Optional[str] = Field(None, min_length=1, pattern=r"^[^/\\]+$")  # model.onnx / model.slim
    atol: float = Field(DEFAULT_ATOL, ge=0)  # fp32 export: allowed difference atol + rtol x max |output|
    rtol: float = Field(DEFAULT_RTOL, ge=0)
    batch: int = Field(1, ge=1, le=4096)  # executorch and tflite files take one batch size, fixed at export
    changes_model: ClassVar[bool] = False

    @model_validator(mode="after")
    def _one_file_per_format(self) -> "ExportStage":
        formats = self.formats
        if len(set(formats)) < len(formats) or not formats:
            raise ValueError("list each format once")
        if self.filename and len(formats) > 1:
            raise ValueError("filename names one file: leave it out when exporting several formats")
        if self.format == "slim" and self.filename and not self.filename.endswith(".slim"):
            raise ValueError(f"a slim export's filename must end in .slim, got {self.filename!r}")
        return self

    @property
    def formats(self) -> list[str]:
        return [self.format] if isinstance(self.format, str) else list(self.format)

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        exports = []
        for fmt in self.formats:
            exports.append(self._export(fmt, model, ctx))
        ctx.notes["export"] = exports[0]
        if len(exports) > 1:
            ctx.notes["exports"] = exports
        return model

    def _export(self, fmt: str, model: nn.Module, ctx: StageContext) -> dict:
        if fmt == "slim":
            return self._slim(model, ctx)
        if fmt in RUNTIME_FORMATS:
            return self._runtime(fmt, model, ctx)
        x = ctx.task.example_inputs
        filename = self.filename or "model.onnx"
        path = ctx.out_dir / filename
        if is_quantized(model) != (fmt == "onnx-int8"):
            raise SlimkitError(f"export format {fmt!r} does not fit this "
                               f"{'quantized' if is_quantized(model) else 'float'} model: use "
                               f"{'onnx-int8' if is_quantized(model) else 'onnx'}")
        if fmt == "onnx-int8":
            check = export_int8_verified(model, path, x)
            ctx.artifacts["onnx_int8_top1_agreement"] = f"{check['top1_agreement']:.4f}"
            verified = {"against": "slimkit's int8 simulation", **check}
        else:
            result = export_onnx(model, path, x[:2], verify_on=x, atol=self.atol, rtol=self.rtol)
            ctx.artifacts["onnx_max_abs_diff"] = f"{result.max_abs_diff:.3g}"
            verified = {"against": "the torch model", "max_abs_diff": result.max_abs_diff,
                        "allowed": result.allowed_diff, "samples": result.samples_checked}
        ctx.artifacts["onnx"] = filename
        return {"file": filename, "format": fmt, "runtime": "ONNX Runtime", "bytes": onnx_bytes(path),
                "check": verified}

    def _runtime(self, fmt: str, model: nn.Module, ctx: StageContext) -> dict:
        from .targets import export_to, get_target

        target = get_target(fmt)
        filename = self.filename or f"model-{fmt}{target.suffix}"
        result = export_to(model, fmt, ctx.out_dir / filename, ctx.task.example_inputs, batch=self.batch,
                           overwrite=True, atol=self.atol, rtol=self.rtol)
        ctx.artifacts[fmt] = filename
        return {**result, "file": filename}

    def _slim(self, model: nn.Module, ctx: StageContext) -> dict:
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
        ctx.artifacts["slim"] = filename
        return {"file": filename, "format": "slim", "runtime": "slimkit.load", "bytes": table["file_bytes"],
                "check": {"against": "the model", "identical_outputs": True, "samples": len(x)}}

