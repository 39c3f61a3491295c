"""The key events: a tamper-evident record of every change to ``data_keys``.

Each change to data_keys (a key created, rotated, retired, disabled, enabled,
destroyed, a scope shredded, every key re-wrapped) appends one event per
scope it touched to ``data_key_events``, in the transaction that makes the
change: no change commits without its event, no event without its change.
Claims of encryptions (the ``encryptions`` counter) are use, not changes, and
record nothing. No event holds a secret: operation, scope, versions, outcome,
actor, the root key's fingerprint and the operator's reason.

The events form a hash chain: each one's ``mac`` is an HMAC-SHA256 over its
fields and the previous event's mac, under a key derived (HKDF) from a random
*chain secret*. The chain secret is wrapped by the root key and stored in an
``anchor`` event, the first of the table. A root key never reveals its bytes
(a KMS key cannot), so this secret, not the root key, keys the chain. `rewrap`
re-anchors: a new anchor carries a new chain secret wrapped by the new root
key, and the previous chain secret sealed under the new one, so the whole
history verifies with the current root key alone. A re-anchor's mac is made
under the new chain secret over its link, a mac under the previous one: the
old root key (which cannot unwrap the new secret) cannot rewrite the history
before the rewrap, nor can whoever can only wrap under the new root key
(which cannot unwrap the previous secret) forge the link. Appends serialize on the lock every
change of data_keys takes (`KeyWrapper.hold`); ``seq``, the primary key,
turns any race that escaped it into an error retried, never a fork.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..crypto.primitives import (
    AESGCM,
    KEY_BYTES,
    NONCE_BYTES,
    InvalidTag,
    constant_time_equal,
    hkdf_sha256,
    hmac_sha256,
    new_data_key,
    new_nonce,
)
from ..errors import ConfigurationError, DecryptionError, KeyEventsTamperedError, WrongRootKeyError
from . import storage
from .rootkey import RootKeyProvider, canonical_json
from .scopes import index_scope, is_index_scope
from .wrapper import KeyWrapper

__all__ = [
    "DEFAULT_EVENTS_TABLE_NAME",
    "OPERATIONS",
    "ChainProblem",
    "ChainReport",
    "EventLog",
    "KeyEvent",
    "default_actor",
    "events_schema",
    "events_table",
    "events_table_name",
]

DEFAULT_EVENTS_TABLE_NAME = "data_key_events"

OPERATIONS = (
    "anchor",
    "init",
    "create_scope",
    "create_on_first_use",
    "rotate",
    "rotate_index",
    "rotate_by_policy",
    "retire",
    "disable",
    "enable",
    "destroy",
    "force_destroy",
    "shred",
    "rewrap",
)
"""Every operation an event can name."""

ANCHOR = "anchor"
MAX_REASON_CHARS = 1000
MAX_ACTOR_CHARS = 200
HEAD_BYTES = 32  # an event's mac, HMAC-SHA256

_MAC_INFO = b"sqlalchemy-envelope/key-events/v1"
_SEAL_INFO = b"sqlalchemy-envelope/key-events/previous-secret/v1"
_RE_ANCHOR_INFO = b"sqlalchemy-envelope/key-events/re-anchor/v1"
_MESSAGE_LABEL = b"sqlalchemy-envelope/key-event/v1\x00"
_SEAL_LABEL = b"sqlalchemy-envelope/key-events/previous-secret/v1\x00"


def events_table_name(keys_table: str) -> str:
    """The events table of a data_keys table: ``data_key_events`` for the
    default ``data_keys``, else ``<name>_events``."""
    if keys_table == storage.DEFAULT_TABLE_NAME:
        return DEFAULT_EVENTS_TABLE_NAME
    return f"{keys_table}_events"


def _text_type(length: int | None = None) -> sa.types.TypeEngine[str]:
    # Text in any script, compared byte for byte, on MySQL/MariaDB too.
    if length is None:
        return sa.Text().with_variant(
            mysql.TEXT(charset="utf8mb4", collation="utf8mb4_bin"),
            *storage.MYSQL_DIALECTS,
        )
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"),
        *storage.MYSQL_DIALECTS,
    )


def events_schema(name: str = DEFAULT_EVENTS_TABLE_NAME) -> list[sa.schema.SchemaItem]:
    """The columns of the events table, new objects on every call: the one
    definition behind `KeyRegistry.init` and the Alembic operations."""
    return [
        # The library numbers events head + 1 itself: never autoincrement.
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("occurred_at", storage.time_type(), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("scope", storage.scope_type(), nullable=True),
        sa.Column("versions", _text_type(), nullable=True),
        sa.Column("outcome", _text_type(), nullable=False),
        sa.Column("actor", _text_type(MAX_ACTOR_CHARS), nullable=False),
        sa.Column("root_key_fingerprint", sa.String(64), nullable=False),
        sa.Column("reason", _text_type(), nullable=True),
        # Anchors only: the chain secret wrapped by the root key, and the
        # previous chain secret sealed under this one.
        sa.Column("wrapped_secret", sa.LargeBinary, nullable=True),
        sa.Column("previous_secret", sa.LargeBinary, nullable=True),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    ]


def events_table(metadata: sa.MetaData, keys_table: str = storage.DEFAULT_TABLE_NAME) -> sa.Table:
    """Define the events table of the data_keys table ``keys_table`` in ``metadata``."""
    name = events_table_name(keys_table)
    return sa.Table(name, metadata, *events_schema(name))


def default_actor() -> str:
    """``user@host:pid`` of this process (the user id where no name is known,
    as in a container running under an id /etc/passwd lacks)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def check_text(value: str | None, what: str, limit: int) -> str | None:
    """An actor or reason as stored: text, printable, at most ``limit`` characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"the {what} must be a str")
    if len(value) > limit:
        raise ConfigurationError(f"the {what} is longer than {limit} characters: shorten it")
    if not value.isprintable() or any("\ud800" <= c <= "\udfff" for c in value):
        raise ConfigurationError(
            f"the {what} must be printable text on one line (no control characters)"
        )
    return value


@dataclass(frozen=True)
class KeyEvent:
    """One recorded change to data_keys; nothing in it is secret. ``mac``
    chains it to the event before (its hex is the chain head when newest)."""

    seq: int
    occurred_at: datetime
    operation: str
    scope: str | None
    versions: str | None
    outcome: str
    actor: str
    root_key_fingerprint: str
    reason: str | None
    mac: bytes

    def __repr__(self) -> str:
        return (
            f"KeyEvent(seq={self.seq}, operation={self.operation!r}, scope={self.scope!r}, "
            f"versions={self.versions!r}, outcome={self.outcome!r}, actor={self.actor!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "occurred_at": self.occurred_at.isoformat(),
            "operation": self.operation,
            "scope": self.scope,
            "versions": self.versions,
            "outcome": self.outcome,
            "actor": self.actor,
            "root_key_fingerprint": self.root_key_fingerprint,
            "reason": self.reason,
            "mac": self.mac.hex(),
        }


@dataclass(frozen=True)
class _Stored:
    """An event as stored, with an anchor's wrapped secrets."""

    event: KeyEvent
    wrapped_secret: bytes | None
    previous_secret: bytes | None

    @property
    def seq(self) -> int:
        return self.event.seq

    @property
    def is_anchor(self) -> bool:
        return self.event.operation == ANCHOR

    def message(self, previous_mac: bytes, seq: int | None = None) -> bytes:
        """What the mac covers: every field (``seq`` as given, to test where
        an event came from) and the previous event's mac."""
        e = self.event
        fields = {
            "seq": str(e.seq if seq is None else seq),
            "occurred_at": _timestamp(e.occurred_at),
            "operation": e.operation,
            "scope": e.scope,
            "versions": e.versions,
            "outcome": e.outcome,
            "actor": e.actor,
            "root_key_fingerprint": e.root_key_fingerprint,
            "reason": e.reason,
            "wrapped_secret": None if self.wrapped_secret is None else self.wrapped_secret.hex(),
            "previous_secret": None if self.previous_secret is None else self.previous_secret.hex(),
        }
        present = {name: value for name, value in fields.items() if value is not None}
        return _MESSAGE_LABEL + canonical_json(present) + previous_mac

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> _Stored:
        wrapped, previous = row["wrapped_secret"], row["previous_secret"]
        return cls(
            event=KeyEvent(
                seq=int(row["seq"]),
                occurred_at=storage.aware(row["occurred_at"]),
                operation=row["operation"],
                scope=row["scope"],
                versions=row["versions"],
                outcome=row["outcome"],
                actor=row["actor"],
                root_key_fingerprint=row["root_key_fingerprint"],
                reason=row["reason"],
                mac=bytes(row["mac"]),
            ),
            wrapped_secret=None if wrapped is None else bytes(wrapped),
            previous_secret=None if previous is None else bytes(previous),
        )


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _mac(secret: bytes, message: bytes) -> bytes:
    return hmac_sha256(hkdf_sha256(secret, _MAC_INFO), message)


