"""How the report dataclasses render as JSON: one rule for each kind of value,
in one place, so that every report writes times, durations and states alike."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any, ClassVar

__all__ = ["Report", "plain", "plain_fields"]


def plain(value: Any) -> Any:
    """``value`` in JSON's types: a report as its dict, a time in ISO 8601, a
    duration in seconds, a state by its value, a mapping with text keys in
    key order; anything else JSON lacks as its text."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Report):
        return value.to_dict()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return str(value)


def plain_fields(entries: Mapping[str, Any]) -> dict[str, Any]:
    """A report's entries, by name, in JSON's types."""
    return {name: plain(value) for name, value in entries.items()}


class Report:
    """A report dataclass: ``to_dict`` gives its public fields in JSON's
    types (a report whose JSON differs from its fields overrides it), and
    ``to_json`` the same as text."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # the subclasses are dataclasses

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(
            {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
