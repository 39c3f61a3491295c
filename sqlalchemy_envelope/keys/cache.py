"""The one cache of unwrapped keys: data keys, and the index keys behind blind
indexes and deterministic columns, with everything derived from them.

Every entry carries ``fresh_until``, a monotonic time after which its row is
read again; `fresh` is the one freshness rule. A shred or destroy replaces a
scope's entries with unusable ones (`forget_scopes`), and any other process
sees the change when its entries go stale. Entries are immutable: refreshing
or invalidating one swaps the reference in a dict, so a thread encrypting
with a key it already holds is never disturbed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from ..crypto.primitives import AESGCM, AESSIV, hkdf_sha256
from ..errors import ConfigurationError
from ..metrics import Metrics
from .storage import KeyState

__all__ = ["DataKey", "IndexKey", "KeyCache"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    """A data key as the hot path needs it: its header and its cipher object.

    ``aead`` is None for a key that may not decrypt (disabled or destroyed).
    ``counter`` counts this process's encryptions under the key; it is shared
    by every copy of the entry. ``budget`` is where the encryptions this
    process may use run out, and ``claimed`` where those it has claimed in
    data_keys do: less than ``budget`` while the database was too busy to
    claim (by one block at most), and the next claim makes up the
    difference. ``encryptions`` is the highest count of claims this process
    has read in the key's row, which every read started after tick
    ``counted`` (`Keyring.ticks`) must show at least.
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
    encryptions: int = 0
    counted: int = 0

    def __repr__(self) -> str:
        return (
            f"DataKey(id={self.id:#012x}, scope={self.scope!r}, "
            f"version={self.version}, state={self.state.value!r})"
        )


@dataclass(frozen=True, slots=True, repr=False)
class IndexKey:
    """An index key (a scope's non-rotating key) and the keys derived from it
    for each purpose: they live and expire with this entry. ``secret`` is
    None while the key is disabled, and once it is destroyed."""

    id: int
    version: int
    scope: str
    state: KeyState
    header: bytes  # the header of deterministic values under this key
    secret: bytes | None
    fresh_until: float
    derived: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    sivs: dict[bytes, AESSIV] = field(default_factory=dict)

    def derive(self, purpose: bytes, length: int = 32) -> bytes | None:
        """A key for one purpose (HKDF, RFC 5869); None without the secret."""
        derived = self.derived.get((purpose, length))
        if derived is None:
            if self.secret is None:
                return None
            derived = self.derived[(purpose, length)] = hkdf_sha256(self.secret, purpose, length)
        return derived

    def __repr__(self) -> str:
        return f"IndexKey(id={self.id:#012x}, scope={self.scope!r}, version={self.version})"


# timedelta.max in seconds rounds up past it: a whole number of days does not.
_LONGEST = timedelta(days=999_999_999).total_seconds()


def _max_age_seconds(value: float | timedelta) -> float:
    """``cache_max_age`` in seconds, checked here for every way it comes in
    (the registries, the command's ``--cache-max-age``): positive, finite,
    and no longer than a timedelta holds, since reports give it as one."""
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not 0 < seconds <= _LONGEST:
        raise ConfigurationError(
            f"cache_max_age must be a positive, finite number of seconds or a timedelta, "
            f"at most 999999999 days, not {value!r} (the default is 60)"
        )
    return seconds


