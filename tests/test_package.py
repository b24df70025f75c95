import subprocess
import sys

import pytest
import torch

from slimkit import StageContext, Task, build_model
from slimkit.stages import stage_types
from slimkit.train import TrainConfig

HEAVY = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "transformers")


def test_import_is_light():
    code = f"import sys, slimkit; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("stage_type", sorted(stage_types()))
def test_every_registered_stage_round_trips_and_applies(stage_type, tmp_path, digits):
    """Compliance: defaults are valid, config round-trips through dict, apply keeps the model usable."""
    cls = stage_types()[stage_type]
    extra = {"epochs": 1} if "epochs" in cls.model_fields else {}
    extra |= {name: {"epochs": 1} for name, field in cls.model_fields.items()  # distill: train.epochs (30)
              if isinstance(field.default, TrainConfig) and field.default.epochs}
    stage = cls.model_validate({"type": stage_type, **extra})
    assert cls.from_dict(stage.to_dict()) == stage
    arch = {"zoo": "vit" if stage_type == "drop-layers" else "lenet300"}  # (an MLP has no stack of blocks)
    model = build_model(arch)
    ctx = StageContext(Task.classification(digits), tmp_path, tmp_path / "stage", progress=False,
                       baseline=build_model(arch))  # as the pipeline gives it
    out = stage.apply(model, ctx)
    assert out(digits.x_test[:3]).shape == (3, 10)
    assert all(torch.isfinite(p).all() for p in out.parameters())
