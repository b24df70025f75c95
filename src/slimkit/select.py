"""Which layers a method touches: by module type, then include/exclude name globs.

Kept apart from the methods so that skipping the first or last layer, or a
sensitive block, is configuration rather than code.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

from torch import nn

from .errors import SlimkitError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv1d)


def select_layers(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``types`` whose name matches an include glob and no exclude glob."""
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, types)
        and any(fnmatchcase(name, pattern) for pattern in include)
        and not any(fnmatchcase(name, pattern) for pattern in exclude)
    ]
    if not chosen:
        kinds = ", ".join(t.__name__ for t in types)
        raise SlimkitError(f"no layers selected (types {kinds}, include {list(include)}, exclude {list(exclude)})")
    return chosen
