"""Compression plans: structural changes recorded as data and replayed on load.

A pruned or factorized model no longer matches the architecture it was built
from. Instead of pickling its code, each structural method records a plan
step (``{"op": ..., ...}``) in ``slimkit.json`` and registers, with a schema of
the step's fields, a function that re-applies it to a freshly built module, so
the weights fit again. A step read from a file is validated against its
schema before it is replayed: a malformed step is an error naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from .config import describe_errors
from .errors import SlimkitError
from .limits import echo, echo_text

PlanStep = dict[str, Any]
Replayer = Callable[[nn.Module, PlanStep], nn.Module]


class StepSchema(BaseModel):
    """Base of every plan op's schema: strict types, no unknown keys. Subclasses fix ``op`` with a Literal."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    op: str


_OPS: dict[str, tuple[type[StepSchema], Replayer]] = {}


def register_plan_op(schema: type[StepSchema]) -> Callable[[Replayer], Replayer]:
    """Decorator: ``fn(model, step) -> model`` re-applies steps of ``schema``'s op."""
    op = schema.model_fields["op"].default
    if not isinstance(op, str):
        raise TypeError(f"{schema.__name__}.op needs a string default naming the op")

    def decorator(fn: Replayer) -> Replayer:
        if op in _OPS:
            raise ValueError(f"plan op {op!r} is already registered")
        _OPS[op] = (schema, fn)
        return fn

    return decorator


def plan_ops() -> dict[str, tuple[type[StepSchema], Replayer]]:
    """Every registered plan op (importing the built-in ones on first use)."""
    from .lowrank import svd as _svd  # noqa: F401  (register their plan ops)
    from .pruning import layers as _layers  # noqa: F401
    from .pruning import structured as _structured  # noqa: F401
    from .quant import ptq as _ptq  # noqa: F401

    return dict(_OPS)


def validate_step(step: Any, where: str, source: str) -> tuple[type[StepSchema], Replayer]:
    """The schema and replayer of ``step``, once it is known to be a well-formed step of a known op."""
    ops = plan_ops()
    op = step.get("op") if isinstance(step, dict) else None
    if not isinstance(op, str) or op not in ops:
        raise SlimkitError(f"{source}: {where} has unknown op {echo(op)} (this slimkit knows: {', '.join(sorted(ops))})")
    schema, replayer = ops[op]
    try:  # JSON mode: the step is JSON data (lists where the schema says tuples), with JSON's strict types
        schema.model_validate_json(json.dumps(step))
    except ValidationError as exc:
        raise SlimkitError(f"{source}: {where} ({op}) is malformed: " + "; ".join(describe_errors(exc, where))) from None
    return schema, replayer


REPLAY_FAILURES = (AttributeError, KeyError, IndexError, ValueError, TypeError, RuntimeError)


def replay_plan(model: nn.Module, plan: list[PlanStep], source: str) -> nn.Module:
    for i, step in enumerate(plan):
        _, replayer = validate_step(step, f"plan[{i}]", source)
        try:
            model = replayer(model, step)
        except SlimkitError as exc:
            raise SlimkitError(f"{source}: plan[{i}] ({step['op']}): {exc}") from None
        except REPLAY_FAILURES as exc:  # a step that names layers or sizes this architecture does not have
            raise SlimkitError(f"{source}: plan[{i}] ({step['op']}) does not fit this architecture "
                               f"({type(exc).__name__}: {echo_text(str(exc))})") from None
    return model
