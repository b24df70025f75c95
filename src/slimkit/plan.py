"""Compression plans: structural changes recorded as data and replayed on load.

A pruned or factorized model no longer matches the architecture it was built
from. Instead of pickling its code, each structural method records a plan
step (``{"op": ..., ...}``) in ``slimkit.json`` and registers a function here
that re-applies it to a freshly built module, so the weights fit again.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .errors import SlimkitError

PlanStep = dict[str, Any]
_REPLAYERS: dict[str, Callable[[nn.Module, PlanStep], nn.Module]] = {}


def register_plan_op(op: str) -> Callable:
    """Decorator: ``fn(model, step) -> model`` re-applies steps whose ``op`` is ``op``."""

    def decorator(fn: Callable[[nn.Module, PlanStep], nn.Module]) -> Callable:
        if op in _REPLAYERS:
            raise ValueError(f"plan op {op!r} is already registered")
        _REPLAYERS[op] = fn
        return fn

    return decorator


def replay_plan(model: nn.Module, plan: list[PlanStep], source: str) -> nn.Module:
    from .lowrank import svd as _svd  # noqa: F401  (register their plan ops)
    from .prune import structured as _structured  # noqa: F401
    from .quant import ptq as _ptq  # noqa: F401

    for i, step in enumerate(plan):
        op = step.get("op") if isinstance(step, dict) else None
        if op not in _REPLAYERS:
            known = ", ".join(sorted(_REPLAYERS)) or "none"
            raise SlimkitError(f"{source}: plan step {i} has unknown op {op!r} (this slimkit knows: {known})")
        model = _REPLAYERS[op](model, step)
    return model
