"""Knowledge distillation through the shared training loop.

``Distiller`` wraps a student and a teacher in one module: its forward returns the
student's logits (so validation, checkpoints and early stopping see the student) and,
while training, also runs the teacher and keeps both outputs and the mapped
intermediate features for ``Distiller.loss``. One-way distillation freezes the teacher
(eval mode, no gradients); ``mutual`` (deep mutual learning, Zhang et al. 2018) trains
both networks, each on the labels and on the other's softened outputs.

Feature distillation (FitNets) maps student layers to teacher layers by name; where
their widths differ a learned projection (a 1x1 convolution for feature maps, a linear
map for vectors and token sequences) carries the student's feature to the teacher's
width. Mapping transformer blocks (``blocks.1`` -> ``blocks.3``) distils hidden states;
``attention`` maps distil attention probabilities (TinyBERT/MiniLM): name a module that outputs
them (an ``nn.Softmax``), or one holding exactly one such softmax (the zoo ViT's
``blocks.N.attn``) or exactly one Hugging Face-style self-attention (``query`` and ``key``
projections, ``attention_head_size``: BERT's ``encoder.layer.N``), whose maps are computed
from its projections and mask, so they exist whether the model runs eager attention or
``scaled_dot_product_attention`` (which never materialises them).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..config import Config
from ..errors import SlimkitError
from ..inputs import call, from_call
from ..models.outputs import prediction
from .losses import attention_loss, feature_loss, kd_loss


class DistillConfig(Config):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)  # weight of the soft (teacher) targets; 1 - alpha on the labels
    features: dict[str, str] = Field(default_factory=dict)  # student layer -> teacher layer
    feature_weight: float = Field(1.0, ge=0)
    attention: dict[str, str] = Field(default_factory=dict)  # student attention module -> teacher's
    attention_weight: float = Field(1.0, ge=0)
    mutual: bool = False  # two-way: the teacher is a peer that learns from the student too


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SlimkitError(f"cannot distil a layer whose output is {type(output).__name__}")


class Distiller(nn.Module):
    """Student + teacher (+ feature projections) trained as one module; see the module docstring."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, example: torch.Tensor,
                 hard_loss=None):
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.hard_loss = hard_loss or F.cross_entropy  # the task's own loss on the labels
        if not cfg.mutual:
            teacher.requires_grad_(False)
        self._captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._hooks = [self._capture(name, "student", _layer(student, name, "student")) for name in cfg.features]
        self._hooks += [self._capture(name, "teacher", _layer(teacher, name, "teacher"))
                        for name in cfg.features.values()]
        for side, model, names in (("student", student, cfg.attention), ("teacher", teacher, cfg.attention.values())):
            for name in names:
                self._hooks += self._capture_attention(name, side, _attention_of(model, name, side))
        self.projections = nn.ModuleDict()
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.features or cfg.attention:
            self._probe(example[:2])

    def _capture(self, key: str, side: str, module: nn.Module):
        return module.register_forward_hook(
            lambda _m, _i, output: self._captured[side].__setitem__(key, _first_tensor(output)))

    def _capture_attention(self, name: str, side: str, module: nn.Module) -> list:
        key = "attention:" + name
        if isinstance(module, nn.Softmax):
            return [self._capture(key, side, module)]
        projected: dict[str, torch.Tensor] = {}

        def keep(which: str):
            return lambda _m, _i, output: projected.__setitem__(which, output)

        def maps(_m, args, kwargs, _output):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self._captured[side][key] = attention_probabilities(module, projected.pop("query"), projected.pop("key"),
                                                                mask)

        return [module.query.register_forward_hook(keep("query")), module.key.register_forward_hook(keep("key")),
                module.register_forward_hook(maps, with_kwargs=True)]

    @torch.no_grad()
    def _probe(self, example: torch.Tensor) -> None:
        """Run both models once: check the mapped shapes, and make projections where widths differ."""
        was = (self.student.training, self.teacher.training)
        example = example.to(next((p.device for p in self.student.parameters()), torch.device("cpu")))
        call(self.student.eval(), example)
        call(self.teacher.eval(), example)
        self.student.train(was[0])
        self.teacher.train(was[1])
        for side, keys in (("student", [*self.cfg.features, *("attention:" + k for k in self.cfg.attention)]),
                           ("teacher", [*self.cfg.features.values(),
                                        *("attention:" + k for k in self.cfg.attention.values())])):
            silent = [k.removeprefix("attention:") for k in keys if k not in self._captured[side]]
            if silent:
                raise SlimkitError(f"distillation: the {side}'s {', '.join(silent)} did not run in its forward pass "
                                   "(a quantized model's layers are graph operations: distil its outputs only)")
        for s_name, t_name in self.cfg.attention.items():
            s, t = self._captured["student"]["attention:" + s_name], self._captured["teacher"]["attention:" + t_name]
            if s.dim() != 4 or t.dim() != 4 or s.shape[2:] != t.shape[2:] or s.shape[-1] != s.shape[-2]:
                raise SlimkitError(f"distillation attention {s_name} -> {t_name}: expected attention maps "
                                   f"(batch, heads, tokens, tokens) over the same tokens, got {tuple(s.shape)} and "
                                   f"{tuple(t.shape)}")
        for s_name, t_name in self.cfg.features.items():
            s, t = self._captured["student"][s_name], self._captured["teacher"][t_name]
            channel = 1 if s.dim() == 4 else -1
            other = [d for i, d in enumerate(s.shape) if i != channel % s.dim()]
            if s.dim() != t.dim() or other != [d for i, d in enumerate(t.shape) if i != channel % t.dim()]:
                raise SlimkitError(f"distillation features {s_name} -> {t_name}: shapes {tuple(s.shape)} and "
                                   f"{tuple(t.shape)} differ beyond their width")
            if s.shape[channel] != t.shape[channel]:
                width_in, width_out = s.shape[channel], t.shape[channel]
                proj = nn.Conv2d(width_in, width_out, 1, bias=False) if s.dim() == 4 else \
                    nn.Linear(width_in, width_out, bias=False)
                self.projections[_key(s_name)] = proj.to(example.device)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if not self.cfg.mutual:
            self.teacher.eval()  # a frozen teacher stays in eval mode (BatchNorm statistics, dropout)
        return self

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        x = from_call(args, kwargs)  # the student's inputs, one tensor or several
        logits = prediction(call(self.student, x))
        if self.training:
            if self.cfg.mutual:
                teacher_logits = prediction(call(self.teacher, x))
            else:
                with torch.no_grad():
                    teacher_logits = prediction(call(self.teacher, x))
            self._outputs = (logits, teacher_logits)
        return logits

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The distillation objective for the batch just run through ``forward`` (in training mode)."""
        if self._outputs is None or self._outputs[0] is not logits:
            raise SlimkitError("Distiller.loss needs the logits of a forward pass in training mode")
        cfg = self.cfg
        student, teacher = self._outputs
        total = (1 - cfg.alpha) * self.hard_loss(student, y) + cfg.alpha * kd_loss(
            student, teacher.detach(), cfg.temperature)
        if cfg.mutual:
            total = total + (1 - cfg.alpha) * self.hard_loss(teacher, y) + cfg.alpha * kd_loss(
                teacher, student.detach(), cfg.temperature)
        for s_name, t_name in cfg.features.items():
            s = self._captured["student"][s_name]
            if _key(s_name) in self.projections:
                s = self.projections[_key(s_name)](s)
            total = total + cfg.feature_weight * feature_loss(s, self._captured["teacher"][t_name].detach())
        for s_name, t_name in cfg.attention.items():
            s, t = self._captured["student"]["attention:" + s_name], self._captured["teacher"]["attention:" + t_name]
            total = total + cfg.attention_weight * attention_loss(s, t.detach())
        self._outputs = None
        return total

    def close(self) -> nn.Module:
        """Remove the hooks; returns the student."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return self.student


