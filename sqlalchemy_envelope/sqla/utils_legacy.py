"""Values written by sqlalchemy-utils' ``StringEncryptedType`` and
``EncryptedType``, read while a column moves to `EncryptedType`.

A column declared ``EncryptedType(..., migrating=StringEncryptedType(...))``
(the sqlalchemy-utils type it had, with its key, engine and padding) reads
both kinds of values during the migration window, and the re-encrypt job
seals the old ones under the registry's keys. Their values are read by
their own type (its engine, its key callable, its parsing of typed values):
this module never decrypts anything itself. AesEngine's CBC carries no
authentication, so a wrong key or padding is told only by padding or text
that does not parse; the job checks a sample before writing (ops/migrate.py).

Their unpadding is lax (oneandzeroes and naive strip any trailing bytes of
their kind, zeroes strips as many bytes as the last one says), so a value
written under one padding read as garbage under another: the reader replaces
it with a strict one, which takes only the bytes its mechanism writes. The
four mechanisms' paddings then never overlap but where they read alike
(pkcs5 and zeroes both end a one-byte padding with 0x01), so a wrong padding
fails on every value it would change.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from ..errors import ConfigurationError, InvalidValueError, LegacyDecryptionError

__all__ = ["LegacyValues", "legacy_values"]

_BLOCK = 16  # AesEngine pads to AES's block, with 1 to 16 bytes


def _pkcs5(padded: bytes) -> int | None:
    """n bytes of value n."""
    n = padded[-1]
    return n if 1 <= n <= _BLOCK and padded[-n:] == bytes((n,)) * n else None


def _zeroes(padded: bytes) -> int | None:
    """n - 1 zero bytes, then n (their ZeroesPadding)."""
    n = padded[-1]
    return n if 1 <= n <= _BLOCK and not any(padded[-n:-1]) else None


def _oneandzeroes(padded: bytes) -> int | None:
    """0x80, then up to 15 zero bytes."""
    n = len(padded) - len(padded.rstrip(b"\x00")) + 1
    return n if n <= _BLOCK and padded[-n] == 0x80 else None


def _naive(padded: bytes) -> int | None:
    """1 to 16 '*': every trailing '*' goes, as sqlalchemy-utils always read
    them (a value's own trailing '*' were lost when it was written)."""
    return len(padded) - len(padded.rstrip(b"*")) or None


# The length of the padding each mechanism wrote at the end of a decrypted
# value, None when that end is not its padding.
_PADDINGS: dict[str, Callable[[bytes], int | None]] = {
    "pkcs5": _pkcs5,
    "oneandzeroes": _oneandzeroes,
    "zeroes": _zeroes,
    "naive": _naive,
}


class _WrongPaddingError(Exception):
    """A decrypted value that does not end with the padding declared."""


class _StrictPadding:
    """In place of an AesEngine's padding engine, to read only: unpads what
    ``mechanism`` writes and refuses anything else."""

    __slots__ = ("_length",)

    def __init__(self, mechanism: str) -> None:
        self._length = _PADDINGS[mechanism]

    def unpad(self, value: bytes) -> bytes:
        if len(value) < _BLOCK or len(value) % _BLOCK:
            raise _WrongPaddingError
        n = self._length(value)
        if n is None:
            raise _WrongPaddingError
        return value[:-n]


def _strict_readers(legacy_type: Any, paddings: dict[str, Any]) -> dict[str, Any]:
    """``legacy_type`` with each padding, unpadded strictly, by name, the
    declared one first ({} for an engine that does not pad, or a padding
    sqlalchemy-utils does not name): copies, so the application's own type
    stays as it was."""
    engine = legacy_type.engine
    kind = type(getattr(engine, "padding_engine", None))
    declared = next((name for name in _PADDINGS if paddings.get(name) is kind), None)
    if declared is None:
        return {}
    readers = {}
    for name in (declared, *(other for other in _PADDINGS if other != declared)):
        reader = copy.copy(legacy_type)
        reader.engine = copy.copy(engine)
        reader.engine.padding_engine = _StrictPadding(name)
        readers[name] = reader
    return readers


class LegacyValues:
    """How one column reads its sqlalchemy-utils values: ``read`` gives the
    Python value their type gives, ``plaintext`` that value in the column's
    own encoding (what the re-encrypt job seals). Errors name the column
    (``where``), never a value or the key."""

    __slots__ = ("_as_bytes", "_encode", "_improperly_configured", "_others", "_type", "_where")

    def __init__(
        self,
        legacy_type: Any,
        encode: Callable[[Any], bytes],
        where: Callable[[], str],
        improperly_configured: type[Exception],
        paddings: dict[str, Any],
    ) -> None:
        readers = _strict_readers(legacy_type, paddings)
        declared = next(iter(readers), None)
        self._type = legacy_type if declared is None else readers.pop(declared)
        # The other paddings' readers, to name the one a refused column has.
        self._others = readers
        # Their EncryptedType stores the base64 text's bytes (LargeBinary)
        # and reads only bytes; StringEncryptedType reads only text.
        self._as_bytes = isinstance(legacy_type.impl_instance, sa.LargeBinary)
        self._encode = encode
        self._where = where
        self._improperly_configured = improperly_configured

    def read(self, stored: Any, dialect: Dialect) -> Any:
        """The value their type reads from ``stored`` (text or bytes, as the
        column's current storage holds it)."""
        return self._read(self._type, stored, dialect)

    def padding_that_reads(self, stored: Iterable[Any], dialect: Dialect) -> str | None:
        """The other AesEngine padding under which every one of ``stored``
        (values that do not read with the declared one) reads, if one does:
        the padding they were likely written with."""
        values = list(stored)
        for name, reader in self._others.items():
            try:
                for value in values:
                    self._read(reader, value, dialect)
            except LegacyDecryptionError:
                continue
            return name
        return None

    def _read(self, legacy_type: Any, stored: Any, dialect: Dialect) -> Any:
        value = bytes(stored) if isinstance(stored, memoryview | bytearray) else stored
        try:
            if self._as_bytes and isinstance(value, str):
                value = value.encode("ascii")
            elif not self._as_bytes and isinstance(value, bytes):
                value = value.decode("ascii")
            return legacy_type.process_result_value(value, dialect)
        except self._improperly_configured as error:
            raise ConfigurationError(f"{self._where()}: sqlalchemy-utils: {error}") from None
        except Exception:
            # Their errors may quote the decrypted text (int() of it): name none.
            raise LegacyDecryptionError(
                f"{self._where()}: a value written by sqlalchemy-utils does not read with "
                "the key, engine and padding of the column's migrating= type: check them "
                "(a key callable must return the key every row was written with)"
            ) from None

    def plaintext(self, stored: Any, dialect: Dialect) -> bytes:
        """``stored`` read by their type, encoded as the column encodes its
        values; `InvalidValueError` when the column's type cannot hold it
        (longer than its ``String(n)``, another Python type)."""
        value = self.read(stored, dialect)
        try:
            return self._encode(value)
        except InvalidValueError as error:
            raise InvalidValueError(f"{self._where()}: a sqlalchemy-utils value: {error}") from None
        except Exception as error:
            raise InvalidValueError(
                f"{self._where()}: a sqlalchemy-utils value does not encode as the column's "
                f"type ({type(error).__name__}): declare the type it holds"
            ) from None


def legacy_values(
    migrating: Any, encode: Callable[[Any], bytes], where: Callable[[], str]
) -> LegacyValues:
    """The reader of ``migrating``, a sqlalchemy-utils ``StringEncryptedType``
    or ``EncryptedType`` instance; anything else is refused."""
    if migrating is Ellipsis:
        raise ConfigurationError(
            "migrating=... stands for the sqlalchemy-utils type the column had (rendered "
            "so because it holds a key): give that type, e.g. migrating=StringEncryptedType"
            "(sa.String, key, AesEngine, 'pkcs5')"
        )
    utils: Any = None
    errors: Any = None
    padding: Any = None
    try:
        utils = importlib.import_module("sqlalchemy_utils")
        errors = importlib.import_module("sqlalchemy_utils.exceptions")
        padding = importlib.import_module("sqlalchemy_utils.types.encrypted.padding")
    except ImportError:
        pass
    if utils is None or not isinstance(migrating, utils.StringEncryptedType):
        raise ConfigurationError(
            "migrating= takes True (legacy plaintext), or the sqlalchemy-utils "
            "StringEncryptedType or EncryptedType instance the column had, with its key, "
            "engine and padding (pip install 'sqlalchemy-envelope[sqlalchemy-utils]')"
        )
    improperly_configured: type[Exception] = errors.ImproperlyConfigured
    return LegacyValues(
        migrating, encode, where, improperly_configured, dict(padding.PADDING_MECHANISM)
    )
