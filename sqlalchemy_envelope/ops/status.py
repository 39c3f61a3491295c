"""What `KeyRegistry.status` and `KeyRegistry.maintenance` report: a scope's
keys, their use and whether rotation is due; what maintenance rotated and
which versions may be destroyed. Dataclasses that also render as JSON.
Nothing here is secret: key ids, versions, states, counts, times and the root
key's fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..keys.storage import KeyRow, KeyState
from .census import ColumnCensus
from .report import Report, plain_fields

__all__ = ["KeyInfo", "MaintenanceReport", "RegistryStatus"]


@dataclass(frozen=True)
class KeyInfo(Report):
    """One data key, without its key material."""

    id: int
    scope: str
    version: int
    state: KeyState
    algorithm: str
    root_key_fingerprint: str
    encryptions: int
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
            encryptions=row.encryptions,
            created_at=row.created_at,
            state_changed_at=row.state_changed_at,
        )


@dataclass(frozen=True)
class RegistryStatus(Report):
    """The registry's view of one scope.

    ``active_encryptions`` counts encryptions claimed under the active key by
    all processes (an upper bound of real use). ``rotation_due`` says why the
    policy wants a rotation, or is None. ``rows_by_version`` is filled when
    asked for (``status(census=True)``): rows per key version over every
    text and binary column of every table, as the destroy guard counts them;
    ``columns`` then lists the columns holding such rows. ``root_key_problem`` says why the
    root key cannot be used right now (an unreachable KMS), or is None.
    ``keys_by_root_key`` counts the stored keys of every scope (destroyed ones
    hold none) by the fingerprint of the root key that wraps them: while
    ``other_root_keys`` lists any but this registry's, those root keys are
    still needed (until ``rewrap``, run with each of them, moves their keys).
    ``events`` counts the key events of every scope and ``events_head`` is
    the chain head (the hex of the newest event's mac): record it, and pass
    it to ``verify_events(expected_head=...)`` later, to detect the newest
    events deleted.
    """

    scope: str
    active_version: int | None
    active_key_id: int | None
    active_age: timedelta | None
    active_encryptions: int | None
    rotation_due: str | None
    rotate_after: timedelta | None
    max_encryptions: int
    root_key_fingerprint: str
    root_key_description: str
    cache_max_age: timedelta
    keys: tuple[KeyInfo, ...]
    keys_by_state: dict[str, int] = field(default_factory=dict)
    root_key_problem: str | None = None
    cached_keys: int = 0
    rows_by_version: dict[int, int] | None = None
    columns: tuple[ColumnCensus, ...] | None = None
    keys_by_root_key: dict[str, int] = field(default_factory=dict)
    events: int = 0
    events_head: str | None = None

    @property
    def other_root_keys(self) -> dict[str, int]:
        """Stored keys wrapped by root keys other than this registry's, by fingerprint."""
        return {
            name: count
            for name, count in self.keys_by_root_key.items()
            if name != self.root_key_fingerprint
        }

    @property
    def other_root_keys_needed(self) -> bool:
        """Whether a root key other than this registry's still wraps a stored
        key: until none does, an old root key must not be destroyed."""
        return bool(self.other_root_keys)

    @property
    def root_key_available(self) -> bool:
        """False while the root key's holder (a KMS) cannot be used; the
        ``cached_keys`` data keys this process holds keep working meanwhile."""
        return self.root_key_problem is None

    def to_dict(self) -> dict[str, Any]:
        # Durations in seconds, named so.
        return plain_fields(
            {
                "scope": self.scope,
                "active_version": self.active_version,
                "active_key_id": self.active_key_id,
                "active_age_seconds": self.active_age,
                "active_encryptions": self.active_encryptions,
                "rotation_due": self.rotation_due,
                "rotate_after_seconds": self.rotate_after,
                "max_encryptions": self.max_encryptions,
                "root_key_fingerprint": self.root_key_fingerprint,
                "root_key_description": self.root_key_description,
                "root_key_available": self.root_key_available,
                "root_key_problem": self.root_key_problem,
                "keys_by_root_key": self.keys_by_root_key,
                "other_root_keys": self.other_root_keys,
                "other_root_keys_needed": self.other_root_keys_needed,
                "cached_keys": self.cached_keys,
                "cache_max_age_seconds": self.cache_max_age,
                "keys_by_state": self.keys_by_state,
                "keys": self.keys,
                "rows_by_version": self.rows_by_version,
                "columns": self.columns,
                "events": self.events,
                "events_head": self.events_head,
            }
        )


@dataclass(frozen=True)
class MaintenanceReport(Report):
    """What `KeyRegistry.maintenance` did and found. It never deletes a key:
    ``destroyable`` lists retired or disabled versions that no row needs and
    that no process can still be writing under; ``still_referenced`` lists
    older versions that rows still use (re-encrypt them first)."""

    scope: str
    rotated: KeyInfo | None
    rotation_reason: str | None
    destroyable: tuple[int, ...]
    still_referenced: dict[int, int]
