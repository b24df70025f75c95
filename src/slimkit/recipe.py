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

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import Config, describe_errors, suggest
from .errors import SlimkitError
from .limits import MAX_RECIPE_BYTES, MAX_YAML_NODES, echo, echo_text
from .stages import Stage, stage_types
from .train.loop import TrainConfig


MAX_PROBLEMS = 20  # listed in one error message


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
    # the report warns when a stage loses more than this much of the metric against the baseline (0.01: a point)
    max_metric_drop: float = Field(0.01, ge=0)


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
        cls = registry.get(raw["type"]) if isinstance(raw["type"], str) else None
        if cls is None:
            problems.append(f"{where}.type: unknown stage type {echo(raw['type'])}"
                            f"{suggest(raw['type'], registry) if isinstance(raw['type'], str) else ''}; "
                            f"known: {', '.join(registry)}")
            continue
        try:
            stages.append(cls.model_validate(raw))
        except ValidationError as exc:
            problems += describe_errors(exc, where, cls)
    problems += _order_problems(stages)
    try:
        recipe = Recipe.model_validate({**data, "stages": []})
    except ValidationError as exc:
        problems = describe_errors(exc, "", Recipe) + problems
        recipe = None
    if problems:
        shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"]
                                           if len(problems) > MAX_PROBLEMS else [])
        raise SlimkitError(f"{source}: invalid recipe:\n  " + "\n  ".join(shown))
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
    """Read and validate a YAML recipe."""
    return parse_recipe(read_recipe(path), str(path))


def read_recipe(path: str | os.PathLike) -> Any:
    """A recipe file's data; its size, nesting and alias expansion are bounded before anything else."""
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"{path}: recipe file not found")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise SlimkitError(f"{path}: {size:,} bytes; a recipe may have at most {MAX_RECIPE_BYTES:,}")
    try:
        return _yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise SlimkitError(f"{path}: not valid YAML ({echo_text(str(exc))})") from None


def _yaml(text: str, source: str) -> Any:
    try:
        loader = _YamlLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expansion(node, source)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SlimkitError(f"{source}: not valid YAML ({echo_text(str(exc))})") from None
    except RecursionError:
        raise SlimkitError(f"{source}: nested too deeply to be a recipe") from None


def override_recipe(data: Any, *, model: str | None = None, data_spec: str | None = None,
                    assignments: list[str] = ()) -> Any:
    """A recipe's data with the command line's changes: ``model`` (a model path, replacing the recipe's model
    section), ``data_spec`` and ``KEY=VALUE`` assignments (dotted keys, list indices as numbers, YAML values).
    The result is validated like the file, so a misspelled key or a wrong type is named the same way."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    if model is not None:
        data["model"] = {"path": model, **{k: v for k, v in (data.get("model") or {}).items() if k == "trust_code"}}
    if data_spec is not None:
        data["data"] = data_spec
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise SlimkitError(f"--set {echo(assignment)}: expected KEY=VALUE, e.g. stages.0.sparsity=0.8")
        _assign(data, key.split("."), _yaml(text, f"--set {key}") if text else None, key)
    return data


def _assign(data: Any, path: list[str], value: Any, key: str) -> None:
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(data, list):
            if not part.isdigit() or int(part) >= len(data):
                raise SlimkitError(f"--set {key}: {'.'.join(path[:depth]) or 'the recipe'} is a list of "
                                   f"{len(data)}; {part!r} is not an index of it")
            index: Any = int(part)
        elif isinstance(data, dict):
            index = part
            if not last and not isinstance(data.get(part), (dict, list)):
                data[part] = {}
        else:
            raise SlimkitError(f"--set {key}: {'.'.join(path[:depth])} is a value, not a section")
        if last:
            data[index] = value
        else:
            data = data[index]


def _check_expansion(root: yaml.Node, path: str) -> None:
    """Count the values the document holds once its aliases are expanded, without expanding them: a few
    hundred bytes of nested aliases can stand for billions of values. A recursive alias is refused too."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > MAX_YAML_NODES:
                raise SlimkitError(f"{path}: expands to more than {MAX_YAML_NODES:,} values through YAML aliases; "
                                   "a recipe may hold at most that many")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise SlimkitError(f"{path}: a YAML alias refers to itself (a recursive structure is not a recipe)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
