"""Root keys: what wraps the data keys stored in ``data_keys``.

A root key never touches a value and never reaches the database. Anything that
can wrap and unwrap 32 bytes under an authenticated context can be a root key:
a key derived here with PBKDF2, a static key from a secret store, or an
external KMS implementing `RootKeyProvider`.
"""

from __future__ import annotations

import binascii
import errno
import json
import logging
import math
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..crypto.primitives import (
    AESGCM,
    NONCE_BYTES,
    InvalidTag,
    hmac_sha256,
    new_nonce,
    pbkdf2_sha256,
)
from ..errors import ConfigurationError, DecryptionError

__all__ = [
    "CheckableRootKey",
    "PBKDF2RootKey",
    "RootKeyProvider",
    "StaticRootKey",
    "root_key_from_env",
]

_FINGERPRINT_LABEL = b"sqlalchemy-envelope/root-key-fingerprint/v1"
# Wrapped-key formats of the local providers (FORMAT.md, "Wrapped data keys"):
# the first byte says how the context became associated data. 0x02 is
# written; 0x01, whose JSON escaped non-ASCII characters, is still read.
_WRAP_V1 = 0x01
_WRAP_V2 = 0x02
_WRAP_LABELS = {
    _WRAP_V1: b"sqlalchemy-envelope/data-key/v1\x00",
    _WRAP_V2: b"sqlalchemy-envelope/data-key/v2\x00",
}
_KEY_LENGTHS = (16, 24, 32)
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256; derivation runs once per process.
DEFAULT_PBKDF2_ITERATIONS = MIN_PBKDF2_ITERATIONS = 600_000
MAX_PBKDF2_ITERATIONS = 100_000_000
# What ``allow_weak=True`` still requires: the minimum of earlier versions, so
# that every deployment they allowed can read its keys and rewrap them.
WEAK_PBKDF2_ITERATIONS = 10_000
MIN_SEED_BITS = 128
_MAX_KEY_FILE_BYTES = 4096
_GENERATE_KEY = 'python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'

log = logging.getLogger("sqlalchemy_envelope")


