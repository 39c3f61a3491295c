"""The key registry: the seed's KMS Manager, Crypto Service and Data Key
Manager in one object.

A registry owns the root key, the ``data_keys`` table on the application's
engine and the cache of unwrapped data keys. ``encrypt_bytes`` and
``decrypt_bytes`` are the hot path: a dict lookup, a clock read, a counter and
one AES-GCM call. The database is read only when a key is new to this
process, older than ``cache_max_age``, or when this process has used up the
encryptions it claimed under the active key.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util.concurrency import in_greenlet

from .crypto import format as fmt
from .crypto.primitives import (
    AESGCM,
    AESSIV,
    NONCE_BYTES,
    InvalidTag,
    hkdf_sha256,
    hmac_sha256,
    new_data_key,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    DestroyedKeyError,
    EnvelopeError,
    InvalidValueError,
    KeyDisabledError,
    KeyInUseError,
    KeyStateError,
    NoActiveKeyError,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
    ShreddedScopeError,
    UnknownKeyError,
    WrongRootKeyError,
)
from .keys import lifecycle, storage, transactions
from .keys.cache import DataKey, KeyCache
from .keys.connections import KeyConnections
from .keys.policy import DEFAULT_MAX_ENCRYPTIONS, RotationPolicy
from .keys.rootkey import CheckableRootKey, RootKeyProvider, root_key_from_env
from .keys.storage import KeyRow, KeyState
from .ops import census, migrate
from .ops.census import ColumnCensus, Target
from .ops.status import KeyInfo, MaintenanceReport, RegistryStatus
from .sqla import binding, strict_mode

__all__ = ["DEFAULT_SCOPE", "KeyRegistry"]

log = logging.getLogger("sqlalchemy_envelope")

DEFAULT_SCOPE = "default"
INDEX_SCOPE_PREFIX = "~index:"
"""Scopes of the keys behind blind indexes and deterministic columns: they
never rotate with data keys, so lookups keep working across rotations."""
MAX_SCOPE_CHARS = storage.SCOPE_CHARS - len(INDEX_SCOPE_PREFIX)
"""A scope's index scope must fit data_keys.scope too."""
DEFAULT_CACHE_MAX_AGE = timedelta(seconds=60)
_urandom = os.urandom
_HEADER = fmt.HEADER_BYTES
_PAYLOAD = fmt.PAYLOAD_OFFSET
T = TypeVar("T")


