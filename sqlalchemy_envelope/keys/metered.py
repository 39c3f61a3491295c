"""`MeteredEnvelope`: the per-value path of a registry given a meter provider.

A registry without one uses `Envelope` itself, so its per-value code is
exactly the unmetered one. This subclass wraps each entry point once: a
value is counted under the key its ciphertext names (a dict lookup by
header, then ``next`` on that key's `itertools.count`), as a cache hit if no
key had to be read from data_keys meanwhile, and a failure by its error
type. Counts are read when the meter provider collects (metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from ..crypto import format as fmt
from ..errors import EnvelopeError
from ..metrics import Cell, Metrics
from .envelope import Envelope
from .keyring import Keyring
from .scopes import scope_of_index

__all__ = ["MeteredEnvelope"]

_HEADER = fmt.HEADER_BYTES
_Cells: TypeAlias = "dict[bytes, Cell[int]]"


class MeteredEnvelope(Envelope):
    """`Envelope`, counting what it encrypts and decrypts into ``metrics``."""

    def __init__(self, keyring: Keyring, metrics: Metrics) -> None:
        super().__init__(keyring)
        self.metrics = metrics
        cache = keyring.cache
        metrics.cache_sizes = lambda: {"data": len(cache.by_header), "index": len(cache.index)}
        # The count of each key's values, by the header values carry (of
        # either format version): found once per header, from the cache.
        self._encrypted: _Cells = {}
        self._decrypted: _Cells = {}

    def _cell(self, cells: _Cells, ciphertext: bytes) -> Cell[int]:
        """The count of the key ``ciphertext`` names, found the first time
        that header is met (the key is cached: it just served the value)."""
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
        count = (
            self.metrics.decrypted_cell if cells is self._decrypted else self.metrics.encrypted_cell
        )
        cell = cells[ciphertext[:_HEADER]] = count(scope, version, deterministic)
        return cell

    def _metered(self, cells: _Cells, call: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        """``call`` (an encryptor or decryptor), counting each value under its
        key, as a cache hit unless the cache missed meanwhile, and failures."""
        find = cells.get
        cell = self._cell
        cache = self.keyring.cache
        hits = self.metrics.hits
        failed = self.metrics.failed
        encrypting = cells is self._encrypted

        def metered(data: bytes) -> bytes:
            misses = cache.misses
            try:
                result = call(data)
            except EnvelopeError as error:
                if not encrypting:
                    failed(error)
                raise
            ciphertext = result if encrypting else data
            next(find(ciphertext[:_HEADER]) or cell(cells, ciphertext))
            if cache.misses == misses:
                next(hits)
            return result

        return metered

    def _count(self, cells: _Cells, ciphertext: bytes, misses: int) -> None:
        """`_metered`'s counting, for the entry points called per value."""
        next(cells.get(ciphertext[:_HEADER]) or self._cell(cells, ciphertext))
        if self.keyring.cache.misses == misses:
            next(self.metrics.hits)

    # -- randomized ------------------------------------------------------------

    def encrypt_bytes(self, plaintext: bytes, context: bytes, scope: str | None = None) -> bytes:
        misses = self.keyring.cache.misses
        ciphertext = super().encrypt_bytes(plaintext, context, scope)
        self._count(self._encrypted, ciphertext, misses)
        return ciphertext

    def encryptor(self, context: bytes, scope: str | None = None) -> Callable[[bytes], bytes]:
        return self._metered(self._encrypted, super().encryptor(context, scope))

    def decryptor(self, context: fmt.Context) -> Callable[[bytes], bytes]:
        return self._metered(self._decrypted, super().decryptor(context))

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
