"""What every request body of the API shares: the input rules of `app.services.inputs`.

A JSON body reaches the database by many routes (a token's name, a project's settings, a
judgment's rationale, a run's config, ...). Each body model derives from `InputModel`, so a NUL
character or a lone surrogate in any of its strings, keys included, or a value nested past the
limit, is a 422 naming the field, on SQLite as on PostgreSQL, before any route code runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from app.services import inputs


class InputModel(BaseModel):
    """A request body: every field's value obeys the input rules."""

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        if (problem := inputs.value_problem(value)) is not None:
            raise PydanticCustomError("unstorable", problem)
        return value
