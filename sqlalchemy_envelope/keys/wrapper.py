"""The root key's part: wrapping and unwrapping data keys, and proving that
this process's root key is the one that wrapped the stored keys before it
changes anything.

A wrapped key is bound to a *wrap context* naming it: its id, scope, version
and kind (version 2 of the context, FORMAT.md). Keys wrapped before version 2
were bound to their id and scope only; they still unwrap (version 2 is tried
first, then version 1) until `KeyAdmin.rewrap` wraps them again."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import (
    DecryptionError,
    KeyTamperedError,
    RegistryClosedError,
    WrongRootKeyError,
)
from ..metrics import Metrics
from . import storage
from .rootkey import RootKeyProvider
from .scopes import is_index_scope
from .storage import KeyRow

__all__ = ["KeyWrapper"]

T = TypeVar("T")

# Connection.info entry: the transaction that holds the lock, as proven with which root key.
_HELD = "sqlalchemy_envelope.held"


class KeyWrapper:
    """Wraps data keys under the current root key, bound to their id, scope,
    version and kind."""

    def __init__(
        self, root_key: RootKeyProvider, table: sa.Table, metrics: Metrics | None = None
    ) -> None:
        self.root_key = root_key
        self.table = table
        self.metrics = metrics
        self._fingerprint: str | None = None
        self._proven: RootKeyProvider | None = None  # unwrapped a stored key
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """The root key's fingerprint (computed once: PBKDF2 or a KMS call)."""
        if self._fingerprint is None:
            with self._lock:
                if self._fingerprint is None:
                    root_key = self.root_key
                    self._fingerprint = self._call("fingerprint", lambda: root_key.fingerprint)
        return self._fingerprint

    def replace(self, root_key: RootKeyProvider, fingerprint: str) -> None:
        """Use ``root_key`` from now on: it wrapped, and unwrapped, every stored key."""
        self.root_key = root_key
        self._fingerprint = fingerprint
        self._proven = root_key

    def forget(self, registry: str) -> None:
        """Let go of the root key for good: ``registry`` (its class name) was
        closed, and every later use of the root key says so."""
        self.root_key = _ClosedRootKey(registry)
        self._proven = None

    @staticmethod
    def kind(scope: str) -> str:
        """What a key of ``scope`` is for: "index" (blind indexes, deterministic
        columns) or "data" (AES-GCM values)."""
        return "index" if is_index_scope(scope) else "data"

    @classmethod
    def context(cls, key_id: int, scope: str, version: int) -> dict[str, str]:
        """The wrap context, version 2: every row field that never changes."""
        return {
            "key_id": str(key_id),
            "kind": cls.kind(scope),
            "scope": scope,
            "version": str(version),
        }

    @staticmethod
    def legacy_context(key_id: int, scope: str) -> dict[str, str]:
        """The wrap context of keys wrapped before version 2."""
        return {"key_id": str(key_id), "scope": scope}

    def wrap(self, plaintext: bytes, key_id: int, scope: str, version: int) -> bytes:
        root_key = self.root_key
        context = self.context(key_id, scope, version)
        return self._call("wrap", lambda: root_key.wrap(plaintext, context))

    def unwrap(self, row: KeyRow) -> bytes:
        """The key ``row`` wraps, if its id, scope, version and kind are the
        ones it was wrapped with (only id and scope for a key wrapped before
        version 2 of the wrap context)."""
        assert row.wrapped_key is not None
        if row.root_key_fingerprint != self.fingerprint:
            raise self.wrong_root_key(row.root_key_fingerprint)
        root_key = self.root_key
        wrapped = row.wrapped_key
        try:
            try:
                context = self.context(row.id, row.scope, row.version)
                plaintext = self._call("unwrap", lambda: root_key.unwrap(wrapped, context))
            except DecryptionError:
                legacy = self.legacy_context(row.id, row.scope)
                plaintext = self._call("unwrap", lambda: root_key.unwrap(wrapped, legacy))
        except DecryptionError:
            if self._proven is root_key:  # it unwrapped another stored key: this one changed
                raise KeyTamperedError(
                    row.version,
                    row.scope,
                    "it does not unwrap under its id, scope, version and kind, while other "
                    "keys do with this root key",
                ) from None
            raise WrongRootKeyError(
                f"data key version {row.version} of scope {row.scope!r} does not unwrap "
                f"with this root key although the fingerprints match ({row.root_key_fingerprint}):"
                " this is another key under the same fingerprint (check the root key "
                "configuration), or its data_keys row was altered (restore data_keys from "
                "a backup)"
            ) from None
        self._proven = root_key
        return plaintext

    def wrap_with(
        self, root_key: RootKeyProvider, plaintext: bytes, context: Mapping[str, str]
    ) -> bytes:
        """``root_key.wrap``, counted as every root key call is (a rewrap's new
        root key, the chain secret of the key events)."""
        return self._call("wrap", lambda: root_key.wrap(plaintext, context), root_key)

    def unwrap_with(
        self, root_key: RootKeyProvider, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        """``root_key.unwrap``, counted as every root key call is."""
        return self._call("unwrap", lambda: root_key.unwrap(wrapped, context), root_key)

    def _call(
        self, operation: str, call: Callable[[], T], root_key: RootKeyProvider | None = None
    ) -> T:
        """A call to the root key (this wrapper's unless given), timed and
        counted when metrics are on."""
        metrics = self.metrics
        if metrics is None:
            return call()
        provider = type(self.root_key if root_key is None else root_key).__name__
        start = time.perf_counter()
        try:
            result = call()
        except Exception as error:
            metrics.root_key_call(operation, provider, time.perf_counter() - start, error)
            raise
        metrics.root_key_call(operation, provider, time.perf_counter() - start, None)
        return result

    def check(self, conn: Connection, *, latest: bool = False) -> None:
        """Refuse to go on if any stored key was wrapped by another root key."""
        foreign = storage.foreign_fingerprints(conn, self.table, self.fingerprint, latest=latest)
        if foreign:
            counts = storage.keys_by_fingerprint(conn, self.table)
            raise self.wrong_root_key(foreign[0], counts)

    def prove(self, conn: Connection, *, latest: bool = False) -> None:
        """Refuse to change a data key unless this root key is the one that
        wrapped the stored keys, so that a misconfigured process can neither
        add a key that locks everyone else out nor disable, destroy or shred
        keys it cannot even read. Matching fingerprints do not prove it when a
        fingerprint names the key rather than derives from it (a KMS key id,
        a Vault key name): a stored key must also unwrap, once per process and
        root key. With no stored key there is nothing to prove against (an
        insert takes `hold` first: a process with another root key cannot
        start the table at the same time)."""
        self.check(conn, latest=latest)
        row = storage.sample_key(conn, self.table)
        if row is None:
            return
        if row.root_key_fingerprint != self.fingerprint:
            raise self.wrong_root_key(row.root_key_fingerprint)
        if self._proven is self.root_key:
            return
        try:
            self.unwrap(row)
        except WrongRootKeyError as error:
            raise WrongRootKeyError(f"{error}. Nothing was written.") from None

    def hold(self, conn: Connection) -> None:
        """Take the lock that every transaction inserting a key and `rewrap`
        take (`storage.lock_table`), then `prove` the root key under it: a
        rewrap can then neither commit between this check and the insert nor
        miss the key inserted, so no key is ever left wrapped under a root key
        a rewrap replaced, whichever commits first; a process still running
        with the old root key gets WrongRootKeyError with nothing written.
        Take it first in the transaction (a snapshot read before the lock
        may predate a rewrap); again, in the same transaction, it checks
        nothing new."""
        transaction = conn.get_transaction()
        held, fingerprint = conn.info.get(_HELD, (lambda: None, None))
        if transaction is not None and held() is transaction and fingerprint == self.fingerprint:
            return  # checked under the lock this transaction holds, for this root key
        storage.lock_table(conn, self.table)
        self.prove(conn, latest=True)
        transaction = conn.get_transaction()
        if transaction is not None:
            conn.info[_HELD] = (weakref.ref(transaction), self.fingerprint)

    def wrong_root_key(
        self, stored: str, counts: dict[str, int] | None = None
    ) -> WrongRootKeyError:
        mine = (counts or {}).get(self.fingerprint, 0)
        if counts and mine:
            return WrongRootKeyError(
                f"{counts.get(stored, 0)} data keys in {self.table.name!r} are wrapped by root "
                f"key {stored} and {mine} by this registry's root key {self.fingerprint}: a "
                "rewrap from one to the other left keys behind. Finish it: run rewrap with "
                "the root key it moved away from as the current root key and the other as "
                "the new one (it re-wraps only the keys not yet moved), until status lists "
                "no other root key. Nothing was written."
            )
        return WrongRootKeyError(
            f"the data keys in {self.table.name!r} were wrapped by root key {stored}, "
            f"but this registry's root key is {self.fingerprint} "
            f"({self.root_key.description}): check the root key configuration "
            "(ENVELOPE_ROOT_KEY, ENVELOPE_ROOT_KEY_FILE, ENVELOPE_AWS_KMS_KEY_ID, or "
            "ENVELOPE_ROOT_SEED, ENVELOPE_ROOT_SALT and ENVELOPE_PBKDF2_ITERATIONS). "
            "Nothing was written."
        )


class _ClosedRootKey:
    """The root key of a closed registry: none. Every use raises `RegistryClosedError`."""

    def __init__(self, registry: str) -> None:
        self.registry = registry

    @property
    def fingerprint(self) -> str:
        raise RegistryClosedError(self.registry)

    @property
    def description(self) -> str:
        raise RegistryClosedError(self.registry)

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        raise RegistryClosedError(self.registry)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        raise RegistryClosedError(self.registry)

    def __repr__(self) -> str:
        return "<none: the registry was closed>"
