"""The base of every settings block and the one way a validation error becomes a message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """Base for every config block: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe(err: ValidationError) -> str:
    """``key.path: message`` of the first error (+ how many more)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing (params.yaml holds the project's only defaults)"
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (+{more} more)" if more else "")
