"""Root keys: what wraps the data keys stored in ``data_keys``.

A root key never touches a value and never reaches the database. Anything that
can wrap and unwrap 32 bytes under an authenticated context can be a root key:
a key derived here with PBKDF2, a static key from a secret store, or an
external KMS implementing `RootKeyProvider`.
"""

from __future__ import annotations

import binascii
import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Protocol, runtime_checkable

from .errors import ConfigurationError, DecryptionError
from .primitives import AESGCM, NONCE_BYTES, InvalidTag, hmac_sha256, new_nonce, pbkdf2_sha256

__all__ = [
    "PBKDF2RootKey",
    "RootKeyProvider",
    "StaticRootKey",
    "root_key_from_env",
]

_WRAP_LABEL = b"sqlalchemy-envelope/data-key/v1\x00"
_FINGERPRINT_LABEL = b"sqlalchemy-envelope/root-key-fingerprint/v1"
_WRAP_VERSION = b"\x01"
_KEY_LENGTHS = (16, 24, 32)
MIN_PBKDF2_ITERATIONS = 10_000
DEFAULT_PBKDF2_ITERATIONS = 600_000


@runtime_checkable
class RootKeyProvider(Protocol):
    """What the registry needs from a root key.

    ``context`` names the data key being wrapped (its id and scope). A provider
    must bind it to the wrapped bytes (as AEAD associated data, or as a KMS
    encryption context) so that a wrapped key moved to another row fails to
    unwrap. ``unwrap`` raises `DecryptionError` when authentication fails.
    """

    @property
    def fingerprint(self) -> str:
        """A stable, non-secret id of the key, stored beside each wrapped key."""
        ...

    @property
    def description(self) -> str:
        """Non-secret parameters (algorithm, iterations), stored for audits."""
        ...

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes: ...


def _associated_data(context: Mapping[str, str]) -> bytes:
    canonical = json.dumps(dict(sorted(context.items())), separators=(",", ":"))
    return _WRAP_LABEL + canonical.encode("utf-8")


class _LocalKey:
    """An AES-GCM wrapping key held in this process; the raw bytes are not kept."""

    __slots__ = ("_aead", "fingerprint")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.fingerprint = hmac_sha256(key, _FINGERPRINT_LABEL)[:8].hex()

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        nonce = new_nonce()
        sealed = self._aead.encrypt(nonce, data_key, _associated_data(context))
        return _WRAP_VERSION + nonce + sealed

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if wrapped[:1] != _WRAP_VERSION:
            raise DecryptionError("wrapped data key has an unknown format version")
        nonce = wrapped[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, wrapped[1 + NONCE_BYTES :], _associated_data(context))
        except InvalidTag:
            raise DecryptionError("wrapped data key failed authentication") from None


def _check_key_length(length: int, what: str) -> None:
    if length not in _KEY_LENGTHS:
        raise ConfigurationError(
            f"{what} must be 16, 24 or 32 bytes long (got {length}); "
            "use 32 random bytes, e.g. base64 of os.urandom(32)"
        )


class StaticRootKey:
    """A root key supplied directly, e.g. 32 random bytes from a secret store."""

    __slots__ = ("_key", "_length")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise ConfigurationError("StaticRootKey takes the key as bytes")
        _check_key_length(len(key), "a static root key")
        self._length = len(key)
        self._key = _LocalKey(bytes(key))

    @property
    def fingerprint(self) -> str:
        return self._key.fingerprint

    @property
    def description(self) -> str:
        return f"static aes-{self._length * 8}-gcm"

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        return self._key.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self._key.unwrap(wrapped, context)

    def __repr__(self) -> str:
        return f"StaticRootKey(fingerprint={self.fingerprint!r})"


