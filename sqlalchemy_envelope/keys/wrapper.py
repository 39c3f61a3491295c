"""The root key's part: wrapping and unwrapping data keys, and proving that
this process's root key is the one that wrapped the stored keys before it
changes anything."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import DecryptionError, RegistryClosedError, WrongRootKeyError
from . import storage
from .rootkey import RootKeyProvider
from .storage import KeyRow

__all__ = ["KeyWrapper"]


class KeyWrapper:
    """Wraps data keys under the current root key, bound to their id and scope."""

    def __init__(self, root_key: RootKeyProvider, table: sa.Table) -> None:
        self.root_key = root_key
        self.table = table
        self._fingerprint: str | None = None
        self._proven: RootKeyProvider | None = None  # unwrapped a stored key
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """The root key's fingerprint (computed once: PBKDF2 or a KMS call)."""
        if self._fingerprint is None:
            with self._lock:
                if self._fingerprint is None:
                    self._fingerprint = self.root_key.fingerprint
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
    def context(key_id: int, scope: str) -> dict[str, str]:
        return {"key_id": str(key_id), "scope": scope}

    def wrap(self, plaintext: bytes, key_id: int, scope: str) -> bytes:
        return self.root_key.wrap(plaintext, self.context(key_id, scope))

    def unwrap(self, row: KeyRow) -> bytes:
        assert row.wrapped_key is not None
        if row.root_key_fingerprint != self.fingerprint:
            raise self.wrong_root_key(row.root_key_fingerprint)
        root_key = self.root_key
        try:
            plaintext = root_key.unwrap(row.wrapped_key, self.context(row.id, row.scope))
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

    def check(self, conn: Connection) -> None:
        """Refuse to go on if any stored key was wrapped by another root key."""
        foreign = storage.foreign_fingerprints(conn, self.table, self.fingerprint)
        if foreign:
            raise self.wrong_root_key(foreign[0])

    def prove(self, conn: Connection) -> None:
        """Refuse to insert or change a data key unless this root key is the
        one that wrapped the stored keys, so that a misconfigured process can
        neither add a key that locks everyone else out nor disable, destroy or
        shred keys it cannot even read. Matching fingerprints do not prove
        it when a fingerprint names the key rather than derives from it (a KMS
        key id, a Vault key name): a stored key must also unwrap, once per
        process and root key. With no stored key there is nothing to prove
        against: the table is locked, so that a process with another root key
        cannot start it at the same time."""
        self.check(conn)
        row = storage.sample_key(conn, self.table)
        if row is None:
            storage.lock_table(conn, self.table)
            row = storage.sample_key(conn, self.table, for_update=True)
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

    def wrong_root_key(self, stored: str) -> WrongRootKeyError:
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
