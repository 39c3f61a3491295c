"""`MeteredEnvelope`: the per-value path of a registry given a meter provider.

A registry without one uses `Envelope` itself, so its per-value code is
exactly the unmetered one. Here the closures columns call per value repeat
`Envelope`'s common case (a cached, fresh key, an authentic value of the
current format) and count each value with one ``next`` on its key's count,
bound with the key's associated data; every other case goes to `Envelope`'s
own closure, which loads keys, reads the legacy format and raises the right
error, and is counted by the value's header, as a cache hit if no key was
read from data_keys meanwhile, or a failure by its error type. The counts
are read when the meter provider collects (metrics.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import TypeAlias

from ..crypto import format as fmt
from ..crypto.primitives import NONCE_BYTES, InvalidTag
from ..errors import EnvelopeError
from ..metrics import Cell, Metrics, Tally
from .envelope import Envelope
from .keyring import Keyring
from .scopes import scope_of_index

__all__ = ["MeteredEnvelope"]

_urandom = os.urandom
_HEADER = fmt.HEADER_BYTES
_PAYLOAD = fmt.PAYLOAD_OFFSET
_Tallies: TypeAlias = "dict[bytes, Tally]"


class MeteredEnvelope(Envelope):
    """`Envelope`, counting what it encrypts and decrypts into ``metrics``."""

    def __init__(self, keyring: Keyring, metrics: Metrics) -> None:
        super().__init__(keyring)
        self.metrics = metrics
        cache = keyring.cache
        metrics.cache_sizes = lambda: {"data": len(cache.by_header), "index": len(cache.index)}
        # The tally of each key's values, by the header values carry (of
        # either format version): found once per header, from the cache.
        self._encrypted: _Tallies = {}
        self._decrypted: _Tallies = {}

    def _tally(self, tallies: _Tallies, ciphertext: bytes) -> Tally:
        """The tally of the key ``ciphertext`` (or its header) names, found
        the first time that header is met (the key is cached: it just served
        a value)."""
        tally = tallies.get(ciphertext[:_HEADER])
        if tally is not None:
            return tally
        key_id = fmt.key_id_of(ciphertext)
        deterministic = ciphertext[0] in fmt.DETERMINISTIC_VERSIONS
        cache = self.keyring.cache
        key = (
            cache.index_by_header.get(fmt.header(key_id, fmt.DETERMINISTIC_VERSION))
            if deterministic
            else cache.by_header.get(fmt.header(key_id))
        )
        scope, version = (key.scope, key.version) if key else self.keyring.scope_version(key_id)
        if deterministic:
            scope = scope_of_index(scope)
        metrics = self.metrics
        tally_of = (
            metrics.decrypted_tally if tallies is self._decrypted else metrics.encrypted_tally
        )
        tally = tallies[ciphertext[:_HEADER]] = tally_of(scope, version, deterministic)
        return tally

    def _count(self, tallies: _Tallies, ciphertext: bytes, misses: int) -> None:
        """Count a value under its key: a hit if the cache has missed no
        key since it counted ``misses``."""
        tally = self._tally(tallies, ciphertext)
        next(tally.hit if self.keyring.cache.misses == misses else tally.miss)

    # -- randomized ------------------------------------------------------------

    def encrypt_bytes(self, plaintext: bytes, context: bytes, scope: str | None = None) -> bytes:
        misses = self.keyring.cache.misses
        ciphertext = super().encrypt_bytes(plaintext, context, scope)
        self._count(self._encrypted, ciphertext, misses)
        return ciphertext

    def encryptor(self, context: bytes, scope: str | None = None) -> Callable[[bytes], bytes]:
        """`Envelope.encryptor`, counting: its common case repeated with a
        count, the rest left to `Envelope`'s closure (keep them in step)."""
        other = super().encryptor(context, scope)
        scope = scope or self.scope
        get = self._active.get
        clock = self._clock
        claim = self.keyring.claim
        cache = self.keyring.cache
        tallies = self._encrypted
        tally = self._tally
        count = self._count
        # The last key's header, the associated data and the key's count of
        # hits (none at first: no header is b"").
        cached: tuple[bytes, bytes, Cell[int]] = (b"", b"", itertools.count())

        def encrypt(plaintext: bytes) -> bytes:
            nonlocal cached
            key = get(scope)
            if key is None or clock() > key.fresh_until:  # KeyCache.fresh, inlined
                return slow(plaintext)
            if next(key.counter) >= key.budget:
                key = claim(key)
            aead = key.aead
            assert aead is not None  # an active key can encrypt
            header = key.header
            pair = cached
            if pair[0] is not header:
                pair = cached = (header, header + context, tally(tallies, header).hit)
            nonce = _urandom(NONCE_BYTES)
            ciphertext = header + nonce + aead.encrypt(nonce, plaintext, pair[1])
            next(pair[2])
            return ciphertext

        def slow(plaintext: bytes) -> bytes:
            misses = cache.misses
            ciphertext = other(plaintext)
            count(tallies, ciphertext, misses)
            return ciphertext

        return encrypt

    def decryptor(self, context: fmt.Context) -> Callable[[bytes], bytes]:
        """`Envelope.decryptor`, counting: its common case repeated with a
        count, the rest (and every error) left to `Envelope`'s closure."""
        other = super().decryptor(context)
        get = self._by_header.get
        clock = self._clock
        current = context.current
        cache = self.keyring.cache
        tallies = self._decrypted
        tally = self._tally
        count = self._count
        failed = self.metrics.failed
        cached: tuple[bytes, bytes, Cell[int]] = (b"", b"", itertools.count())

        def decrypt(ciphertext: bytes) -> bytes:
            nonlocal cached
            key = get(ciphertext[:_HEADER])
            if key is None or clock() > key.fresh_until or (aead := key.aead) is None:
                return slow(ciphertext)
            header = key.header
            pair = cached
            if pair[0] is not header:
                pair = cached = (header, header + current, tally(tallies, header).hit)
            try:
                plaintext = aead.decrypt(
                    ciphertext[_HEADER:_PAYLOAD], ciphertext[_PAYLOAD:], pair[1]
                )
            except (InvalidTag, ValueError):
                return slow(ciphertext)  # which raises the error `Envelope` gives it
            next(pair[2])
            return plaintext

        def slow(ciphertext: bytes) -> bytes:
            misses = cache.misses
            try:
                plaintext = other(ciphertext)
            except EnvelopeError as error:
                failed(error)
                raise
            count(tallies, ciphertext, misses)
            return plaintext

        return decrypt

    def decrypt_scoped(self, ciphertext: bytes, context: fmt.Context, scope: str | None) -> bytes:
        # Values decrypted are counted by the decryptor it ends with.
        try:
            return super().decrypt_scoped(ciphertext, context, scope)
        except EnvelopeError as error:
            self.metrics.failed(error)
            raise

    # -- deterministic -----------------------------------------------------------

    def encrypt_deterministic(
        self, plaintext: bytes, context: bytes, version: int = 1, *, scope: str | None = None
    ) -> bytes:
        misses = self.keyring.cache.misses
        ciphertext = super().encrypt_deterministic(plaintext, context, version, scope=scope)
        self._count(self._encrypted, ciphertext, misses)
        return ciphertext

    def decrypt_deterministic(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        misses = self.keyring.cache.misses
        try:
            plaintext = super().decrypt_deterministic(ciphertext, context)
        except EnvelopeError as error:
            self.metrics.failed(error)
            raise
        self._count(self._decrypted, ciphertext, misses)
        return plaintext
