"""The key registry: the seed's KMS Manager, Crypto Service and Data Key
Manager in one object.

A registry owns the root key, the ``data_keys`` table on the application's
engine and the cache of unwrapped data keys. ``encrypt_bytes`` and
``decrypt_bytes`` are the hot path: a dict lookup, a clock read and one
AES-GCM call; the database is read only when a key is new to this process or
older than ``cache_max_age``.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import binding, storage
from . import format as fmt
from .cache import DataKey, KeyCache
from .errors import (
    ConfigurationError,
    DecryptionError,
    DestroyedKeyError,
    EnvelopeError,
    KeyDisabledError,
    NoActiveKeyError,
    UnknownKeyError,
    WrongRootKeyError,
)
from .primitives import AESGCM, NONCE_BYTES, InvalidTag, new_data_key
from .rootkey import RootKeyProvider, root_key_from_env
from .status import KeyInfo, RegistryStatus
from .storage import KeyRow, KeyState

__all__ = ["DEFAULT_SCOPE", "KeyRegistry"]

log = logging.getLogger("sqlalchemy_envelope")

DEFAULT_SCOPE = "default"
DEFAULT_CACHE_MAX_AGE = timedelta(seconds=60)
_TRANSACTION_ATTEMPTS = 40
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization, deadlock
_urandom = os.urandom
T = TypeVar("T")


@dataclass(frozen=True)
class _NewKey:
    key: DataKey
    info: KeyInfo


def _seconds(value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ConfigurationError("cache_max_age must be positive")
    return seconds


def _check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not scope or len(scope) > 255:
        raise ConfigurationError("a scope is a non-empty string of at most 255 characters")
    return scope


def _is_contention(error: sa.exc.DBAPIError) -> bool:
    """True for errors a concurrent writer causes, which a retry resolves."""
    if isinstance(error, sa.exc.IntegrityError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    text = str(error.orig).lower()
    return "database is locked" in text or "deadlock" in text


class KeyRegistry:
    """Envelope encryption for one engine.

    ``KeyRegistry(engine, root_key)`` attaches itself to ``engine``: every
    Session and Connection on it can then read and write encrypted columns.
    Call `init` once (it is idempotent) to create ``data_keys`` and the first
    data key.
    """

    def __init__(
        self,
        engine: Engine,
        root_key: RootKeyProvider,
        *,
        scope: str = DEFAULT_SCOPE,
        cache_max_age: float | timedelta = DEFAULT_CACHE_MAX_AGE,
        table_name: str = storage.DEFAULT_TABLE_NAME,
        attach: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(engine, Engine):
            hint = (
                " (async engines are not supported yet)" if hasattr(engine, "sync_engine") else ""
            )
            raise ConfigurationError(f"KeyRegistry needs a SQLAlchemy Engine{hint}")
        if not isinstance(root_key, RootKeyProvider):
            raise ConfigurationError(
                "root_key must be a RootKeyProvider, e.g. PBKDF2RootKey(seed, salt) "
                "or StaticRootKey(key)"
            )
        self.engine = engine
        self.root_key = root_key
        self.scope = _check_scope(scope)
        self.table = storage.data_keys_table(sa.MetaData(), table_name)
        self._cache = KeyCache(_seconds(cache_max_age), clock)
        self._active = self._cache.active
        self._by_header = self._cache.by_header
        self._clock = clock
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        self._closed = False
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
        """A registry whose root key comes from the ``ENVELOPE_*`` variables."""
        return cls(engine, root_key_from_env(environ), **options)

    def __repr__(self) -> str:
        return (
            f"KeyRegistry({self.engine!r}, root_key={self.root_key!r}, "
            f"scope={self.scope!r}, table={self.table.name!r})"
        )

    def __enter__(self) -> KeyRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -------------------------------------------------------------

    def init(self) -> KeyInfo:
        """Create ``data_keys`` if missing and the scope's first data key if
        none is active; prove the root key. Safe to call from many processes."""
        self._check_open()
        self._create_table()

        def work(conn: Connection) -> tuple[KeyRow | None, _NewKey | None]:
            self._check_root_key(conn)
            row = storage.active_key(conn, self.table, self.scope)
            if row is not None:
                return row, None
            now = storage.utcnow()
            version = storage.next_version(conn, self.table, self.scope)
            return None, self._insert_active(conn, self.scope, version, now)

        row, new = self._in_transaction(work)
        if new is not None:
            self._cache.put(new.key)
            log.info("created data key version %d in scope %r", new.info.version, self.scope)
            return new.info
        assert row is not None
        self._remember(row, previous=None)
        return KeyInfo.from_row(row)

    def _create_table(self) -> None:
        try:
            with self.engine.begin() as conn:
                self.table.create(conn, checkfirst=True)
        except sa.exc.DBAPIError:
            # Another process created it between our check and our CREATE.
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table(self.table.name):
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

    # -- rotation and status ---------------------------------------------

    def rotate(self, scope: str | None = None) -> KeyInfo:
        """Make a new data key active in one transaction; the old one is
        retired (still decrypts). Concurrent rotations each commit in turn."""
        self._check_open()
        scope = self.scope if scope is None else _check_scope(scope)

        def work(conn: Connection) -> _NewKey:
            self._check_root_key(conn)
            now = storage.utcnow()
            storage.retire_active(conn, self.table, scope, now, expected_id=None)
            version = storage.next_version(conn, self.table, scope)
            return self._insert_active(conn, scope, version, now)

        new = self._in_transaction(work)
        with self._lock:
            old = self._active.get(scope)
            if old is not None:
                self._cache.put(replace(old, state=KeyState.RETIRED))
            self._cache.put(new.key)
        log.info("rotated scope %r to data key version %d", scope, new.info.version)
        return new.info

    def status(self, scope: str | None = None) -> RegistryStatus:
        scope = self.scope if scope is None else _check_scope(scope)
        rows = self._read(lambda conn: storage.all_keys(conn, self.table, scope))
        active = next((r for r in rows if r.state is KeyState.ACTIVE), None)
        return RegistryStatus(
            scope=scope,
            active_version=None if active is None else active.version,
            active_key_id=None if active is None else active.id,
            active_age=None if active is None else storage.utcnow() - active.state_changed_at,
            root_key_fingerprint=self._root_fingerprint(),
            root_key_description=self.root_key.description,
            cache_max_age=timedelta(seconds=self._cache.max_age),
            keys=tuple(KeyInfo.from_row(r) for r in rows),
            keys_by_state=dict(Counter(r.state.value for r in rows)),
        )

    # -- the hot path ----------------------------------------------------

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` under the active data key, bound to ``context``
        (for columns, ``"table.column"``)."""
        if not isinstance(plaintext, (bytes, bytearray)):
            raise TypeError("encrypt() takes the plaintext as bytes")
        return self.encrypt_bytes(bytes(plaintext), context.encode("utf-8"))

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        """Decrypt a value written by `encrypt` with the same ``context``."""
        if not isinstance(ciphertext, (bytes, bytearray)):
            raise TypeError("decrypt() takes the ciphertext as bytes")
        return self.decrypt_bytes(bytes(ciphertext), context.encode("utf-8"))

    def encrypt_many(self, plaintexts: Iterable[bytes], context: str) -> list[bytes]:
        """The seed's EncryptBatch: many values, one context, one key lookup
        per value and no other overhead."""
        encrypt = self.encrypt_bytes
        aad = context.encode("utf-8")
        return [encrypt(p, aad) for p in plaintexts]

    def decrypt_many(self, ciphertexts: Iterable[bytes], context: str) -> list[bytes]:
        decrypt = self.decrypt_bytes
        aad = context.encode("utf-8")
        return [decrypt(c, aad) for c in ciphertexts]

    def encrypt_bytes(self, plaintext: bytes, context: bytes) -> bytes:
        """`encrypt` with the context already encoded: what column types call."""
        key = self._active.get(self.scope)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_active(self.scope)
        aead = key.aead
        assert aead is not None
        nonce = _urandom(NONCE_BYTES)
        header = key.header
        return header + nonce + aead.encrypt(nonce, plaintext, header + context)

    def decrypt_bytes(self, ciphertext: bytes, context: bytes) -> bytes:
        """`decrypt` with the context already encoded: what column types call."""
        header = ciphertext[: fmt.HEADER_BYTES]
        key = self._by_header.get(header)
        if key is None or self._clock() > key.fresh_until:
            key = self._fresh_key(ciphertext)
        aead = key.aead
        if aead is None:
            raise self._unusable(key)
        try:
            return aead.decrypt(
                ciphertext[fmt.HEADER_BYTES : fmt.PAYLOAD_OFFSET],
                ciphertext[fmt.PAYLOAD_OFFSET :],
                header + context,
            )
        except InvalidTag:
            raise DecryptionError(
                f"value for context {context.decode('utf-8', 'replace')!r} failed "
                "authentication: it was altered, or it was written for another "
                "column or row (a different context)"
            ) from None

    # -- the slow path: loading keys ---------------------------------------

    def _fresh_active(self, scope: str) -> DataKey:
        stale = self._active.get(scope)
        if stale is not None and not self._lock.acquire(blocking=False):
            return stale  # another thread is refreshing; the old key is still good
        if stale is None:
            self._lock.acquire()
        try:
            key = self._active.get(scope)
            if key is not None and self._clock() <= key.fresh_until:
                return key
            self._check_open()
            row = self._read(lambda conn: storage.active_key(conn, self.table, scope))
            if row is None:
                raise NoActiveKeyError(scope)
            key = self._remember(row, previous=self._by_header.get(fmt.header(row.id)))
            if stale is not None and stale.id != key.id:
                self._cache.put(replace(stale, state=KeyState.RETIRED))
            return key
        finally:
            self._lock.release()

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

    def _remember(self, row: KeyRow, previous: DataKey | None) -> DataKey:
        """Cache ``row`` as a usable key, unwrapping it unless the previous
        cache entry for the same key already holds its cipher."""
        usable = row.state in (KeyState.ACTIVE, KeyState.RETIRED)
        aead: AESGCM | None = None
        if usable:
            if previous is not None and previous.id == row.id and previous.aead is not None:
                aead = previous.aead
            else:
                aead = AESGCM(self._unwrap(row))
        return self._cache.put(
            DataKey(
                id=row.id,
                version=row.version,
                scope=row.scope,
                state=row.state,
                header=fmt.header(row.id),
                aead=aead,
                fresh_until=self._cache.expiry(),
            )
        )

    def _unwrap(self, row: KeyRow) -> bytes:
        assert row.wrapped_key is not None
        if row.root_key_fingerprint != self._root_fingerprint():
            raise self._wrong_root_key(row.root_key_fingerprint)
        try:
            return self.root_key.unwrap(row.wrapped_key, self._wrap_context(row.id, row.scope))
        except DecryptionError:
            raise WrongRootKeyError(
                f"data key version {row.version} of scope {row.scope!r} does not unwrap "
                "with this root key although the fingerprints match: its data_keys row "
                "was altered; restore data_keys from a backup"
            ) from None

    def _insert_active(self, conn: Connection, scope: str, version: int, now: Any) -> _NewKey:
        plaintext = new_data_key()
        key_id = 1 + secrets.randbelow(fmt.MAX_KEY_ID)
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
        key = DataKey(
            id=key_id,
            version=version,
            scope=scope,
            state=KeyState.ACTIVE,
            header=fmt.header(key_id),
            aead=AESGCM(plaintext),
            fresh_until=self._cache.expiry(),
        )
        info = KeyInfo(
            id=key_id,
            scope=scope,
            version=version,
            state=KeyState.ACTIVE,
            algorithm=storage.ALGORITHM,
            root_key_fingerprint=self._root_fingerprint(),
            created_at=now,
            state_changed_at=now,
        )
        return _NewKey(key, info)

    @staticmethod
    def _wrap_context(key_id: int, scope: str) -> dict[str, str]:
        return {"key_id": str(key_id), "scope": scope}

    # -- checks ------------------------------------------------------------

    def _root_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.root_key.fingerprint
        return self._fingerprint

    def _check_root_key(self, conn: Connection) -> None:
        """Refuse to go on if any stored key was wrapped by another root key."""
        foreign = storage.foreign_fingerprints(conn, self.table, self._root_fingerprint())
        if foreign:
            raise self._wrong_root_key(foreign[0])

    def _wrong_root_key(self, stored: str) -> WrongRootKeyError:
        return WrongRootKeyError(
            f"the data keys in {self.table.name!r} were wrapped by root key {stored}, "
            f"but this registry's root key is {self._root_fingerprint()} "
            f"({self.root_key.description}): check ENVELOPE_ROOT_KEY, or "
            "ENVELOPE_ROOT_SEED, ENVELOPE_ROOT_SALT and ENVELOPE_PBKDF2_ITERATIONS. "
            "Nothing was written."
        )

    def _missing_table(self) -> ConfigurationError | None:
        """After a failed statement: the error to raise if data_keys is missing."""
        with self.engine.connect() as conn:
            if sa.inspect(conn).has_table(self.table.name):
                return None
        return ConfigurationError(
            f"table {self.table.name!r} does not exist: call KeyRegistry.init() "
            "(or run `sqlalchemy-envelope init`, or the Alembic migration) first"
        )

    def _read(self, query: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return query(conn)
        except sa.exc.DBAPIError as error:
            missing = self._missing_table()
            if missing is not None:
                raise missing from error
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("this KeyRegistry was closed; create a new one")

    @staticmethod
    def _unusable(key: DataKey) -> EnvelopeError:
        if key.state is KeyState.DESTROYED:
            return DestroyedKeyError(key.id, key.version, key.scope)
        return KeyDisabledError(key.id, key.version, key.scope)

    def _in_transaction(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in its own transaction, retrying when a concurrent
        writer (another process rotating or initializing) got there first."""
        for attempt in range(1, _TRANSACTION_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as error:
                if attempt == _TRANSACTION_ATTEMPTS or not _is_contention(error):
                    missing = self._missing_table()
                    if missing is not None:
                        raise missing from error
                    raise
            time.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")
