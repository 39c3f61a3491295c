"""The root key's part: wrapping and unwrapping data keys, and proving that
this process's root key is the one that wrapped the stored keys before it
changes anything.

A wrapped key is bound to a *wrap context* naming it: its id, scope, version
and kind (version 2 of the context, FORMAT.md). Keys wrapped before version 2
were bound to their id and scope only; they still unwrap (version 2 is tried
first, then version 1) until `KeyAdmin.rewrap` wraps them again."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import DecryptionError, WrongRootKeyError
from . import storage
from .rootkey import RootKeyProvider
from .scopes import is_index_scope
from .storage import KeyRow

__all__ = ["KeyWrapper"]


class KeyWrapper:
    """Wraps data keys under the current root key, bound to their id, scope,
    version and kind."""

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
        return self.root_key.wrap(plaintext, self.context(key_id, scope, version))

    def unwrap(self, row: KeyRow) -> bytes:
        """The key ``row`` wraps, if its id, scope, version and kind are the
        ones it was wrapped with (only id and scope for a key wrapped before
        version 2 of the wrap context)."""
        assert row.wrapped_key is not None
        if row.root_key_fingerprint != self.fingerprint:
            raise self.wrong_root_key(row.root_key_fingerprint)
        root_key = self.root_key
        try:
            try:
                plaintext = root_key.unwrap(
                    row.wrapped_key, self.context(row.id, row.scope, row.version)
                )
            except DecryptionError:
                plaintext = root_key.unwrap(row.wrapped_key, self.legacy_context(row.id, row.scope))
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