@runtime_checkable
class RootKeyProvider(Protocol):
    """What the registry needs from a root key.

    ``context`` names the data key being wrapped (its id, scope, version and
    kind). A provider must bind all of it to the wrapped bytes (as AEAD
    associated data, or as a KMS encryption context) so that a wrapped key
    moved to another row, or a row renumbered, fails to unwrap. ``unwrap``
    raises `DecryptionError` when authentication fails.
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


@runtime_checkable
class CheckableRootKey(Protocol):
    """A provider that can say whether its key is reachable right now (a KMS);
    `KeyRegistry.status` calls ``check`` and reports what it raises."""

    def check(self) -> None: ...


def canonical_json(context: Mapping[str, str]) -> bytes:
    """RFC 8785 (JCS) canonical JSON of an object of strings: members sorted by
    their keys' UTF-16 code units, no whitespace, strings escaped as
    JSON.stringify escapes them (quote, backslash and control characters
    only), UTF-8. Any other implementation of RFC 8785 gives the same bytes."""
    members = sorted(context.items(), key=lambda member: member[0].encode("utf-16-be"))
    text = ",".join(f"{_json_string(k)}:{_json_string(v)}" for k, v in members)
    try:
        return ("{" + text + "}").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not Unicode text, and not to be quoted
        raise ConfigurationError("a wrap context must be valid Unicode text") from None


def _json_string(value: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError("a wrap context maps strings to strings")
    # With ensure_ascii=False, Python escapes exactly what JSON.stringify
    # does: ", \, \b \t \n \f \r, and other control characters as \u00xx.
    return json.dumps(value, ensure_ascii=False)


def _associated_data(version: int, context: Mapping[str, str]) -> bytes:
    if version == _WRAP_V1:
        legacy = json.dumps(dict(sorted(context.items())), separators=(",", ":"))
        return _WRAP_LABELS[_WRAP_V1] + legacy.encode("utf-8")
    return _WRAP_LABELS[_WRAP_V2] + canonical_json(context)


class _LocalKey:
    """An AES-GCM wrapping key held in this process; the raw bytes are not kept."""

    __slots__ = ("_aead", "fingerprint")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.fingerprint = hmac_sha256(key, _FINGERPRINT_LABEL)[:8].hex()

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        nonce = new_nonce()
        sealed = self._aead.encrypt(nonce, data_key, _associated_data(_WRAP_V2, context))
        return bytes([_WRAP_V2]) + nonce + sealed

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if not wrapped or wrapped[0] not in _WRAP_LABELS:
            raise DecryptionError("wrapped data key has an unknown format version")
        version = wrapped[0]
        nonce = wrapped[1 : 1 + NONCE_BYTES]
        aad = _associated_data(version, context)
        try:
            return self._aead.decrypt(nonce, wrapped[1 + NONCE_BYTES :], aad)
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

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, raw: bool = False) -> StaticRootKey:
        """Read the key from a file, such as a mounted secret: the base64 of 32
        bytes (surrounding whitespace ignored), or with ``raw=True`` exactly 32
        bytes. The file must be a regular file, not a symbolic link, owned by
        this process's user (or root) and inaccessible to anyone else; it is
        checked and read through one descriptor, so it cannot be swapped
        between the check and the read."""
        path = Path(path)
        data = _read_key_file(path)
        if raw:
            if len(data) != 32:
                raise ConfigurationError(
                    f"root key file {path} is read as raw bytes (ENVELOPE_ROOT_KEY_FILE_RAW, "
                    "raw=True) but does not hold exactly 32 bytes"
                )
            return cls(data)
        if len(data) == 32:  # what earlier versions took as a raw key
            advice = (
                ". Earlier versions took its 32 bytes as a raw key: to keep reading the data "
                "keys wrapped with it, set ENVELOPE_ROOT_KEY_FILE_RAW=1 (raw=True); if they "
                f"are random bytes, convert the file instead: `(umask 077; base64 {path} > "
                f"{path}.b64)`; if they are a password, rewrap to a generated key "
                f"(`{_GENERATE_KEY}`)"
            )
        else:
            advice = (
                " (a password is not a key): generate one with "
                f"`(umask 077; {_GENERATE_KEY} > {path})`"
            )
        return cls(_decode_base64_key(data.strip(), f"root key file {path}", advice))

    def __repr__(self) -> str:
        return f"StaticRootKey(fingerprint={self.fingerprint!r})"


def _read_key_file(path: Path) -> bytes:
    """The file's bytes, opened once without following a final symbolic link,
    checked on the open descriptor and read from it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigurationError(
                f"root key file {path} is a symbolic link, refused whatever it points to: name "
                "the file itself (in Kubernetes, whose secret volumes present each key as a "
                "link, mount the key with subPath)"
            ) from None
        raise ConfigurationError(
            f"cannot read root key file {path}: {error.strerror or error}: name the file "
            "that holds the key"
        ) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(
                f"root key file {path} is not a regular file: name the file that holds the key"
            )
        user = os.geteuid()
        if info.st_uid not in (user, 0):
            raise ConfigurationError(
                f"root key file {path} belongs to user id {info.st_uid}, not to this "
                f"process's user ({user}) or root: `chown` it to the user the application "
                "runs as"
            )
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"root key file {path} is accessible to other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}` (in Kubernetes, "
                "mount the secret with defaultMode 0400)"
            )
        data = b""
        while chunk := os.read(descriptor, _MAX_KEY_FILE_BYTES + 1 - len(data)):
            data += chunk
            if len(data) > _MAX_KEY_FILE_BYTES:
                break
    except OSError as error:
        raise ConfigurationError(
            f"cannot read root key file {path}: {error.strerror or error}"
        ) from None
    finally:
        os.close(descriptor)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigurationError(
            f"root key file {path} is too large to hold a root key: name the file that holds "
            "the key"
        )
    return data


