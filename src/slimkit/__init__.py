"""slimkit: make trained PyTorch models smaller and faster, and prove it with measured numbers.

Importing slimkit imports torch but not onnx, onnxruntime, matplotlib or transformers.
"""

__version__ = "0.1.0"

from .analyze import count_macs, count_params, measure_latency, profile
from .data import Splits, calibration_subset, load_data, make_loader
from .errors import SlimkitError
from .export import export_onnx
from .modelfile import load, new_model, save
from .models import ZOO, build_model
from .models.text import pack_named_batch
from .pipeline import run_recipe
from .recipe import Recipe, load_recipe, parse_recipe
from .stages import Stage, StageContext, register_stage
from .task import Task
from .train import TrainConfig, evaluate, fit, train_model
from .verbs import (
    ClusterStage, DistillStage, FactorizeStage, PruneStage, QuantizeStage, cluster, distill, factorize, prune, quantize,
)

__all__ = [
    "ClusterStage", "DistillStage", "FactorizeStage", "PruneStage", "QuantizeStage", "ZOO", "Recipe",
    "SlimkitError", "Splits", "Stage", "StageContext", "Task", "TrainConfig", "__version__", "build_model",
    "calibration_subset", "cluster", "count_macs", "count_params", "distill", "evaluate", "export_onnx",
    "factorize", "fit", "load", "load_data", "load_recipe", "make_loader", "measure_latency", "new_model",
    "pack_named_batch", "parse_recipe", "profile", "prune", "quantize", "register_stage", "run_recipe", "save", "train_model",
]
