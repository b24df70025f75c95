"""Rebuild an ``nn.Module`` from the architecture spec stored in ``slimkit.json``.

Three kinds, one key each:

* ``{"zoo": "lenet5", "args": {...}}`` - a built-in model;
* ``{"factory": "package.module:function", "args": {...}}`` - the user's own
  class or function; importing it runs code, so it needs ``trust_code=True``
  (a model directory from elsewhere must not be able to name ``os:system``);
* ``{"torchvision": "resnet18", "args": {"num_classes": 10}}`` - a torchvision classification
  architecture (needs the ``vision`` extra; no code from the model file runs, no weights downloaded);
* ``{"huggingface": "/local/dir" | {config}, "task": "sentence-embedding"|"sequence-classification"|"base"}`` -
  a Hugging Face encoder from a local directory (loaded offline) or from its config (needs the ``hf`` extra);
  see ``models.text``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ..limits import MAX_MODEL_ELEMENTS, echo, echo_text
from .zoo import ZOO

KINDS = ("zoo", "factory", "torchvision", "huggingface")


def build_model(arch: dict[str, Any], trust_code: bool = False) -> nn.Module:
    if not isinstance(arch, dict):
        raise SlimkitError(f"architecture must be a mapping, got {type(arch).__name__}")
    kinds = [k for k in KINDS if k in arch]
    if len(kinds) != 1:
        raise SlimkitError(f"architecture needs exactly one of {', '.join(map(repr, KINDS))}, got {sorted(arch)}")
    args = arch.get("args", {})
    if not isinstance(args, dict):
        raise SlimkitError(f"architecture 'args' must be a mapping, got {type(args).__name__}")
    kind = kinds[0]
    if kind == "zoo":
        return _zoo(arch["zoo"], args)
    if kind == "factory":
        return _factory(arch["factory"], args, trust_code)
    if kind == "torchvision":
        from .vision import build_torchvision

        return build_torchvision(arch["torchvision"], args)
    from .text import build_text_model

    return build_text_model(arch)


TORCHVISION = "torchvision:"


def named_spec(name: str, args: dict[str, Any] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """The architecture spec of a model named on the command line or in a recipe: a zoo name, or
    ``torchvision:NAME``, whose classifier is sized for the data's ``num_classes`` unless ``args`` say otherwise."""
    args = dict(args or {})
    if name.startswith(TORCHVISION):
        return {"torchvision": name[len(TORCHVISION):], "args": {**({"num_classes": num_classes} if num_classes else {}),
                                                               **args}}
    if name not in ZOO:
        raise SlimkitError(f"unknown model {echo(name)}; choose a zoo model ({', '.join(ZOO)}) or torchvision:NAME "
                           "(any torchvision classification architecture, e.g. torchvision:resnet18)")
    return {"zoo": name, "args": args}


def _zoo(name: str, args: dict[str, Any]) -> nn.Module:
    """A built-in model; its arguments are tried on the meta device first (no memory), so arguments asking
    for an absurd size are an error before anything is allocated."""
    if not isinstance(name, str) or name not in ZOO:
        raise SlimkitError(f"unknown zoo model {echo(name)}; choose one of {', '.join(ZOO)}")
    try:
        params = 0
        if args:  # (the defaults are known to be small)
            with torch.device("meta"):
                params = sum(p.numel() for p in ZOO[name].build(**args).parameters())
        if params > MAX_MODEL_ELEMENTS:
            raise SlimkitError(f"zoo model {name!r} with arguments {echo(args)} would have {params:,} parameters; "
                               f"at most {MAX_MODEL_ELEMENTS:,} are built")
        return ZOO[name].build(**args)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise SlimkitError(f"zoo model {name!r}: bad arguments {echo(args)} ({echo_text(str(exc))})") from None


def _factory(target: str, args: dict[str, Any], trust_code: bool) -> nn.Module:
    if not trust_code:
        raise SlimkitError(
            f"architecture names Python code {target!r}; importing it runs that code. "
            "Pass trust_code=True (CLI: --trust-code) if you trust this model directory."
        )
    module_name, _, attr = str(target).partition(":")
    if not module_name or not attr:
        raise SlimkitError(f"factory {target!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SlimkitError(
            f"factory {target!r}: cannot import module {module_name!r} ({exc}). The module must be importable where "
            f"slimkit runs: install its package (pip install -e .), or add the folder holding it to PYTHONPATH "
            f"(PYTHONPATH=/path/to/folder slimkit ...)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise SlimkitError(f"factory {target!r}: module {module_name!r} has no {attr!r}") from None
    model = fn(**args)
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"factory {target!r} returned {type(model).__name__}, not an nn.Module")
    return model
