"""torchvision's classification models as architectures (``{"torchvision": "resnet18", "args": {...}}``).

torchvision is an optional extra (``slimkit[vision]``). The wheel PyPI serves for Linux x86_64 is a
CUDA build: beside a CPU-only torch its C++ operators (detection ops such as ``nms`` and
``roi_align``) cannot load, and ``import torchvision`` fails while registering their meta kernels,
although no classification model uses them. ``import_torchvision`` then imports it without those
registrations; the detection ops still raise torchvision's own error if called.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ..limits import MAX_MODEL_ELEMENTS, echo, echo_text

META_REGISTRATIONS = "torchvision._meta_registrations"


def import_torchvision():
    try:
        import torchvision
    except ImportError:
        raise SlimkitError("torchvision models need the vision extra: pip install 'slimkit[vision]'") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules[META_REGISTRATIONS] = types.ModuleType(META_REGISTRATIONS)  # the ops it registers are absent
        import torchvision
    return torchvision


def classification_models() -> list[str]:
    """Every torchvision classification architecture (not detection, segmentation, video or optical flow)."""
    models = import_torchvision().models
    return models.list_models(module=models)


def build_torchvision(name: str, args: dict[str, Any]) -> nn.Module:
    """A torchvision classifier, randomly initialised (weights come from the model file; none are downloaded)."""
    if not isinstance(name, str) or name not in classification_models():
        raise SlimkitError(f"unknown torchvision classification model {echo(name)}; see "
                           "torchvision.models.list_models(module=torchvision.models)")
    if "weights" in args:
        raise SlimkitError("torchvision 'weights' download from a hub; load your weights from a model file instead")
    models = import_torchvision().models
    try:
        params = _parameters_on_meta(models, name, args)
        if params > MAX_MODEL_ELEMENTS:
            raise SlimkitError(f"torchvision {name} with arguments {echo(args)} would have {params:,} parameters")
        model = models.get_model(name, **args)
        params = sum(p.numel() for p in model.parameters())
        if params > MAX_MODEL_ELEMENTS:  # a builder the meta probe could not run
            raise SlimkitError(f"torchvision {name} with arguments {echo(args)} has {params:,} parameters")
        return model
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise SlimkitError(f"torchvision {name}: bad arguments {echo(args)} ({echo_text(str(exc))})") from None


def _parameters_on_meta(models, name: str, args: dict[str, Any]) -> int:
    """The parameter count, found without allocating (the size limit is checked before any memory is used);
    0 when the builder computes with tensor values (RegNet derives its widths with torch ops), which the
    meta device does not hold: only architecture-chosen sizes are at stake there, checked after building."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in models.get_model(name, **args).parameters())
    except NotImplementedError:
        return 0
