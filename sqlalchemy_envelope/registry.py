"""`KeyRegistry`: envelope encryption for one engine, in one object.

The facade over the layers below: `keys.store` (connections),
`keys.keyring` (loading, claiming, rotating), `keys.envelope` (the per-value
path), `keys.admin` (changing keys), `sqla.binding` (how statements find it)
and `ops` (jobs over stored values). Each method delegates.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .crypto import format as fmt
from .errors import ConfigurationError, InvalidValueError
from .keys import storage
from .keys.admin import KeyAdmin
from .keys.cache import KeyCache
from .keys.envelope import Envelope
from .keys.events import ChainReport, EventLog, KeyEvent, events_table
from .keys.keyring import Keyring
from .keys.metered import MeteredEnvelope
from .keys.policy import DEFAULT_MAX_ENCRYPTIONS, RotationPolicy
from .keys.rootkey import RootKeyProvider, root_key_from_env
from .keys.scopes import DEFAULT_SCOPE, check_key_scope, check_scope, index_scope
from .keys.store import KeyStore
from .keys.wrapper import KeyWrapper
from .metrics import Metrics
from .ops import backfill, key_reports, migrate
from .ops.census import ColumnCensus, Target
from .ops.status import KeyInfo, MaintenanceReport, RegistryStatus
from .sqla import binding, strict_mode

__all__ = ["DEFAULT_SCOPE", "KeyRegistry"]

DEFAULT_CACHE_MAX_AGE = timedelta(seconds=60)
_facades: weakref.WeakKeyDictionary[Envelope, KeyRegistry] = weakref.WeakKeyDictionary()


def _check_bytes(value: Any, method: str, what: str) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidValueError(
            f"{method}() takes {what} as bytes, got {type(value).__name__}: encode a "
            "str first (e.g. value.encode('utf-8'))"
        )


class KeyRegistry:
    """Envelope encryption for one engine.

    ``KeyRegistry(engine, root_key)`` attaches itself to ``engine``: every
    Session and Connection on it can then read and write encrypted columns.
    Call `init` once (it is idempotent) to create ``data_keys`` and the first
    data key. ``rotate_after`` and ``max_encryptions`` set the rotation
    policy, applied by the encrypt path itself, without a background thread.
    Every change to the keys is recorded in the key events table (`events`),
    by ``actor`` (default: ``user@host:pid``).
    On MySQL and MariaDB, connections without a strict ``sql_mode`` are
    refused unless ``allow_non_strict_mysql=True`` (see strict_mode.py).
    """

    def __init__(
        self,
        engine: Engine,
        root_key: RootKeyProvider,
        *,
        scope: str = DEFAULT_SCOPE,
        cache_max_age: float | timedelta = DEFAULT_CACHE_MAX_AGE,
        rotate_after: timedelta | None = None,
        max_encryptions: int = DEFAULT_MAX_ENCRYPTIONS,
        table_name: str = storage.DEFAULT_TABLE_NAME,
        create_scopes: bool = True,
        max_cached_keys: int = 10_000,
        attach: bool = True,
        allow_non_strict_mysql: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = storage.utcnow,
        meter_provider: Any = None,
        actor: str | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            hint = (
                ": for an AsyncEngine use AsyncKeyRegistry"
                if hasattr(engine, "sync_engine")
                else ""
            )
            raise ConfigurationError(f"KeyRegistry needs a SQLAlchemy Engine{hint}")
        if not isinstance(root_key, RootKeyProvider):
            raise ConfigurationError(
                "root_key must be a RootKeyProvider, e.g. PBKDF2RootKey(seed, salt) "
                "or StaticRootKey(key)"
            )
        self.engine = engine
        strict_mode.require_strict_mode(engine, allow=allow_non_strict_mysql)
        self._allow_non_strict_mysql = allow_non_strict_mysql
        self.scope = check_scope(scope)
        metadata = sa.MetaData()
        self.table = storage.data_keys_table(metadata, table_name)
        self.events_table = events_table(metadata, table_name)
        # OpenTelemetry metrics (docs/metrics.md), only with a meter provider.
        metrics = None if meter_provider is None else Metrics(meter_provider)
        self._store = KeyStore(engine, self.table, metrics)
        self._wrapper = KeyWrapper(root_key, self.table, metrics)
        self._keyring = Keyring(
            self._store,
            self._wrapper,
            KeyCache(cache_max_age, clock, max_cached_keys, metrics),
            RotationPolicy(rotate_after, max_encryptions),
            EventLog(self.events_table, self._wrapper, actor=actor, now=wall_clock),
            scope=self.scope,
            create_scopes=create_scopes,
            now=wall_clock,
        )
        self._admin = KeyAdmin(self._keyring)
        self.envelope = (
            Envelope(self._keyring) if metrics is None else MeteredEnvelope(self._keyring, metrics)
        )
        """The per-value encrypt and decrypt path (what columns call)."""
        _facades[self.envelope] = self
        if attach:
            binding.attach(engine, self.envelope)

    @classmethod
    def from_env(
        cls,
        engine: Engine,
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> KeyRegistry:
        """A registry whose root key comes from the ``ENVELOPE_*`` variables,
        as does ``allow_non_strict_mysql`` (``ENVELOPE_ALLOW_NON_STRICT_MYSQL``)
        unless given."""
        env = os.environ if environ is None else environ
        options.setdefault("allow_non_strict_mysql", strict_mode.allowed_by(env))
        return cls(engine, root_key_from_env(env), **options)

    @staticmethod
    def serving(engine: Engine) -> KeyRegistry | None:
        """The registry attached to ``engine``, if any."""
        envelope = binding.attached(engine)
        return None if envelope is None else _facades.get(envelope)

    def __repr__(self) -> str:
        return (
            f"KeyRegistry({self.engine!r}, root_key={self.root_key!r}, "
            f"scope={self.scope!r}, table={self.table.name!r})"
        )

    def __enter__(self) -> KeyRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def root_key(self) -> RootKeyProvider:
        return self._wrapper.root_key

    @property
    def root_key_fingerprint(self) -> str:
        """The root key's fingerprint (computing it the first time: PBKDF2 or a KMS call)."""
        return self._wrapper.fingerprint

    @property
    def policy(self) -> RotationPolicy:
        return self._keyring.policy

    @property
    def create_scopes(self) -> bool:
        return self._keyring.create_scopes

    @property
    def cache_max_age(self) -> timedelta:
        return timedelta(seconds=self._keyring.cache.max_age)

    @property
    def index_scope(self) -> str:
        """The scope of the keys behind the blind indexes and deterministic
        columns this registry writes for its own scope (each tenant's are
        under its own, ``~index:<tenant>``)."""
        return index_scope(self.scope)

    @contextmanager
    def on_connection(self, connection: Connection) -> Iterator[KeyRegistry]:
        """Do all of this registry's database work on ``connection``, inside
        its transaction, while the block runs. For migrations: Alembic runs
        them in one transaction, which may have created data_keys itself and
        holds locks that a second connection would wait on forever. Its
        ``sql_mode`` is checked as the registry's own connections' are."""
        strict_mode.check_connection(connection, allow=self._allow_non_strict_mysql)
        with self._store.pin(connection):
            yield self

    def bind(self, target: Any) -> Any:
        """Make this registry the one that encrypts what a Session,
        AsyncSession, sessionmaker or async_sessionmaker writes."""
        binding.bind(target, self.envelope)
        return target

    def close(self) -> None:
        """Forget every key, the root key included, close the registry's own
        connections and release the engine (which a new registry may then
        serve). From then on every use raises `RegistryClosedError`, also
        through statements SQLAlchemy compiled and cached before."""
        self._keyring.close()
        binding.detach(self.envelope)
        _facades.pop(self.envelope, None)

    def _scope(self, scope: str | None) -> str:
        """A scope whose keys a call addresses: a user scope or an index scope."""
        return self.scope if scope is None else check_key_scope(scope)

    # -- keys ----------------------------------------------------------------

    # Every method that changes keys takes ``reason``: free text (at most
    # 1000 characters, one line) recorded with its events, as an auditor
    # would ask why. Never put a secret in it.

    def init(self, *, reason: str | None = None) -> KeyInfo:
        """Create ``data_keys`` and ``data_key_events`` if missing, the events'
        anchor if none, and the scope's first data key if none is active;
        prove the root key. Safe to call from many processes. A shredded
        scope is not brought back (`ShreddedScopeError`)."""
        return KeyInfo.from_row(self._admin.init(reason))

    def rotate(self, scope: str | None = None, *, reason: str | None = None) -> KeyInfo:
        """Make a new data key active in one transaction; the old one is
        retired (still decrypts). Concurrent rotations each commit in turn."""
        return KeyInfo.from_row(self._admin.rotate(self._scope(scope), reason))

    def create_scope(self, *scopes: str, reason: str | None = None) -> list[KeyInfo]:
        """Give each scope what it lacks of an active data key and an index
        key, in one transaction; the active data keys. Scopes are also
        created on first use (``create_scopes``), except shredded ones, which
        only this brings back (with new keys; their old values stay
        unreadable). The registry's own scope is no new tenant: it has its
        keys from `init`, and this only brings it back after a shred."""
        return [KeyInfo.from_row(row) for row in self._admin.create_scopes(list(scopes), reason)]

    def shred(
        self, scope: str, *, including_shared_index: bool = False, reason: str | None = None
    ) -> int:
        """Crypto-shred a scope (a tenant): destroy every key of the scope,
        the active one included, and its index keys, in one transaction. Every
        value written for it, deterministic values and blind-index digests
        included, becomes unreadable and unfindable for good (in this process
        at once, in others within ``cache_max_age``); other scopes' keys are
        untouched. Returns the number of keys destroyed. Backups taken before
        still hold the wrapped keys: see docs/tenants.md.

        Shredding this registry's own scope while other scopes have keys is
        refused with `ConfigurationError` unless
        ``including_shared_index=True``: its index key is the one tenants
        used before they had their own, and may still hold their values."""
        return self._admin.shred(
            scope, including_shared_index=including_shared_index, reason=reason
        )

    def retire(
        self, version: int, scope: str | None = None, *, reason: str | None = None
    ) -> KeyInfo:
        """Retire a key (it still decrypts). Retiring the active key rotates,
        so that a successor takes over in the same transaction."""
        return KeyInfo.from_row(self._admin.retire(self._scope(scope), version, reason))

    def disable(
        self,
        version: int,
        scope: str | None = None,
        *,
        force: bool = False,
        reason: str | None = None,
    ) -> KeyInfo:
        """Refuse decryption under a retired key, reversibly (see `enable`).
        An index key (scope ``~index:...``) is refused with `KeyInUseError`
        unless ``force=True``: no census counts the blind-index digests that
        need it."""
        return KeyInfo.from_row(
            self._admin.disable(self._scope(scope), version, force=force, reason=reason)
        )

    def enable(
        self, version: int, scope: str | None = None, *, reason: str | None = None
    ) -> KeyInfo:
        """Bring a disabled key back to retired."""
        return KeyInfo.from_row(
            self._admin.transition("enable", self._scope(scope), version, reason=reason)
        )

    def destroy(
        self,
        version: int,
        scope: str | None = None,
        *,
        force: bool = False,
        columns: Iterable[Target] = (),
        reason: str | None = None,
    ) -> KeyInfo:
        """Erase a retired or disabled key's wrapped key for good; its row stays
        as a tombstone. Refused while any row still holds a value under it
        (counted in SQL over ``columns``, or else over every text and binary
        column of every table in every schema the connection can see, models
        loaded or not), or while processes or still-open transactions may
        write under it, unless ``force=True``: crypto-shredding on purpose.
        An index key is always refused without ``force``: blind-index
        digests carry no key id, so no count can show that nothing needs it.
        With ``force`` the event is "force_destroy"."""
        row = key_reports.destroy(
            self._admin, self._scope(scope), version, force=force, columns=columns, reason=reason
        )
        return KeyInfo.from_row(row)

    def rewrap(self, new_root_key: RootKeyProvider, *, reason: str | None = None) -> int:
        """Re-wrap every data key under ``new_root_key`` in one transaction (all
        or nothing), without touching any value. Afterwards this registry uses
        the new root key and the old one is no longer needed. Returns the number
        of keys re-wrapped. The key events are re-anchored under the new root
        key in the same transaction."""
        return self._admin.rewrap(new_root_key, reason)

    def key_info(self, version: int, scope: str | None = None) -> KeyInfo:
        return KeyInfo.from_row(self._admin.row(self._scope(scope), version))

    # -- key events --------------------------------------------------------------

    def events(
        self,
        scope: str | None = None,
        *,
        since: datetime | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        """The recorded changes to the keys, oldest first: of ``scope`` (a
        user scope includes its index scope's), at or after ``since`` (UTC if
        naive), numbered after ``after`` (the last seq shipped: the cursor
        to resume from, since hosts' clocks differ), the newest ``limit``."""
        self._keyring.check_open()
        scope = None if scope is None else check_key_scope(scope)
        log = self._keyring.events
        return self._store.read(
            lambda conn: log.read(conn, scope=scope, since=since, after=after, limit=limit)
        )

    def start_events(self, *, reason: str | None = None) -> KeyEvent:
        """Start the chain of key events over the keys that exist already: a
        database of an earlier version, once ``data_key_events`` exists
        (created here if missing). Until then key changes are refused
        (`KeyEventsTamperedError`), since an empty events table beside keys
        may as well be one whose events were deleted. The anchor records how
        many keys it starts over, the actor and ``reason``; `verify_events`
        lists it (``start``). Refused once the chain is started."""
        return self._admin.start_events(reason)

    def verify_events(self, expected_head: str | None = None) -> ChainReport:
        """Walk the chain of key events with the root key: ``ok`` unless an
        event was altered, inserted, reordered or deleted (the report names
        the first, by seq), and unless ``expected_head`` (a head recorded
        earlier, from `status` or a previous report) is missing from it, which
        shows the newest events deleted. Raises `WrongRootKeyError` if this
        root key is not the table's, never for a broken chain."""
        self._keyring.check_open()
        log = self._keyring.events
        return self._store.read(lambda conn: log.verify(conn, expected_head))

    # -- reports ---------------------------------------------------------------

    def census(self, *targets: Target, scope: str | None = None) -> list[ColumnCensus]:
        """Rows per data key for each encrypted column, counted in SQL from the
        ciphertext header without decrypting anything. ``targets`` are
        "table.column" names, Columns, ORM attributes, mapped classes or
        Tables; with none, every encrypted column this process has defined
        whose table exists in the database. With ``scope``, only that
        scope's keys are listed (a tenant's census)."""
        return key_reports.census_of(
            self._admin, targets, None if scope is None else check_key_scope(scope)
        )

    def status(self, scope: str | None = None, *, census: bool = False) -> RegistryStatus:
        """A scope's keys, rotation policy and root key; with ``census=True``
        also the rows under each key version, counted over every text and
        binary column of every table (as `destroy` checks), and the columns
        that hold them."""
        return key_reports.status(self._admin, self._scope(scope), with_census=census)

    def maintenance(self, scope: str | None = None) -> MaintenanceReport:
        """Rotate if the policy says so, and report which old keys no row
        needs any more. Deletes nothing."""
        return key_reports.maintenance(self._admin, self._scope(scope))

    # -- jobs over stored values -------------------------------------------------

    def reencrypt(
        self,
        *targets: Target,
        batch_size: int = 1000,
        workers: int = 1,
        encrypt_plaintext: bool = False,
        progress: bool | None = None,
        scope: str | None = None,
        plaintext_rows: Mapping[str, Iterable[Any]] | None = None,
        shard: tuple[int, int] | None = None,
        where: Any = None,
    ) -> migrate.MigrationReport:
        """Move every value of the target columns that is under an older key
        of ``scope`` (default: the registry's) onto the scope's active key:
        online (compare-and-swap updates in short batches), resumable (a
        rerun finishes a killed job), with a progress bar on a terminal.
        Legacy plaintext is encrypted too in columns declared
        ``migrating=True``, or everywhere with ``encrypt_plaintext=True``.
        ``workers`` > 1 splits each table into primary-key ranges handled by
        parallel processes. Values of other scopes are left untouched
        (``report.other_scopes``); values that do not decrypt are left as
        they are and named in ``report.left_rows``. ``plaintext_rows`` maps
        "table.column" to primary keys (a tuple for a composite key) of rows
        whose value is legacy plaintext that merely looks like ciphertext:
        such a value is encrypted as plaintext unless it decrypts, or its key
        is disabled or destroyed (then it is this registry's ciphertext).
        ``shard=(K, N)`` does only shard K (0 <= K < N) of each table, for
        running one job on many machines (see docs/sharding.md).
        ``where`` (a condition on one target table's columns) limits the job
        to the rows it selects, which it takes to be ``scope``'s: there it
        also moves deterministic values under the index key of the
        registry's own scope (where earlier versions sealed every tenant's)
        to ``scope``'s own."""
        self._keyring.check_open()
        return migrate.run(
            self.envelope,
            targets,
            batch_size=batch_size,
            workers=workers,
            encrypt_plaintext=encrypt_plaintext,
            progress=progress,
            scope=self.scope if scope is None else check_scope(scope),
            plaintext_rows=plaintext_rows,
            shard=shard,
            where=where,
        )

    def migrate_from_sqlalchemy_utils(
        self,
        *targets: Target,
        batch_size: int = 1000,
        workers: int = 1,
        progress: bool | None = None,
        shard: tuple[int, int] | None = None,
    ) -> migrate.MigrationReport:
        """Seal the values sqlalchemy-utils wrote in columns declared
        ``EncryptedType(..., migrating=StringEncryptedType(...))`` (the type
        each had) under the registry's keys, reading each with that type:
        the `reencrypt` job, with its batching, compare-and-swap and
        resumption. Before writing anything it reads a sample of the old
        values, and fails with `LegacyDecryptionError` if one does not read
        (a wrong key, engine or padding); it fails with `ValuesLeftBehindError`, naming the
        rows, if any value is left as it was."""
        self._keyring.check_open()
        return migrate.from_sqlalchemy_utils(
            self.envelope,
            targets,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            shard=shard,
        )

    def decrypt_in_place(
        self,
        *targets: Target,
        batch_size: int = 1000,
        workers: int = 1,
        progress: bool | None = None,
        shard: tuple[int, int] | None = None,
    ) -> migrate.MigrationReport:
        """The reverse of encrypting a column in place: write every value back
        as plaintext (strings in text storage, bytes in binary storage), with
        the same batching and compare-and-swap safety as `reencrypt`."""
        self._keyring.check_open()
        return migrate.run(
            self.envelope,
            targets,
            decrypt=True,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            shard=shard,
        )

    def backfill_index(
        self,
        target: Any,
        *,
        batch_size: int = 1000,
        progress: bool | None = None,
        shard: tuple[int, int] | None = None,
        recompute: bool = False,
    ) -> migrate.MigrationReport:
        """Fill a blind index column for existing rows (resumable, batched,
        compare-and-swap), each row's digest under the index key of the scope
        its sources belong to; ``recompute`` also rewrites the digests already
        set that differ (digests written before tenants had index keys of
        their own). To re-key or re-normalize an index, add a second index
        column, backfill it, switch lookups to it, then drop the first."""
        return backfill.run(
            self.envelope,
            target,
            batch_size=batch_size,
            progress=progress,
            shard=shard,
            recompute=recompute,
        )

    # -- values outside ORM columns --------------------------------------------

    def encrypt(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` under the active data key, bound to ``context``,
        ``"table.column"``: the value of that column (in the default schema)."""
        _check_bytes(plaintext, "encrypt", "plaintext")
        return self.envelope.encrypt_bytes(bytes(plaintext), fmt.given_context(context).current)

    def decrypt(self, ciphertext: bytes, context: str) -> bytes:
        """Decrypt a value written by `encrypt` with the same ``context``."""
        if not isinstance(ciphertext, (bytes, bytearray)):
            raise TypeError("decrypt() takes the ciphertext as bytes")
        return self.envelope.decrypt_bytes(bytes(ciphertext), fmt.given_context(context))

    def encrypt_many(self, plaintexts: Iterable[bytes], context: str) -> list[bytes]:
        """Encrypt many values for one context."""
        plaintexts = list(plaintexts)
        for plaintext in plaintexts:
            _check_bytes(plaintext, "encrypt_many", "each plaintext")
        encrypt = self.envelope.encrypt_bytes
        bound = fmt.given_context(context).current
        return [encrypt(bytes(p), bound) for p in plaintexts]

    def decrypt_many(self, ciphertexts: Iterable[bytes], context: str) -> list[bytes]:
        """Decrypt many values written for one context."""
        decrypt = self.envelope.decryptor(fmt.given_context(context))
        return [decrypt(c) for c in ciphertexts]

    def hash_field(
        self, value: bytes, context: str, *, version: int = 1, scope: str | None = None
    ) -> str:
        """A keyed, context-bound HMAC-SHA256 (hex) for equality lookups
        outside ORM columns, under the index key of ``scope``, by default the
        enclosing ``scope()`` block's, else the registry's own. Never a bare
        hash."""
        _check_bytes(value, "hash_field", "value")
        scope = binding.current_writing().ambient if scope is None else check_scope(scope)
        return self.envelope.hash_field(bytes(value), context, version, scope=scope)
