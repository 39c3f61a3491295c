"""Values written by sqlalchemy-utils' ``StringEncryptedType`` and
``EncryptedType``, read while a column moves to `EncryptedType`.

A column declared ``EncryptedType(..., migrating=StringEncryptedType(...))``
(the sqlalchemy-utils type it had, with its key, engine and padding) reads
both kinds of values during the migration window, and the re-encrypt job
seals the old ones under the registry's keys. Their values are read by
their own type (its engine, its key callable, its parsing of typed values):
this module never decrypts anything itself. AesEngine's CBC carries no
authentication, so a wrong key is told only by padding or text that does not
parse; the job checks a sample before writing (ops/migrate.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from ..errors import ConfigurationError, InvalidValueError, LegacyDecryptionError

__all__ = ["LegacyValues", "legacy_values"]


class LegacyValues:
    """How one column reads its sqlalchemy-utils values: ``read`` gives the
    Python value their type gives, ``plaintext`` that value in the column's
    own encoding (what the re-encrypt job seals). Errors name the column
    (``where``), never a value or the key."""

    __slots__ = ("_as_bytes", "_encode", "_improperly_configured", "_type", "_where")

    def __init__(
        self,
        legacy_type: Any,
        encode: Callable[[Any], bytes],
        where: Callable[[], str],
        improperly_configured: type[Exception],
    ) -> None:
        self._type = legacy_type
        # Their EncryptedType stores the base64 text's bytes (LargeBinary)
        # and reads only bytes; StringEncryptedType reads only text.
        self._as_bytes = isinstance(legacy_type.impl_instance, sa.LargeBinary)
        self._encode = encode
        self._where = where
        self._improperly_configured = improperly_configured

    def read(self, stored: Any, dialect: Dialect) -> Any:
        """The value their type reads from ``stored`` (text or bytes, as the
        column's current storage holds it)."""
        value = bytes(stored) if isinstance(stored, memoryview | bytearray) else stored
        try:
            if self._as_bytes and isinstance(value, str):
                value = value.encode("ascii")
            elif not self._as_bytes and isinstance(value, bytes):
                value = value.decode("ascii")
            return self._type.process_result_value(value, dialect)
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
    try:
        utils = importlib.import_module("sqlalchemy_utils")
        errors = importlib.import_module("sqlalchemy_utils.exceptions")
    except ImportError:
        pass
    if utils is None or not isinstance(migrating, utils.StringEncryptedType):
        raise ConfigurationError(
            "migrating= takes True (legacy plaintext), or the sqlalchemy-utils "
            "StringEncryptedType or EncryptedType instance the column had, with its key, "
            "engine and padding (pip install 'sqlalchemy-envelope[sqlalchemy-utils]')"
        )
    improperly_configured: type[Exception] = errors.ImproperlyConfigured
    return LegacyValues(migrating, encode, where, improperly_configured)
