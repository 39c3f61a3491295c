"""The ciphertext format (``FORMAT.md`` is its specification).

::

    offset  size  field
    0       1     format version: 0x03 (AES-256-GCM, randomized)
                  or 0x04 (AES-SIV, deterministic; no nonce)
    1       5     data key id, big-endian
    6       12    nonce, random from the OS
    18      n     AES-256-GCM ciphertext of the n-byte plaintext
    18+n    16    GCM tag

    associated data = bytes 0..5 (the header) + the context

The context is the value's schema, table and column (and, for a scope-bound
column, its scope), each as its 4-byte big-endian length and its UTF-8
bytes: no two columns share one, whatever their names hold. Versions 0x01
and 0x02, which earlier releases wrote, have the same layouts and bound the
values to ``"table.column"`` (the scope appended after a NUL): they are read
as before, and re-encrypting moves them to 0x03 and 0x04.

The header is six bytes so that its base64 form is exactly the first eight
characters of a text-stored value: SQL can group rows by key from either
storage without decrypting anything.
"""

from __future__ import annotations

import binascii
import math
from typing import NamedTuple

from ..errors import NotCiphertextError
from .primitives import NONCE_BYTES, TAG_BYTES

__all__ = [
    "DETERMINISTIC_VERSION",
    "DETERMINISTIC_VERSIONS",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "KEY_ID_BYTES",
    "LEGACY_DETERMINISTIC_VERSION",
    "LEGACY_VERSION",
    "MAX_KEY_ID",
    "OVERHEAD",
    "PAYLOAD_OFFSET",
    "RANDOMIZED_VERSIONS",
    "TEXT_HEADER_CHARS",
    "VERSIONS",
    "Context",
    "check",
    "column_context",
    "from_text",
    "given_context",
    "header",
    "key_id_of",
    "scoped_context",
    "text_length",
    "to_text",
]

# What values are written in; earlier releases wrote the legacy versions,
# which bound values to an ambiguous context and are still read.
FORMAT_VERSION = 3
DETERMINISTIC_VERSION = 4
LEGACY_VERSION = 1
LEGACY_DETERMINISTIC_VERSION = 2
RANDOMIZED_VERSIONS = frozenset({LEGACY_VERSION, FORMAT_VERSION})
DETERMINISTIC_VERSIONS = frozenset({LEGACY_DETERMINISTIC_VERSION, DETERMINISTIC_VERSION})
VERSIONS = RANDOMIZED_VERSIONS | DETERMINISTIC_VERSIONS
KEY_ID_BYTES = 5
MAX_KEY_ID = 2 ** (8 * KEY_ID_BYTES) - 1
HEADER_BYTES = 1 + KEY_ID_BYTES
PAYLOAD_OFFSET = HEADER_BYTES + NONCE_BYTES
OVERHEAD = PAYLOAD_OFFSET + TAG_BYTES
DETERMINISTIC_OVERHEAD = HEADER_BYTES + TAG_BYTES  # AES-SIV: no nonce, a 16-byte tag
TEXT_HEADER_CHARS = HEADER_BYTES * 4 // 3
_DETERMINISTIC_BYTES = frozenset(bytes([v]) for v in DETERMINISTIC_VERSIONS)


def header(key_id: int, version: int = FORMAT_VERSION) -> bytes:
    return bytes([version]) + key_id.to_bytes(KEY_ID_BYTES, "big")


def key_id_of(ciphertext: bytes) -> int:
    return int.from_bytes(ciphertext[1:HEADER_BYTES], "big")


def check(ciphertext: bytes) -> None:
    """Raise `NotCiphertextError` unless the value can be a ciphertext."""
    if ciphertext[:1] in _DETERMINISTIC_BYTES and len(ciphertext) >= DETERMINISTIC_OVERHEAD:
        return
    if len(ciphertext) < OVERHEAD:
        raise NotCiphertextError(
            f"value of {len(ciphertext)} bytes is shorter than any ciphertext "
            f"({OVERHEAD} bytes): it is probably plaintext written before the "
            "column was encrypted; encrypt it with the re-encrypt utility"
        )
    if ciphertext[0] not in RANDOMIZED_VERSIONS:
        raise NotCiphertextError(  # without the byte: it may be the plaintext's first
            "value does not start with a format byte (0x01 or 0x03): it is not "
            "sqlalchemy-envelope ciphertext (plaintext, or written by another tool)"
        )


def to_text(ciphertext: bytes) -> str:
    return binascii.b2a_base64(ciphertext, newline=False).decode("ascii")


# Base64 characters whose unused low bits are zero: the last data character
# before "==" (4 unused bits) or "=" (2 unused bits) of canonical base64.
_CANONICAL_LAST = {
    1: frozenset("AQgw"),
    2: frozenset("AEIMQUYcgkosw048"),
}


def from_text(value: str) -> bytes:
    """The bytes of canonical base64 text, as `to_text` writes it. Strict
    decoding refuses other characters and wrong padding, and non-zero unused
    bits are refused here: otherwise several texts would read as one value,
    and an altered stored value could read back as the original."""
    try:
        data = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NotCiphertextError(
            "text value is not base64: it is probably plaintext written before "
            "the column was encrypted; encrypt it with the re-encrypt utility"
        ) from None
    rest = len(data) % 3
    if rest and value[rest - 4] not in _CANONICAL_LAST[rest]:
        raise NotCiphertextError(
            "text value is not canonical base64 (its last character has unused bits "
            "set): it was altered, or was not written by this library"
        )
    return data


def text_length(max_plaintext_bytes: int) -> int:
    """Characters of base64 text needed for a plaintext of at most this size."""
    return 4 * math.ceil((max_plaintext_bytes + OVERHEAD) / 3)


class Context(NamedTuple):
    """What a column's values are bound to (after the header, in their
    associated data): ``current`` in the formats values are written in,
    ``legacy`` in those of earlier releases, which are still read."""

    current: bytes
    legacy: bytes


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def column_context(
    schema: str | None, table: str, column: str, legacy: str | None = None
) -> Context:
    """The context of ``schema.table.column`` (``schema`` None: the default
    schema, encoded as empty): three length-prefixed fields, so that no
    other names give the same bytes. ``legacy`` is what formats 1 and 2
    bound the values to, by default ``"table.column"``."""
    current = _field(schema or "") + _field(table) + _field(column)
    return Context(current, (f"{table}.{column}" if legacy is None else legacy).encode("utf-8"))


def given_context(context: str, schema: str | None = None) -> Context:
    """The context given by name, ``"table.column"``: that column's own
    context (split at the last dot; without a dot, a column of no table),
    so that a renamed column reads its values under its old name. Formats 1
    and 2 bound values to the name as given."""
    table, _, column = context.rpartition(".")
    return column_context(schema, table, column, context)


def scoped_context(context: Context, scope: str) -> Context:
    """The context of a scope-bound column's values written for ``scope``
    (the tenant): a fourth field; formats 1 and 2 appended it after a NUL."""
    return Context(
        context.current + _field(scope), context.legacy + b"\x00scope=" + scope.encode("utf-8")
    )
