"""The schema of ``slimkit.json``: what a model file may declare, checked before anything is built or decoded.

Known fields are typed and bounded; unknown top-level fields are kept (``new_model(**meta)``
records the caller's own). Plan steps are validated by their ops' own schemas (``plan.py``).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import describe_errors
from ..errors import SlimkitError
from ..inputs import InputSpec
from ..limits import MAX_INPUT_ELEMENTS, MAX_META_BYTES, MAX_MODEL_ELEMENTS, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, \
    echo, echo_text

FORMAT_NAME = "slimkit-model"
FORMAT_VERSION = 2  # 2: integer codes may be stored at sparse positions (1 is read too)
META_FILE = "slimkit.json"
WEIGHTS_FILE = "model.safetensors"
DIGEST_PREFIX = "sha256:"

Dims = list[Annotated[int, Field(ge=0)]]


class TensorEncoding(BaseModel):
    """How one tensor is stored (``codec.state``): its layout, shape and code widths."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    encoding: Literal["dense", "bitmask", "indices", "int8-channel", "int4-channel"]
    shape: Dims = Field(max_length=MAX_TENSOR_DIMS)
    codebook_bits: int | None = Field(None, ge=1, le=8)
    positions: Literal["bitmask", "indices"] | None = None
    group_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounded(self) -> "TensorEncoding":
        if math.prod(self.shape) > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"shape {self.shape} has more than {MAX_TENSOR_ELEMENTS:,} elements")
        integer = self.encoding.endswith("-channel")
        if integer and self.codebook_bits is not None or not integer and (self.positions or self.group_size):
            raise ValueError(f"fields that do not belong to a {self.encoding} tensor")
        return self


class ModelMeta(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    format: Literal["slimkit-model"]
    version: int = Field(ge=1, le=FORMAT_VERSION)
    architecture: dict[str, Any]
    plan: list[dict[str, Any]] = Field(default_factory=list)
    tensors: dict[str, TensorEncoding] = Field(default_factory=dict)
    files: dict[str, Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]] = Field(default_factory=dict)
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=MAX_TENSOR_DIMS)
    inputs: InputSpec | None = None  # a model taking several tensors: their names, shapes and dtypes
    num_classes: int | None = Field(None, ge=1)
    data: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "ModelMeta":
        if sum(math.prod(t.shape) for t in self.tensors.values()) > MAX_MODEL_ELEMENTS:
            raise ValueError(f"its tensors declare more than {MAX_MODEL_ELEMENTS:,} elements")
        if self.input_shape and math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {self.input_shape} has more than {MAX_INPUT_ELEMENTS:,} elements")
        return self


def parse_meta(text: str | bytes, source: str) -> dict[str, Any]:
    """The metadata of a model file, validated; every problem is a ``SlimkitError`` naming the field."""
    if len(text) > MAX_META_BYTES:
        raise SlimkitError(f"{source}: {len(text):,} bytes of metadata; at most {MAX_META_BYTES:,} are read")
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlimkitError(f"{source}: not valid JSON ({echo_text(str(exc))})") from None
    except RecursionError:
        raise SlimkitError(f"{source}: JSON nested too deeply to be slimkit metadata") from None
    return validate_meta(raw, source)


def validate_meta(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise SlimkitError(f"{source}: expected a JSON object with \"format\": \"{FORMAT_NAME}\"")
    version = raw.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise SlimkitError(f"{source}: format version {version} is newer than this slimkit reads ({FORMAT_VERSION})")
    try:  # JSON mode: JSON's types, strictly ("2" is not a version)
        ModelMeta.model_validate_json(json.dumps(raw))
    except ValidationError as exc:
        raise SlimkitError(f"{source}: invalid model metadata: " + "; ".join(describe_errors(exc)[:10])) from None
    except (RecursionError, ValueError) as exc:
        raise SlimkitError(f"{source}: invalid model metadata ({echo(type(exc).__name__)})") from None
    return raw
