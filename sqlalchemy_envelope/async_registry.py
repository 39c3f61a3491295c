"""The key registry for SQLAlchemy's asyncio extension.

Encrypted columns need nothing special under an `AsyncEngine`: the registry
serves the engine's ``sync_engine``, and its key lookups never block the event
loop on a statement (see connections.py). What does change is administration:
`AsyncKeyRegistry` offers the registry's operations as coroutines. Each runs
in SQLAlchemy's greenlet, so its database I/O is awaited on the running loop;
deriving a PBKDF2 root key, the one slow computation, runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.util.concurrency import greenlet_spawn

from .errors import ConfigurationError
from .keys.envelope import Envelope
from .keys.rootkey import RootKeyProvider, root_key_from_env
from .registry import KeyRegistry
from .sqla import strict_mode

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncEngine

    from .keys.events import ChainReport, KeyEvent
    from .ops.census import ColumnCensus, Target
    from .ops.migrate import MigrationReport
    from .ops.status import KeyInfo, MaintenanceReport, RegistryStatus

__all__ = ["AsyncKeyRegistry"]

T = TypeVar("T")


class AsyncKeyRegistry:
    """`KeyRegistry` for an `AsyncEngine`, with awaitable operations.

    ``AsyncKeyRegistry(async_engine, root_key, **options)`` takes the same
    options as `KeyRegistry`; ``sync_registry`` is the `KeyRegistry` it
    wraps (for code that runs inside ``AsyncConnection.run_sync``)."""

    def __init__(self, engine: AsyncEngine, root_key: RootKeyProvider, **options: Any) -> None:
        sync_engine = getattr(engine, "sync_engine", None)
        if sync_engine is None:
            raise ConfigurationError(
                "AsyncKeyRegistry needs an AsyncEngine (create_async_engine); "
                "use KeyRegistry for a synchronous Engine"
            )
        self.engine = engine
        self.sync_registry = KeyRegistry(sync_engine, root_key, **options)
        self._root_ready = False

    @classmethod
    def from_env(
        cls,
        engine: AsyncEngine,
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> AsyncKeyRegistry:
        """A registry whose root key comes from the ``ENVELOPE_*`` variables,
        as does ``allow_non_strict_mysql`` (``ENVELOPE_ALLOW_NON_STRICT_MYSQL``)
        unless given."""
        env = os.environ if environ is None else environ
        options.setdefault("allow_non_strict_mysql", strict_mode.allowed_by(env))
        return cls(engine, root_key_from_env(env), **options)

    def __repr__(self) -> str:
        return f"Async{self.sync_registry!r}"

    async def __aenter__(self) -> AsyncKeyRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def scope(self) -> str:
        return self.sync_registry.scope

    @property
    def root_key(self) -> RootKeyProvider:
        return self.sync_registry.root_key

    @property
    def envelope(self) -> Envelope:
        """The per-value encrypt and decrypt path (what columns call)."""
        return self.sync_registry.envelope

    async def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._root_ready:
            # PBKDF2 (or a KMS DescribeKey) once, off the event loop.
            await asyncio.to_thread(lambda: self.sync_registry.root_key_fingerprint)
            self._root_ready = True
        return await greenlet_spawn(method, *args, **kwargs)

    # -- setup and rotation ----------------------------------------------------

    async def init(self, *, reason: str | None = None) -> KeyInfo:
        return await self._call(self.sync_registry.init, reason=reason)

    async def rotate(self, scope: str | None = None, *, reason: str | None = None) -> KeyInfo:
        return await self._call(self.sync_registry.rotate, scope, reason=reason)

    async def create_scope(self, *scopes: str, reason: str | None = None) -> list[KeyInfo]:
        return await self._call(self.sync_registry.create_scope, *scopes, reason=reason)

    async def shred(
        self, scope: str, *, including_shared_index: bool = False, reason: str | None = None
    ) -> int:
        return await self._call(
            self.sync_registry.shred,
            scope,
            including_shared_index=including_shared_index,
            reason=reason,
        )

    async def rewrap(self, new_root_key: RootKeyProvider, *, reason: str | None = None) -> int:
        await asyncio.to_thread(lambda: new_root_key.fingerprint)
        return await self._call(self.sync_registry.rewrap, new_root_key, reason=reason)

    # -- key states --------------------------------------------------------------

    async def retire(
        self, version: int, scope: str | None = None, *, reason: str | None = None
    ) -> KeyInfo:
        return await self._call(self.sync_registry.retire, version, scope, reason=reason)

    async def disable(
        self,
        version: int,
        scope: str | None = None,
        *,
        force: bool = False,
        reason: str | None = None,
    ) -> KeyInfo:
        return await self._call(
            self.sync_registry.disable, version, scope, force=force, reason=reason
        )

    async def enable(
        self, version: int, scope: str | None = None, *, reason: str | None = None
    ) -> KeyInfo:
        return await self._call(self.sync_registry.enable, version, scope, reason=reason)

    async def destroy(
        self,
        version: int,
        scope: str | None = None,
        *,
        columns: Iterable[Target] = (),
        force: bool = False,
        reason: str | None = None,
    ) -> KeyInfo:
        return await self._call(
            self.sync_registry.destroy, version, scope, columns=columns, force=force, reason=reason
        )

    # -- key events ----------------------------------------------------------------

    async def events(
        self,
        scope: str | None = None,
        *,
        since: datetime | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        return await self._call(
            self.sync_registry.events, scope, since=since, after=after, limit=limit
        )

    async def start_events(self, *, reason: str | None = None) -> KeyEvent:
        return await self._call(self.sync_registry.start_events, reason=reason)

    async def verify_events(self, expected_head: str | None = None) -> ChainReport:
        return await self._call(self.sync_registry.verify_events, expected_head)

    # -- status, census and long jobs ----------------------------------------------

    async def status(self, scope: str | None = None, *, census: bool = False) -> RegistryStatus:
        return await self._call(self.sync_registry.status, scope, census=census)

    async def key_info(self, version: int, scope: str | None = None) -> KeyInfo:
        return await self._call(self.sync_registry.key_info, version, scope)

    async def census(self, *targets: Target, scope: str | None = None) -> list[ColumnCensus]:
        return await self._call(self.sync_registry.census, *targets, scope=scope)

    async def maintenance(self, scope: str | None = None) -> MaintenanceReport:
        return await self._call(self.sync_registry.maintenance, scope)

    async def reencrypt(
        self,
        *targets: Target,
        batch_size: int = 1000,
        encrypt_plaintext: bool = False,
        progress: bool | None = False,
        scope: str | None = None,
        plaintext_rows: Mapping[str, Iterable[Any]] | None = None,
        shard: tuple[int, int] | None = None,
        where: Any = None,
    ) -> MigrationReport:
        """`KeyRegistry.reencrypt` in batches, each awaited on the event
        loop. For parallel workers, run ``sqlalchemy-envelope reencrypt
        --workers N`` with the synchronous driver's URL."""
        return await self._call(
            self.sync_registry.reencrypt,
            *targets,
            batch_size=batch_size,
            encrypt_plaintext=encrypt_plaintext,
            progress=progress,
            scope=scope,
            plaintext_rows=plaintext_rows,
            shard=shard,
            where=where,
        )

    async def migrate_from_sqlalchemy_utils(
        self,
        *targets: Target,
        batch_size: int = 1000,
        progress: bool | None = False,
        shard: tuple[int, int] | None = None,
    ) -> MigrationReport:
        """`KeyRegistry.migrate_from_sqlalchemy_utils` in batches, each awaited
        on the event loop (parallel workers: see `reencrypt`)."""
        return await self._call(
            self.sync_registry.migrate_from_sqlalchemy_utils,
            *targets,
            batch_size=batch_size,
            progress=progress,
            shard=shard,
        )

    async def decrypt_in_place(
        self,
        *targets: Target,
        batch_size: int = 1000,
        progress: bool | None = False,
        shard: tuple[int, int] | None = None,
    ) -> MigrationReport:
        return await self._call(
            self.sync_registry.decrypt_in_place,
            *targets,
            batch_size=batch_size,
            progress=progress,
            shard=shard,
        )

    async def backfill_index(
        self,
        target: Any,
        *,
        batch_size: int = 1000,
        progress: bool | None = False,
        shard: tuple[int, int] | None = None,
        recompute: bool = False,
    ) -> MigrationReport:
        return await self._call(
            self.sync_registry.backfill_index,
            target,
            batch_size=batch_size,
            progress=progress,
            shard=shard,
            recompute=recompute,
        )

    # -- values outside columns: CPU work, I/O only when a key is not cached ----------

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        return self.sync_registry.encrypt(plaintext, context)

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        return self.sync_registry.decrypt(ciphertext, context)

    def hash_field(
        self, value: bytes, context: str, *, version: int = 1, scope: str | None = None
    ) -> str:
        return self.sync_registry.hash_field(value, context, version=version, scope=scope)

    # -- no I/O: plain calls ---------------------------------------------------------

    def bind(self, target: Any) -> Any:
        """Make this registry the one that encrypts what an AsyncSession or
        async_sessionmaker writes."""
        return self.sync_registry.bind(target)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync_registry.close)
