"""Quantization-aware training: learn through the quantizers, then freeze into the same deployable graph.

``prepare_qat`` calibrates like static PTQ, but inserts trainable fake quantizers:
rounding passes gradients straight through (STE), and with ``learn_scale`` each
quantizer's step size is a parameter trained with LSQ's gradient scaling (Esser
et al., 2020). BatchNorm is folded first. Weights that are exactly zero (a pruned
model) are masked so they stay zero. ``convert_qat`` rebuilds the plain
fake-quantized graph from the trained weights and learned scales, so a QAT model
is saved, replayed and exported exactly like a PTQ one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import SlimkitError
from ..inputs import Inputs
from ..pruning.mask import remove_masks, set_mask
from .ops import expand_group_scale
from .ptq import (activation_limits, StaticQuantConfig, _convert, _weight_arg, _weight_name, capture, plan_example,
                  quantize_static, weight_scales, weight_scheme)


class LearnedFakeQuant(nn.Module):
    """Fake quantization with a straight-through estimator and (optionally) a learned step size."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, learn_scale: bool = True,
                 group_size: int | None = None, activation: bool = False):
        super().__init__()
        self.scale = nn.Parameter(scale.clone().float(), requires_grad=learn_scale)
        self.register_buffer("zero", zero.clone().float())
        self.qmin, self.qmax, self.group_size, self.activation = qmin, qmax, group_size, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.abs().clamp_min(1e-8)
        if self.group_size:  # symmetric weights: zero is 0
            scale, zero = expand_group_scale(scale, x.shape, self.group_size), 0.0
        else:
            shape = (-1,) + (1,) * (x.dim() - 1) if self.scale.numel() > 1 else ()
            scale, zero = scale.reshape(shape), self.zero.reshape(shape)
        # LSQ: values per step size, per sample for activations (so neither the batch size nor a
        # data-parallel split changes the update), keeps step-size updates on the weights' scale
        per_scale = (x[0].numel() if self.activation else x.numel()) / max(1, self.scale.numel())
        g = 1.0 / math.sqrt(per_scale * self.qmax)
        scale = (scale - scale * g).detach() + scale * g
        v = x / scale + zero
        q = torch.clamp((v.round() - v).detach() + v, self.qmin, self.qmax)
        return (q - zero) * scale


@dataclass
class QATContext:
    """What conversion needs besides the trained graph: the plan step being learned and the float model."""

    step: dict[str, Any]
    folded: nn.Module


def prepare_qat(model: nn.Module, calib: Inputs, cfg: StaticQuantConfig | None = None,
                learn_scale: bool = True) -> tuple[fx.GraphModule, QATContext]:
    """A trainable graph with quantizers initialised from calibration (and the context to convert it)."""
    cfg = cfg or StaticQuantConfig()
    if cfg.weight_levels != "linear":
        raise SlimkitError("quantization-aware training learns linear step sizes: use weight_levels 'linear'")
    if cfg.activations == "dynamic":
        raise SlimkitError("quantization-aware training learns fixed activation ranges: use static activations "
                           "(or none) rather than dynamic")
    _, step = quantize_static(model, calib, cfg)
    from .ptq import fold_batchnorm

    folded, _ = fold_batchnorm(model, calib) if cfg.fold_bn else (model, [])
    gm = capture(folded, calib)
    nodes = {node.name: node for node in gm.graph.nodes}
    for i, (name, spec) in enumerate(step["weights"].items()):
        qmax_w = weight_scheme(spec["bits"]).qmax
        op = next(n for n in gm.graph.nodes if n.op == "call_function" and _weight_name(n) == name)
        weight = gm.get_parameter(name).detach()
        scale = weight_scales(weight, spec, cfg)
        module = LearnedFakeQuant(scale, torch.zeros_like(scale), -qmax_w, qmax_w, learn_scale, spec.get("group_size"))
        gm.add_submodule(f"_slimkit_wq_{i}", module)
        stored = op.args[_weight_arg(op)]
        with gm.graph.inserting_before(op):
            fq = gm.graph.call_module(f"_slimkit_wq_{i}", (stored,))
        op.replace_input_with(stored, fq)
        if bool((weight == 0).any()):  # a pruned model: its zeros stay zeros
            owner, _, attr = name.rpartition(".")
            set_mask(gm.get_submodule(owner), (weight != 0).float(), attr)
    for i, (name, (scale, zero)) in enumerate(step["activations"].items()):
        value = nodes[name]
        module = LearnedFakeQuant(torch.tensor(scale), torch.tensor(float(zero)), *activation_limits(step),
                                  learn_scale, activation=True)
        gm.add_submodule(f"_slimkit_aq_{i}", module)
        with gm.graph.inserting_after(value):
            node = gm.graph.call_module(f"_slimkit_aq_{i}", (value,))
        value.replace_all_uses_with(node, delete_user_cb=lambda user, n=node: user is not n)
    gm.graph.lint()
    gm.recompile()
    gm.requires_grad_(True)
    for module in gm.modules():  # a quantizer without learned scale keeps it fixed
        if isinstance(module, LearnedFakeQuant):
            module.scale.requires_grad_(learn_scale)
    return gm, QATContext(step, folded)


@torch.no_grad()
def convert_qat(gm: fx.GraphModule, ctx: QATContext) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Freeze the learned scales and trained weights into the standard quantized graph and plan step."""
    remove_masks(gm)
    step = {**ctx.step, "activations": dict(ctx.step["activations"]), "qat": True}
    for i, name in enumerate(step["activations"]):
        module = gm.get_submodule(f"_slimkit_aq_{i}")
        zero = int(module.zero)
        step["activations"][name] = [float(module.scale.abs()), zero]
    scales = {name: gm.get_submodule(f"_slimkit_wq_{i}").scale.detach().abs().clone()
              for i, name in enumerate(step["weights"])}
    folded = ctx.folded
    trained = {k: v for k, v in gm.state_dict().items() if not k.startswith("_slimkit_")}
    folded.load_state_dict(trained, strict=True)
    final = _convert(capture(folded, plan_example(step)), step, scales)
    return final, step
