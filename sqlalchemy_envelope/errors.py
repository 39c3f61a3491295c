"""Every error the library raises, under one base class.

Messages name what went wrong and what to do about it. They may name a key id,
a key version, a scope or a context ("table.column"); they never contain key
material, seeds or plaintext, so they are safe to log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy.exc import DontWrapMixin, StatementError

__all__ = [
    "BlindIndexError",
    "ConfigurationError",
    "ConnectionLostError",
    "DecryptionError",
    "DestroyedKeyError",
    "EncryptedComparisonError",
    "EncryptedExpressionError",
    "EncryptionLimitError",
    "EnvelopeError",
    "InvalidValueError",
    "KeyDisabledError",
    "KeyEventsTamperedError",
    "KeyInUseError",
    "KeyStateError",
    "KeyTamperedError",
    "LegacyDecryptionError",
    "NoActiveKeyError",
    "NotCiphertextError",
    "RegistryClosedError",
    "RootKeyAccessDeniedError",
    "RootKeyUnavailableError",
    "ShreddedScopeError",
    "StatementFailedError",
    "UnknownKeyError",
    "ValuesLeftBehindError",
    "WrongRootKeyError",
    "database_reason",
]


class EnvelopeError(DontWrapMixin, Exception):
    """Base class of every sqlalchemy-envelope error.

    SQLAlchemy re-raises these as they are rather than wrapping them in a
    StatementError, whose message would list the statement's parameters,
    plaintext included.
    """


class ConfigurationError(EnvelopeError, ValueError):
    """The library was set up wrongly: a missing secret, a bad parameter, no
    registry for an engine, an unsupported column type."""


class RegistryClosedError(ConfigurationError):
    """The registry was closed: it holds no key any more (not even the root
    key) and encrypts, decrypts, hashes and administers nothing. Create a
    new one; the engine it served can take it."""

    def __init__(self, registry: str = "KeyRegistry", *, served_engine: bool = False) -> None:
        self.registry = registry
        if served_engine:
            message = (
                f"the {registry} serving this engine was closed: create a new one with "
                f"{registry}(engine, root_key=...) (or {registry}.from_env(engine))"
            )
        else:
            message = f"this {registry} was closed; create a new {registry}"
        super().__init__(message)


class InvalidValueError(EnvelopeError, ValueError):
    """A Python value cannot be stored in an encrypted column: wrong type, too
    long for the column, or out of range. The message names the column and
    the type, never the value."""


class BlindIndexError(EnvelopeError, ValueError):
    """A write changes a blind index's source in a way the library cannot
    follow (a SQL expression, or only some sources of a compound index), so
    it was refused rather than leave the index out of step. The message names
    the index and what to do."""


class NoActiveKeyError(ConfigurationError):
    """No data key is active in a scope, so nothing can be encrypted."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(
            f"no active data key in scope {scope!r}: call the registry's init() "
            "(or run `sqlalchemy-envelope init`) before encrypting"
        )


class ShreddedScopeError(NoActiveKeyError):
    """The scope was crypto-shredded: all its data keys were destroyed. It
    gets no new key behind anyone's back, only from an explicit
    ``create_scope``."""

    def __init__(self, scope: str) -> None:
        ConfigurationError.__init__(
            self,
            f"scope {scope!r} was crypto-shredded (all its data keys were destroyed): "
            "nothing can be written for it. If it is meant to come back, re-create it "
            f"explicitly with KeyRegistry.create_scope({scope!r}); its old values stay "
            "unreadable",
        )
        self.scope = scope


class WrongRootKeyError(EnvelopeError):
    """The root key given is not the one the stored data keys were wrapped
    with. Nothing was written."""


class RootKeyUnavailableError(EnvelopeError):
    """The service holding the root key (a KMS) could not be reached, timed
    out or throttled the call. Usually brief: data keys already in the cache
    keep working meanwhile; retry later."""


class RootKeyAccessDeniedError(EnvelopeError):
    """The service holding the root key refused this application: missing
    permission or credentials, or the key is disabled, scheduled for
    deletion or does not exist. Retrying will not help; fix the access."""