def _decode_base64_key(text: bytes, what: str, advice: str = "") -> bytes:
    try:
        key = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        raise ConfigurationError(
            f"{what} is not the base64 of 32 bytes"
            + (advice or f"; generate a key with `{_GENERATE_KEY}`")
        )
    return key


def _as_bytes(value: str | bytes, name: str) -> bytes:
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:  # its message and object would quote the secret
            raise ConfigurationError(
                f"the PBKDF2 {name} is not valid Unicode (it holds a lone surrogate, such as "
                "an environment variable's bytes that are not UTF-8): give it as bytes"
            ) from None
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ConfigurationError(f"the PBKDF2 {name} must be a non-empty str or bytes")
    return bytes(value)


def _seed_bits(seed: str | bytes) -> float:
    """A rough strength of a seed: its length times the Shannon entropy of its
    own characters' (or bytes') frequencies. Random seeds of 32 bytes, or their
    hex or base64, score well over `MIN_SEED_BITS`; short or small-alphabet
    seeds (a password, a few words) score under it. A long sentence or a long
    repeated pattern can still pass: it is a check against mistakes, not a
    proof."""
    counts = Counter(seed)
    return -sum(n * math.log2(n / len(seed)) for n in counts.values())


_LEGACY = (
    "; if data_keys already depends on weaker parameters, pass allow_weak=True "
    "(ENVELOPE_PBKDF2_ALLOW_WEAK=1) to read it, then rewrap to a stronger root key"
)


class PBKDF2RootKey:
    """A root key derived with PBKDF2-HMAC-SHA256 from a secret seed and salt.

    Derivation is deliberately slow, so it runs once, on first use, and the
    seed and salt are dropped afterwards. The iteration count is recorded in
    ``data_keys`` (via `description`) so that it can be raised later by
    re-wrapping under a new root key. The seed must look random (its length
    times the entropy of its characters' frequencies at least
    `MIN_SEED_BITS`) and the count be at least `MIN_PBKDF2_ITERATIONS`;
    ``allow_weak=True`` accepts what earlier versions did (any non-empty
    seed, `WEAK_PBKDF2_ITERATIONS`) for deployments whose keys depend on it,
    until they rewrap.
    """

    def __init__(
        self,
        seed: str | bytes,
        salt: str | bytes,
        iterations: int = DEFAULT_PBKDF2_ITERATIONS,
        key_length: int = 32,
        *,
        allow_weak: bool = False,
    ) -> None:
        self._seed: bytes | None = _as_bytes(seed, "seed")
        self._salt: bytes | None = _as_bytes(salt, "salt")
        floor = WEAK_PBKDF2_ITERATIONS if allow_weak else MIN_PBKDF2_ITERATIONS
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < floor:
            raise ConfigurationError(
                f"PBKDF2 iterations must be an integer of at least {floor:,}"
                + (" even with allow_weak=True" if allow_weak else _LEGACY)
            )
        if iterations > MAX_PBKDF2_ITERATIONS:
            raise ConfigurationError(
                f"PBKDF2 iterations must be at most {MAX_PBKDF2_ITERATIONS:,} (that takes "
                "minutes already; OpenSSL takes no more than 2**32 - 1)"
            )
        weak_seed = _seed_bits(seed) < MIN_SEED_BITS
        if weak_seed and not allow_weak:
            raise ConfigurationError(
                f"the PBKDF2 seed looks weak (under {MIN_SEED_BITS} bits by its length and "
                'character frequencies): use 32 random bytes, e.g. `python -c "import '
                'secrets; print(secrets.token_urlsafe(32))"`, or better a random root key '
                "(StaticRootKey, ENVELOPE_ROOT_KEY)" + _LEGACY
            )
        _check_key_length(key_length, "the PBKDF2 key length")
        if weak_seed or iterations < MIN_PBKDF2_ITERATIONS:
            log.warning(
                "a PBKDF2 root key below the minimums is in use (allow_weak=True): "
                "rewrap the data keys to a stronger root key"
            )
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
        """The root key's size and work factor, for people."""
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