def _event_mac(secret: bytes, message: bytes, own: bytes | None = None) -> bytes:
    """An event's mac under its segment's ``secret``; for a re-anchor (``own``,
    its new chain secret, given) the mac under ``own`` of the message and of
    its link, the mac under the previous secret: both secrets are needed."""
    link = _mac(secret, message)
    if own is None:
        return link
    return hmac_sha256(hkdf_sha256(own, _RE_ANCHOR_INFO), message + link)


def _seal_aad(seq: int) -> bytes:
    return _SEAL_LABEL + str(seq).encode("ascii")


def _seal(secret: bytes, previous: bytes, seq: int) -> bytes:
    """The previous chain secret, sealed under the new one (AES-256-GCM)."""
    nonce = new_nonce()
    return nonce + AESGCM(hkdf_sha256(secret, _SEAL_INFO)).encrypt(nonce, previous, _seal_aad(seq))


def _unseal(secret: bytes, sealed: bytes, seq: int) -> bytes | None:
    try:
        return AESGCM(hkdf_sha256(secret, _SEAL_INFO)).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _seal_aad(seq)
        )
    except (InvalidTag, ValueError):
        return None


@dataclass(frozen=True)
class ChainProblem:
    """The first place where the chain does not verify. ``kind`` is one of
    "altered", "inserted", "reordered", "deleted", "unknown anchor"."""

    seq: int
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "detail": self.detail}

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind} ({self.detail})"


