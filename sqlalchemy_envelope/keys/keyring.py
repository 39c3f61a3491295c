"""Loading, claiming and rotating keys: what the hot path falls back on when
the cache cannot answer.

The database is read only when a key is new to this process, older than
``cache_max_age``, or when this process has used up the encryptions it
claimed under the active key. Rotation by policy happens here too, without a
background thread, and never waits on locks the application may hold.

A row read again is checked against what this process already knows of its
key: its id, scope, version and kind never change, its count of claims
never goes down, and a scope's active key is its newest version. Anything
else is `KeyTamperedError`, and nothing from that row is used.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import partial

from sqlalchemy.engine import Connection

from ..crypto import format as fmt
from ..crypto.primitives import AESGCM, new_data_key
from ..errors import (
    ConfigurationError,
    DecryptionError,
    DestroyedKeyError,
    EncryptionLimitError,
    EnvelopeError,
    KeyDisabledError,
    KeyTamperedError,
    NoActiveKeyError,
    RegistryClosedError,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
    ShreddedScopeError,
    UnknownKeyError,
)
from . import storage, transactions
from .cache import DataKey, IndexKey, KeyCache
from .events import EventLog
from .policy import RotationPolicy
from .scopes import check_scope, index_scope, is_index_scope, scope_of_index
from .storage import KeyRow, KeyState
from .store import KeyStore
from .wrapper import KeyWrapper

__all__ = ["Keyring"]

log = logging.getLogger("sqlalchemy_envelope")

_ROTATION_WAIT = 0.01
"""Seconds before trying again a rotation at the limit that another process
holds (doubled each time, about 2.5 s in all): the encrypt path waits on no
lock, but a key at its limit cannot encrypt until someone rotates it."""

_keyrings: weakref.WeakSet[Keyring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for keyring in list(_keyrings):
        keyring.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Keyring:
    """The keys of one ``data_keys`` table as this process sees them."""

    def __init__(
        self,
        store: KeyStore,
        wrapper: KeyWrapper,
        cache: KeyCache,
        policy: RotationPolicy,
        events: EventLog,
        *,
        scope: str,
        create_scopes: bool,
        now: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.wrapper = wrapper
        self.cache = cache
        self.policy = policy
        self.events = events
        self.scope = scope
        self.create_scopes = create_scopes
        self.now = now
        self.table = store.table
        self.lock = threading.RLock()
        self.closed = False
        # Orders the reads of data_keys rows: a read that started before a
        # count of claims was known may have seen an older one (async tasks
        # interleave inside the lock).
        self.ticks = itertools.count(1)
        _keyrings.add(self)

    def after_fork(self) -> None:
        """In a forked child (called at every fork): a lock, claims and
        connections of its own. The parent's claimed blocks stay the
        parent's: two processes spending one block would encrypt more than
        data_keys counts."""
        self.lock = threading.RLock()
        self.cache.forget_claims()
        self.store.forget_key_connections()

    def check_open(self) -> None:
        if self.closed:
            raise RegistryClosedError(self.store.registry)

    def close(self) -> None:
        """Serve nothing more and hold no key: the cache is emptied for good
        (with the keys derived from index keys) and the root key let go. The
        processors SQLAlchemy caches reach keys only through this keyring, so
        they reach none either; what they ask for next raises
        `RegistryClosedError`."""
        with self.lock:
            self.closed = True
            self.cache.close()
            self.events.forget()
            self.wrapper.forget(self.store.registry)
        self.store.close()

    # -- data keys -----------------------------------------------------------

    def active(self, scope: str, *, force: bool = False) -> DataKey:
        """The scope's active key, read again if stale (or ``force``). While
        another thread refreshes it, the stale key is still good."""
        stale = self.cache.active.get(scope)
        if stale is not None and not force and not self.lock.acquire(blocking=False):
            return stale
        if stale is None or force:
            self.lock.acquire()
        try:
            key = self.cache.active.get(scope)
            if key is not None and not force and self.cache.fresh(key):
                return key
            self.check_open()
            if not force:
                self.cache.missed("data")
            read = self.active_row(scope) or self._first_key(scope)
            row = read[0]
            if self.policy.due_by_age(row.created_at, self.now()) and self._rotate_for_policy(
                self.remember(row, self.cached(row.id), read[1])
            ):
                read = self.active_row(scope) or read
                row = read[0]
            key = self.remember(row, self.cached(row.id), read[1])
            if stale is not None and stale.id != key.id:
                self.cache.put(replace(stale, state=KeyState.RETIRED))
            return key
        finally:
            self.lock.release()

    def for_ciphertext(self, ciphertext: bytes) -> DataKey:
        """The key named by a value's header, read again if stale. An id
        data_keys does not hold is asked about once per ``cache_max_age``."""
        fmt.check(ciphertext)
        header = fmt.header(fmt.key_id_of(ciphertext))  # of any format version
        key = self.cache.by_header.get(header)
        if key is not None and self.cache.fresh(key):
            return key
        key_id = fmt.key_id_of(ciphertext)
        if self.cache.is_missing(key_id):
            raise UnknownKeyError(key_id)
        with self.lock:
            key = self.cache.by_header.get(header)
            if key is not None and self.cache.fresh(key):
                return key
            self.check_open()
            self.cache.missed("data")
            started = next(self.ticks)
            row = self.store.read(lambda conn: storage.key_by_id(conn, self.table, key_id))
            if row is None:
                self.cache.put_missing(key_id)
                raise UnknownKeyError(key_id)
            return self.remember(row, key, started)

    def usable(self, key: DataKey) -> DataKey:
        """``key`` if it may decrypt, else the typed error for why not."""
        if key.aead is not None:
            return key
        if key.state is KeyState.DESTROYED:
            raise DestroyedKeyError(key.id, key.version, key.scope)
        raise KeyDisabledError(key.id, key.version, key.scope)

    def scope_version(self, key_id: int) -> tuple[str, int]:
        key = self.cached(key_id)
        if key is not None:
            return key.scope, key.version
        row = self.store.read(lambda conn: storage.key_by_id(conn, self.table, key_id))
        if row is None:
            raise UnknownKeyError(key_id)
        return row.scope, row.version

    def active_row(self, scope: str) -> tuple[KeyRow, int] | None:
        """The row of the scope's active key, and when its read started;
        refused unless it names that scope and is the scope's newest
        version, in data_keys and among the keys this process has
        unwrapped: a retired key made active again is not. (`remember` then
        checks that the scope and version are the ones its key was wrapped
        with.)"""
        started = next(self.ticks)
        found = self.store.read(lambda conn: storage.active_key_and_newest(conn, self.table, scope))
        if found is None:
            return None
        row, newest = found
        if row.scope != scope:
            raise KeyTamperedError(
                row.version, row.scope, f"it is marked as the active key of scope {scope!r}"
            )
        seen, seen_at = self.cache.newest.get(scope, (0, 0))
        if started > seen_at:  # else the read may have started before that key existed
            newest = max(newest, seen)
        if row.version < newest:
            raise KeyTamperedError(
                row.version, scope, f"it is active, but version {newest} of its scope is newer"
            )
        return row, started

    def cached(self, key_id: int) -> DataKey | None:
        return self.cache.by_header.get(fmt.header(key_id))

    def remember(
        self, row: KeyRow, previous: DataKey | None, read_at: int | None = None
    ) -> DataKey:
        """Cache ``row``, unwrapping it unless the previous cache entry for the
        same key already holds its cipher; keep that entry's use counter. A
        row that contradicts what this process knows of its key is refused;
        ``read_at`` is when the read of ``row`` started (`ticks`), if known.
        An index key is never taken for a data key: a value whose header
        names one as its AES-GCM key was altered (or written by a scope that
        named an index scope, which no user scope can)."""
        if is_index_scope(row.scope):
            raise DecryptionError(
                f"the value names key {row.id:#012x}, an index key (scope {row.scope!r}), "
                "as its data key: it was altered"
            )
        self._check_known(row)
        encryptions, counted = self._check_count(row, self.cached(row.id), read_at)
        usable = row.state in (KeyState.ACTIVE, KeyState.RETIRED)
        same = previous is not None and previous.id == row.id
        aead: AESGCM | None = None
        if usable:
            if same and previous is not None and previous.aead is not None:
                aead = previous.aead
            else:
                aead = AESGCM(self.wrapper.unwrap(row))
        key = DataKey(
            id=row.id,
            version=row.version,
            scope=row.scope,
            state=row.state,
            header=fmt.header(row.id),
            aead=aead,
            fresh_until=self.cache.expiry(),
            created_at=row.created_at,
            encryptions=encryptions,
            counted=counted,
        )
        if same and previous is not None:
            key = replace(
                key, counter=previous.counter, budget=previous.budget, claimed=previous.claimed
            )
        if aead is not None and not self.store.pinned:
            self.cache.saw(key, next(self.ticks))
        return self.cache.put(key)

    def _check_known(self, row: KeyRow) -> None:
        """Refuse a row that contradicts the key of its id this process
        loaded, as a data key or as an index key."""
        for known in (
            self.cached(row.id),
            self.cache.index_by_header.get(fmt.header(row.id, fmt.DETERMINISTIC_VERSION)),
        ):
            if known is not None:
                self._check_unchanged(row, known)

    def _check_unchanged(self, row: KeyRow, known: DataKey | IndexKey) -> None:
        """A key's id, scope, version and kind never change (its wrapping
        binds them): a row that says otherwise than the key this process
        loaded was altered."""
        kind = self.wrapper.kind
        if (row.id, row.scope, row.version, kind(row.scope)) != (
            known.id,
            known.scope,
            known.version,
            kind(known.scope),
        ):
            other = "" if row.id == known.id else " under another key id"
            raise KeyTamperedError(
                known.version,
                known.scope,
                f"it now says version {row.version} of scope {row.scope!r}{other}",
            )

    def _check_count(
        self, row: KeyRow, known: DataKey | None, read_at: int | None
    ) -> tuple[int, int]:
        """The highest count of claims seen in the key's row, and the tick
        after which every read shows at least that many: claims are only
        ever added (one written in the application's rolled-back
        transaction is taken off by `_unclaim`), so a read started after
        that tick that shows fewer was altered. A pinned connection's
        transaction may see its own claims, or an older snapshot: its reads
        count for nothing."""
        if self.store.pinned:
            return (0, 0) if known is None else (known.encryptions, known.counted)
        if known is None or row.encryptions > known.encryptions:
            return row.encryptions, next(self.ticks)
        if read_at is not None and read_at > known.counted and row.encryptions < known.encryptions:
            raise KeyTamperedError(
                known.version,
                known.scope,
                f"its count of encryptions went down from {known.encryptions:,} to "
                f"{row.encryptions:,}",
            )
        return known.encryptions, known.counted

    def refresh(self, row: KeyRow) -> None:
        """Cache a row this process just changed (a state change), whatever its kind."""
        with self.lock:
            if is_index_scope(row.scope):
                self._remember_index(row, self.cache.index.get((row.scope, row.version)))
            else:
                self.remember(row, previous=self.cached(row.id))

    def _first_key(self, scope: str) -> tuple[KeyRow, int]:
        """The active key of a scope that has none in data_keys: a tenant's
        created on first use, unless the scope was shredded."""
        if self.store.read(lambda conn: storage.is_shredded(conn, self.table, scope)):
            self.forget_scope(scope)
            raise ShreddedScopeError(scope)
        found = None
        if scope != self.scope and self.create_scopes:
            found = self._create_on_first_use(scope)
        if found is None:
            raise NoActiveKeyError(scope)
        return found

    def _create_on_first_use(self, scope: str) -> tuple[KeyRow, int] | None:
        """Create a scope met for the first time by the encrypt path (its data
        key and its index key), or give a scope of earlier versions the
        index key it lacks. It must not wait on locks the application may
        hold: SQLite has one writer at a time, so there the scope must exist
        before a write transaction meets it. The key created is cached as
        created, not unwrapped again from its row (which a rewrap may have
        moved to another root key already)."""
        check_scope(scope)

        def work(conn: Connection) -> tuple[DataKey | None, IndexKey | None]:
            self.wrapper.hold(conn)
            if storage.active_key(conn, self.table, scope) is not None and (
                storage.key_by_version(conn, self.table, index_scope(scope), 1) is not None
            ):
                return None, None
            self.refuse_shredded(conn, scope)
            return self.create_keys(conn, scope, operation="create_on_first_use")

        outcome = self.store.try_write(work)
        if isinstance(outcome, tuple):
            data_key, index_key = outcome
            if data_key is not None:
                self.cache.put(data_key)
            if index_key is not None:
                self.cache.put_index(index_key)
        found = self.active_row(scope)
        if found is None and isinstance(outcome, transactions.Busy):
            raise ConfigurationError(
                f"scope {scope!r} has no data key yet, and the database is locked by an "
                "open write transaction: create scopes ahead with "
                "KeyRegistry.create_scope() (on SQLite, always)"
            )
        return found

    def create_keys(
        self,
        conn: Connection,
        scope: str,
        *,
        operation: str,
        revive: bool = False,
        reason: str | None = None,
    ) -> tuple[DataKey | None, IndexKey | None]:
        """Give ``scope`` what it lacks of an active data key and its index
        key version 1, in the caller's transaction, which holds the root key's
        lock; the keys it created, each recorded as an event of ``operation``.
        With ``revive`` (`create_scope`), a shredded scope gets a new index
        key too: the destroyed ones keep their rows, renumbered below zero,
        so that version 1, which its columns use, names the new key. (Index
        keys destroyed on purpose in a live scope stay as they are.)"""
        index = index_scope(scope)
        revived = revive and storage.is_shredded(conn, self.table, scope)
        data_key = index_key = None
        if storage.active_key(conn, self.table, scope) is None:
            data_key = self.insert_active(
                conn, scope, storage.next_version(conn, self.table, scope)
            )
            self.record_created(conn, operation, scope, data_key.version, reason)
        if revived and storage.is_shredded(conn, self.table, index):
            renumbered = [row.version for row in storage.all_keys(conn, self.table, index)]
            storage.renumber_destroyed(conn, self.table, index)
            self.events.append(
                conn,
                operation,
                scope=index,
                versions=[v for v in renumbered if v > 0],
                outcome="destroyed keys renumbered below 0",
                reason=reason,
            )
        if storage.key_by_version(conn, self.table, index, 1) is None:
            index_key = self.insert_index(conn, index, 1)
            self.record_created(conn, operation, index, 1, reason)
        return data_key, index_key

    def record_created(
        self, conn: Connection, operation: str, scope: str, version: int, reason: str | None
    ) -> None:
        """The event of a key just inserted, active."""
        self.events.append(
            conn, operation, scope=scope, versions=[version], outcome="created", reason=reason
        )

    # -- claims: bounding encryptions per key across processes ------------------

    def claim(self, key: DataKey) -> DataKey:
        """The encrypt path ran out of claimed encryptions under ``key``: claim
        another block, or rotate when the key is due, and return the key to
        use for the encryption at hand. The limit is hard: a key at
        ``max_encryptions`` that cannot be rotated encrypts nothing more
        (`EncryptionLimitError`). While the database is too busy to record a
        claim, the key in hand stays in use for up to one block, which the
        next claim records."""
        block = self.policy.block
        at_limit = False
        with self.lock:
            for attempt in range(8):
                latest = self.cache.by_header.get(key.header, key)
                used = next(latest.counter)
                if used < latest.budget and latest.state is KeyState.ACTIVE:
                    return latest
                if self.policy.due_by_age(
                    latest.created_at, self.now()
                ) and self._rotate_for_policy(latest):
                    key = self.active(latest.scope, force=True)
                    continue
                # Not due by age, or its rotation postponed: claim under it.
                target = used + block
                granted = self._claim_block(latest, target - latest.claimed)
                if granted is True:
                    return self.cache.put(replace(latest, budget=target, claimed=target))
                if granted is transactions.BUSY:
                    current = self.cache.active.get(latest.scope)
                    if current is None or current.id == latest.id:
                        return self._unrecorded(latest, used)
                    key = current  # rotated meanwhile, by another task of this process
                    continue
                # Refused. Read the scope's active key again rather than carry
                # on: another process may have rotated, or shredded the scope
                # (ShreddedScopeError from here on).
                key = self.active(latest.scope, force=True)
                at_limit = key.id == latest.id  # still active: at its limit
                if at_limit:
                    if self._rotate_for_policy(latest):
                        key = self.active(latest.scope, force=True)
                    else:  # another process is rotating it, most likely: give it time
                        time.sleep(_ROTATION_WAIT * 2**attempt)
            if at_limit:
                raise EncryptionLimitError(
                    f"data key version {latest.version} of scope {latest.scope!r} "
                    f"reached max_encryptions ({self.policy.max_encryptions:,}) and "
                    "could not be rotated now (data_keys is busy, or the root key's "
                    "KMS cannot be reached): nothing was encrypted; retry shortly"
                )
            return self._unrecorded(latest, used)

    def _unrecorded(self, key: DataKey, used: int) -> DataKey:
        """The database could not record a claim now: go on under ``key``
        with encryptions not yet recorded (a few at a time, the next claim
        records them), one block of them at most; then fail closed."""
        limit = key.claimed + self.policy.block
        if key.state is not KeyState.ACTIVE or used >= limit:
            raise EncryptionLimitError(
                f"data_keys could not record the encryptions claimed under data key "
                f"version {key.version} of scope {key.scope!r} (the database is busy, or "
                "other processes rotate it at the same time), and this process used "
                f"the {self.policy.block:,} it may use unrecorded: nothing was encrypted; "
                "retry shortly (on SQLite, commit long write transactions sooner)"
            )
        budget = min(used + 1 + self.policy.block // 8, limit)
        return self.cache.put(replace(key, budget=budget))

    def _claim_block(self, key: DataKey, count: int) -> bool | transactions.Busy:
        """Claim ``count`` encryptions under ``key`` in data_keys.

        On SQLite, while the application executes a statement, the claim is
        written on that statement's own connection. SQLite has one writer at a
        time: a claim committed on another connection would wait for the
        application's open results to finish (rollback journal), and in WAL
        mode would make that connection's next write, often the very statement
        being encrypted for, fail with "database is locked" whenever it holds
        an older read snapshot. On its own connection the claim waits for
        nothing that statement would not, and poisons nothing: it is a
        transaction of its own when none is open there, else it joins the
        application's (which writes anyway); if that is rolled back, so is the
        claim, and `_unclaim` makes this process claim those encryptions again
        before its next one, so the shared counter keeps bounding real use.
        Elsewhere claims go on the registry's own connections: row locks keep
        them short, and a claim held until the application commits would make
        other processes wait for it. (Rotations by policy and first-use scope
        creation, rare, always commit there, without waiting: a new key must
        not depend on the application's transaction.)"""
        limit = self.policy.max_encryptions
        statement = storage.claim_statement(self.table, key.id, count, limit)
        changed = self.store.try_write_in_statement(statement, partial(self._unclaim, key, count))
        if changed is None:
            return self.store.try_write(
                partial(storage.claim, table=self.table, key_id=key.id, count=count, limit=limit)
            )
        return changed if isinstance(changed, transactions.Busy) else changed == 1

    def _unclaim(self, key: DataKey, count: int) -> None:
        """A claim written in the application's transaction was rolled back
        with it: the encryptions it covered are claimed again, with the next
        block, before this process encrypts under the key again."""
        with self.lock:
            latest = self.cache.by_header.get(key.header)
            if latest is not None and latest.id == key.id:
                claimed = latest.claimed - count
                self.cache.put(
                    replace(
                        latest,
                        claimed=claimed,
                        budget=min(latest.budget, claimed),
                        encryptions=max(0, latest.encryptions - count),
                    )
                )

    # -- rotation --------------------------------------------------------------

    def rotate_in(
        self,
        conn: Connection,
        scope: str,
        expected_id: int | None,
        *,
        operation: str,
        reason: str | None = None,
    ) -> DataKey | IndexKey | None:
        """Retire the active key and insert its successor (an index key in an
        index scope), recorded as an event of ``operation``; with
        ``expected_id``, only if that key is still the active one
        (compare-and-swap), so that many processes acting on the same policy
        decision rotate once. The root key's lock is taken first, before the
        row lock of the retired key: two rotations then cannot each hold what
        the other waits for."""
        self.wrapper.hold(conn)
        old = storage.active_key(conn, self.table, scope)
        if expected_id is not None and (old is None or old.id != expected_id):
            return None
        retired = storage.retire_active(conn, self.table, scope, self.now(), expected_id)
        if expected_id is not None and retired == 0:
            return None
        if retired == 0:
            self.refuse_shredded(conn, scope)
            if is_index_scope(scope):  # nor does a shredded scope's index scope
                self.refuse_shredded(conn, scope_of_index(scope))
        version = storage.next_version(conn, self.table, scope)
        new: DataKey | IndexKey
        if is_index_scope(scope):
            new = self.insert_index(conn, scope, version)
        else:
            new = self.insert_active(conn, scope, version)
        self.events.append(
            conn,
            operation,
            scope=scope,
            versions=f"{old.version}->{version}" if retired and old else str(version),
            outcome="rotated" if retired else "created",
            reason=reason,
        )
        return new

    def adopt(self, new: DataKey | IndexKey) -> None:
        """Make a key this process just created its scope's active key (not
        its newest version while pinned: the pinned transaction may yet be
        rolled back)."""
        if isinstance(new, IndexKey):
            self.cache.put_index(new)
            return
        with self.lock:
            old = self.cache.active.get(new.scope)
            if old is not None and old.id != new.id:
                self.cache.put(replace(old, state=KeyState.RETIRED))
            if not self.store.pinned:
                self.cache.saw(new, next(self.ticks))
            self.cache.put(new)

    def _rotate_for_policy(self, key: DataKey) -> bool:
        """Rotate away from ``key`` unless another process already has. Best
        effort: False if the database is busy or the root key's KMS cannot be
        reached, and ``key`` simply stays in use."""
        try:
            outcome = self.store.try_write(
                lambda conn: self.rotate_in(
                    conn, key.scope, expected_id=key.id, operation="rotate_by_policy"
                )
            )
        except (RootKeyUnavailableError, RootKeyAccessDeniedError) as error:
            log.warning("policy rotation of scope %r postponed: %s", key.scope, error)
            return False
        if isinstance(outcome, transactions.Busy):
            log.debug("policy rotation of scope %r postponed: data_keys is busy", key.scope)
            return False
        if outcome is not None:
            self.adopt(outcome)
            self.cache.rotated(key.scope, "policy")
            log.info(
                "rotated scope %r to data key version %d by policy", key.scope, outcome.version
            )
        return True

    def insert_active(self, conn: Connection, scope: str, version: int) -> DataKey:
        """Insert a new active data key, under the lock and root key check of
        `KeyWrapper.hold` (callers take it first in the transaction)."""
        if is_index_scope(scope):
            raise ConfigurationError(f"{scope!r} is an index scope: it holds no data key")
        key_id, plaintext, now = self._insert(conn, scope, version)
        return DataKey(
            id=key_id,
            version=version,
            scope=scope,
            state=KeyState.ACTIVE,
            header=fmt.header(key_id),
            aead=AESGCM(plaintext),
            fresh_until=self.cache.expiry(),
            created_at=now,
        )

    def insert_index(self, conn: Connection, scope: str, version: int) -> IndexKey:
        """Insert a new active index key in the index scope ``scope``, as
        `insert_active` does. Its secret only ever derives keys (HKDF): it is
        never an AES-GCM key."""
        if not is_index_scope(scope):
            raise ConfigurationError(f"{scope!r} is no index scope")
        key_id, secret, _ = self._insert(conn, scope, version)
        return IndexKey(
            id=key_id,
            version=version,
            scope=scope,
            state=KeyState.ACTIVE,
            header=fmt.header(key_id, fmt.DETERMINISTIC_VERSION),
            secret=secret,
            fresh_until=self.cache.expiry(),
        )

    def _insert(self, conn: Connection, scope: str, version: int) -> tuple[int, bytes, datetime]:
        """Insert a new active key's row; its id, its secret and its creation
        time. The lock of `KeyWrapper.hold` is taken again here (it checks
        nothing new when the caller took it first), so no insert escapes it;
        and the events must be able to record it (`EventLog.ready`), checked
        before the insert, while data_keys shows what was there before."""
        self.wrapper.hold(conn)
        self.events.ready(conn)
        plaintext = new_data_key()
        key_id = 1 + secrets.randbelow(fmt.MAX_KEY_ID)
        now = self.now()
        storage.insert_active(
            conn,
            self.table,
            key_id=key_id,
            scope=scope,
            version=version,
            wrapped_key=self.wrapper.wrap(plaintext, key_id, scope, version),
            root_key_fingerprint=self.wrapper.fingerprint,
            root_key_description=self.wrapper.root_key.description,
            now=now,
        )
        return key_id, plaintext, now

    # -- shredded scopes -----------------------------------------------------

    def refuse_shredded(self, conn: Connection, scope: str) -> None:
        """A shredded scope (or index scope) gets no new key but from `create_scope`."""
        if storage.is_shredded(conn, self.table, scope):
            raise ShreddedScopeError(scope_of_index(scope) if is_index_scope(scope) else scope)

    def forget_scope(self, scope: str) -> None:
        """Make every cached key of a shredded scope, and its index keys, unusable."""
        with self.lock:
            self.cache.forget_scopes((scope, index_scope(scope)))

    # -- index keys: blind indexes and deterministic columns --------------------

    def index_key(self, scope: str, version: int) -> IndexKey:
        """``scope``'s index key ``version``, read again if stale. Version 1
        of a scope met for the first time is created with its data key, as
        on first use (and so is one that a scope of earlier versions lacks)."""
        name = index_scope(scope)
        key = self.cache.index.get((name, version))
        if key is not None and self.cache.fresh(key):
            return key
        found = self._load_index_key(name, version, key)
        if found is None and version == 1:
            found = self._first_index_key(scope)
        if found is None:
            raise ConfigurationError(
                f"no index key version {version} in scope {name!r}: "
                + (
                    "rotate that scope for a new version"
                    if version > 1
                    else "call KeyRegistry.init() (the registry's own scope) or "
                    f"KeyRegistry.create_scope({scope!r})"
                )
            )
        return found

    def find_index_key(self, scope: str, version: int) -> IndexKey | None:
        """``scope``'s index key ``version``, read again if stale; None if
        data_keys holds no such key."""
        name = index_scope(scope)
        key = self.cache.index.get((name, version))
        if key is not None and self.cache.fresh(key):
            return key
        return self._load_index_key(name, version, key)

    def _load_index_key(
        self, name: str, version: int, previous: IndexKey | None
    ) -> IndexKey | None:
        with self.lock:
            self.check_open()
            self.cache.missed("index")
            row = self.store.read(lambda c: storage.key_by_version(c, self.table, name, version))
            return None if row is None else self._remember_index(row, previous)

    def _first_index_key(self, scope: str) -> IndexKey | None:
        """Version 1 of the index key of a scope that has none: created with
        the scope on first use (`_create_on_first_use`), unless the scope was
        shredded; None where the scope must be created on purpose."""
        with self.lock:
            self.check_open()
            if self.store.read(lambda conn: storage.is_shredded(conn, self.table, scope)):
                self.forget_scope(scope)
                raise ShreddedScopeError(scope)
            if scope == self.scope or not self.create_scopes:
                return None
            self._create_on_first_use(scope)
            return self._load_index_key(index_scope(scope), 1, None)

    def index_key_for(self, ciphertext: bytes) -> IndexKey | None:
        """The index key named by a deterministic value's header, read again if
        stale; None if the header names a key that is no index key (a data
        key is never taken for one).

        Any index scope will do: each tenant's values name its own index key,
        and reading needs no choice. AES-SIV authenticates the header, so a
        value cannot be made to name another index key than its own. An id
        data_keys does not hold is asked about once per ``cache_max_age``."""
        fmt.check(ciphertext)
        header = fmt.header(fmt.key_id_of(ciphertext), fmt.DETERMINISTIC_VERSION)
        key = self.cache.index_by_header.get(header)  # of any format version
        if key is not None and self.cache.fresh(key):
            return key
        key_id = fmt.key_id_of(ciphertext)
        if self.cache.is_missing(key_id):
            raise UnknownKeyError(key_id)
        with self.lock:
            self.check_open()
            self.cache.missed("index")
            row = self.store.read(lambda c: storage.key_by_id(c, self.table, key_id))
            if row is None:
                self.cache.put_missing(key_id)
                raise UnknownKeyError(key_id)
            if not is_index_scope(row.scope):
                self._check_known(row)
                return None
            return self._remember_index(row, key)

    def _remember_index(self, row: KeyRow, previous: IndexKey | None) -> IndexKey:
        """Cache an index key; a disabled or destroyed one without its secret.
        A row that contradicts what this process knows of its key, or of
        the key its scope and version named before, is refused."""
        if not is_index_scope(row.scope):
            raise ConfigurationError(f"key {row.id:#012x} is a data key, not an index key")
        self._check_known(row)
        named = self.cache.index.get((row.scope, row.version))
        if named is not None:
            self._check_unchanged(row, named)
        secret = None
        if row.state in (KeyState.ACTIVE, KeyState.RETIRED):
            same = previous is not None and previous.id == row.id and previous.secret is not None
            secret = previous.secret if same and previous is not None else None
            if secret is None:
                secret = self.wrapper.unwrap(row)
        return self.cache.put_index(
            IndexKey(
                id=row.id,
                version=row.version,
                scope=row.scope,
                state=row.state,
                header=fmt.header(row.id, fmt.DETERMINISTIC_VERSION),
                secret=secret,
                fresh_until=self.cache.expiry(),
            )
        )

    @staticmethod
    def unusable(key: IndexKey) -> EnvelopeError:
        """Why an index key without its secret cannot be used."""
        if key.state is KeyState.DISABLED:
            return KeyDisabledError(key.id, key.version, key.scope)
        return DestroyedKeyError(key.id, key.version, key.scope)