def _seconds(value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ConfigurationError("cache_max_age must be positive")
    return seconds


def _check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_CHARS:
        raise ConfigurationError(
            f"a scope is a non-empty string of at most {MAX_SCOPE_CHARS} characters"
        )
    return scope


def _check_bytes(value: Any, method: str, what: str) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidValueError(
            f"{method}() takes {what} as bytes, got {type(value).__name__}: encode a "
            "str first (e.g. value.encode('utf-8'))"
        )


class KeyRegistry:
    """Envelope encryption for one engine.

    ``KeyRegistry(engine, root_key)`` attaches itself to ``engine``: every
    Session and Connection on it can then read and write encrypted columns.
    Call `init` once (it is idempotent) to create ``data_keys`` and the first
    data key. ``rotate_after`` and ``max_encryptions`` set the rotation
    policy, applied by the encrypt path itself, without a background thread.
    On MySQL and MariaDB, connections without a strict ``sql_mode`` are
    refused unless ``allow_non_strict_mysql=True`` (see strict_mode.py).
    """

    def __init__(
        self,
        engine: Engine,
        root_key: RootKeyProvider,
        *,
        scope: str = DEFAULT_SCOPE,
        cache_max_age: float | timedelta = DEFAULT_CACHE_MAX_AGE,
        rotate_after: timedelta | None = None,
        max_encryptions: int = DEFAULT_MAX_ENCRYPTIONS,
        table_name: str = storage.DEFAULT_TABLE_NAME,
        create_scopes: bool = True,
        max_cached_keys: int = 10_000,
        attach: bool = True,
        allow_non_strict_mysql: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = storage.utcnow,
    ) -> None:
        if not isinstance(engine, Engine):
            hint = (
                ": for an AsyncEngine use AsyncKeyRegistry"
                if hasattr(engine, "sync_engine")
                else ""
            )
            raise ConfigurationError(f"KeyRegistry needs a SQLAlchemy Engine{hint}")
        if not isinstance(root_key, RootKeyProvider):
            raise ConfigurationError(
                "root_key must be a RootKeyProvider, e.g. PBKDF2RootKey(seed, salt) "
                "or StaticRootKey(key)"
            )
        self.engine = engine
        strict_mode.require_strict_mode(engine, allow=allow_non_strict_mysql)
        self._allow_non_strict_mysql = allow_non_strict_mysql
        self._keys = KeyConnections(engine)
        self.root_key = root_key
        self.scope = _check_scope(scope)
        self.policy = RotationPolicy(rotate_after, max_encryptions)
        self.table = storage.data_keys_table(sa.MetaData(), table_name)
        self.create_scopes = create_scopes
        self._cache = KeyCache(_seconds(cache_max_age), clock, max_cached_keys)
        self._active = self._cache.active
        self._by_header = self._cache.by_header
        self._clock = clock
        self._now = wall_clock
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        self._proven: RootKeyProvider | None = None  # unwrapped a stored key
        self._closed = False
        self._public_name = "KeyRegistry"  # what errors tell the user to create
        self._pinned: ContextVar[Connection | None] = ContextVar("envelope_pinned", default=None)
        self._index_rows: dict[int, KeyRow] = {}  # index key version -> its row
        self._index_ids: dict[int, int] = {}  # index key id -> version
        self._derived: dict[tuple[int, bytes], bytes] = {}
        self._sivs: dict[tuple[int, bytes], tuple[bytes, AESSIV]] = {}
        if attach:
            binding.attach(engine, self)

    @classmethod
    def from_env(
        cls,
        engine: Engine,
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> KeyRegistry:
        """A registry whose root key comes from the ``ENVELOPE_*`` variables,
        as does ``allow_non_strict_mysql`` (``ENVELOPE_ALLOW_NON_STRICT_MYSQL``)
        unless given."""
        env = os.environ if environ is None else environ
        options.setdefault("allow_non_strict_mysql", strict_mode.allowed_by(env))
        return cls(engine, root_key_from_env(env), **options)

    def __repr__(self) -> str:
        return (
            f"KeyRegistry({self.engine!r}, root_key={self.root_key!r}, "
            f"scope={self.scope!r}, table={self.table.name!r})"
        )

    def __enter__(self) -> KeyRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache_max_age(self) -> timedelta:
        return timedelta(seconds=self._cache.max_age)

    @contextmanager
    def on_connection(self, connection: Connection) -> Iterator[KeyRegistry]:
        """Do all of this registry's database work on ``connection``, inside
        its transaction, while the block runs. For migrations: Alembic runs
        them in one transaction, which may have created data_keys itself and
        holds locks that a second connection would wait on forever. Its
        ``sql_mode`` is checked as the registry's own connections' are."""
        strict_mode.check_connection(connection, allow=self._allow_non_strict_mysql)
        token = self._pinned.set(connection)
        try:
            yield self
        finally:
            self._pinned.reset(token)

    def _key_call(self, work: Callable[[Engine | Connection], T]) -> T:
        """Run ``work`` against data_keys: on the pinned connection if there is
        one, else on the registry's own connections (see connections.py)."""
        pinned = self._pinned.get()
        if pinned is not None:
            return work(pinned)
        engine = self._keys.engine
        return self._keys.call(lambda: work(engine))

    def _attempt(self, work: Callable[[Connection], T]) -> T | transactions.Busy:
        return self._key_call(lambda bind: transactions.attempt(bind, work))

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        pinned = self._pinned.get()
        if pinned is not None:
            yield pinned
            return
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        pinned = self._pinned.get()
        if pinned is not None:
            yield pinned
            return
        with self.engine.begin() as conn:
            yield conn

    # -- setup -------------------------------------------------------------

    def init(self) -> KeyInfo:
        """Create ``data_keys`` if missing and the scope's first data key if
        none is active; prove the root key. Safe to call from many processes.
        A shredded scope is not brought back (`ShreddedScopeError`)."""
        self._check_open()
        self._create_table()

        def work(conn: Connection) -> tuple[KeyRow | None, DataKey | None]:
            row = storage.active_key(conn, self.table, self.scope)
            index = storage.key_by_version(conn, self.table, self.index_scope, 1)
            if row is not None and index is not None:
                self._check_root_key(conn)  # the active key's unwrapping proves the rest
                return row, None
            if row is None:
                self._refuse_shredded(conn, self.scope)
            self._prove_root_key(conn)
            if index is None:
                self._insert_active(conn, self.index_scope, 1)
            if row is not None:
                return row, None
            version = storage.next_version(conn, self.table, self.scope)
            return None, self._insert_active(conn, self.scope, version)

        row, new = self._run(work)
        if new is not None:
            self._cache.put(new)
            log.info("created data key version %d in scope %r", new.version, self.scope)
            return self.key_info(new.version)
        assert row is not None
        self._remember(row, previous=None)
        return KeyInfo.from_row(row)

    @property
    def index_scope(self) -> str:
        """The scope of the keys behind this registry's blind indexes and
        deterministic columns."""
        return INDEX_SCOPE_PREFIX + self.scope

    def _create_table(self) -> None:
        try:
            self._key_call(lambda bind: self.table.create(bind, checkfirst=True))
        except sa.exc.DBAPIError:
            # Another process created it between our check and our CREATE.
            if not self._key_call(lambda bind: sa.inspect(bind).has_table(self.table.name)):
                raise

    def bind(self, target: Any) -> Any:
        """Make this registry the one that encrypts what a Session,
        AsyncSession, sessionmaker or async_sessionmaker writes."""
        binding.bind(target, self)
        return target

    def close(self) -> None:
        """Detach from the engine and forget every cached key."""
        self._closed = True
        binding.detach(self)
        self._cache.clear()
        self._keys.close()

    # -- rotation ----------------------------------------------------------

    def rotate(self, scope: str | None = None) -> KeyInfo:
        """Make a new data key active in one transaction; the old one is
        retired (still decrypts). Concurrent rotations each commit in turn."""
        self._check_open()
        scope = self._scope(scope)
        new = self._run(lambda conn: self._rotate_in(conn, scope, expected_id=None))
        assert new is not None
        self._adopt(new)
        log.info("rotated scope %r to data key version %d", scope, new.version)
        return self.key_info(new.version, scope)

    def _rotate_in(self, conn: Connection, scope: str, expected_id: int | None) -> DataKey | None:
        """Retire the active key and insert its successor; with ``expected_id``,
        only if that key is still the active one (compare-and-swap), so that
        many processes acting on the same policy decision rotate once."""
        retired = storage.retire_active(conn, self.table, scope, self._now(), expected_id)
        if expected_id is not None and retired == 0:
            return None
        if retired == 0:
            self._refuse_shredded(conn, scope)
        self._prove_root_key(conn)
        version = storage.next_version(conn, self.table, scope)
        return self._insert_active(conn, scope, version)

    def _adopt(self, new: DataKey) -> None:
        with self._lock:
            old = self._active.get(new.scope)
            if old is not None and old.id != new.id:
                self._cache.put(replace(old, state=KeyState.RETIRED))
            self._cache.put(new)

    def _rotate_for_policy(self, key: DataKey) -> bool:
        """Rotate away from ``key`` unless another process already has. Best
        effort: False if the database is busy or the root key's KMS cannot be
        reached, and ``key`` simply stays in use."""
        try:
            outcome = self._attempt(
                lambda conn: self._rotate_in(conn, key.scope, expected_id=key.id)
            )
        except (RootKeyUnavailableError, RootKeyAccessDeniedError) as error:
            log.warning("policy rotation of scope %r postponed: %s", key.scope, error)
            return False
        if isinstance(outcome, transactions.Busy):
            log.debug("policy rotation of scope %r postponed: data_keys is busy", key.scope)
            return False
        if outcome is not None:
            self._adopt(outcome)
            log.info(
                "rotated scope %r to data key version %d by policy", key.scope, outcome.version
            )
        return True

    # -- scopes (tenants) ------------------------------------------------------

    def create_scope(self, *scopes: str) -> list[KeyInfo]:
        """Give each scope that has none an active data key, in one
        transaction. Scopes are also created on first use (``create_scopes``),
        except shredded ones, which only this brings back (with a new key
        version; their old values stay unreadable)."""
        names = [_check_scope(s) for s in scopes]

        def work(conn: Connection) -> list[int]:
            self._prove_root_key(conn)
            created = []
            for name in names:
                if storage.active_key(conn, self.table, name) is None:
                    version = storage.next_version(conn, self.table, name)
                    created.append(self._insert_active(conn, name, version).version)
            return created

        self._run(work)

        def active_rows(conn: Connection) -> list[KeyRow | None]:
            return [storage.active_key(conn, self.table, name) for name in names]

        return [KeyInfo.from_row(row) for row in self._read(active_rows) if row is not None]

    def _create_on_first_use(self, scope: str) -> KeyRow | None:
        """Create a scope met for the first time by the encrypt path. It must
        not wait on locks the application may hold: SQLite has one writer at a
        time, so there the scope must exist before a write transaction meets it."""
        _check_scope(scope)

        def work(conn: Connection) -> None:
            if storage.active_key(conn, self.table, scope) is None:
                self._refuse_shredded(conn, scope)
                self._prove_root_key(conn)
                self._insert_active(conn, scope, storage.next_version(conn, self.table, scope))

        outcome = self._attempt(work)
        row = self._read(lambda conn: storage.active_key(conn, self.table, scope))
        if row is None and isinstance(outcome, transactions.Busy):
            raise ConfigurationError(
                f"scope {scope!r} has no data key yet, and the database is locked by an "
                "open write transaction: create scopes ahead with "
                "KeyRegistry.create_scope() (on SQLite, always)"
            )
        return row

    def shred(self, scope: str) -> int:
        """Crypto-shred a scope (a tenant): destroy every key of the scope,
        the active one included, and its index key, in one transaction. Every
        value written under them becomes unreadable for good, other scopes are
        untouched. Returns the number of keys destroyed. Backups taken before
        still hold the wrapped keys: see the README."""
        scope = _check_scope(scope)
        scopes = [scope, INDEX_SCOPE_PREFIX + scope]

        def work(conn: Connection) -> int:
            self._prove_root_key(conn)
            now = self._now()
            count = 0
            if not storage.all_keys(conn, self.table, scope):
                raise ConfigurationError(
                    f"scope {scope!r} has no keys: nothing to shred (check the scope's name)"
                )
            for name in scopes:
                for row in storage.all_keys(conn, self.table, name):
                    if row.state is not KeyState.DESTROYED:
                        storage.set_state(conn, self.table, row.id, KeyState.DESTROYED, now)
                        count += 1
            return count

        count = self._run(work)
        self._forget_shredded(scope)
        log.warning("shredded scope %r: %d keys destroyed", scope, count)
        return count

    def _forget_shredded(self, scope: str) -> None:
        """Drop every cached key of a shredded scope, and its index keys."""
        scopes = (scope, INDEX_SCOPE_PREFIX + scope)
        with self._lock:
            for key in list(self._by_header.values()):
                if key.scope in scopes:
                    self._cache.put(replace(key, state=KeyState.DESTROYED, aead=None))
            self._active.pop(scope, None)
            if scope == self.scope:
                self._index_rows.clear()
                self._index_ids.clear()
                self._derived.clear()
                self._sivs.clear()

    def _refuse_shredded(self, conn: Connection, scope: str) -> None:
        """A shredded scope gets no new key but from `create_scope`."""
        if storage.is_shredded(conn, self.table, scope):
            raise ShreddedScopeError(scope)

    # -- key states ----------------------------------------------------------

    def retire(self, version: int, scope: str | None = None) -> KeyInfo:
        """Retire a key (it still decrypts). Retiring the active key rotates,
        so that a successor takes over in the same transaction."""
        scope = self._scope(scope)
        row = self._row(scope, version)
        if row.state is KeyState.ACTIVE:
            new = self._run(lambda conn: self._rotate_in(conn, scope, expected_id=row.id))
            if new is not None:
                self._adopt(new)
            return self.key_info(version, scope)
        return self._transition("retire", scope, version)

    def disable(self, version: int, scope: str | None = None) -> KeyInfo:
        """Refuse decryption under a retired key, reversibly (see `enable`)."""
        return self._transition("disable", self._scope(scope), version)

    def enable(self, version: int, scope: str | None = None) -> KeyInfo:
        """Bring a disabled key back to retired."""
        return self._transition("enable", self._scope(scope), version)

    def destroy(
        self,
        version: int,
        scope: str | None = None,
        *,
        force: bool = False,
        columns: Iterable[Target] = (),
    ) -> KeyInfo:
        """Erase a retired or disabled key's wrapped key for good; its row stays
        as a tombstone. Refused while any row still holds a value under it
        (counted in SQL over ``columns``, or else over every text and binary
        column of every table in every schema the connection can see, models
        loaded or not), or while
        processes may still be writing under it, unless ``force=True``:
        crypto-shredding on purpose."""
        scope = self._scope(scope)
        row = self._row(scope, version)
        lifecycle.target_state("destroy", row.state, version, scope)
        if not force and row.state is not KeyState.DESTROYED:
            self._guard_destroy(row, columns)
        info = self._transition("destroy", scope, version)
        log.warning("destroyed data key version %d of scope %r", version, scope)
        return info

    def _guard_destroy(self, row: KeyRow, columns: Iterable[Target]) -> None:
        quiet_for = self._now() - row.state_changed_at
        if quiet_for < self.cache_max_age:
            raise KeyStateError(
                f"data key version {row.version} of scope {row.scope!r} changed state "
                f"{quiet_for.total_seconds():.0f}s ago; processes may still be writing under "
                f"it until their caches refresh ({self.cache_max_age.total_seconds():.0f}s): "
                "wait, then take the census again"
            )
        headers = [fmt.header(row.id), fmt.header(row.id, fmt.DETERMINISTIC_VERSION)]
        with self._connect() as conn:
            targets = list(columns)
            refs = census.resolve(conn, targets) if targets else self._discover(conn)
            counts = {
                ref.qualified_name: sum(census.rows_under(conn, ref, h) for h in headers)
                for ref in refs
            }
        in_use = {name: n for name, n in counts.items() if n}
        if in_use:
            raise KeyInUseError(row.version, row.scope, in_use)

    def _discover(self, conn: Connection) -> list[census.EncryptedColumnRef]:
        """Every column of every table that could hold ciphertext, but ours."""
        return census.discover(conn, skip_table=(self.table.schema, self.table.name))

    def _census_everywhere(self) -> list[ColumnCensus]:
        """Columns anywhere in the database (models or not) that hold values
        under a data key: what the destroy guard checks, counted the same way."""
        keys = {row.id: row for row in self._read(lambda c: storage.all_keys(c, self.table))}
        with self._connect() as conn:
            counts = [census.count(conn, ref, keys) for ref in self._discover(conn)]
        return [c for c in counts if c.keys or c.unknown_key_rows]

    def _transition(self, action: str, scope: str, version: int) -> KeyInfo:
        def work(conn: Connection) -> KeyRow:
            self._prove_root_key(conn)
            row = storage.key_by_version(conn, self.table, scope, version, for_update=True)
            if row is None:
                raise UnknownKeyError(scope=scope, version=version)
            target = lifecycle.target_state(action, row.state, version, scope)
            if target is not row.state:
                storage.set_state(conn, self.table, row.id, target, self._now())
            return row

        before = self._run(work)
        after = self._row(scope, version)
        if after.state is not before.state:
            log.info(
                "data key version %d of scope %r: %s -> %s",
                version,
                scope,
                before.state.value,
                after.state.value,
            )
        with self._lock:
            self._remember(after, previous=self._by_header.get(fmt.header(after.id)))
        return KeyInfo.from_row(after)

    # -- root key rotation -----------------------------------------------

    def rewrap(self, new_root_key: RootKeyProvider) -> int:
        """Re-wrap every data key under ``new_root_key`` in one transaction (all
        or nothing), without touching any value. Afterwards this registry uses
        the new root key and the old one is no longer needed. Returns the number
        of keys re-wrapped."""
        self._check_open()
        if not isinstance(new_root_key, RootKeyProvider):
            raise ConfigurationError("rewrap() needs a RootKeyProvider")
        new_fingerprint = new_root_key.fingerprint
        if new_fingerprint == self._root_fingerprint():
            raise ConfigurationError("the new root key is the one already in use")

        def work(conn: Connection) -> int:
            storage.lock_table(conn, self.table)
            self._check_root_key(conn)
            count = 0
            for row in storage.all_keys(conn, self.table):
                context = self._wrap_context(row.id, row.scope)
                wrapped = None
                if row.wrapped_key is not None:
                    plaintext = self._unwrap(row)
                    wrapped = new_root_key.wrap(plaintext, context)
                    if new_root_key.unwrap(wrapped, context) != plaintext:
                        raise WrongRootKeyError("the new root key does not unwrap what it wrapped")
                    count += 1
                storage.rewrap(
                    conn,
                    self.table,
                    row.id,
                    wrapped_key=wrapped,
                    root_key_fingerprint=new_fingerprint,
                    root_key_description=new_root_key.description,
                )
            return count

        count = self._run(work)
        with self._lock:
            self.root_key = new_root_key
            self._fingerprint = new_fingerprint
            self._proven = new_root_key  # it wrapped, and unwrapped, every stored key
            self._index_rows.clear()  # their wrapped keys changed
        log.info("re-wrapped %d data keys under root key %s", count, new_fingerprint)
        return count

    # -- census, status and maintenance ------------------------------------

    def census(self, *targets: Target, scope: str | None = None) -> list[ColumnCensus]:
        """Rows per data key for each encrypted column, counted in SQL from the
        ciphertext header without decrypting anything. ``targets`` are
        "table.column" names, Columns, ORM attributes, mapped classes or
        Tables; with none, every encrypted column this process has defined
        whose table exists in the database. With ``scope``, only that
        scope's keys are listed (a tenant's census)."""
        keys = {row.id: row for row in self._read(lambda c: storage.all_keys(c, self.table))}
        with self._connect() as conn:
            counts = [census.count(conn, ref, keys) for ref in census.resolve(conn, targets)]
        if scope is None:
            return counts
        return [replace(c, keys=tuple(k for k in c.keys if k.scope == scope)) for c in counts]

    def reencrypt(
        self,
        *targets: Target,
        batch_size: int = 1000,
        workers: int = 1,
        encrypt_plaintext: bool = False,
        progress: bool | None = None,
        scope: str | None = None,
        plaintext_rows: Mapping[str, Iterable[Any]] | None = None,
    ) -> migrate.MigrationReport:
        """Move every value of the target columns that is under an older key
        of ``scope`` (default: the registry's) onto the scope's active key:
        online (compare-and-swap updates in short batches), resumable (a
        rerun finishes a killed job), with a progress bar on a terminal.
        Legacy plaintext is encrypted too in columns declared
        ``migrating=True``, or everywhere with ``encrypt_plaintext=True``.
        ``workers`` > 1 splits each table into primary-key ranges handled by
        parallel processes. Values of other scopes are left untouched
        (``report.other_scopes``); values that do not decrypt are left as
        they are and named in ``report.left_rows``. ``plaintext_rows`` maps
        "table.column" to primary keys (a tuple for a composite key) of rows
        whose value is legacy plaintext that merely looks like ciphertext:
        such a value is encrypted as plaintext unless it decrypts, or its key
        is disabled or destroyed (then it is this registry's ciphertext)."""
        self._check_open()
        return migrate.run(
            self,
            targets,
            batch_size=batch_size,
            workers=workers,
            encrypt_plaintext=encrypt_plaintext,
            progress=progress,
            scope=self._scope(scope),
            plaintext_rows=plaintext_rows,
        )

    def decrypt_in_place(
        self,
        *targets: Target,
        batch_size: int = 1000,
        workers: int = 1,
        progress: bool | None = None,
    ) -> migrate.MigrationReport:
        """The reverse of encrypting a column in place: write every value back
        as plaintext (strings in text storage, bytes in binary storage), with
        the same batching and compare-and-swap safety as `reencrypt`."""
        self._check_open()
        return migrate.run(
            self, targets, decrypt=True, batch_size=batch_size, workers=workers, progress=progress
        )

    def backfill_index(self, target: Any, *, batch_size: int = 1000) -> migrate.MigrationReport:
        """Fill a blind index column for existing rows (resumable, batched,
        compare-and-swap); to re-key or re-normalize an index, add a second
        index column, backfill it, switch lookups to it, then drop the first."""
        from .sqla.blind_index import backfill

        report: migrate.MigrationReport = backfill(self, target, batch_size=batch_size)
        return report

    def active_header(self, scope: str | None = None) -> bytes:
        """The ciphertext header of a scope's active key: values starting with
        it need no re-encryption."""
        scope = scope or self.scope
        key = self._active.get(scope)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_active(scope)
        return key.header

    def key_scope_version(self, key_id: int) -> tuple[str, int]:
        key = self._cached(key_id)
        if key is not None:
            return key.scope, key.version
        row = self._read(lambda conn: storage.key_by_id(conn, self.table, key_id))
        if row is None:
            raise UnknownKeyError(key_id)
        return row.scope, row.version

    def key_info(self, version: int, scope: str | None = None) -> KeyInfo:
        return KeyInfo.from_row(self._row(self._scope(scope), version))

    def status(self, scope: str | None = None, *, census: bool = False) -> RegistryStatus:
        """The seed's GetStatus and GetKeyStatistics for one scope; with
        ``census=True`` also the rows under each key version, counted over
        every text and binary column of every table (as `destroy` checks),
        and the columns that hold them."""
        scope = self._scope(scope)

        def read(conn: Connection) -> list[KeyRow]:
            self._check_root_key(conn)
            return storage.all_keys(conn, self.table, scope)

        rows = self._read(read)
        active = next((r for r in rows if r.state is KeyState.ACTIVE), None)
        columns = tuple(self._census_everywhere()) if census else None
        rows_by_version: dict[int, int] | None = None
        if columns is not None:
            by_id = {r.id: r.version for r in rows}
            counts: Counter[int] = Counter()
            for column in columns:
                for key in column.keys:
                    if key.key_id in by_id:
                        counts[by_id[key.key_id]] += key.rows
            rows_by_version = dict(counts)
        now = self._now()
        return RegistryStatus(
            scope=scope,
            active_version=None if active is None else active.version,
            active_key_id=None if active is None else active.id,
            active_age=None if active is None else now - active.created_at,
            active_encryptions=None if active is None else active.encryptions,
            rotation_due=(
                None
                if active is None
                else self.policy.reason(active.created_at, active.encryptions, now)
            ),
            rotate_after=self.policy.rotate_after,
            max_encryptions=self.policy.max_encryptions,
            root_key_fingerprint=self._root_fingerprint(),
            root_key_description=self.root_key.description,
            cache_max_age=self.cache_max_age,
            keys=tuple(KeyInfo.from_row(r) for r in rows),
            keys_by_state=dict(Counter(r.state.value for r in rows)),
            root_key_problem=self._root_key_problem(),
            cached_keys=len(self._by_header),
            rows_by_version=rows_by_version,
            columns=columns,
        )

    def _root_key_problem(self) -> str | None:
        if not isinstance(self.root_key, CheckableRootKey):
            return None
        try:
            self.root_key.check()
        except (RootKeyUnavailableError, RootKeyAccessDeniedError) as error:
            return str(error)
        return None

    def maintenance(self, scope: str | None = None) -> MaintenanceReport:
        """The seed's PerformMaintenance, done safely: rotate if the policy says
        so, and report which old keys no row needs any more. Deletes nothing."""
        scope = self._scope(scope)
        due = self.status(scope)
        rotated = None
        if due.rotation_due is not None and due.active_key_id is not None:
            expected = due.active_key_id
            new = self._run(lambda conn: self._rotate_in(conn, scope, expected_id=expected))
            if new is not None:
                self._adopt(new)
                rotated = self.key_info(new.version, scope)
        status = self.status(scope, census=True)
        referenced = status.rows_by_version or {}
        now = self._now()
        destroyable = tuple(
            key.version
            for key in status.keys
            if key.state in (KeyState.RETIRED, KeyState.DISABLED)
            and not referenced.get(key.version)
            and now - key.state_changed_at >= self.cache_max_age
        )
        still_referenced = {
            key.version: referenced[key.version]
            for key in status.keys
            if key.state in (KeyState.RETIRED, KeyState.DISABLED) and referenced.get(key.version)
        }
        return MaintenanceReport(
            scope=scope,
            rotated=rotated,
            rotation_reason=due.rotation_due if rotated is not None else None,
            destroyable=destroyable,
            still_referenced=still_referenced,
        )

    # -- keys that do not rotate: blind indexes and deterministic columns ----

    def _index_row(self, version: int) -> KeyRow:
        row = self._index_rows.get(version)
        if row is None:
            scope = self.index_scope
            row = self._read(lambda c: storage.key_by_version(c, self.table, scope, version))
            if row is None:
                raise ConfigurationError(
                    f"no blind-index key version {version} in scope {scope!r}: call "
                    "KeyRegistry.init() (version 1), or rotate that scope for a new version"
                )
            if row.wrapped_key is None:
                raise DestroyedKeyError(row.id, row.version, row.scope)
            self._index_rows[version] = row
            self._index_ids[row.id] = version
        return row

    def derived_key(self, purpose: bytes, version: int = 1, length: int = 32) -> bytes:
        """A key for one purpose and column (HKDF, RFC 5869), derived from the
        scope's non-rotating index key: blind indexes and `hash_field`."""
        cached = self._derived.get((version, purpose))
        if cached is None or len(cached) != length:
            with self._lock:
                master = self._unwrap(self._index_row(version))
                cached = hkdf_sha256(master, purpose, length)
                self._derived[(version, purpose)] = cached
        return cached

    def hash_field(self, value: bytes, context: str, *, version: int = 1) -> str:
        """The seed's HashField done right: a keyed, context-bound HMAC-SHA256
        (hex) for equality lookups outside ORM columns. Never a bare hash."""
        _check_bytes(value, "hash_field", "value")
        key = self.derived_key(b"sqlalchemy-envelope/hash-field/v1\x00" + context.encode(), version)
        return hmac_sha256(key, value).hex()

    def _siv(self, context: bytes, version: int) -> tuple[bytes, AESSIV]:
        entry = self._sivs.get((version, context))
        if entry is None:
            row = self._index_row(version)
            key = self.derived_key(
                b"sqlalchemy-envelope/deterministic/v1\x00" + context, version, length=64
            )
            entry = (fmt.header(row.id, fmt.DETERMINISTIC_VERSION), AESSIV(key))
            self._sivs[(version, context)] = entry
        return entry

    def deterministic_header(self, context: bytes, version: int = 1) -> bytes:
        return self._siv(context, version)[0]

    def encrypt_deterministic(self, plaintext: bytes, context: bytes, version: int = 1) -> bytes:
        """AES-SIV: the same plaintext and context always give the same
        ciphertext, so the database can compare, join and enforce uniqueness."""
        header, siv = self._siv(context, version)
        return header + siv.encrypt(plaintext, [header, context])

    def decrypt_deterministic(self, ciphertext: bytes, context: bytes) -> bytes:
        fmt.check(ciphertext)
        if ciphertext[0] != fmt.DETERMINISTIC_VERSION:
            raise DecryptionError("value is randomized ciphertext in a deterministic column")
        key_id = fmt.key_id_of(ciphertext)
        version = self._index_ids.get(key_id)
        if version is None:
            row = self._read(lambda c: storage.key_by_id(c, self.table, key_id))
            if row is None:
                raise UnknownKeyError(key_id)
            if row.scope != self.index_scope:
                # Only this registry's index keys encrypt deterministically: a
                # header naming any other key was altered. Nothing is cached.
                raise self._deterministic_failure(context)
            version = row.version
        header, siv = self._siv(context, version)
        if ciphertext[: fmt.HEADER_BYTES] != header:
            raise self._deterministic_failure(context)
        try:
            return siv.decrypt(ciphertext[fmt.HEADER_BYTES :], [header, context])
        except InvalidTag:
            raise self._deterministic_failure(context) from None

    @staticmethod
    def _deterministic_failure(context: bytes) -> DecryptionError:
        return DecryptionError(
            f"value for context {context.decode('utf-8', 'replace')!r} failed "
            "authentication: it was altered, or written for another column"
        )

    # -- the hot path ----------------------------------------------------

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` under the active data key, bound to ``context``
        (for columns, ``"table.column"``)."""
        _check_bytes(plaintext, "encrypt", "plaintext")
        return self.encrypt_bytes(bytes(plaintext), context.encode("utf-8"))

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        """Decrypt a value written by `encrypt` with the same ``context``."""
        if not isinstance(ciphertext, (bytes, bytearray)):
            raise TypeError("decrypt() takes the ciphertext as bytes")
        return self.decrypt_bytes(bytes(ciphertext), context.encode("utf-8"))

    def encrypt_many(self, plaintexts: Iterable[bytes], context: str) -> list[bytes]:
        """The seed's EncryptBatch: many values, one context."""
        encrypt = self.encrypt_bytes
        aad = context.encode("utf-8")
        plaintexts = list(plaintexts)
        for plaintext in plaintexts:
            _check_bytes(plaintext, "encrypt_many", "each plaintext")
        return [encrypt(bytes(p), aad) for p in plaintexts]

    def decrypt_many(self, ciphertexts: Iterable[bytes], context: str) -> list[bytes]:
        decrypt = self.decrypt_bytes
        aad = context.encode("utf-8")
        return [decrypt(c, aad) for c in ciphertexts]

    def encrypt_bytes(self, plaintext: bytes, context: bytes, scope: str | None = None) -> bytes:
        """`encrypt` with the context already encoded: what column types call.
        ``scope`` picks another scope's active key (a tenant's)."""
        scope = scope or self.scope
        key = self._active.get(scope)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_active(scope)
        if next(key.counter) >= key.budget:
            key = self._claim(key)
        aead = key.aead
        assert aead is not None
        nonce = _urandom(NONCE_BYTES)
        header = key.header
        return header + nonce + aead.encrypt(nonce, plaintext, header + context)

    def encryptor(self, context: bytes, scope: str | None = None) -> Callable[[bytes], bytes]:
        """`encrypt_bytes` for one context and scope, with every lookup bound
        once: what a column's bind processor calls per value, for the statement
        at hand. It checks the active key's age and claimed encryptions per
        value, exactly as `encrypt_bytes` does, and leaves loading, claiming and
        rotating to it."""
        scope = scope or self.scope
        get = self._active.get
        clock = self._clock
        claim = self._claim
        slow = self.encrypt_bytes
        # The last key used and its associated data (header + context): one
        # tuple, replaced whole, so that threads sharing it read a matching pair.
        bound: tuple[DataKey | None, bytes] = (None, b"")

        def encrypt(plaintext: bytes) -> bytes:
            nonlocal bound
            key = get(scope)
            if key is None or clock() > key.fresh_until:
                return slow(plaintext, context, scope)
            if next(key.counter) >= key.budget:
                key = claim(key)
            aead = key.aead
            assert aead is not None  # an active key can encrypt
            pair = bound
            if pair[0] is not key:
                pair = bound = (key, key.header + context)
            nonce = _urandom(NONCE_BYTES)
            return key.header + nonce + aead.encrypt(nonce, plaintext, pair[1])

        return encrypt

    def decrypt_bytes(self, ciphertext: bytes, context: bytes) -> bytes:
        """`decrypt` with the context already encoded: what column types call."""
        header = ciphertext[:_HEADER]
        key = self._by_header.get(header)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_key(ciphertext)
        aead = key.aead
        if aead is None:
            raise self._unusable(key)
        try:
            return aead.decrypt(
                ciphertext[_HEADER:_PAYLOAD], ciphertext[_PAYLOAD:], header + context
            )
        except InvalidTag:
            raise DecryptionError(
                f"value for context {context.decode('utf-8', 'replace')!r} failed "
                "authentication: it was altered, or it was written for another "
                "column or row (a different context)"
            ) from None
        except ValueError:  # too short to hold a nonce: cut short after a known header
            fmt.check(ciphertext)
            raise DecryptionError("value is truncated: it was altered") from None

    def decryptor(self, context: bytes) -> Callable[[bytes], bytes]:
        """`decrypt_bytes` for one context, with every lookup bound once: what
        a column's result processor calls per value. Anything but a cached,
        usable key and an authentic value takes `decrypt_bytes`, which loads
        the key or raises the right error."""
        get = self._by_header.get
        clock = self._clock
        slow = self.decrypt_bytes
        # The last key used and its associated data (header + context): one
        # tuple, replaced whole, so that threads sharing it read a matching pair.
        bound: tuple[DataKey | None, bytes] = (None, b"")

        def decrypt(ciphertext: bytes) -> bytes:
            nonlocal bound
            key = get(ciphertext[:_HEADER])
            if key is None or clock() > key.fresh_until or key.aead is None:
                return slow(ciphertext, context)
            pair = bound
            if pair[0] is not key:
                pair = bound = (key, key.header + context)
            try:
                return key.aead.decrypt(
                    ciphertext[_HEADER:_PAYLOAD], ciphertext[_PAYLOAD:], pair[1]
                )
            except (InvalidTag, ValueError):
                return slow(ciphertext, context)

        return decrypt

    def decrypt_scoped(self, ciphertext: bytes, context: bytes, scope: str | None) -> bytes:
        """Decrypt a value whose context binds its scope (``EncryptedType(...,
        bind_scope=True)``). With ``scope``, a value written in another scope is
        refused, even if it was copied into this scope's rows."""
        header = ciphertext[: fmt.HEADER_BYTES]
        key = self._by_header.get(header)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_key(ciphertext)
        if key.aead is None:
            raise self._unusable(key)
        if scope is not None and key.scope != scope:
            raise DecryptionError(
                f"value for context {context.decode('utf-8', 'replace')!r} was written in "
                f"another scope than {scope!r}: it was copied from another tenant's row"
            )
        return self.decrypt_bytes(ciphertext, fmt.scoped_context(context, key.scope))

    # -- the slow path: claims, refreshes and loading keys ----------------------

    def _claim(self, key: DataKey) -> DataKey:
        """The encrypt path ran out of claimed encryptions under ``key``: claim
        another block, or rotate when the key's limit is reached, and return
        the key to use for the encryption at hand. The key in hand stays in use
        whenever the database cannot answer at once; what it encrypts then is
        claimed with the next block."""
        block = self.policy.block
        with self._lock:
            for _ in range(8):
                latest = self._by_header.get(key.header, key)
                used = next(latest.counter)
                if used < latest.budget and latest.state is KeyState.ACTIVE:
                    return latest
                target = used + block
                granted: bool | transactions.Busy = False
                if not self.policy.due_by_age(latest.created_at, self._now()):
                    granted = self._claim_block(latest, target - latest.claimed)
                if granted is True:
                    return self._cache.put(replace(latest, budget=target, claimed=target))
                if granted is transactions.BUSY:
                    break
                # Refused, or due by age. Read the scope's active key again
                # rather than carry on: another process may have rotated, or
                # shredded the scope (ShreddedScopeError from here on).
                key = self._fresh_active(latest.scope, force=True)
                if key.id == latest.id:  # still active: at its limit, or due by age
                    if not self._rotate_for_policy(latest):
                        break
                    key = self._fresh_active(latest.scope, force=True)
            return self._cache.put(replace(latest, budget=used + 1 + block // 8))

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
        conn = self._statement_connection()
        if conn is None:
            claim = partial(
                storage.claim, table=self.table, key_id=key.id, count=count, limit=limit
            )
            return self._attempt(claim)
        statement = storage.claim_statement(self.table, key.id, count, limit)
        changed = transactions.attempt_within(conn, statement, partial(self._unclaim, key, count))
        return changed if isinstance(changed, transactions.Busy) else changed == 1

    def _statement_connection(self) -> Connection | None:
        """The SQLite connection of the application statement being executed,
        on this registry's database, if a claim can be written there now."""
        if self.engine.dialect.name != "sqlite" or self._pinned.get() is not None:
            return None
        conn = binding.statement_connection()
        if conn is None or conn.closed or conn.invalidated or conn.engine.url != self.engine.url:
            return None
        if conn.dialect.is_async and not in_greenlet():
            return None
        return conn

    def _unclaim(self, key: DataKey, count: int) -> None:
        """A claim written in the application's transaction was rolled back
        with it: the encryptions it covered are claimed again, with the next
        block, before this process encrypts under the key again."""
        with self._lock:
            latest = self._by_header.get(key.header)
            if latest is not None and latest.id == key.id:
                claimed = latest.claimed - count
                self._cache.put(
                    replace(latest, claimed=claimed, budget=min(latest.budget, claimed))
                )

    def _fresh_active(self, scope: str, *, force: bool = False) -> DataKey:
        stale = self._active.get(scope)
        if stale is not None and not force and not self._lock.acquire(blocking=False):
            return stale  # another thread is refreshing; the old key is still good
        if stale is None or force:
            self._lock.acquire()
        try:
            key = self._active.get(scope)
            if key is not None and not force and self._clock() <= key.fresh_until:
                return key
            self._check_open()
            row = self._read(lambda conn: storage.active_key(conn, self.table, scope))
            if row is None:
                row = self._first_key(scope)
            if self.policy.due_by_age(row.created_at, self._now()) and self._rotate_for_policy(
                self._remember(row, self._cached(row.id))
            ):
                row = self._read(lambda conn: storage.active_key(conn, self.table, scope)) or row
            key = self._remember(row, previous=self._cached(row.id))
            if stale is not None and stale.id != key.id:
                self._cache.put(replace(stale, state=KeyState.RETIRED))
            return key
        finally:
            self._lock.release()

    def _first_key(self, scope: str) -> KeyRow:
        """The active key of a scope that has none in data_keys: a tenant's
        created on first use, unless the scope was shredded."""
        if self._read(lambda conn: storage.is_shredded(conn, self.table, scope)):
            self._forget_shredded(scope)
            raise ShreddedScopeError(scope)
        row = None
        if scope != self.scope and self.create_scopes:
            row = self._create_on_first_use(scope)
        if row is None:
            raise NoActiveKeyError(scope)
        return row

    def _fresh_key(self, ciphertext: bytes) -> DataKey:
        fmt.check(ciphertext)
        header = ciphertext[: fmt.HEADER_BYTES]
        with self._lock:
            key = self._by_header.get(header)
            if key is not None and self._clock() <= key.fresh_until:
                return key
            self._check_open()
            key_id = fmt.key_id_of(ciphertext)
            row = self._read(lambda conn: storage.key_by_id(conn, self.table, key_id))
            if row is None:
                raise UnknownKeyError(key_id)
            return self._remember(row, previous=key)

    def _cached(self, key_id: int) -> DataKey | None:
        return self._by_header.get(fmt.header(key_id))

    def _remember(self, row: KeyRow, previous: DataKey | None) -> DataKey:
        """Cache ``row``, unwrapping it unless the previous cache entry for the
        same key already holds its cipher; keep that entry's use counter."""
        usable = row.state in (KeyState.ACTIVE, KeyState.RETIRED)
        same = previous is not None and previous.id == row.id
        aead: AESGCM | None = None
        if usable:
            if same and previous is not None and previous.aead is not None:
                aead = previous.aead
            else:
                aead = AESGCM(self._unwrap(row))
        key = DataKey(
            id=row.id,
            version=row.version,
            scope=row.scope,
            state=row.state,
            header=fmt.header(row.id),
            aead=aead,
            fresh_until=self._cache.expiry(),
            created_at=row.created_at,
        )
        if same and previous is not None:
            key = replace(
                key, counter=previous.counter, budget=previous.budget, claimed=previous.claimed
            )
        return self._cache.put(key)

    def _unwrap(self, row: KeyRow) -> bytes:
        assert row.wrapped_key is not None
        if row.root_key_fingerprint != self._root_fingerprint():
            raise self._wrong_root_key(row.root_key_fingerprint)
        root_key = self.root_key
        try:
            plaintext = root_key.unwrap(row.wrapped_key, self._wrap_context(row.id, row.scope))
        except DecryptionError:
            raise WrongRootKeyError(
                f"data key version {row.version} of scope {row.scope!r} does not unwrap "
                f"with this root key although the fingerprints match ({row.root_key_fingerprint}):"
                " this is another key under the same fingerprint (check the root key "
                "configuration), or its data_keys row was altered (restore data_keys from "
                "a backup)"
            ) from None
        self._proven = root_key
        return plaintext

    def _insert_active(self, conn: Connection, scope: str, version: int) -> DataKey:
        """Insert a new active data key. Callers prove the root key first, in the
        same transaction (`_prove_root_key`)."""
        plaintext = new_data_key()
        key_id = 1 + secrets.randbelow(fmt.MAX_KEY_ID)
        now = self._now()
        storage.insert_active(
            conn,
            self.table,
            key_id=key_id,
            scope=scope,
            version=version,
            wrapped_key=self.root_key.wrap(plaintext, self._wrap_context(key_id, scope)),
            root_key_fingerprint=self._root_fingerprint(),
            root_key_description=self.root_key.description,
            now=now,
        )
        return DataKey(
            id=key_id,
            version=version,
            scope=scope,
            state=KeyState.ACTIVE,
            header=fmt.header(key_id),
            aead=AESGCM(plaintext),
            fresh_until=self._cache.expiry(),
            created_at=now,
        )

    @staticmethod
    def _wrap_context(key_id: int, scope: str) -> dict[str, str]:
        return {"key_id": str(key_id), "scope": scope}

    # -- checks and plumbing -------------------------------------------------

    def _scope(self, scope: str | None) -> str:
        return self.scope if scope is None else _check_scope(scope)

    def _row(self, scope: str, version: int) -> KeyRow:
        row = self._read(lambda conn: storage.key_by_version(conn, self.table, scope, version))
        if row is None:
            raise UnknownKeyError(scope=scope, version=version)
        return row

    def _root_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.root_key.fingerprint
        return self._fingerprint

    def _check_root_key(self, conn: Connection) -> None:
        """Refuse to go on if any stored key was wrapped by another root key."""
        foreign = storage.foreign_fingerprints(conn, self.table, self._root_fingerprint())
        if foreign:
            raise self._wrong_root_key(foreign[0])

    def _prove_root_key(self, conn: Connection) -> None:
        """Refuse to insert or change a data key unless this root key is the
        one that wrapped the stored keys, so that a misconfigured process can
        neither add a key that locks everyone else out nor disable, destroy or
        shred keys it cannot even read. Matching fingerprints do not prove
        it when a fingerprint names the key rather than derives from it (a KMS
        key id, a Vault key name): a stored key must also unwrap, once per
        process and root key. With no stored key there is nothing to prove
        against: the table is locked, so that a process with another root key
        cannot start it at the same time."""
        self._check_root_key(conn)
        row = storage.sample_key(conn, self.table)
        if row is None:
            storage.lock_table(conn, self.table)
            row = storage.sample_key(conn, self.table, for_update=True)
            if row is None:
                return
        if row.root_key_fingerprint != self._root_fingerprint():
            raise self._wrong_root_key(row.root_key_fingerprint)
        if self._proven is self.root_key:
            return
        try:
            self._unwrap(row)
        except WrongRootKeyError as error:
            raise WrongRootKeyError(f"{error}. Nothing was written.") from None

    def _wrong_root_key(self, stored: str) -> WrongRootKeyError:
        return WrongRootKeyError(
            f"the data keys in {self.table.name!r} were wrapped by root key {stored}, "
            f"but this registry's root key is {self._root_fingerprint()} "
            f"({self.root_key.description}): check the root key configuration "
            "(ENVELOPE_ROOT_KEY, ENVELOPE_ROOT_KEY_FILE, ENVELOPE_AWS_KMS_KEY_ID, or "
            "ENVELOPE_ROOT_SEED, ENVELOPE_ROOT_SALT and ENVELOPE_PBKDF2_ITERATIONS). "
            "Nothing was written."
        )

    def _missing_table(self) -> ConfigurationError | None:
        """After a failed statement: the error to raise if data_keys is missing."""
        if self._pinned.get() is not None:
            return None  # a failed statement aborted the pinned transaction
        if self._key_call(lambda bind: sa.inspect(bind).has_table(self.table.name)):
            return None
        return ConfigurationError(
            f"table {self.table.name!r} does not exist: call {self._public_name}.init() "
            "(or run `sqlalchemy-envelope init`, or the Alembic migration) first"
        )

    def _read(self, query: Callable[[Connection], T]) -> T:
        def read(bind: Engine | Connection) -> T:
            if isinstance(bind, Connection):
                return query(bind)
            with bind.connect() as conn:
                return query(conn)

        try:
            return self._key_call(read)
        except sa.exc.DBAPIError as error:
            missing = self._missing_table()
            if missing is not None:
                raise missing from error
            raise

    def _run(self, work: Callable[[Connection], T]) -> T:
        try:
            return self._key_call(lambda bind: transactions.run(bind, work))
        except sa.exc.DBAPIError as error:
            missing = self._missing_table()
            if missing is not None:
                raise missing from error
            raise

    def _check_open(self) -> None:
        if self._closed:
            name = self._public_name
            raise ConfigurationError(f"this {name} was closed; create a new {name}")

    @staticmethod
    def _unusable(key: DataKey) -> EnvelopeError:
        if key.state is KeyState.DESTROYED:
            return DestroyedKeyError(key.id, key.version, key.scope)
        return KeyDisabledError(key.id, key.version, key.scope)
