"""Loading, claiming and rotating keys: what the hot path falls back on when
the cache cannot answer.

The database is read only when a key is new to this process, older than
``cache_max_age``, or when this process has used up the encryptions it
claimed under the active key. Rotation by policy happens here too, without a
background thread, and never waits on locks the application may hold.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import partial

from sqlalchemy.engine import Connection

from ..crypto import format as fmt
from ..crypto.primitives import AESGCM, new_data_key
from ..errors import (
    ConfigurationError,
    DestroyedKeyError,
    EnvelopeError,
    KeyDisabledError,
    NoActiveKeyError,
    RegistryClosedError,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
    ShreddedScopeError,
    UnknownKeyError,
)
from . import storage, transactions
from .cache import DataKey, IndexKey, KeyCache
from .policy import RotationPolicy
from .scopes import check_scope, index_scope, is_index_scope
from .storage import KeyRow, KeyState
from .store import KeyStore
from .wrapper import KeyWrapper

__all__ = ["Keyring"]

log = logging.getLogger("sqlalchemy_envelope")


class Keyring:
    """The keys of one ``data_keys`` table as this process sees them."""

    def __init__(
        self,
        store: KeyStore,
        wrapper: KeyWrapper,
        cache: KeyCache,
        policy: RotationPolicy,
        *,
        scope: str,
        create_scopes: bool,
        now: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.wrapper = wrapper
        self.cache = cache
        self.policy = policy
        self.scope = scope
        self.create_scopes = create_scopes
        self.now = now
        self.table = store.table
        self.lock = threading.RLock()
        self.closed = False

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
            row = self._active_row(scope)
            if row is None:
                row = self._first_key(scope)
            if self.policy.due_by_age(row.created_at, self.now()) and self._rotate_for_policy(
                self.remember(row, self.cached(row.id))
            ):
                row = self._active_row(scope) or row
            key = self.remember(row, previous=self.cached(row.id))
            if stale is not None and stale.id != key.id:
                self.cache.put(replace(stale, state=KeyState.RETIRED))
            return key
        finally:
            self.lock.release()

    def for_ciphertext(self, ciphertext: bytes) -> DataKey:
        """The key named by a value's header, read again if stale."""
        fmt.check(ciphertext)
        header = ciphertext[: fmt.HEADER_BYTES]
        with self.lock:
            key = self.cache.by_header.get(header)
            if key is not None and self.cache.fresh(key):
                return key
            self.check_open()
            key_id = fmt.key_id_of(ciphertext)
            row = self.store.read(lambda conn: storage.key_by_id(conn, self.table, key_id))
            if row is None:
                raise UnknownKeyError(key_id)
            return self.remember(row, previous=key)

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

    def _active_row(self, scope: str) -> KeyRow | None:
        return self.store.read(lambda conn: storage.active_key(conn, self.table, scope))

    def cached(self, key_id: int) -> DataKey | None:
        return self.cache.by_header.get(fmt.header(key_id))

    def remember(self, row: KeyRow, previous: DataKey | None) -> DataKey:
        """Cache ``row``, unwrapping it unless the previous cache entry for the
        same key already holds its cipher; keep that entry's use counter."""
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
        )
        if same and previous is not None:
            key = replace(
                key, counter=previous.counter, budget=previous.budget, claimed=previous.claimed
            )
        return self.cache.put(key)

    def refresh(self, row: KeyRow) -> None:
        """Cache a row this process just changed (a state change), whatever its kind."""
        with self.lock:
            if is_index_scope(row.scope):
                self._remember_index(row, self.cache.index.get((row.scope, row.version)))
            else:
                self.remember(row, previous=self.cached(row.id))

    def _first_key(self, scope: str) -> KeyRow:
        """The active key of a scope that has none in data_keys: a tenant's
        created on first use, unless the scope was shredded."""
        if self.store.read(lambda conn: storage.is_shredded(conn, self.table, scope)):
            self.forget_scope(scope)
            raise ShreddedScopeError(scope)
        row = None
        if scope != self.scope and self.create_scopes:
            row = self._create_on_first_use(scope)
        if row is None:
            raise NoActiveKeyError(scope)
        return row

    def _create_on_first_use(self, scope: str) -> KeyRow | None:
        """Create a scope met for the first time by the encrypt path. It must
        not wait on locks the application may hold: SQLite has one writer at a
        time, so there the scope must exist before a write transaction meets it."""
        check_scope(scope)

        def work(conn: Connection) -> None:
            if storage.active_key(conn, self.table, scope) is None:
                self.refuse_shredded(conn, scope)
                self.wrapper.prove(conn)
                self.insert_active(conn, scope, storage.next_version(conn, self.table, scope))

        outcome = self.store.try_write(work)
        row = self._active_row(scope)
        if row is None and isinstance(outcome, transactions.Busy):
            raise ConfigurationError(
                f"scope {scope!r} has no data key yet, and the database is locked by an "
                "open write transaction: create scopes ahead with "
                "KeyRegistry.create_scope() (on SQLite, always)"
            )
        return row

    # -- claims: bounding encryptions per key across processes ------------------

    def claim(self, key: DataKey) -> DataKey:
        """The encrypt path ran out of claimed encryptions under ``key``: claim
        another block, or rotate when the key's limit is reached, and return
        the key to use for the encryption at hand. The key in hand stays in use
        whenever the database cannot answer at once; what it encrypts then is
        claimed with the next block."""
        block = self.policy.block
        with self.lock:
            for _ in range(8):
                latest = self.cache.by_header.get(key.header, key)
                used = next(latest.counter)
                if used < latest.budget and latest.state is KeyState.ACTIVE:
                    return latest
                target = used + block
                granted: bool | transactions.Busy = False
                if not self.policy.due_by_age(latest.created_at, self.now()):
                    granted = self._claim_block(latest, target - latest.claimed)
                if granted is True:
                    return self.cache.put(replace(latest, budget=target, claimed=target))
                if granted is transactions.BUSY:
                    break
                # Refused, or due by age. Read the scope's active key again
                # rather than carry on: another process may have rotated, or
                # shredded the scope (ShreddedScopeError from here on).
                key = self.active(latest.scope, force=True)
                if key.id == latest.id:  # still active: at its limit, or due by age
                    if not self._rotate_for_policy(latest):
                        break
                    key = self.active(latest.scope, force=True)
            return self.cache.put(replace(latest, budget=used + 1 + block // 8))

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
                self.cache.put(replace(latest, claimed=claimed, budget=min(latest.budget, claimed)))

    # -- rotation --------------------------------------------------------------

    def rotate_in(self, conn: Connection, scope: str, expected_id: int | None) -> DataKey | None:
        """Retire the active key and insert its successor; with ``expected_id``,
        only if that key is still the active one (compare-and-swap), so that
        many processes acting on the same policy decision rotate once."""
        retired = storage.retire_active(conn, self.table, scope, self.now(), expected_id)
        if expected_id is not None and retired == 0:
            return None
        if retired == 0:
            self.refuse_shredded(conn, scope)
        self.wrapper.prove(conn)
        version = storage.next_version(conn, self.table, scope)
        return self.insert_active(conn, scope, version)

    def adopt(self, new: DataKey) -> None:
        """Make a key this process just created its scope's active key."""
        with self.lock:
            old = self.cache.active.get(new.scope)
            if old is not None and old.id != new.id:
                self.cache.put(replace(old, state=KeyState.RETIRED))
            self.cache.put(new)

    def _rotate_for_policy(self, key: DataKey) -> bool:
        """Rotate away from ``key`` unless another process already has. Best
        effort: False if the database is busy or the root key's KMS cannot be
        reached, and ``key`` simply stays in use."""
        try:
            outcome = self.store.try_write(
                lambda conn: self.rotate_in(conn, key.scope, expected_id=key.id)
            )
        except (RootKeyUnavailableError, RootKeyAccessDeniedError) as error:
            log.warning("policy rotation of scope %r postponed: %s", key.scope, error)
            return False
        if isinstance(outcome, transactions.Busy):
            log.debug("policy rotation of scope %r postponed: data_keys is busy", key.scope)
            return False
        if outcome is not None:
            self.adopt(outcome)
            log.info(
                "rotated scope %r to data key version %d by policy", key.scope, outcome.version
            )
        return True

    def insert_active(self, conn: Connection, scope: str, version: int) -> DataKey:
        """Insert a new active data key. Callers prove the root key first, in the
        same transaction (`KeyWrapper.prove`)."""
        plaintext = new_data_key()
        key_id = 1 + secrets.randbelow(fmt.MAX_KEY_ID)
        now = self.now()
        storage.insert_active(
            conn,
            self.table,
            key_id=key_id,
            scope=scope,
            version=version,
            wrapped_key=self.wrapper.wrap(plaintext, key_id, scope),
            root_key_fingerprint=self.wrapper.fingerprint,
            root_key_description=self.wrapper.root_key.description,
            now=now,
        )
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

    # -- shredded scopes -----------------------------------------------------

    def refuse_shredded(self, conn: Connection, scope: str) -> None:
        """A shredded scope gets no new key but from `create_scope`."""
        if storage.is_shredded(conn, self.table, scope):
            raise ShreddedScopeError(scope)

    def forget_scope(self, scope: str) -> None:
        """Make every cached key of a shredded scope, and its index keys, unusable."""
        with self.lock:
            self.cache.forget_scopes((scope, index_scope(scope)))

    # -- index keys: blind indexes and deterministic columns --------------------

    def index_key(self, version: int) -> IndexKey:
        """This registry's index key ``version``, read again if stale."""
        key = self.cache.index.get((index_scope(self.scope), version))
        if key is not None and self.cache.fresh(key):
            return key
        found = self._load_index_key(version, key)
        if found is None:
            raise ConfigurationError(
                f"no blind-index key version {version} in scope {index_scope(self.scope)!r}: "
                "call KeyRegistry.init() (version 1), or rotate that scope for a new version"
            )
        return found

    def find_index_key(self, version: int) -> IndexKey | None:
        """This registry's index key ``version``, read again if stale; None
        if data_keys holds no such key."""
        key = self.cache.index.get((index_scope(self.scope), version))
        if key is not None and self.cache.fresh(key):
            return key
        return self._load_index_key(version, key)

    def _load_index_key(self, version: int, previous: IndexKey | None) -> IndexKey | None:
        scope = index_scope(self.scope)
        with self.lock:
            self.check_open()
            row = self.store.read(lambda c: storage.key_by_version(c, self.table, scope, version))
            return None if row is None else self._remember_index(row, previous)

    def index_key_for(self, ciphertext: bytes) -> IndexKey | None:
        """The index key named by a deterministic value's header, read again if
        stale; None if the header names a key that is no index key.

        Any index scope will do, not only this registry's: a value written by
        another registry on the same data_keys (a tenant's, bound to a
        session) names its own, and reading needs no choice. AES-SIV
        authenticates the header, so a value cannot be made to name another
        index key than its own."""
        fmt.check(ciphertext)
        key = self.cache.index_by_header.get(ciphertext[: fmt.HEADER_BYTES])
        if key is not None and self.cache.fresh(key):
            return key
        key_id = fmt.key_id_of(ciphertext)
        with self.lock:
            self.check_open()
            row = self.store.read(lambda c: storage.key_by_id(c, self.table, key_id))
            if row is None:
                raise UnknownKeyError(key_id)
            if not is_index_scope(row.scope):
                return None
            return self._remember_index(row, key)

    def _remember_index(self, row: KeyRow, previous: IndexKey | None) -> IndexKey:
        """Cache an index key; a disabled or destroyed one without its secret."""
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
