"""Strict YAML recipes: every unknown key and wrong type is an error naming its path.

    name: baseline
    seed: 0
    data: digits
    model: {zoo: lenet5, train: {epochs: 40}}   # or {path: runs/x/model}
    stages:
      - {type: finetune, epochs: 3}
      - {type: export, format: onnx}
    evaluate: {latency: true, threads: 1}
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import Config
from .errors import SlimkitError
from .stages import Stage, stage_types
from .train.loop import TrainConfig


class ModelSection(Config):
    zoo: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    trust_code: bool = False
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.zoo is None) == (self.path is None):
            raise ValueError("give exactly one of 'zoo' (train a built-in model) or 'path' (load a model)")
        return self


class EvaluateSection(Config):
    latency: bool = True
    threads: int = Field(1, ge=1)


class Recipe(Config):
    name: str = "recipe"
    seed: int = 0
    data: str = "digits"
    model: ModelSection
    stages: list[Stage] = Field(default_factory=list)
    evaluate: EvaluateSection = EvaluateSection()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["stages"] = [s.to_dict() for s in self.stages]
        return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2), as people write learning rates."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."),
)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; all problems are reported together, each with its key path."""
    if not isinstance(data, dict):
        raise SlimkitError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    problems: list[str] = []
    raw_stages = data.get("stages", [])
    stages: list[Stage] = []
    if not isinstance(raw_stages, list):
        problems.append(f"stages: expected a list of stages, got {type(raw_stages).__name__}")
        raw_stages = []
    registry = stage_types()
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict) or "type" not in raw:
            problems.append(f"{where}: expected a mapping with a 'type' key (one of {', '.join(registry)})")
            continue
        cls = registry.get(raw["type"])
        if cls is None:
            problems.append(f"{where}.type: unknown stage type {raw['type']!r}{_suggest(raw['type'], registry)}; "
                            f"known: {', '.join(registry)}")
            continue
        try:
            stages.append(cls.model_validate(raw))
        except ValidationError as exc:
            problems += _describe(exc, where, cls)
    problems += _order_problems(stages)
    try:
        recipe = Recipe.model_validate({**data, "stages": []})
    except ValidationError as exc:
        problems = _describe(exc, "", Recipe) + problems
        recipe = None
    if problems:
        raise SlimkitError(f"{source}: invalid recipe:\n  " + "\n  ".join(problems))
    return recipe.model_copy(update={"stages": stages})


def _order_problems(stages: list[Stage]) -> list[str]:
    """Stages that need float weights cannot follow quantize (its output is integer codes)."""
    first = next((i for i, stage in enumerate(stages) if stage.type == "quantize"), None)
    if first is None:
        return []
    return [f"stages[{i}]: a {stage.type} stage works on float weights, but stages[{first}] (quantize) made them "
            "integer codes; put it before the quantize stage" for i, stage in enumerate(stages)
            if i > first and stage.needs_float_model]


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SlimkitError(f"{path}: not valid YAML ({exc})") from None
    return parse_recipe(data, str(path))


def _describe(exc: ValidationError, prefix: str, model: type[Config]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        loc = loc or "(top level)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            allowed = _allowed_keys(model, err["loc"][:-1])
            out.append(f"{loc}: unknown key{_suggest(key, allowed)}" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        elif err["type"] == "missing":
            out.append(f"{loc}: required key is missing")
        else:
            out.append(f"{loc}: {err['msg'].rstrip('.')}, got {err.get('input')!r}")
    return out


def _allowed_keys(model: type[Config], loc: tuple) -> list[str]:
    """Field names of the (nested) config class at ``loc``, for "did you mean" hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, Config)):
            return []
        model = annotation
    return list(model.model_fields)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
