"""Knowledge distillation: soft targets, feature (hint) losses, mutual learning."""

from .distiller import DistillConfig, Distiller
from .losses import feature_loss, kd_loss
from .run import build_student, distill

__all__ = ["DistillConfig", "Distiller", "build_student", "distill", "feature_loss", "kd_loss"]
