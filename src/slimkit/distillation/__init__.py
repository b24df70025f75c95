"""Knowledge distillation: soft targets, feature (hint) and attention-map losses, mutual learning."""

from .distiller import DistillConfig, Distiller
from .losses import attention_loss, feature_loss, kd_loss
from .run import build_student, distill

__all__ = ["DistillConfig", "Distiller", "attention_loss", "build_student", "distill", "feature_loss", "kd_loss"]