class KeyCache:
    """Data keys by ciphertext header and the active key of each scope; index
    keys by scope and version, and by the header of deterministic values;
    the newest version of each scope among the keys this process unwrapped
    (an active key older than that was made active again); and the key ids
    data_keys did not hold, for ``max_age``, so that values naming unknown
    keys, such as a client's forged ones, cost one query per id."""

    def __init__(
        self,
        max_age: float | timedelta,
        clock: Clock = time.monotonic,
        max_keys: int = 10_000,
        metrics: Metrics | None = None,
    ) -> None:
        self.max_age = _max_age_seconds(max_age)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError(
                f"max_cached_keys must be a whole number of at least 1, not {max_keys!r}"
            )
        self.clock = clock
        self.max_keys = max_keys
        self.by_header: dict[bytes, DataKey] = {}
        self.active: dict[str, DataKey] = {}
        self.index: dict[tuple[str, int], IndexKey] = {}
        self.index_by_header: dict[bytes, IndexKey] = {}
        self.newest: dict[str, tuple[int, int]] = {}
        self.missing: dict[int, float] = {}
        self.closed = False
        self.metrics = metrics
        # Keys read from data_keys for want of a fresh entry: a value
        # encrypted or decrypted while this stays the same was a cache hit.
        self.misses = 0

    def missed(self, kind: str) -> None:
        """Count a key of ``kind`` ("data" or "index") read from data_keys
        because the cache held no fresh entry for it."""
        self.misses += 1
        if self.metrics is not None:
            self.metrics.missed(kind)

    def rotated(self, scope: str, trigger: str) -> None:
        """Count a rotation of ``scope``, "manual" or by "policy"."""
        if self.metrics is not None:
            self.metrics.rotated(scope, trigger)

    def expiry(self) -> float:
        return self.clock() + self.max_age

    def fresh(self, entry: DataKey | IndexKey | None) -> bool:
        """The freshness rule: an entry is used until ``max_age`` after its row was read."""
        return entry is not None and self.clock() <= entry.fresh_until

    def put(self, key: DataKey) -> DataKey:
        """Remember ``key``, and make it its scope's active key if it is active.
        Past ``max_keys`` entries the oldest one is forgotten (it is read
        again from the database if it is needed again). A closed cache keeps nothing."""
        if self.closed:
            return key
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

    def put_index(self, key: IndexKey) -> IndexKey:
        """Remember an index key; a refreshed entry keeps the keys already
        derived from the same secret. A closed cache keeps nothing."""
        if self.closed:
            return key
        previous = self.index.get((key.scope, key.version))
        if previous is not None and previous.id == key.id and previous.secret == key.secret:
            key = replace(key, derived=previous.derived, sivs=previous.sivs)
        self.index[(key.scope, key.version)] = key
        self.index_by_header[key.header] = key
        return key

    def saw(self, key: DataKey, tick: int) -> None:
        """Remember the newest version of ``key``'s scope, and the tick
        (`Keyring.ticks`) after which every read shows it: ``key`` was
        unwrapped, or created, and committed. Past ``max_keys`` scopes the
        one seen longest ago is forgotten."""
        if key.version > self.newest.get(key.scope, (0, 0))[0]:
            self.newest.pop(key.scope, None)  # re-inserted last: the most recent
            self.newest[key.scope] = (key.version, tick)
            while len(self.newest) > self.max_keys:
                del self.newest[next(iter(self.newest))]

    def is_missing(self, key_id: int) -> bool:
        """Whether data_keys held no key ``key_id`` less than ``max_age`` ago."""
        until = self.missing.get(key_id)
        return until is not None and self.clock() <= until

    def put_missing(self, key_id: int) -> None:
        """Remember that data_keys holds no key ``key_id`` (the oldest such
        entry is forgotten past ``max_keys``)."""
        self.missing.pop(key_id, None)
        self.missing[key_id] = self.expiry()
        while len(self.missing) > self.max_keys:
            del self.missing[next(iter(self.missing))]

    def forget_claims(self) -> None:
        """In a forked child: the encryptions the parent claimed are the
        parent's to use; the child claims its own."""
        for header, key in list(self.by_header.items()):
            fresh = replace(key, counter=itertools.count(), budget=0, claimed=0)
            self.by_header[header] = fresh
            if self.active.get(key.scope) is key:
                self.active[key.scope] = fresh

    def forget_scopes(self, scopes: tuple[str, ...]) -> None:
        """After a shred: every key of these scopes becomes unusable at once
        (data keys stay known as destroyed; index keys are forgotten, so
        their next use reads the destroyed row)."""
        for key in list(self.by_header.values()):
            if key.scope in scopes:
                self.put(replace(key, state=KeyState.DESTROYED, aead=None))
        for scope in scopes:
            self.active.pop(scope, None)
        for index_key in list(self.index.values()):
            if index_key.scope in scopes:
                del self.index[(index_key.scope, index_key.version)]
                self.index_by_header.pop(index_key.header, None)

    def close(self) -> None:
        """Forget every key for good, the keys derived from index keys too
        (an entry still in someone's hands shares them), and keep none from
        now on: a closed registry holds no key."""
        self.closed = True
        for index_key in (*self.index.values(), *self.index_by_header.values()):
            index_key.derived.clear()
            index_key.sivs.clear()
        self.clear()

    def clear(self) -> None:
        # In place: the hot path holds references to these dicts.
        self.by_header.clear()
        self.active.clear()
        self.index.clear()
        self.index_by_header.clear()
        self.newest.clear()
        self.missing.clear()