@dataclass(frozen=True)
class ChainReport:
    """What `KeyRegistry.verify_events` found: ``ok`` if every event
    verifies (and ``expected_head``, if given, is one of them); ``events``
    checked before the first problem; ``head``, the hex of the newest event's
    mac (safe to log: record it, and pass it as ``expected_head`` later to
    detect the newest events deleted); ``start``, the chain's first anchor
    when it verifies: when, by whom, why, and over how many keys that
    existed already it started (its outcome)."""

    ok: bool
    events: int
    head: str | None
    problem: ChainProblem | None
    start: KeyEvent | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head": self.head,
            "problem": None if self.problem is None else self.problem.to_dict(),
            "start": None if self.start is None else self.start.to_dict(),
        }


class EventLog:
    """The events of one data_keys table: appended in the transactions that
    change keys, read, and verified."""

    def __init__(
        self,
        table: sa.Table,
        wrapper: KeyWrapper,
        *,
        actor: str | None,
        now: Callable[[], datetime],
    ) -> None:
        self.table = table
        self.wrapper = wrapper
        self.actor = check_text(actor, "actor", MAX_ACTOR_CHARS)
        self.now = now
        # Chain secrets unwrapped by this process, by anchor (seq, mac): one
        # root key call per anchor, as for data keys.
        self._secrets: dict[tuple[int, bytes], bytes] = {}
        self._lock = threading.Lock()
        self._exists = False

    def forget(self) -> None:
        """Drop every chain secret held (the registry was closed)."""
        with self._lock:
            self._secrets.clear()

    # -- appending -----------------------------------------------------------

    def append(
        self,
        conn: Connection,
        operation: str,
        *,
        scope: str | None,
        versions: Sequence[int] | str | None,
        outcome: str,
        reason: str | None,
        also: RootKeyProvider | None = None,
    ) -> KeyEvent:
        """Record one change in the caller's transaction, which holds the
        lock of `KeyWrapper.hold` (or `storage.lock_table`) already; an empty
        table is started as `ready` does. ``also`` is
        another root key that may hold the chain (a rewrap's new one: a
        rewrap run again, to finish one, finds the chain under it already)."""
        assert operation in OPERATIONS and operation != ANCHOR
        reason = check_text(reason, "reason", MAX_REASON_CHARS)
        head = self._head(conn)
        if head is None:
            head = self._start_new(conn)
        secret = self._secret(conn, self._latest_anchor(conn), self.wrapper.root_key, also)
        return self._write(
            conn,
            head,
            secret,
            operation=operation,
            scope=scope,
            versions=_versions(versions),
            outcome=outcome,
            root_key_fingerprint=self.wrapper.fingerprint,
            reason=reason,
        ).event

    def started(self, conn: Connection) -> bool:
        """Whether the chain has its anchor (the table holds an event)."""
        self._require_table(conn)
        return conn.execute(sa.select(self.table.c.seq).limit(1)).first() is not None

    def ready(self, conn: Connection) -> None:
        """Check, under the lock and before a change touches data_keys, that
        the chain can take its event: started, or started here if data_keys
        is empty too (a new database). An empty table beside keys is refused
        (`_start_new`): no change starts a chain over them silently."""
        if self._head(conn) is None:
            self._start_new(conn)

    def _start_new(self, conn: Connection) -> _Stored:
        """The first anchor of a new database, whose data_keys is empty;
        beside keys, the events were deleted or never started: refused."""
        keys = self._count_keys(conn)
        if keys:
            raise KeyEventsTamperedError(
                f"{self.table.name!r} (the key events) is empty but {self.wrapper.table.name!r} "
                f"holds {keys} keys: the events were deleted, or this database comes from a "
                "version without key events. Nothing was written. Restore the table from a "
                "backup; or, if it was never started, start it: KeyRegistry.start_events("
                "reason=...) (sqlalchemy-envelope events start --reason ...)"
            )
        return self._write_anchor(conn, self.wrapper.root_key, None, None, None)

    def start(self, conn: Connection, reason: str | None) -> KeyEvent:
        """Start the chain on purpose over the keys data_keys holds already
        (a database of an earlier version), in the caller's transaction,
        which holds the lock of `KeyWrapper.hold`: the anchor says how many
        keys it starts over, who started it and why. Refused once started."""
        reason = check_text(reason, "reason", MAX_REASON_CHARS)
        head = self._head(conn)
        if head is not None:
            raise ConfigurationError(
                f"the key events in {self.table.name!r} are started already ({head.seq} "
                "events): nothing was written; verify them with verify_events "
                "(sqlalchemy-envelope events verify)"
            )
        keys = self._count_keys(conn)
        outcome = f"chain started over {keys} existing keys" if keys else "chain started"
        return self._write_anchor(
            conn, self.wrapper.root_key, None, None, reason, outcome=outcome
        ).event

    def _count_keys(self, conn: Connection) -> int:
        stmt = sa.select(sa.func.count()).select_from(self.wrapper.table)
        return int(conn.execute(stmt).scalar_one())

    def re_anchor(
        self, conn: Connection, new_root_key: RootKeyProvider, reason: str | None
    ) -> KeyEvent:
        """Start a new segment of the chain under ``new_root_key`` (after a
        rewrap, in its transaction): a new chain secret, wrapped by it, and
        the current one sealed under the new one, the anchor's mac made
        under both (`_event_mac`)."""
        reason = check_text(reason, "reason", MAX_REASON_CHARS)
        head = self._head(conn)
        assert head is not None  # the rewrap event came first
        current = self._secret(conn, self._latest_anchor(conn), self.wrapper.root_key, new_root_key)
        return self._write_anchor(conn, new_root_key, head, current, reason).event

    def _write_anchor(
        self,
        conn: Connection,
        root_key: RootKeyProvider,
        head: _Stored | None,
        previous: bytes | None,
        reason: str | None,
        outcome: str = "chain started",
    ) -> _Stored:
        seq = 1 if head is None else head.seq + 1
        secret = new_data_key()
        fingerprint = root_key.fingerprint
        stored = self._write(
            conn,
            head,
            secret if previous is None else previous,
            operation=ANCHOR,
            scope=None,
            versions=None,
            outcome=outcome if previous is None else f"chain re-anchored under {fingerprint}",
            root_key_fingerprint=fingerprint,
            reason=reason,
            wrapped_secret=self.wrapper.wrap_with(root_key, secret, self.context(seq)),
            previous_secret=None if previous is None else _seal(secret, previous, seq),
            own=None if previous is None else secret,
        )
        with self._lock:
            self._secrets[(stored.seq, stored.event.mac)] = secret
        return stored

    def _write(
        self,
        conn: Connection,
        head: _Stored | None,
        secret: bytes,
        *,
        operation: str,
        scope: str | None,
        versions: str | None,
        outcome: str,
        root_key_fingerprint: str,
        reason: str | None,
        wrapped_secret: bytes | None = None,
        previous_secret: bytes | None = None,
        own: bytes | None = None,
    ) -> _Stored:
        draft = _Stored(
            event=KeyEvent(
                seq=1 if head is None else head.seq + 1,
                occurred_at=self.now().astimezone(UTC),
                operation=operation,
                scope=scope,
                versions=versions,
                outcome=outcome,
                actor=self.actor or default_actor(),
                root_key_fingerprint=root_key_fingerprint,
                reason=reason,
                mac=b"",
            ),
            wrapped_secret=wrapped_secret,
            previous_secret=previous_secret,
        )
        mac = _event_mac(secret, draft.message(b"" if head is None else head.event.mac), own)
        e = draft.event
        conn.execute(
            sa.insert(self.table).values(
                seq=e.seq,
                occurred_at=e.occurred_at,
                operation=e.operation,
                scope=e.scope,
                versions=e.versions,
                outcome=e.outcome,
                actor=e.actor,
                root_key_fingerprint=e.root_key_fingerprint,
                reason=e.reason,
                wrapped_secret=wrapped_secret,
                previous_secret=previous_secret,
                mac=mac,
            )
        )
        return _Stored(
            event=KeyEvent(**{**e.__dict__, "mac": mac}),
            wrapped_secret=wrapped_secret,
            previous_secret=previous_secret,
        )

    def context(self, seq: int) -> dict[str, str]:
        """The wrap context of a chain secret: the wrap context's keys (a KMS
        key policy that conditions on them lets it through), of a kind no
        data key has, bound to its anchor and its table."""
        return {"key_id": str(seq), "kind": "key-events", "scope": self.table.name, "version": "1"}

    def exists(self, conn: Connection) -> bool:
        """Whether the events table exists (known for good once it does)."""
        if not self._exists:
            self._exists = sa.inspect(conn).has_table(self.table.name, schema=self.table.schema)
        return self._exists

    def _require_table(self, conn: Connection) -> None:
        """Fail with what to do when the events table is missing (a database
        of an earlier version, not yet migrated)."""
        if not self.exists(conn):
            raise ConfigurationError(
                f"table {self.table.name!r} (the key events) does not exist: call "
                "KeyRegistry.init() (or run `sqlalchemy-envelope init`, or "
                "op.create_data_key_events_table() in an Alembic migration) first; "
                "nothing was written"
            )

    def _head(self, conn: Connection) -> _Stored | None:
        """The newest event, as last committed (a locking read on
        MySQL/MariaDB, whose plain reads see the transaction's snapshot)."""
        self._require_table(conn)
        stmt = sa.select(self.table).order_by(self.table.c.seq.desc()).limit(1)
        if conn.dialect.name in storage.MYSQL_DIALECTS:
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).mappings().first()
        return None if row is None else _Stored.from_mapping(row)

    def _latest_anchor(self, conn: Connection) -> _Stored:
        stmt = (
            sa.select(self.table)
            .where(self.table.c.operation == ANCHOR)
            .order_by(self.table.c.seq.desc())
            .limit(1)
        )
        row = conn.execute(stmt).mappings().first()
        if row is None:
            raise KeyEventsTamperedError(
                f"{self.table.name!r} holds events but no anchor: its first events were "
                "deleted. Nothing was written; restore the table from a backup"
            )
        return _Stored.from_mapping(row)

    def _secret(
        self,
        conn: Connection,
        anchor: _Stored,
        root_key: RootKeyProvider,
        also: RootKeyProvider | None = None,
    ) -> bytes:
        """The chain secret of ``anchor``, unwrapped by ``root_key`` (or
        ``also``, whichever it names), once per process; refused unless the
        anchor's own mac verifies (made under the previous chain secret for
        a re-anchor), so that no event is chained onto a forged anchor."""
        cached = (anchor.seq, anchor.event.mac)
        with self._lock:
            secret = self._secrets.get(cached)
        if secret is not None:
            return secret
        if also is not None and anchor.event.root_key_fingerprint == also.fingerprint:
            root_key = also
        fingerprint = root_key.fingerprint
        if anchor.event.root_key_fingerprint != fingerprint or anchor.wrapped_secret is None:
            raise WrongRootKeyError(
                f"the key events in {self.table.name!r} are anchored (seq {anchor.seq}) under "
                f"root key {anchor.event.root_key_fingerprint}, but this registry's root key is "
                f"{fingerprint}: check the root key configuration (a rewrap by a version "
                "without key events leaves the chain under the old root key: rewrap with this "
                "version). Nothing was written."
            )
        try:
            secret = self.wrapper.unwrap_with(
                root_key, anchor.wrapped_secret, self.context(anchor.seq)
            )
        except DecryptionError:
            raise KeyEventsTamperedError(
                f"the anchor (seq {anchor.seq}) of the key events in {self.table.name!r} does "
                "not unwrap with this root key although the fingerprints match: it was "
                "altered or forged. Run verify_events (sqlalchemy-envelope events verify) to "
                "find the first bad event"
            ) from None
        if len(secret) != KEY_BYTES or not self._anchor_verifies(conn, anchor, secret):
            raise KeyEventsTamperedError(
                f"the anchor (seq {anchor.seq}) of the key events in {self.table.name!r} "
                "does not follow from the chain before it: it was altered or forged. Nothing "
                "was written; run verify_events (sqlalchemy-envelope events verify) to find "
                "the first bad event"
            )
        with self._lock:
            self._secrets[cached] = secret
        return secret

    def _anchor_verifies(self, conn: Connection, anchor: _Stored, secret: bytes) -> bool:
        """Whether ``anchor``'s mac follows from the event before it: under
        its own secret for the first anchor, under its own and the previous
        chain secret (sealed in it) for a re-anchor."""
        if anchor.previous_secret is None:
            return anchor.seq == 1 and constant_time_equal(
                _mac(secret, anchor.message(b"")), anchor.event.mac
            )
        previous = _unseal(secret, anchor.previous_secret, anchor.seq)
        before = conn.execute(
            sa.select(self.table.c.mac).where(self.table.c.seq == anchor.seq - 1)
        ).scalar()
        if previous is None or before is None:
            return False
        mac = _event_mac(previous, anchor.message(bytes(before)), secret)
        return constant_time_equal(mac, anchor.event.mac)

    # -- reading ---------------------------------------------------------------

    def read(
        self,
        conn: Connection,
        *,
        scope: str | None = None,
        since: datetime | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        """Events, oldest first: of ``scope`` (and its index scope), since
        ``since``, numbered after ``after`` (a cursor that, unlike times
        from hosts' clocks, follows the order of the chain), the newest
        ``limit`` of them."""
        self._require_table(conn)
        t = self.table
        stmt = sa.select(t).order_by(t.c.seq.desc())
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, int) or after < 0:
                raise ConfigurationError("after must be an event's seq (an int, 0 or more)")
            stmt = stmt.where(t.c.seq > after)
        if scope is not None:
            names = [scope] if is_index_scope(scope) else [scope, index_scope(scope)]
            stmt = stmt.where(t.c.scope.in_(names))
        if since is not None:
            when = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
            stmt = stmt.where(t.c.occurred_at >= when.astimezone(UTC))
        if limit is not None:
            if limit < 1:
                raise ConfigurationError("limit must be at least 1")
            stmt = stmt.limit(limit)
        rows = [_Stored.from_mapping(r).event for r in conn.execute(stmt).mappings()]
        return rows[::-1]

    def summary(self, conn: Connection) -> tuple[int, str | None]:
        """How many events there are, and the chain head (hex of the newest mac)."""
        self._require_table(conn)
        count = conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
        head = conn.execute(
            sa.select(self.table.c.mac).order_by(self.table.c.seq.desc()).limit(1)
        ).scalar()
        return int(count), None if head is None else bytes(head).hex()

    # -- verifying ---------------------------------------------------------------

    def verify(self, conn: Connection, expected_head: str | None = None) -> ChainReport:
        """Walk the chain with this registry's root key (`_Verifier`). A root
        key that wraps no stored key raises `WrongRootKeyError`: a broken
        chain is reported, a wrong configuration is not."""
        expected_head = _head_hex(expected_head)
        self._require_table(conn)
        self.wrapper.check(conn)
        rows = [
            _Stored.from_mapping(r)
            for r in conn.execute(sa.select(self.table).order_by(self.table.c.seq)).mappings()
        ]
        keys = conn.execute(sa.select(sa.func.count()).select_from(self.wrapper.table))
        return _Verifier(self, rows, int(keys.scalar_one())).run(expected_head)


