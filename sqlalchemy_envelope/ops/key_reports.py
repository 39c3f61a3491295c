"""Key administration that looks at stored values: the census, the guard
that keeps a key from being destroyed while rows need it, status and
maintenance."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from datetime import timedelta
from functools import partial

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..crypto import format as fmt
from ..errors import KeyInUseError, KeyStateError, RootKeyAccessDeniedError, RootKeyUnavailableError
from ..keys import lifecycle, storage, transactions
from ..keys.admin import KeyAdmin
from ..keys.rootkey import CheckableRootKey
from ..keys.scopes import is_index_scope
from ..keys.storage import KeyRow, KeyState
from . import census
from .census import ColumnCensus, Target
from .open_writers import StaleError, UnreadableError, open_writers
from .status import KeyInfo, MaintenanceReport, RegistryStatus

__all__ = ["census_of", "destroy", "maintenance", "status"]

log = logging.getLogger("sqlalchemy_envelope")


def _max_age(admin: KeyAdmin) -> timedelta:
    return timedelta(seconds=admin.keyring.cache.max_age)


def _all_keys(admin: KeyAdmin) -> dict[int, KeyRow]:
    return {row.id: row for row in admin.store.read(lambda c: storage.all_keys(c, admin.table))}


def _discover(admin: KeyAdmin, conn: Connection) -> list[census.EncryptedColumnRef]:
    """Every column of every table that could hold ciphertext, but the
    library's own: data_keys and its key events (whose anchors hold wrapped
    chain secrets, no value)."""
    own = (admin.table, admin.events.table)
    return census.discover(conn, skip_tables=[(t.schema, t.name) for t in own])


def census_of(
    admin: KeyAdmin, targets: Iterable[Target], scope: str | None = None
) -> list[ColumnCensus]:
    """Rows per data key of the target columns (every defined encrypted column
    by default), counted in SQL from the ciphertext headers."""
    keys = _all_keys(admin)
    with admin.store.connect() as conn:
        counts = [census.count(conn, ref, keys) for ref in census.resolve(conn, targets)]
    if scope is None:
        return counts
    return [replace(c, keys=tuple(k for k in c.keys if k.scope == scope)) for c in counts]


def _census_everywhere(admin: KeyAdmin) -> list[ColumnCensus]:
    """Columns anywhere in the database (models or not) that hold values
    under a data key: what the destroy guard checks, counted the same way."""
    keys = _all_keys(admin)
    with admin.store.connect() as conn:
        counts = [census.count(conn, ref, keys) for ref in _discover(admin, conn)]
    return [c for c in counts if c.keys or c.unknown_key_rows]


def destroy(
    admin: KeyAdmin,
    scope: str,
    version: int,
    *,
    force: bool,
    columns: Iterable[Target],
    reason: str | None = None,
) -> KeyRow:
    """Erase a retired or disabled key's wrapped key, unless rows or writers
    may still need it (``force`` crypto-shreds on purpose, recorded as
    "force_destroy")."""
    row = admin.row(scope, version)
    lifecycle.target_state("destroy", row.state, version, scope)
    guard = None
    if not force and row.state is not KeyState.DESTROYED:
        targets = list(columns)
        if not is_index_scope(scope):  # refused below in any case
            _refuse_open_writers(admin, row, targets)
        guard = partial(_guard_destroy, admin, row, targets)
    after = admin.transition(
        "destroy",
        scope,
        version,
        reason=reason,
        operation="force_destroy" if force else "destroy",
        guard=guard,
    )
    log.warning("destroyed data key version %d of scope %r", version, scope)
    return after


def _named(row: KeyRow) -> str:
    return f"data key version {row.version} of scope {row.scope!r}"


def _quiet_for(admin: KeyAdmin, row: KeyRow) -> timedelta:
    """How long ago the key changed state, refused while caches may still
    use it: other processes could still be writing under it."""
    max_age = _max_age(admin)
    quiet_for = admin.keyring.now() - row.state_changed_at
    if quiet_for < max_age and not is_index_scope(row.scope):
        raise KeyStateError(
            f"{_named(row)} changed state {quiet_for.total_seconds():.0f}s ago; processes "
            f"may still be writing under it until their caches refresh "
            f"({max_age.total_seconds():.0f}s): wait, then take the census again"
        )
    return quiet_for


def _refuse_open_writers(admin: KeyAdmin, row: KeyRow, targets: list[Target]) -> None:
    """Refuse while another transaction that started before every cache had
    refreshed may still commit rows under the key (open_writers.py), before
    the guard's transaction begins: its census then sees what they committed,
    and no transaction able to add to it is left."""
    older_than = (_quiet_for(admin, row) - _max_age(admin)).total_seconds()
    with admin.store.connect() as conn:
        tables: list[tuple[str | None, str]] = []
        if conn.dialect.name == "postgresql":
            tables = [(ref.schema, ref.table) for ref in _refs(admin, conn, targets)]
        try:
            writers = open_writers(conn, admin.table, tables, older_than)
        except UnreadableError as error:
            raise KeyStateError(
                f"{_named(row)}: this database account cannot see other sessions' "
                "transactions, one of which may still write under the key: grant it "
                f"({error.grant}), or destroy the key as an account that has it"
            ) from None
        except StaleError:
            raise KeyStateError(
                f"{_named(row)}: the server did not refresh its list of transactions "
                "(information_schema.innodb_trx), which shows whether one may still write "
                "under the key: something reads it more often than every 0.1 s; destroy "
                "the key again later"
            ) from None
    if writers:
        first = writers[0]
        since = "unknown" if first.started is None else first.started.isoformat(sep=" ")
        where = "" if first.table is None else f", writing to {first.table}"
        raise KeyStateError(
            f"{_named(row)}: a transaction open since {since} (database time; backend "
            f"{first.backend}{where}) may still write under it: wait for it to end, "
            "re-encrypt, then destroy the key again"
        )


def _refs(
    admin: KeyAdmin, conn: Connection, targets: list[Target]
) -> list[census.EncryptedColumnRef]:
    return census.resolve(conn, targets) if targets else _discover(admin, conn)


def _guard_destroy(admin: KeyAdmin, row: KeyRow, targets: list[Target], conn: Connection) -> None:
    """Refuse while rows or writers may still need the key, in the transaction
    that destroys it. It takes the lock of key changes first (the one every
    key change takes first: on SQLite the write lock, so no other transaction
    can write between the census and the change). An index key is always
    refused: the digests of blind indexes and hash_field carry no key id, so
    no count can show that nothing needs it."""
    try:
        storage.lock_table(conn, admin.table)
    except sa.exc.DBAPIError as error:
        if not transactions.is_contention(error):
            raise
        raise KeyStateError(
            f"{_named(row)}: another transaction holds the database's write lock and "
            "may still write under it: wait for it to end, then destroy the key again"
        ) from None
    now = storage.key_by_version(conn, admin.table, row.scope, row.version, for_update=True)
    if now is None or now.state_changed_at != row.state_changed_at:
        raise KeyStateError(f"{_named(row)} changed state meanwhile: destroy it again")
    _quiet_for(admin, now)
    index_key = is_index_scope(row.scope)
    headers = [fmt.header(row.id, version) for version in sorted(fmt.VERSIONS)]
    counts = {
        ref.qualified_name: sum(census.rows_under(conn, ref, h) for h in headers)
        for ref in _refs(admin, conn, targets)
    }
    in_use = {name: n for name, n in counts.items() if n}
    if in_use or index_key:
        raise KeyInUseError(row.version, row.scope, in_use, index_key=index_key)


def status(admin: KeyAdmin, scope: str, *, with_census: bool = False) -> RegistryStatus:
    """A scope's keys, its rotation policy and the root key; with
    ``with_census``, the rows under each key version anywhere in the database."""
    keyring = admin.keyring

    def read(conn: Connection) -> tuple[list[KeyRow], dict[str, int], tuple[int, str | None]]:
        by_root_key = storage.keys_by_fingerprint(conn, admin.table)
        if by_root_key and admin.wrapper.fingerprint not in by_root_key:
            # Not a root key of this table at all: a configuration mistake.
            raise admin.wrapper.wrong_root_key(next(iter(by_root_key)))
        events = admin.events.summary(conn) if admin.events.exists(conn) else (0, None)
        return storage.all_keys(conn, admin.table, scope), by_root_key, events

    rows, by_root_key, (event_count, events_head) = admin.store.read(read)
    active = next((r for r in rows if r.state is KeyState.ACTIVE), None)
    columns = tuple(_census_everywhere(admin)) if with_census else None
    rows_by_version: dict[int, int] | None = None
    if columns is not None:
        by_id = {r.id: r.version for r in rows}
        counts: Counter[int] = Counter()
        for column in columns:
            for key in column.keys:
                if key.key_id in by_id:
                    counts[by_id[key.key_id]] += key.rows
        rows_by_version = dict(counts)
    now = keyring.now()
    policy = keyring.policy
    return RegistryStatus(
        scope=scope,
        active_version=None if active is None else active.version,
        active_key_id=None if active is None else active.id,
        active_age=None if active is None else now - active.created_at,
        active_encryptions=None if active is None else active.encryptions,
        rotation_due=(
            None if active is None else policy.reason(active.created_at, active.encryptions, now)
        ),
        rotate_after=policy.rotate_after,
        max_encryptions=policy.max_encryptions,
        root_key_fingerprint=admin.wrapper.fingerprint,
        root_key_description=admin.wrapper.root_key.description,
        cache_max_age=_max_age(admin),
        keys=tuple(KeyInfo.from_row(r) for r in rows),
        keys_by_state=dict(Counter(r.state.value for r in rows)),
        root_key_problem=_root_key_problem(admin),
        cached_keys=len(keyring.cache.by_header),
        rows_by_version=rows_by_version,
        columns=columns,
        keys_by_root_key=by_root_key,
        events=event_count,
        events_head=events_head,
    )


def _root_key_problem(admin: KeyAdmin) -> str | None:
    root_key = admin.wrapper.root_key
    if not isinstance(root_key, CheckableRootKey):
        return None
    try:
        root_key.check()
    except (RootKeyUnavailableError, RootKeyAccessDeniedError) as error:
        return str(error)
    return None


def maintenance(admin: KeyAdmin, scope: str) -> MaintenanceReport:
    """Rotate if the policy says so, and report which old keys no row needs
    any more. Deletes nothing."""
    due = status(admin, scope)
    rotated = None
    if due.rotation_due is not None and due.active_key_id is not None:
        new = admin.rotate_if(scope, due.active_key_id, operation="rotate_by_policy")
        rotated = None if new is None else KeyInfo.from_row(new)
    current = status(admin, scope, with_census=True)
    referenced = current.rows_by_version or {}
    now = admin.keyring.now()
    max_age = _max_age(admin)
    destroyable = tuple(
        key.version
        for key in current.keys
        if key.state in (KeyState.RETIRED, KeyState.DISABLED)
        and not referenced.get(key.version)
        and now - key.state_changed_at >= max_age
    )
    if is_index_scope(scope):  # no count clears an index key (see _guard_destroy)
        destroyable = ()
    still_referenced = {
        key.version: referenced[key.version]
        for key in current.keys
        if key.state in (KeyState.RETIRED, KeyState.DISABLED) and referenced.get(key.version)
    }
    return MaintenanceReport(
        scope=scope,
        rotated=rotated,
        rotation_reason=due.rotation_due if rotated is not None else None,
        destroyable=destroyable,
        still_referenced=still_referenced,
    )
