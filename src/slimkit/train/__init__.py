"""The training loop shared by training from scratch and every recovery stage."""

from .loop import TrainConfig, TrainResult, evaluate, fit
from .run import build_seeded, default_train_config, split_metrics, train_model

__all__ = [
    "TrainConfig", "TrainResult", "build_seeded", "default_train_config", "evaluate", "fit",
    "split_metrics", "train_model",
]
