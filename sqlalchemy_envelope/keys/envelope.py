"""The per-value path: encrypting and decrypting with cached keys.

``encrypt_bytes`` and the closures ``decryptor`` returns are the hot path: a
dict lookup, a clock read, a counter and one AES-GCM call. Anything else (a
key missing or stale, a claim used up, an error to explain) goes to the
`Keyring`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from ..crypto import format as fmt
from ..crypto.primitives import AESSIV, NONCE_BYTES, InvalidTag, hmac_sha256
from ..errors import DecryptionError
from .cache import IndexKey
from .keyring import Keyring

__all__ = ["Envelope"]

_urandom = os.urandom
_HEADER = fmt.HEADER_BYTES
_PAYLOAD = fmt.PAYLOAD_OFFSET
_CURRENT = bytes([fmt.FORMAT_VERSION])
_LEGACY = bytes([fmt.LEGACY_VERSION])
DETERMINISTIC_PURPOSE = b"sqlalchemy-envelope/deterministic/v2\x00"
LEGACY_DETERMINISTIC_PURPOSE = b"sqlalchemy-envelope/deterministic/v1\x00"  # format 2
HASH_FIELD_PURPOSE = b"sqlalchemy-envelope/hash-field/v1\x00"


class Envelope:
    """Encrypts values under the active key of a scope and decrypts them
    under the key their header names."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self.scope = keyring.scope
        cache = keyring.cache
        self._active = cache.active
        self._by_header = cache.by_header
        self._clock = cache.clock
        self._decryptors: dict[fmt.Context, Callable[[bytes], bytes]] = {}

    # -- randomized: AES-256-GCM under rotating data keys --------------------

    # Values are written bound to a context's current form (`fmt.Context`'s
    # ``current``), and read bound to either form, as their version says.

    def encrypt_bytes(self, plaintext: bytes, context: bytes, scope: str | None = None) -> bytes:
        """Encrypt under ``scope``'s active key (default: the registry's)."""
        scope = scope or self.scope
        key = self._active.get(scope)
        if key is None or self._clock() > key.fresh_until:  # KeyCache.fresh, inlined
            key = self.keyring.active(scope)
        if next(key.counter) >= key.budget:
            key = self.keyring.claim(key)
        aead = key.aead
        assert aead is not None
        nonce = _urandom(NONCE_BYTES)
        header = key.header
        return header + nonce + aead.encrypt(nonce, plaintext, header + context)

    def encryptor(self, context: bytes, scope: str | None = None) -> Callable[[bytes], bytes]:
        """`encrypt_bytes` for one context and scope, with every lookup bound
        once: what a column's bind processor calls per value, for the statement
        at hand. It checks the active key's age and claimed encryptions per
        value, as `encrypt_bytes` does, and leaves loading, claiming and
        rotating to the keyring."""
        scope = scope or self.scope
        get = self._active.get
        clock = self._clock
        claim = self.keyring.claim
        # This class's, not an override: `MeteredEnvelope` counts what the
        # closure returns, the slow path's values too.
        slow = partial(Envelope.encrypt_bytes, self)
        # The last key's header and the associated data (header + context):
        # one tuple, replaced whole, so that threads sharing it read a
        # matching pair. Not the key: SQLAlchemy caches this closure, and a
        # closed registry's keys must go with its cache.
        cached: tuple[bytes, bytes] = (b"", b"")

        def encrypt(plaintext: bytes) -> bytes:
            nonlocal cached
            key = get(scope)
            if key is None or clock() > key.fresh_until:  # KeyCache.fresh, inlined
                return slow(plaintext, context, scope)
            if next(key.counter) >= key.budget:
                key = claim(key)
            aead = key.aead
            assert aead is not None  # an active key can encrypt
            header = key.header
            pair = cached
            if pair[0] is not header:
                pair = cached = (header, header + context)
            nonce = _urandom(NONCE_BYTES)
            return header + nonce + aead.encrypt(nonce, plaintext, pair[1])

        return encrypt

    def decryptor(self, context: fmt.Context) -> Callable[[bytes], bytes]:
        """Decrypt values written for ``context``, with every lookup bound
        once: what a column's result processor calls per value. Anything but
        a cached, fresh, usable key, a value of the current format and an
        authentic one takes `other`, which loads the key, reads a value of
        the legacy format or raises the right error."""
        get = self._by_header.get
        clock = self._clock
        keyring = self.keyring
        current, legacy = context

        # The last key's header and the associated data, as in `encryptor`.
        cached: tuple[bytes, bytes] = (b"", b"")

        def decrypt(ciphertext: bytes) -> bytes:
            nonlocal cached
            key = get(ciphertext[:_HEADER])
            # KeyCache.fresh, inlined, and a key that may decrypt (its cipher, loaded once)
            if key is None or clock() > key.fresh_until or (aead := key.aead) is None:
                return other(ciphertext)
            header = key.header
            pair = cached
            if pair[0] is not header:
                pair = cached = (header, header + current)
            try:
                return aead.decrypt(ciphertext[_HEADER:_PAYLOAD], ciphertext[_PAYLOAD:], pair[1])
            except InvalidTag:
                raise _altered(legacy) from None
            except ValueError:  # too short to hold a nonce: cut short after a known header
                fmt.check(ciphertext)
                raise DecryptionError("value is truncated: it was altered") from None

        def other(ciphertext: bytes) -> bytes:
            header = ciphertext[:_HEADER]
            key = get(_CURRENT + header[1:]) if header[:1] == _LEGACY else None
            if key is None or clock() > key.fresh_until or key.aead is None:
                key = keyring.usable(keyring.for_ciphertext(ciphertext))
            if header == key.header:
                bound = current
            elif header[0] == fmt.LEGACY_VERSION:
                bound = legacy
            else:  # a deterministic header naming this key's id
                raise _altered(legacy)
            aead = key.aead
            assert aead is not None
            try:
                return aead.decrypt(
                    ciphertext[_HEADER:_PAYLOAD], ciphertext[_PAYLOAD:], header + bound
                )
            except InvalidTag:
                raise _altered(legacy) from None

        return decrypt

    def decrypt_bytes(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        """Decrypt one value written for ``context``, with that context's
        `decryptor`, made once."""
        decrypt = self._decryptors.get(context)
        if decrypt is None:
            decrypt = self._decryptors[context] = self.decryptor(context)
        return decrypt(ciphertext)

    def decrypt_scoped(self, ciphertext: bytes, context: fmt.Context, scope: str | None) -> bytes:
        """Decrypt a value whose context binds its scope (``EncryptedType(...,
        bind_scope=True)``). With ``scope``, a value written in another scope is
        refused, even if it was copied into this scope's rows."""
        key = self.keyring.usable(self.keyring.for_ciphertext(ciphertext))
        if scope is not None and key.scope != scope:
            raise DecryptionError(
                f"value for context {context.legacy.decode('utf-8', 'replace')!r} was written "
                f"in another scope than {scope!r}: it was copied from another tenant's row"
            )
        return self.decrypt_bytes(ciphertext, fmt.scoped_context(context, key.scope))

    def active_header(self, scope: str | None = None) -> bytes:
        """The header of a scope's active key: values starting with it need
        no re-encryption."""
        return self.keyring.active(scope or self.scope).header

    # -- deterministic: AES-SIV under the scope's non-rotating index key -------
    #
    # Each scope (a tenant, the registry's own) has its own index key: what
    # one scope writes and looks up is unrelated to another's equal values,
    # and shredding a scope reaches them. ``scope`` None is the registry's own.

    def _index_key(self, version: int, scope: str | None) -> IndexKey:
        key = self.keyring.index_key(scope or self.scope, version)
        if key.secret is None:
            raise self.keyring.unusable(key)
        return key

    def derived_key(
        self, purpose: bytes, version: int = 1, length: int = 32, *, scope: str | None = None
    ) -> bytes:
        """A key for one purpose and column (HKDF, RFC 5869), derived from
        ``scope``'s non-rotating index key: blind indexes and `hash_field`. It
        expires with the index key's cache entry, so a shred reaches it."""
        key = self._index_key(version, scope)
        derived = key.derive(purpose, length)
        if derived is None:
            raise self.keyring.unusable(key)
        return derived

    def hash_field(
        self, value: bytes, context: str, version: int = 1, *, scope: str | None = None
    ) -> str:
        """A keyed, context-bound HMAC-SHA256 (hex) for equality lookups."""
        key = self.derived_key(HASH_FIELD_PURPOSE + context.encode(), version, scope=scope)
        return hmac_sha256(key, value).hex()

    def _siv(self, key: IndexKey, context: bytes, legacy: bool = False) -> AESSIV:
        """The AES-SIV of ``context`` (``legacy``: of format 2), derived once
        per index key. A current context is cached under itself, as the
        per-value path looks it up; a legacy one under the legacy purpose's
        text, which no current context (a 4-byte length first) starts with."""
        purpose = LEGACY_DETERMINISTIC_PURPOSE if legacy else DETERMINISTIC_PURPOSE
        cached = purpose + context if legacy else context
        siv = key.sivs.get(cached)
        if siv is None:
            derived = key.derive(purpose + context, 64)
            if derived is None:
                raise self.keyring.unusable(key)
            siv = key.sivs[cached] = AESSIV(derived)
        return siv

    def deterministic_header(self, version: int = 1, *, scope: str | None = None) -> bytes | None:
        """The header of the deterministic values written for ``scope`` under
        index key ``version``; None if its index scope has no such key (so
        no value is under it)."""
        key = self.keyring.find_index_key(scope or self.scope, version)
        if key is None:
            return None
        if key.secret is None:
            raise self.keyring.unusable(key)
        return key.header

    def encrypt_deterministic(
        self, plaintext: bytes, context: bytes, version: int = 1, *, scope: str | None = None
    ) -> bytes:
        """AES-SIV: the same plaintext, context and scope always give the same
        ciphertext, so the database can compare, join and enforce uniqueness."""
        key = self._index_key(version, scope)
        header = key.header
        return header + self._siv(key, context).encrypt(plaintext, [header, context])

    def decrypt_deterministic(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        fmt.check(ciphertext)
        if ciphertext[0] not in fmt.DETERMINISTIC_VERSIONS:
            raise DecryptionError("value is randomized ciphertext in a deterministic column")
        key = self.keyring.index_key_for(ciphertext)
        if key is None:
            # Only index keys encrypt deterministically: a header naming a
            # data key was altered.
            raise _altered(context.legacy)
        if key.secret is None:
            raise self.keyring.unusable(key)
        header = ciphertext[:_HEADER]
        legacy = ciphertext[0] == fmt.LEGACY_DETERMINISTIC_VERSION
        bound = context.legacy if legacy else context.current
        try:
            return self._siv(key, bound, legacy).decrypt(ciphertext[_HEADER:], [header, bound])
        except InvalidTag:
            raise _altered(context.legacy) from None


def _altered(context: bytes) -> DecryptionError:
    return DecryptionError(
        f"value for context {context.decode('utf-8', 'replace')!r} failed "
        "authentication: it was altered, or it was written for another "
        "column or row (a different context)"
    )
