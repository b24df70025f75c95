"""Base class for every configuration slimkit takes: frozen, strict, dict round-trip.

Unknown keys and wrong types are ``ValueError``s (pydantic's
``ValidationError``) that name the field, which is what makes recipes strict.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return cls.model_validate(data)