class KeyTamperedError(EnvelopeError):
    """A ``data_keys`` row says something its wrapped key, or what this
    process already read of it, contradicts: another scope, version or kind,
    an active key that is not its scope's newest, a counter that went down.
    Someone who can write to the database changed it; nothing from that row
    is used."""

    def __init__(self, version: int, scope: str, what: str) -> None:
        self.version = version
        self.scope = scope
        super().__init__(
            f"the data_keys row of data key version {version} of scope {scope!r} was "
            f"altered: {what}. Nothing was encrypted or decrypted with it. Find out who "
            "writes to data_keys and restore it from a backup (if it was restored from a "
            "backup on purpose, restart the processes that use it)"
        )


class KeyEventsTamperedError(EnvelopeError):
    """A key change refused: the key events table was altered where the
    change must chain its event (its anchor is missing, does not unwrap, or
    does not follow from the chain). Nothing was written; `verify_events`
    (``sqlalchemy-envelope events verify``) finds the first bad event, and
    restoring those rows from a backup ends it (docs/audit.md)."""


class EncryptionLimitError(EnvelopeError):
    """An encryption would pass the bound on encryptions per data key: the
    key reached ``max_encryptions`` and could not be rotated, or the
    database could not record this process's claims for longer than one
    block. Nothing was encrypted; retry once the database or the root key's
    KMS answers."""


class DecryptionError(EnvelopeError):
    """Authentication failed: the ciphertext was altered, or it was written
    for another context (another table or column)."""


class UnknownKeyError(DecryptionError):
    """A ciphertext, or a call, names a data key that data_keys does not hold."""

    def __init__(
        self, key_id: int | None = None, *, scope: str | None = None, version: int | None = None
    ) -> None:
        self.key_id = key_id
        self.scope = scope
        self.version = version
        if key_id is not None:
            # The key id is not in the message: if the value is legacy
            # plaintext that merely looks like ciphertext, it is five of its bytes.
            message = (
                "the value names a data key that is not in the data_keys table: it was "
                "written by another database's keys, or its key's row was removed from "
                "data_keys (restore data_keys from a backup), or it is legacy plaintext "
                "that looks like ciphertext (see the re-encrypt utility)"
            )
        else:
            message = (
                f"scope {scope!r} has no data key version {version}: "
                "`sqlalchemy-envelope status` lists the versions"
            )
        super().__init__(message)


class _UnusableKeyError(DecryptionError):
    def __init__(self, key_id: int, version: int, scope: str, why: str) -> None:
        self.key_id = key_id
        self.version = version
        self.scope = scope
        super().__init__(f"data key version {version} of scope {scope!r} {why}")


class DestroyedKeyError(_UnusableKeyError):
    """The value's data key was destroyed (crypto-shredded); the value can no
    longer be read by anyone."""

    def __init__(self, key_id: int, version: int, scope: str) -> None:
        super().__init__(
            key_id, version, scope, "was destroyed: values written under it are unreadable for good"
        )


class KeyDisabledError(_UnusableKeyError):
    """The value's data key is disabled; enable it to read the value again."""

    def __init__(self, key_id: int, version: int, scope: str) -> None:
        super().__init__(
            key_id,
            version,
            scope,
            "is disabled: enable it (KeyRegistry.enable or `sqlalchemy-envelope enable`) "
            "to read this value",
        )


class KeyStateError(EnvelopeError):
    """A key state transition that the lifecycle does not allow, such as
    disabling the active key or enabling a destroyed one."""


class KeyInUseError(EnvelopeError):
    """Destroying a key that rows still need, or destroying or disabling an
    index key, whose use no census can rule out; ``rows`` maps "table.column"
    to the number of rows under the key (for an index key, its deterministic
    values: blind-index digests carry no key id)."""

    def __init__(
        self,
        version: int,
        scope: str,
        rows: dict[str, int],
        *,
        index_key: bool = False,
        action: str = "destroy",
    ) -> None:
        self.version = version
        self.scope = scope
        self.rows = rows
        where = ", ".join(f"{column}: {count}" for column, count in sorted(rows.items()))
        if not index_key:
            super().__init__(
                f"data key version {version} of scope {scope!r} still encrypts rows ({where}): "
                "re-encrypt them under the active key first, or pass force=True to "
                "crypto-shred them on purpose"
            )
            return
        deterministic = (
            f"; deterministic values are under it ({where}), and no job moves them to "
            "another version (deterministic columns always use version 1 of their index "
            "key): decrypt them in place or copy them to a new column first"
            if rows
            else ""
        )
        super().__init__(
            f"cannot {action} index key version {version} of scope {scope!r} without "
            "force=True: blind-index and hash_field digests carry no key id, so no census "
            "can tell whether rows still need it. Re-key each blind index that uses it "
            "first: add an index column with key_version=N (a newer version of this index "
            "scope), backfill it, switch lookups to it and drop the old column "
            f"(docs/finding-rows.md){deterministic}; then pass force=True "
            f"to {action} it on purpose"
        )