def _as_bytes(value: str | bytes, name: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ConfigurationError(f"the PBKDF2 {name} must be a non-empty str or bytes")
    return bytes(value)


class PBKDF2RootKey:
    """A root key derived with PBKDF2-HMAC-SHA256 from a secret seed and salt.

    Derivation is deliberately slow, so it runs once, on first use, and the
    seed and salt are dropped afterwards. The iteration count is recorded in
    ``data_keys`` (via `description`) so that it can be raised later by
    re-wrapping under a new root key.
    """

    def __init__(
        self,
        seed: str | bytes,
        salt: str | bytes,
        iterations: int = DEFAULT_PBKDF2_ITERATIONS,
        key_length: int = 32,
    ) -> None:
        self._seed: bytes | None = _as_bytes(seed, "seed")
        self._salt: bytes | None = _as_bytes(salt, "salt")
        if not isinstance(iterations, int) or iterations < MIN_PBKDF2_ITERATIONS:
            raise ConfigurationError(
                f"PBKDF2 iterations must be an integer of at least "
                f"{MIN_PBKDF2_ITERATIONS:,} ({DEFAULT_PBKDF2_ITERATIONS:,} is recommended)"
            )
        _check_key_length(key_length, "the PBKDF2 key length")
        self.iterations = iterations
        self.key_length = key_length
        self._key: _LocalKey | None = None
        self._lock = threading.Lock()

    def _derived(self) -> _LocalKey:
        key = self._key
        if key is None:
            with self._lock:
                if self._key is None:
                    assert self._seed is not None and self._salt is not None
                    self._key = _LocalKey(
                        pbkdf2_sha256(self._seed, self._salt, self.iterations, self.key_length)
                    )
                    self._seed = self._salt = None
                key = self._key
        return key

    @property
    def fingerprint(self) -> str:
        return self._derived().fingerprint

    @property
    def description(self) -> str:
        return f"pbkdf2-hmac-sha256 iterations={self.iterations} aes-{self.key_length * 8}-gcm"

    @property
    def strength(self) -> str:
        """The seed's GetKeyStrength: the root key's size and work factor."""
        return (
            f"AES-{self.key_length * 8} from PBKDF2-HMAC-SHA256 with {self.iterations:,} iterations"
        )

    def estimate_generation_time(self) -> timedelta:
        """Time one derivation would take here, measured on a 1% sample."""
        sample = max(self.iterations // 100, 1_000)
        start = time.perf_counter()
        pbkdf2_sha256(b"estimate", b"estimate", sample, self.key_length)
        elapsed = time.perf_counter() - start
        return timedelta(seconds=elapsed * self.iterations / sample)

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        return self._derived().wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self._derived().unwrap(wrapped, context)

    def __repr__(self) -> str:
        return f"PBKDF2RootKey(iterations={self.iterations}, key_length={self.key_length})"


def root_key_from_env(
    environ: Mapping[str, str] | None = None, prefix: str = "ENVELOPE_"
) -> RootKeyProvider:
    """Read the root key from ``ENVELOPE_ROOT_KEY``, or derive it from
    ``ENVELOPE_ROOT_SEED`` + ``ENVELOPE_ROOT_SALT`` (and optionally
    ``ENVELOPE_PBKDF2_ITERATIONS``). Another ``prefix`` reads another set, such
    as ``ENVELOPE_NEW_`` for the target of a root key rotation."""
    env = os.environ if environ is None else environ
    names = {
        name: f"{prefix}{name}"
        for name in ("ROOT_KEY", "ROOT_SEED", "ROOT_SALT", "PBKDF2_ITERATIONS")
    }
    raw = env.get(names["ROOT_KEY"])
    seed = env.get(names["ROOT_SEED"])
    salt = env.get(names["ROOT_SALT"])
    if raw is not None:
        if seed is not None or salt is not None:
            raise ConfigurationError(
                f"set either {names['ROOT_KEY']} or {names['ROOT_SEED']} and "
                f"{names['ROOT_SALT']}, not both"
            )
        try:
            key = binascii.a2b_base64(raw.strip().encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ConfigurationError(
                f"{names['ROOT_KEY']} is not valid base64; generate one with `python -c "
                '"import base64, os; print(base64.b64encode(os.urandom(32)).decode())"`'
            ) from None
        if len(key) != 32:
            raise ConfigurationError(f"{names['ROOT_KEY']} must decode to 32 bytes, not {len(key)}")
        return StaticRootKey(key)
    if seed is None and salt is None:
        raise ConfigurationError(
            f"no root key configured: set {names['ROOT_KEY']} (base64 of 32 random "
            f"bytes), or {names['ROOT_SEED']} and {names['ROOT_SALT']}"
        )
    if not seed or not salt:
        missing = names["ROOT_SEED"] if not seed else names["ROOT_SALT"]
        raise ConfigurationError(f"{missing} is missing or empty; set both seed and salt")
    iterations_text = env.get(names["PBKDF2_ITERATIONS"])
    iterations = DEFAULT_PBKDF2_ITERATIONS
    if iterations_text is not None:
        try:
            iterations = int(iterations_text)
        except ValueError:
            raise ConfigurationError(
                f"{names['PBKDF2_ITERATIONS']} must be a whole number"
            ) from None
    return PBKDF2RootKey(seed, salt, iterations=iterations)
