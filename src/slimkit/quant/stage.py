"""The ``quantize`` recipe stage: post-training quantization (static, dynamic or weight-only; optionally
followed by quantization-aware training), exported as a verified integer ONNX model."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..data import first_samples
from ..errors import SlimkitError
from ..stages import Stage, StageContext, register_stage
from ..train.loop import TrainConfig
from .placement import LatencyPlacement, choose_float_layers
from .ptq import StaticQuantConfig, quantize_static

QAT_FALLBACK = TrainConfig(epochs=2, lr=1e-4)  # from calibrated scales: a short, gentle fine-tune


@register_stage
class QuantizeStage(Stage, StaticQuantConfig):
    type: Literal["quantize"] = "quantize"
    needs_float_model: ClassVar[bool] = True
    # int8-static: int8 weights, uint8 activations calibrated once; int8-dynamic: linear layers with int8
    # weights and uint8 activation ranges taken at run time (per token or per tensor: dynamic_scales);
    # int8-weight: weights only (activations stay float); int4-weight: 4-bit weights, one scale per group of
    # group_size inputs (32 unless set), rounded by GPTQ unless `rounding` says otherwise; log: power-of-two
    # weights, uint8 activations. Fewer weight bits with weight_bits.
    scheme: Literal["int8-static", "int8-dynamic", "int8-weight", "int4-weight", "log"] = "int8-static"
    onnx: str = Field("model-int8.onnx", min_length=1, pattern=r"^[^/\\]+\.onnx$")
    qat: TrainConfig | None = None  # quantization-aware training after calibration (epochs, lr, ...)
    # QAT only where static quantization loses more than this much validation score (0.01: one point of
    # accuracy), with the `qat` settings or QAT_FALLBACK; PTQ is kept when it is close enough
    qat_if_drop: float | None = Field(None, ge=0, le=1)
    size_budget: float | None = Field(None, gt=0, le=0.25)  # mixed precision: weights' fraction of fp32 bytes
    learn_scale: bool = True  # LSQ step sizes during QAT
    # keep in float the layers whose int8 form makes ONNX Runtime slower, measured at this batch and thread
    # count (quant/placement.py)
    latency_placement: LatencyPlacement | None = None

    def apply(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        from ..export.onnx import onnx_bytes
        from ..export.qdq import export_int8_verified

        batches = ctx.task.train_batches(TrainConfig(seed=self.seed))
        calib = first_samples((x for x, _ in batches), self.calib)
        cfg = self.quant_config()
        if self.size_budget is not None:
            from .mixed import allocate_bits

            allocation = allocate_bits(model, ctx.task, calib, self.size_budget, cfg)
            cfg = cfg.model_copy(update={"layer_bits": allocation["layer_bits"]})
            ctx.notes["mixed_precision"] = allocation
        if self.latency_placement is not None:
            placement = choose_float_layers(model, calib, cfg, self.latency_placement)
            cfg = cfg.model_copy(update={"exclude": [*cfg.exclude, *placement["exclude"]]})
            ctx.notes["latency_placement"] = placement
        qat = self.qat if self.qat is not None and self.qat.epochs > 0 else None
        if qat is not None and self.qat_if_drop is None:
            quantized, step = self._train(model, calib, cfg, ctx, qat)
        else:
            quantized, step = quantize_static(model, calib, cfg)
            if self.qat_if_drop is not None:
                quantized, step, qat = self._qat_if_needed(model, calib, cfg, ctx, (quantized, step), qat)
        meta = getattr(model, "slimkit_meta", {"plan": []})
        quantized.slimkit_meta = {**meta, "plan": [*meta.get("plan", []), step]}
        if cfg.symmetric_activations:  # quantized for TensorRT: its file, checked against the ONNX reference
            from ..export.targets import export_to

            exported = export_to(quantized, "onnx-tensorrt", ctx.out_dir / self.onnx, ctx.task.example_inputs)
            check = {k: v for k, v in exported["check"].items() if k != "against"}
            fmt, runtime = exported["format"], exported["runtime"]
        else:
            check = export_int8_verified(quantized, ctx.out_dir / self.onnx, ctx.task.example_inputs,
                                         reference=model)
            fmt, runtime = "onnx-int8", "ONNX Runtime"
        ctx.artifacts["onnx"] = self.onnx
        ctx.notes["export"] = {"file": self.onnx, "format": fmt, "runtime": runtime,
                               "bytes": onnx_bytes(ctx.out_dir / self.onnx),
                               "check": {"against": "slimkit's int8 simulation", **check}}
        ctx.notes["quantize"] = {**check, "weights_int8": len(step["weights"]), "weight_bits": cfg.weight_bits,
                                 "reduce_range": cfg.reduces_range(),
                                 "qat_epochs": qat.epochs if qat else 0,
                                 "activations": cfg.activations, "group_size": cfg.group_size,
                                 **({"dynamic_scales": "token" if cfg.dynamic_kind(model) == "dynamic-token"
                                     else "tensor"} if cfg.activations == "dynamic" else {}),
                                 "activations_quantized": len(step["activations"]),
                                 "activation_dtype": cfg.activation_dtype,
                                 "folded_batchnorm": len(step["folded_batchnorm"]), "observer": self.observer,
                                 "calibration_samples": len(calib)}
        return quantized

    def scheme_settings(self) -> dict:
        """The quantization settings the stage's scheme fixes."""
        return {"int8-static": {}, "log": {"weight_levels": "log"}, "int8-dynamic": {"activations": "dynamic"},
                "int8-weight": {"activations": "none"},
                "int4-weight": {"activations": "none", "weight_bits": 4, "group_size": self.group_size or 32,
                                "rounding": self.rounding if "rounding" in self.model_fields_set else "gptq"}
                }[self.scheme]

    def quant_config(self) -> StaticQuantConfig:
        """The stage's scheme spelled out as quantization settings."""
        settings = self.model_dump(include=set(StaticQuantConfig.model_fields))
        scheme = self.scheme_settings()
        if self.scheme == "int4-weight" and "weight_bits" in self.model_fields_set and self.weight_bits != 4:
            raise ValueError(f"scheme int4-weight has 4-bit weights, not weight_bits {self.weight_bits}")
        clash = {k for k, v in scheme.items() if k in self.model_fields_set and getattr(self, k) != v
                 and k not in ("weight_bits", "group_size", "rounding")}
        if clash:
            raise ValueError(f"scheme {self.scheme} sets {', '.join(sorted(clash))} itself; leave it out")
        return StaticQuantConfig(**{**settings, **scheme})

    def model_post_init(self, __context) -> None:
        """The scheme's settings must be consistent; the fields it fixes then hold its values, so the stage
        written out (a run's recorded recipe) reads back as the same stage."""
        self.quant_config()
        for name, value in self.scheme_settings().items():
            object.__setattr__(self, name, value)  # not marked as set by the user

    def _qat_if_needed(self, model: nn.Module, calib, cfg: StaticQuantConfig, ctx: StageContext, ptq,
                       qat: TrainConfig | None):
        """PTQ's result, or QAT's where PTQ lost more than ``qat_if_drop`` of the validation score."""
        if not ctx.task.can_score:
            raise SlimkitError("qat_if_drop needs labelled data to score the quantized model on")
        before, after = ctx.task.val_score(model), ctx.task.val_score(ptq[0])
        needed = before - after > self.qat_if_drop
        qat = (qat or QAT_FALLBACK) if needed else None
        ctx.notes["qat_decision"] = {"val_score_float": before, "val_score_ptq": after, "max_drop": self.qat_if_drop,
                                     "method": "QAT" if needed else "PTQ"}
        return (*(self._train(model, calib, cfg, ctx, qat) if needed else ptq), qat)

    def _train(self, model: nn.Module, calib, cfg: StaticQuantConfig, ctx: StageContext, qat: TrainConfig):
        from .qat import convert_qat, prepare_qat

        trainable, qat_ctx = prepare_qat(model, calib, cfg, learn_scale=self.learn_scale)
        ctx.fit(trainable, qat, "QAT")
        return convert_qat(trainable, qat_ctx)
