"""Layer dropping: remove whole blocks from a stack of identical blocks (a transformer's encoder layers).

A student made by dropping layers starts from the teacher's own weights, as DistilBERT's and
the MiniLM/TinyBERT students do, and recovers with distillation from the full model. The
removal is a plan step (which blocks of how many were kept), so a saved model rebuilds from its
original architecture with the same blocks.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field
from torch import nn

from ..errors import SlimkitError
from ..plan import StepSchema, register_plan_op

PLAN_OP = "drop-layers"


class DropLayersStep(StepSchema):
    op: Literal["drop-layers"] = PLAN_OP
    container: str = Field(min_length=1)  # the stack of blocks (an nn.ModuleList or nn.Sequential)
    original: int = Field(ge=2)  # how many blocks it held
    keep: list[int] = Field(min_length=1)  # the blocks kept, in order


STACKS = (nn.ModuleList, nn.Sequential)


def layer_stack(model: nn.Module) -> str:
    """The name of ``model``'s longest ``nn.ModuleList`` or ``nn.Sequential`` of blocks of one type (a
    transformer's layers)."""
    stacks = [(len(module), name) for name, module in model.named_modules()
              if isinstance(module, STACKS) and len(module) > 1 and len({type(m) for m in module}) == 1]
    if not stacks:
        raise SlimkitError(f"{type(model).__name__} has no stack of repeated blocks (an nn.ModuleList or "
                           "nn.Sequential of one block type) to drop layers from")
    return max(stacks, key=lambda s: s[0])[1]


def spaced_layers(total: int, count: int) -> list[int]:
    """``count`` of ``total`` blocks, evenly spaced and ending with the last (TinyBERT's uniform mapping:
    the student's m-th layer is the teacher's ``m * total / count``-th)."""
    if not 1 <= count < total:
        raise SlimkitError(f"keeping {count} of {total} layers: keep at least 1 and fewer than {total}")
    return [round((i + 1) * total / count) - 1 for i in range(count)]


def drop_layers(model: nn.Module, keep: int | list[int] | None = None,
                container: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` keeping ``keep`` blocks of its layer stack (a count: evenly spaced, see
    ``spaced_layers``; the indices; or None: half, rounded up, as DistilBERT halves BERT), and the plan
    step that replays it. ``container`` names the stack (default: the longest stack of one block type)."""
    name = container or layer_stack(model)
    stack = _stack(model, name)
    keep = (len(stack) + 1) // 2 if keep is None else keep
    indices = spaced_layers(len(stack), keep) if isinstance(keep, int) else list(keep)
    step = {"op": PLAN_OP, "container": name, "original": len(stack), "keep": indices}
    dropped = apply_drop(copy.deepcopy(model), step)
    meta = getattr(model, "slimkit_meta", None)
    if meta is not None:
        dropped.slimkit_meta = {**meta, "plan": [*meta.get("plan", []), step]}
    return dropped, step


@register_plan_op(DropLayersStep)
def apply_drop(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Keep the step's blocks; a Hugging Face config that counts them (``num_hidden_layers``) follows, and each
    kept layer's ``layer_idx`` becomes its new position."""
    stack, keep = _stack(model, step["container"]), step["keep"]
    if len(stack) != step["original"]:
        raise SlimkitError(f"{step['container']} holds {len(stack)} blocks, the plan drops from {step['original']}")
    if sorted(set(keep)) != keep or not all(0 <= i < len(stack) for i in keep) or len(keep) == len(stack):
        raise SlimkitError(f"layers to keep must be increasing indices below {len(stack)}, fewer than all of them; "
                           f"got {keep}")
    kept = type(stack)(*[stack[i] for i in keep]) if isinstance(stack, nn.Sequential) else \
        nn.ModuleList(stack[i] for i in keep)
    parent, _, attr = step["container"].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    for position, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "num_hidden_layers", None) == len(stack):
            config.num_hidden_layers = len(keep)
    return model


def _stack(model: nn.Module, name: str) -> nn.ModuleList | nn.Sequential:
    try:
        stack = model.get_submodule(name)
    except AttributeError:
        raise SlimkitError(f"{type(model).__name__} has no module {name!r} to drop layers from") from None
    if not isinstance(stack, STACKS) or len(stack) < 2:
        raise SlimkitError(f"{name} is not a stack of blocks (an nn.ModuleList or nn.Sequential of at least 2)")
    return stack
