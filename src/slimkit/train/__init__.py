"""The training loop shared by training from scratch and every recovery stage."""

from .loop import TrainConfig, TrainResult, evaluate, fit
from .run import build_seeded, default_train_config, train_model

__all__ = ["TrainConfig", "TrainResult", "build_seeded", "default_train_config", "evaluate", "fit", "train_model"]