def _layer(model: nn.Module, name: str, side: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SlimkitError(f"distillation: the {side} has no layer {name!r}") from None


def _is_projected_attention(module: nn.Module) -> bool:
    """A Hugging Face-style self-attention: query and key projections, heads of ``attention_head_size``."""
    return (isinstance(getattr(module, "query", None), nn.Linear) and isinstance(getattr(module, "key", None), nn.Linear)
            and isinstance(getattr(module, "attention_head_size", None), int))


def _attention_of(model: nn.Module, name: str, side: str) -> nn.Module:
    """Where ``name``'s attention probabilities come from: ``name`` itself or its one ``nn.Softmax`` (which outputs
    them), else its one Hugging Face-style self-attention (whose projections and mask give them)."""
    module = _layer(model, name, side)
    if isinstance(module, nn.Softmax) or _is_projected_attention(module):
        return module
    softmaxes = [m for m in module.modules() if isinstance(m, nn.Softmax)]
    projected = [m for m in module.modules() if _is_projected_attention(m)]
    if len(softmaxes) == 1:
        return softmaxes[0]
    if not softmaxes and len(projected) == 1:
        return projected[0]
    raise SlimkitError(f"distillation attention: the {side}'s {name!r} holds {len(softmaxes)} nn.Softmax modules and "
                       f"{len(projected)} self-attention modules with query/key projections; name the module that "
                       "outputs the attention probabilities, or one self-attention")


def attention_probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) per head, ``(batch, heads, queries, keys)``, from a self-attention's
    projections ``(batch, tokens, heads * head size)``; ``mask``: boolean (True attends) or additive, or None."""
    size = module.attention_head_size
    q = query.unflatten(-1, (-1, size)).transpose(1, 2)
    k = key.unflatten(-1, (-1, size)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * getattr(module, "scaling", size ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1)


def _key(layer: str) -> str:
    return layer.replace(".", "__") or "__root__"
