"""Cryptographic primitives, all from pyca/cryptography.

This module sits at the bottom of the package and imports nothing of ours, so
every algorithm the library relies on can be audited in one place.
"""

from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

__all__ = [
    "AESGCM",
    "AESSIV",
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "InvalidTag",
    "constant_time_equal",
    "hkdf_sha256",
    "hmac_sha256",
    "new_data_key",
    "new_nonce",
    "pbkdf2_sha256",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def new_data_key() -> bytes:
    """A fresh AES-256 key from the operating system's CSPRNG."""
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def new_nonce() -> bytes:
    """A random 96-bit GCM nonce from the operating system."""
    return os.urandom(NONCE_BYTES)


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def hkdf_sha256(key: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """A subkey for one purpose (RFC 5869): distinct ``info``, independent keys."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def pbkdf2_sha256(secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=length, salt=salt, iterations=iterations)
    return kdf.derive(secret)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