def _head_hex(value: str | None) -> str | None:
    """A recorded chain head, checked: a malformed one is a usage error,
    never reported as a broken chain."""
    if value is None:
        return None
    head = value.strip().lower() if isinstance(value, str) else ""
    if len(head) != 2 * HEAD_BYTES or any(c not in "0123456789abcdef" for c in head):
        raise ConfigurationError(
            f"the expected head must be a chain head as recorded ({2 * HEAD_BYTES} hex digits, "
            "from status or a previous verify_events): pass it whole, or omit it"
        )
    return head


def _versions(versions: Sequence[int] | str | None) -> str | None:
    if versions is None or isinstance(versions, str):
        return versions
    return ",".join(str(v) for v in versions)


class _Verifier:
    """One walk of the chain: the chain secret of each anchor (unwrapped by
    the root key if it is this root key's, else unsealed from the next
    anchor's), then every event, in order, against its segment's secret."""

    def __init__(self, log: EventLog, rows: list[_Stored], keys: int) -> None:
        self.log = log
        self.rows = rows
        self.keys = keys
        self.secrets: dict[int, bytes] = {}  # anchor seq -> chain secret

    def run(self, expected_head: str | None) -> ChainReport:
        rows = self.rows
        if not rows:
            if self.keys or expected_head:
                held = ", but data_keys holds keys" if self.keys else ""
                return self._report(
                    0,
                    ChainProblem(
                        1,
                        "deleted",
                        f"the table holds no event{held}: deleted, or never started (a "
                        "database of an earlier version: start_events, `sqlalchemy-envelope "
                        "events start`)",
                    ),
                )
            return ChainReport(True, 0, None, None)
        self._find_secrets()
        fingerprint = self.log.wrapper.fingerprint
        if not any(r.is_anchor and r.event.root_key_fingerprint == fingerprint for r in rows):
            # data_keys is under this root key (`KeyWrapper.check`): its anchor went.
            if rows[0].seq != 1 or not rows[0].is_anchor:
                return self._report(*self._walk())  # the first events went: it names them
            return self._report(
                0,
                ChainProblem(
                    rows[-1].seq + 1,
                    "deleted",
                    f"no anchor is under this root key ({fingerprint}): the newest events, "
                    "its anchor among them, were deleted (or a version without key events "
                    "rewrapped the keys)",
                ),
            )
        checked, problem = self._walk()
        if problem is None and expected_head is not None:
            known = {r.event.mac.hex() for r in rows}
            if expected_head not in known:
                problem = ChainProblem(
                    rows[-1].seq + 1,
                    "deleted",
                    "the expected head is no event's mac: the newest events were deleted "
                    "(or the head was recorded from another chain)",
                )
        return self._report(checked, problem)

    def _report(self, checked: int, problem: ChainProblem | None) -> ChainReport:
        verified = self.rows[:checked]
        head = verified[-1].event.mac.hex() if verified else None
        start = verified[0].event if verified else None
        return ChainReport(problem is None, checked, head, problem, start)

    def _find_secrets(self) -> None:
        anchors = [r for r in self.rows if r.is_anchor]
        wrapper = self.log.wrapper
        newer: _Stored | None = None
        for anchor in reversed(anchors):
            secret = None
            if anchor.event.root_key_fingerprint == wrapper.fingerprint and anchor.wrapped_secret:
                try:
                    secret = wrapper.unwrap_with(
                        wrapper.root_key, anchor.wrapped_secret, self.log.context(anchor.seq)
                    )
                except DecryptionError:
                    secret = None
            if secret is None and newer is not None and newer.previous_secret is not None:
                newer_secret = self.secrets.get(newer.seq)
                if newer_secret is not None:
                    secret = _unseal(newer_secret, newer.previous_secret, newer.seq)
            if secret is not None and len(secret) == KEY_BYTES:
                self.secrets[anchor.seq] = secret
            newer = anchor

    def _walk(self) -> tuple[int, ChainProblem | None]:
        """Check every event in order; the number that verified and the first problem."""
        previous = b""
        secret = b""  # of the segment in force
        for position, row in enumerate(self.rows):
            expected = position + 1
            if row.seq < expected:  # only the first can be: seq is the primary key
                return 0, ChainProblem(
                    row.seq, "inserted", f"an event numbered {row.seq}, before the anchor (1)"
                )
            if row.seq != expected:
                missing = f"{expected}" if row.seq == expected + 1 else f"{expected}-{row.seq - 1}"
                return position, ChainProblem(expected, "deleted", f"no event numbered {missing}")
            if position == 0 and not (row.is_anchor and row.previous_secret is None):
                return 0, ChainProblem(1, "deleted", "the first event is not the chain's anchor")
            own = None
            if row.is_anchor:
                own = self.secrets.get(row.seq)
                if own is None:
                    return position, ChainProblem(
                        row.seq, "unknown anchor", "its chain secret does not unwrap or unseal"
                    )
                if position == 0:
                    secret, own = own, None
            mac = _event_mac(secret, row.message(previous), own)
            if not constant_time_equal(mac, row.event.mac):
                return position, self._classify(position, previous, secret)
            if row.is_anchor:
                secret = self.secrets[row.seq]
            previous = row.event.mac
        return len(self.rows), None

    def _classify(self, position: int, previous: bytes, secret: bytes) -> ChainProblem:
        """What became of the event at ``position``, whose mac does not follow
        from ``previous``: the next event tells, checked as if it were at
        another place (within one segment; else "altered")."""
        row = self.rows[position]
        seq = row.seq
        if row.is_anchor:
            own = self.secrets[seq]
            if position == 0 or _unseal(own, row.previous_secret or b"", seq) == secret:
                # Its secret is the chain's: the anchor is genuine, but changed.
                return ChainProblem(seq, "altered", "its fields or its mac do not match")
            return ChainProblem(seq, "unknown anchor", "an anchor the chain does not hold")
        after = self.rows[position + 1] if position + 1 < len(self.rows) else None
        if after is None:
            return ChainProblem(
                seq, "altered", "the newest event does not verify (or was inserted)"
            )

        def verifies(event: _Stored, at: int, before: bytes) -> bool:
            return constant_time_equal(_mac(secret, event.message(before, at)), event.event.mac)

        if not after.is_anchor:
            if verifies(after, after.seq, row.event.mac):
                return ChainProblem(seq, "altered", "its fields do not match its mac")
            if verifies(row, seq + 1, after.event.mac) and verifies(after, seq, previous):
                return ChainProblem(
                    seq, "reordered", f"events {seq} and {seq + 1} exchanged places"
                )
            if verifies(after, seq, previous):
                return ChainProblem(seq, "inserted", "an event the chain does not hold")
            if verifies(after, after.seq + 1, row.event.mac):
                return ChainProblem(
                    seq, "deleted", "an event before it was deleted and the rest renumbered"
                )
        return ChainProblem(seq, "altered", "its mac does not follow from the chain")
