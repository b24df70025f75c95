"""Distillation losses, as pure functions of outputs."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` keeps the soft targets' gradients on the same scale as the hard targets'
    whatever the temperature.
    """
    t = temperature
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return kl.mean() * t * t


def feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., 2015) hint loss: mean squared error between (projected) features."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student_feature.shape)}, "
                         f"teacher {tuple(teacher_feature.shape)}")
    return F.mse_loss(student_feature, teacher_feature)


def attention_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention distributions (TinyBERT / MiniLM), averaged over rows.

    Inputs are attention probabilities ``(batch, heads, queries, keys)``. With different head
    counts the heads' mean maps are compared (each still a distribution over the keys).
    """
    dtype = torch.promote_types(student_attention.dtype, torch.float32)  # bf16/fp16 maps: the loss in fp32
    s, t = student_attention.to(dtype), teacher_attention.to(dtype)
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"attention maps differ beyond their head count: student {tuple(s.shape)}, "
                         f"teacher {tuple(t.shape)}")
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    log_s = s.clamp_min(torch.finfo(s.dtype).tiny).log()  # a probability that underflowed to 0 stays finite
    kl = torch.xlogy(t, t) - t * log_s  # 0 log 0 = 0 where the teacher gives a key no weight
    return kl.sum(-1).mean()
