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