_SOURCES = ("ROOT_KEY", "ROOT_KEY_FILE", "ROOT_SEED", "AWS_KMS_KEY_ID")


def root_key_from_env(
    environ: Mapping[str, str] | None = None, prefix: str = "ENVELOPE_"
) -> RootKeyProvider:
    """The root key the ``ENVELOPE_*`` variables describe, from exactly one of:
    ``ENVELOPE_ROOT_KEY`` (base64 of 32 bytes), ``ENVELOPE_ROOT_KEY_FILE``
    (a file holding it; 32 raw bytes with ``ENVELOPE_ROOT_KEY_FILE_RAW=1``),
    ``ENVELOPE_ROOT_SEED`` + ``ENVELOPE_ROOT_SALT`` (PBKDF2, optionally
    ``ENVELOPE_PBKDF2_ITERATIONS`` and ``ENVELOPE_PBKDF2_ALLOW_WEAK``), or
    ``ENVELOPE_AWS_KMS_KEY_ID`` (optionally ``ENVELOPE_AWS_REGION``). Another
    ``prefix`` reads another set, such as ``ENVELOPE_NEW_`` for the target of
    a root key rotation."""
    env = os.environ if environ is None else environ

    def name(suffix: str) -> str:
        return f"{prefix}{suffix}"

    given = [s for s in _SOURCES if env.get(name(s)) is not None]
    if env.get(name("ROOT_SALT")) is not None and "ROOT_SEED" not in given:
        given.append("ROOT_SEED")
    if len(given) > 1:
        raise ConfigurationError(
            "more than one root key configured ("
            + ", ".join(name(s) for s in given)
            + "): set exactly one"
        )
    if not given:
        raise ConfigurationError(
            f"no root key configured: set {name('ROOT_KEY')} (base64 of 32 random "
            f"bytes), {name('ROOT_KEY_FILE')}, {name('ROOT_SEED')} and "
            f"{name('ROOT_SALT')}, or {name('AWS_KMS_KEY_ID')}"
        )
    source = given[0]
    if source == "ROOT_KEY":
        text = env[name("ROOT_KEY")].strip()
        if not text.isascii():
            raise ConfigurationError(f"{name('ROOT_KEY')} is not the base64 of 32 bytes")
        return StaticRootKey(_decode_base64_key(text.encode("ascii"), name("ROOT_KEY")))
    if source == "ROOT_KEY_FILE":
        raw = _flag(env, name("ROOT_KEY_FILE_RAW"))
        return StaticRootKey.from_file(env[name("ROOT_KEY_FILE")], raw=raw)
    if source == "AWS_KMS_KEY_ID":
        from .aws_kms import AWSKMSRootKey

        return AWSKMSRootKey(env[name("AWS_KMS_KEY_ID")], region=env.get(name("AWS_REGION")))
    seed = env.get(name("ROOT_SEED"))
    salt = env.get(name("ROOT_SALT"))
    if not seed or not salt:
        missing = name("ROOT_SEED") if not seed else name("ROOT_SALT")
        raise ConfigurationError(f"{missing} is missing or empty; set both seed and salt")
    iterations_text = env.get(name("PBKDF2_ITERATIONS"))
    iterations = DEFAULT_PBKDF2_ITERATIONS
    if iterations_text is not None:
        try:
            iterations = int(iterations_text)
        except ValueError:
            raise ConfigurationError(
                f"{name('PBKDF2_ITERATIONS')} must be a whole number"
            ) from None
    allow_weak = _flag(env, name("PBKDF2_ALLOW_WEAK"))
    return PBKDF2RootKey(seed, salt, iterations=iterations, allow_weak=allow_weak)


def _flag(env: Mapping[str, str], variable: str) -> bool:
    """An opt-in variable: unset or 0 is off, 1 on, anything else a mistake."""
    text = env.get(variable, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{variable} must be 1 or 0")
