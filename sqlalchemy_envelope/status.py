"""What `KeyRegistry.status` reports: the seed's GetStatus and
GetKeyStatistics, as dataclasses that also render as JSON. Nothing here is
secret: key ids, versions, states, times and the root key's fingerprint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .storage import KeyRow, KeyState

__all__ = ["KeyInfo", "RegistryStatus"]


@dataclass(frozen=True)
class KeyInfo:
    """One data key, without its key material."""

    id: int
    scope: str
    version: int
    state: KeyState
    algorithm: str
    root_key_fingerprint: str
    created_at: datetime
    state_changed_at: datetime

    @classmethod
    def from_row(cls, row: KeyRow) -> KeyInfo:
        return cls(
            id=row.id,
            scope=row.scope,
            version=row.version,
            state=row.state,
            algorithm=row.algorithm,
            root_key_fingerprint=row.root_key_fingerprint,
            created_at=row.created_at,
            state_changed_at=row.state_changed_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "version": self.version,
            "state": self.state.value,
            "algorithm": self.algorithm,
            "root_key_fingerprint": self.root_key_fingerprint,
            "created_at": self.created_at.isoformat(),
            "state_changed_at": self.state_changed_at.isoformat(),
        }


@dataclass(frozen=True)
class RegistryStatus:
    """The registry's view of one scope."""

    scope: str
    active_version: int | None
    active_key_id: int | None
    active_age: timedelta | None
    root_key_fingerprint: str
    root_key_description: str
    cache_max_age: timedelta
    keys: tuple[KeyInfo, ...]
    keys_by_state: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "active_version": self.active_version,
            "active_key_id": self.active_key_id,
            "active_age_seconds": (
                None if self.active_age is None else self.active_age.total_seconds()
            ),
            "root_key_fingerprint": self.root_key_fingerprint,
            "root_key_description": self.root_key_description,
            "cache_max_age_seconds": self.cache_max_age.total_seconds(),
            "keys_by_state": dict(self.keys_by_state),
            "keys": [key.to_dict() for key in self.keys],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
