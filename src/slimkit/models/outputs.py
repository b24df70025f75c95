"""What a model predicts, whatever shape its output takes.

slimkit trains, scores, distils and checks exports on one tensor per batch. Many models return
more: a Hugging Face model a ``ModelOutput`` (``logits`` or ``last_hidden_state`` first),
torchvision's Inception ``InceptionOutputs`` in training mode, user models a tuple or a dict.
The prediction is the output itself when it is a tensor, otherwise its first tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SlimkitError


def prediction(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else None
    if values is not None:
        for value in values:  # a ModelOutput is an ordered dict: its first field is the prediction
            if isinstance(value, torch.Tensor):
                return value
    raise SlimkitError(f"the model returned a {type(output).__name__} holding no tensor: slimkit needs a tensor, or "
                       "a tuple, dict or ModelOutput whose first tensor is the prediction")
