"""The ciphertext format, version 1 (``FORMAT.md`` is its specification).

::

    offset  size  field
    0       1     format version: 0x01 (AES-256-GCM, randomized)
                  or 0x02 (AES-SIV, deterministic; no nonce)
    1       5     data key id, big-endian
    6       12    nonce, random from the OS
    18      n     AES-256-GCM ciphertext of the n-byte plaintext
    18+n    16    GCM tag

    associated data = bytes 0..5 (the header) + the context, UTF-8

The header is six bytes so that its base64 form is exactly the first eight
characters of a text-stored value: SQL can group rows by key from either
storage without decrypting anything.
"""

from __future__ import annotations

import binascii
import math

from ..errors import NotCiphertextError
from .primitives import NONCE_BYTES, TAG_BYTES

__all__ = [
    "DETERMINISTIC_VERSION",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "KEY_ID_BYTES",
    "MAX_KEY_ID",
    "OVERHEAD",
    "PAYLOAD_OFFSET",
    "TEXT_HEADER_CHARS",
    "check",
    "from_text",
    "header",
    "key_id_of",
    "scoped_context",
    "text_length",
    "to_text",
]

FORMAT_VERSION = 1
DETERMINISTIC_VERSION = 2
KEY_ID_BYTES = 5
MAX_KEY_ID = 2 ** (8 * KEY_ID_BYTES) - 1
HEADER_BYTES = 1 + KEY_ID_BYTES
PAYLOAD_OFFSET = HEADER_BYTES + NONCE_BYTES
OVERHEAD = PAYLOAD_OFFSET + TAG_BYTES
DETERMINISTIC_OVERHEAD = HEADER_BYTES + TAG_BYTES  # AES-SIV: no nonce, a 16-byte tag
TEXT_HEADER_CHARS = HEADER_BYTES * 4 // 3


def header(key_id: int, version: int = FORMAT_VERSION) -> bytes:
    return bytes([version]) + key_id.to_bytes(KEY_ID_BYTES, "big")


def key_id_of(ciphertext: bytes) -> int:
    return int.from_bytes(ciphertext[1:HEADER_BYTES], "big")


def check(ciphertext: bytes) -> None:
    """Raise `NotCiphertextError` unless the value can be a ciphertext."""
    if ciphertext[:1] == b"\x02" and len(ciphertext) >= DETERMINISTIC_OVERHEAD:
        return
    if len(ciphertext) < OVERHEAD:
        raise NotCiphertextError(
            f"value of {len(ciphertext)} bytes is shorter than any ciphertext "
            f"({OVERHEAD} bytes): it is probably plaintext written before the "
            "column was encrypted; encrypt it with the re-encrypt utility"
        )
    if ciphertext[0] != FORMAT_VERSION:
        raise NotCiphertextError(  # without the byte: it may be the plaintext's first
            f"value does not start with format byte {FORMAT_VERSION:#04x}: it is not "
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


def scoped_context(context: bytes, scope: str) -> bytes:
    """The associated data of a scope-bound column: its context and the scope
    (the tenant) the value was written for."""
    return context + b"\x00scope=" + scope.encode("utf-8")