class NotCiphertextError(DecryptionError):
    """A value where ciphertext was expected is not in the library's format,
    typically plaintext left over from before the column was encrypted."""


class LegacyDecryptionError(DecryptionError):
    """A value written by sqlalchemy-utils (in a column declared
    ``EncryptedType(..., migrating=StringEncryptedType(...))``) does not read
    with that type's key, engine and padding: a wrong key, or a value altered
    or written under another key."""


class EncryptedComparisonError(EnvelopeError, TypeError):
    """An encrypted column or blind index was compared or sorted in SQL in a
    way that cannot mean anything: any comparison of randomized ciphertext,
    or an ordering or pattern on deterministic ciphertext or digests."""


class EncryptedExpressionError(EnvelopeError, TypeError):
    """SQL would put values that are not an encrypted column's own among its
    values: a write sets the column (or a blind index) to a SQL expression
    the library cannot encrypt or hash (a function, a cast, another column),
    or a CASE or COALESCE of its values also holds other ones. The database
    would store or compare them as they are, so the statement is refused."""


class ValuesLeftBehindError(EnvelopeError):
    """A column conversion (``op.encrypt_column``, ``op.decrypt_column``)
    finished with values it could not convert; ``report`` (a
    `MigrationReport`) names their rows and why in ``left_rows``."""

    def __init__(self, message: str, report: Any) -> None:
        self.report = report
        super().__init__(message)


class StatementFailedError(EnvelopeError):
    """The database refused a statement of a job (a re-encrypt, a decrypt in
    place); the text names the table and the driver's reason, never the
    statement's values. The job is resumable: run it again once fixed."""


class ConnectionLostError(StatementFailedError):
    """A job lost its connection to the database mid-statement: the server
    restarted or stopped, an administrator ended the session, the network
    failed. The batches committed before stay; run the job again once the
    database is back. A `StatementFailedError` too, so that code handling a
    job's failures handles this one."""


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$.]*")


def _values(params: Any) -> Iterator[str]:
    if isinstance(params, dict):
        params = list(params.values())
    if isinstance(params, list | tuple):
        for item in params:
            yield from _values(item)
    elif isinstance(params, str):
        yield params
    elif isinstance(params, bytes | bytearray | memoryview):
        yield bytes(params).decode("utf-8", "replace")
        yield repr(bytes(params))


def database_reason(error: BaseException) -> str:
    """The first line of a database error's text (the driver's own, for a
    SQLAlchemy error), safe to print: no statement or parameters, and every
    quoted literal masked unless it is an identifier that is none of the
    statement's values (drivers quote the offending value, e.g. PostgreSQL's
    ``invalid input syntax ...: "x"`` or MySQL's ``Duplicate entry 'x'``). A
    MySQL error's code comes first, its message unquoted: a deadlock's or a
    lock wait's reason holds no value and reads in full."""
    cause = error.orig if isinstance(error, StatementError) and error.orig else error
    args: tuple[Any, ...] = tuple(getattr(cause, "args", ()))
    code: int | None = None
    message = str(cause)
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        # MySQL's drivers: (code, message), whose repr quotes the whole message
        # (which the masking below would hide); quoted parts inside it stay masked.
        code, message = args
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[0] if lines else type(cause).__name__
    values = set(_values(error.params)) if isinstance(error, StatementError) else set()

    def mask(match: re.Match[str]) -> str:
        inner = match.group()[1:-1]
        if _IDENTIFIER.fullmatch(inner) and inner not in values:
            return match.group()
        return match.group()[0] + "***" + match.group()[-1]

    text = _QUOTED.sub(mask, text)
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= 3:
            text = text.replace(value, "***")
    return f"{type(cause).__name__}: {'' if code is None else f'({code}) '}{text}"
