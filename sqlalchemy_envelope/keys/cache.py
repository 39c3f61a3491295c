"""The registry's key cache: unwrapped data keys, ready to use.

Cached `DataKey` objects are immutable. Refreshing or invalidating a key swaps
the reference in a dict, so a thread that is encrypting with a key it already
holds is never disturbed (zeroing key bytes in place would pull them from
under an encryption in flight).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..crypto.primitives import AESGCM
from .storage import KeyState

__all__ = ["DataKey", "KeyCache"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    """A data key as the hot path needs it: its header and its cipher object.

    ``aead`` is None for a key that may not decrypt (disabled or destroyed).
    ``fresh_until`` is a monotonic time after which the row is read again.
    ``counter`` counts this process's encryptions under the key; it is shared
    by every copy of the entry. ``budget`` is where the encryptions this
    process may use run out, and ``claimed`` where those it has claimed in
    data_keys do: less than ``budget`` while the database was too busy to
    claim, and the next claim makes up the difference.
    """

    id: int
    version: int
    scope: str
    state: KeyState
    header: bytes
    aead: AESGCM | None
    fresh_until: float
    created_at: datetime
    counter: itertools.count[int] = field(default_factory=itertools.count)
    budget: int = 0
    claimed: int = 0

    def __repr__(self) -> str:
        return (
            f"DataKey(id={self.id:#012x}, scope={self.scope!r}, "
            f"version={self.version}, state={self.state.value!r})"
        )


class KeyCache:
    """Keys by ciphertext header, and the active key of each scope."""

    def __init__(
        self, max_age: float, clock: Clock = time.monotonic, max_keys: int = 10_000
    ) -> None:
        self.max_age = max_age
        self.clock = clock
        self.max_keys = max_keys
        self.by_header: dict[bytes, DataKey] = {}
        self.active: dict[str, DataKey] = {}

    def expiry(self) -> float:
        return self.clock() + self.max_age

    def put(self, key: DataKey) -> DataKey:
        """Remember ``key``, and make it its scope's active key if it is active.
        Past ``max_keys`` entries the oldest one is forgotten (it is read
        again from the database if it is needed again)."""
        self.by_header.pop(key.header, None)  # re-inserted last: the most recent
        self.by_header[key.header] = key
        while len(self.by_header) > self.max_keys:
            oldest = next(iter(self.by_header))
            evicted = self.by_header.pop(oldest)
            if self.active.get(evicted.scope) is evicted:
                del self.active[evicted.scope]
        if key.state is KeyState.ACTIVE:
            self.active[key.scope] = key
        else:
            current = self.active.get(key.scope)
            if current is not None and current.id == key.id:
                self.active.pop(key.scope, None)
        return key

    def clear(self) -> None:
        # In place: the registry's hot path holds references to these dicts.
        self.by_header.clear()
        self.active.clear()
