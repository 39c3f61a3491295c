"""The key events: every change to data_keys records one event per scope it
touches, in its own transaction, and nothing else does; the events form a
hash chain that `verify_events` walks with the root key alone, and that
detects every kind of tampering; no event holds a secret."""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, encrypted_table, stored_bytes
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from format_md import format_vectors
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    SCOPE_OPTION,
    ConfigurationError,
    KeyEventsTamperedError,
    KeyRegistry,
    PBKDF2RootKey,
    StaticRootKey,
    WrongRootKeyError,
)
from sqlalchemy_envelope.keys.rootkey import canonical_json

EVENTS = "data_key_events"


def summary(registry: KeyRegistry, **options: Any) -> list[tuple[Any, ...]]:
    """The events as (operation, scope, versions, outcome, reason)."""
    return [
        (e.operation, e.scope, e.versions, e.outcome, e.reason) for e in registry.events(**options)
    ]


def write_and_read(engine: sa.Engine, notes: sa.Table, start: int, scope: str | None) -> None:
    """Encrypt and decrypt through Connection and Session, each statement twice."""
    options = {} if scope is None else {SCOPE_OPTION: scope}
    for i in range(2):
        with engine.begin() as conn:
            conn.execute(
                notes.insert(), {"id": start + i, "body": "secret"}, execution_options=options
            )
        with Session(engine) as session:
            session.execute(
                notes.insert(), {"id": start + 10 + i, "body": "secret"}, execution_options=options
            )
            session.commit()
    mine = sa.select(notes.c.body).where(notes.c.id.between(start, start + 19))
    for _ in range(2):
        with engine.connect() as conn:
            assert conn.execute(mine).scalars().all() == ["secret"] * 4
        with Session(engine) as session:
            assert session.scalars(mine).all() == ["secret"] * 4


def test_every_change_records_its_event_and_nothing_else(engine: sa.Engine, clocks: Clocks) -> None:
    root = StaticRootKey(os.urandom(32))
    registry = KeyRegistry(
        engine,
        root,
        actor="billing-service",
        rotate_after=timedelta(days=30),
        max_encryptions=1_000_000,
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init(reason="first deployment")
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    expected: list[tuple[Any, ...]] = [
        ("anchor", None, None, "chain started", None),
        ("init", "default", "1", "created", "first deployment"),
        ("init", "~index:default", "1", "created", "first deployment"),
    ]
    assert summary(registry) == expected
    registry.init()  # nothing to do: no event
    write_and_read(engine, notes, 0, None)  # encryptions claimed: no event
    assert summary(registry) == expected

    registry.create_scope("acme", reason="new tenant")
    expected += [
        ("create_scope", "acme", "1", "created", "new tenant"),
        ("create_scope", "~index:acme", "1", "created", "new tenant"),
    ]
    write_and_read(engine, notes, 100, "globex")  # a tenant created on first use
    expected += [
        ("create_on_first_use", "globex", "1", "created", None),
        ("create_on_first_use", "~index:globex", "1", "created", None),
    ]
    assert summary(registry) == expected

    registry.rotate(reason="quarterly")
    registry.rotate("~index:acme", reason="index key rotation")
    expected += [
        ("rotate", "default", "1->2", "rotated", "quarterly"),
        ("rotate_index", "~index:acme", "1->2", "rotated", "index key rotation"),
    ]
    clocks.advance(timedelta(days=31))
    write_and_read(engine, notes, 200, None)  # due by age: the encrypt path rotates
    expected.append(("rotate_by_policy", "default", "2->3", "rotated", None))
    assert summary(registry) == expected

    registry.retire(3, reason="suspected leak")  # the active key: rotates
    registry.retire(1)  # retired already: no change, no event
    registry.disable(1, reason="investigation")
    registry.disable(1)  # no change
    registry.enable(1, reason="cleared")
    registry.disable(2)
    registry.destroy(2, force=True, reason="crypto-shred v2")
    registry.destroy(2, force=True)  # destroyed already: no event
    expected += [
        ("retire", "default", "3->4", "rotated", "suspected leak"),
        ("disable", "default", "1", "retired->disabled", "investigation"),
        ("enable", "default", "1", "disabled->retired", "cleared"),
        ("disable", "default", "2", "retired->disabled", None),
        ("force_destroy", "default", "2", "disabled->destroyed", "crypto-shred v2"),
    ]
    assert summary(registry) == expected

    clocks.advance(timedelta(days=1))
    registry.maintenance()  # not due: no event
    registry.disable(1, "~index:acme", force=True)
    registry.destroy(1, "~index:acme", force=True)
    expected += [
        ("disable", "~index:acme", "1", "retired->disabled", None),
        ("force_destroy", "~index:acme", "1", "disabled->destroyed", None),
    ]
    registry.shred("globex", reason="customer left")
    registry.create_scope("globex", reason="customer back")
    expected += [
        ("shred", "globex", "1", "destroyed", "customer left"),
        ("shred", "~index:globex", "1", "destroyed", "customer left"),
        ("create_scope", "globex", "2", "created", "customer back"),
        (
            "create_scope",
            "~index:globex",
            "1",
            "destroyed keys renumbered below 0",
            "customer back",
        ),
        ("create_scope", "~index:globex", "1", "created", "customer back"),
    ]
    clocks.advance(timedelta(days=31))
    report = registry.maintenance("acme")  # due: rotated by the policy
    assert report.rotated is not None
    expected.append(("rotate_by_policy", "acme", "1->2", "rotated", None))
    assert summary(registry) == expected

    new_root = StaticRootKey(os.urandom(32))
    count = registry.rewrap(new_root, reason="yearly root key rotation")
    assert count == 9
    expected += [
        (
            "rewrap",
            None,
            None,
            f"re-wrapped {count} keys under root key {new_root.fingerprint}",
            "yearly root key rotation",
        ),
        (
            "anchor",
            None,
            None,
            f"chain re-anchored under {new_root.fingerprint}",
            "yearly root key rotation",
        ),
    ]
    registry.rotate()
    expected.append(("rotate", "default", "4->5", "rotated", None))
    write_and_read(engine, notes, 300, "acme")
    assert summary(registry) == expected

    events = registry.events()
    assert [e.seq for e in events] == list(range(1, len(expected) + 1))
    assert {e.actor for e in events} == {"billing-service"}
    assert events[-1].root_key_fingerprint == new_root.fingerprint
    assert events[0].root_key_fingerprint == root.fingerprint
    assert all(e.occurred_at.tzinfo is not None for e in events)
    # Reading: a scope's events include its index scope's; since; the newest N.
    assert [e.operation for e in registry.events("globex")] == [
        "create_on_first_use",
        "create_on_first_use",
        "shred",
        "shred",
        "create_scope",
        "create_scope",
        "create_scope",
    ]
    assert [e.scope for e in registry.events("~index:acme")] == ["~index:acme"] * 4
    assert registry.events(limit=2) == events[-2:]
    assert registry.events(since=clocks.now()) == events[-4:]
    report = registry.verify_events()
    assert (report.ok, report.events, report.problem) == (True, len(expected), None)
    assert report.head == events[-1].mac.hex()
    status = registry.status()
    assert (status.events, status.events_head) == (len(expected), report.head)
    assert status.to_dict()["events_head"] == report.head
    registry.close()

    # Another process, with the new root key only, reads and verifies the
    # whole history, the part under the old root key included.
    other = KeyRegistry(sa.create_engine(engine.url), new_root)
    assert other.verify_events(expected_head=report.head).ok
    other.close()


def test_the_default_actor_is_user_at_host_and_pid(registry: KeyRegistry) -> None:
    (event,) = registry.events(limit=1)
    assert event.actor == f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    assert registry.verify_events().ok


def test_reason_and_actor_are_checked(engine: sa.Engine, root_key: StaticRootKey) -> None:
    with pytest.raises(ConfigurationError, match="actor is longer than 200"):
        KeyRegistry(engine, root_key, actor="x" * 201)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    for bad, message in [
        ("two\nlines", "printable text on one line"),
        ("x" * 1001, "longer than 1000"),
        (b"bytes", "must be a str"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            registry.rotate(reason=bad)  # type: ignore[arg-type]
    assert [e.operation for e in registry.events()] == ["anchor", "init", "init"]
    assert [k.version for k in registry.status().keys] == [1]  # nothing rotated
    registry.rotate(reason="Ünïcode, quotes \"' and emoji 🔑 ok")
    assert registry.events()[-1].reason == "Ünïcode, quotes \"' and emoji 🔑 ok"
    assert registry.verify_events().ok
    registry.close()


def _fail_event_inserts(engine: sa.Engine) -> None:
    """Make every insert into the events table fail, as a statement of the
    transaction that comes after the key's own."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER no_events BEFORE INSERT ON {EVENTS} "
                "BEGIN INSERT INTO events_refused VALUES (1); END"
            )
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION no_events() RETURNS trigger AS "
                "$$ BEGIN RAISE EXCEPTION 'events refused'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER no_events BEFORE INSERT ON {EVENTS} "
                "FOR EACH ROW EXECUTE FUNCTION no_events()"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE TRIGGER no_events BEFORE INSERT ON {EVENTS} FOR EACH ROW "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'events refused'"
            )


def _rows(engine: sa.Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1")]


def test_a_change_whose_event_fails_is_not_made(engine: sa.Engine, root_key: StaticRootKey) -> None:
    registry = KeyRegistry(engine, root_key)
    registry.init()
    registry.create_scope("acme")
    registry.rotate()
    keys, events = _rows(engine, "data_keys"), _rows(engine, EVENTS)
    _fail_event_inserts(engine)
    changes = [
        lambda: registry.rotate(reason="x"),
        lambda: registry.rotate("~index:acme"),
        lambda: registry.retire(2),
        lambda: registry.disable(1),
        lambda: registry.destroy(1, force=True),
        lambda: registry.shred("acme"),
        lambda: registry.create_scope("globex"),
        lambda: registry.rewrap(StaticRootKey(os.urandom(32))),
    ]
    for change in changes:
        with pytest.raises(sa.exc.DBAPIError, match=r"events refused|events_refused"):
            change()
        assert _rows(engine, "data_keys") == keys
        assert _rows(engine, EVENTS) == events
    registry.close()


def _wait_for(query: str, engine: sa.Engine) -> Any:
    """The first value ``query`` returns, once it returns one (a minute at most)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(query).scalar()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"nothing from {query}")


def test_a_connection_killed_mid_rotation_leaves_no_key_and_no_event(
    server_url: str, root_key: StaticRootKey
) -> None:
    """The rotation's key row is written, its event waits for a lock; the
    connection is killed from another one: neither stays."""
    engine = sa.create_engine(server_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    keys, events = _rows(engine, "data_keys"), _rows(engine, EVENTS)
    postgres = engine.dialect.name == "postgresql"
    outcome: list[BaseException] = []

    def rotate() -> None:
        try:
            registry.rotate(reason="killed")
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=rotate)
    with engine.connect() as blocker, blocker.begin() as transaction:
        if postgres:  # lets the rotation read the head, not insert its event
            blocker.exec_driver_sql(f"LOCK TABLE {EVENTS} IN EXCLUSIVE MODE")
        else:  # the head is read FOR UPDATE there
            blocker.exec_driver_sql(f"SELECT seq FROM {EVENTS} FOR UPDATE").all()
        thread.start()
        try:
            if postgres:
                waiting = _wait_for(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    f"AND query LIKE 'INSERT INTO {EVENTS}%%'",
                    engine,
                )
                with engine.connect() as conn:
                    # The key row is written: the rotation is mid-way.
                    assert conn.exec_driver_sql(
                        f"SELECT count(*) FROM pg_locks WHERE pid = {waiting} AND granted "
                        "AND relation = 'data_keys'::regclass AND mode = 'RowExclusiveLock'"
                    ).scalar()
                    conn.exec_driver_sql(f"SELECT pg_terminate_backend({waiting})")
            else:
                waiting = _wait_for(
                    "SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX "
                    "WHERE trx_state = 'LOCK WAIT' AND trx_rows_modified > 0",
                    engine,
                )
                with engine.connect() as conn:
                    conn.exec_driver_sql(f"KILL {int(waiting)}")
        finally:
            transaction.rollback()
            thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], sa.exc.DBAPIError)
    assert _rows(engine, "data_keys") == keys
    assert _rows(engine, EVENTS) == events
    registry.rotate(reason="again")  # the registry goes on, on a new connection
    assert [e.reason for e in registry.events()][-1:] == ["again"]
    assert registry.verify_events().ok
    registry.close()
    engine.dispose()


_ROTATOR = r"""
import sys
import sqlalchemy as sa
from sqlalchemy_envelope import KeyRegistry, StaticRootKey
engine = sa.create_engine(sys.argv[1])
registry = KeyRegistry(engine, StaticRootKey(bytes.fromhex(sys.argv[2])), actor=sys.argv[3])
for i in range(int(sys.argv[4])):
    registry.rotate(reason=f"{sys.argv[3]} #{i}")
registry.close()
"""


def test_eight_processes_rotating_make_one_chain(db_url: str) -> None:
    raw = os.urandom(32)
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(raw))
    registry.init()
    rotations = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ROTATOR, db_url, raw.hex(), f"worker-{n}", str(rotations)],
            stderr=subprocess.PIPE,
        )
        for n in range(8)
    ]
    for proc in procs:
        assert proc.wait(300) == 0, proc.stderr.read() if proc.stderr else ""
    events = registry.events()
    assert [e.seq for e in events] == list(range(1, 4 + 8 * rotations))
    rotates = [e for e in events if e.operation == "rotate"]
    assert len(rotates) == 8 * rotations
    # Each rotation retired the key the one before it made: one line of versions.
    assert [e.versions for e in rotates] == [f"{v}->{v + 1}" for v in range(1, 8 * rotations + 1)]
    assert sorted(e.reason for e in rotates) == sorted(
        f"worker-{n} #{i}" for n in range(8) for i in range(rotations)
    )
    report = registry.verify_events()
    assert (report.ok, report.events) == (True, len(events))
    registry.close()
    engine.dispose()


# -- tampering -----------------------------------------------------------------


@pytest.fixture
def chain(engine: sa.Engine, root_key: StaticRootKey) -> Any:
    """A registry with a chain of 12 events, and the table's rows to restore."""
    registry = KeyRegistry(engine, root_key, actor="ops")
    registry.init()
    for i in range(9):
        registry.rotate(reason=f"rotation {i}")
    assert len(registry.events()) == 12
    yield registry
    registry.close()


def _events(engine: sa.Engine) -> sa.Table:
    return sa.Table(EVENTS, sa.MetaData(), autoload_with=engine)


def _update(engine: sa.Engine, where: int, **values: Any) -> None:
    """Change the event numbered ``where``."""
    table = _events(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.seq == where).values(**values))


def _problem(registry: KeyRegistry, expected_head: str | None = None) -> tuple[int, str]:
    report = registry.verify_events(expected_head)
    assert not report.ok and report.problem is not None
    assert report.events == report.problem.seq - 1 or report.problem.seq > report.events
    return report.problem.seq, report.problem.kind


def test_an_altered_field_is_detected(chain: KeyRegistry, engine: sa.Engine) -> None:
    for field, value in [
        ("reason", "nothing to see"),
        ("actor", "someone else"),
        ("operation", "enable"),
        ("versions", "1->9"),
        ("scope", "acme"),
        ("outcome", "created"),
        ("root_key_fingerprint", "0" * 16),
    ]:
        original = chain.events()[5]
        _update(engine, 6, **{field: value})
        assert _problem(chain) == (6, "altered"), field
        _update(engine, 6, **{field: getattr(original, field)})
        assert chain.verify_events().ok
    original_time = chain.events()[5].occurred_at
    _update(engine, 6, occurred_at=original_time + timedelta(seconds=1))
    assert _problem(chain) == (6, "altered")


def test_an_altered_mac_is_detected(chain: KeyRegistry, engine: sa.Engine) -> None:
    mac = chain.events()[7].mac
    _update(engine, 8, mac=bytes([mac[0] ^ 1]) + mac[1:])
    assert _problem(chain) == (8, "altered")
    _update(engine, 8, mac=mac)
    assert chain.verify_events().ok
    # The newest event's too.
    newest = chain.events()[-1]
    _update(engine, newest.seq, mac=b"\x00" * 32)
    assert _problem(chain) == (newest.seq, "altered")


def _renumber(engine: sa.Engine, start: int, delta: int) -> None:
    """Move every event from ``start`` on by ``delta`` places (in an order
    the primary key allows)."""
    table = _events(engine)
    with engine.begin() as conn:
        seqs = conn.execute(sa.select(table.c.seq).where(table.c.seq >= start)).scalars().all()
        for seq in sorted(seqs, reverse=delta > 0):
            conn.execute(sa.update(table).where(table.c.seq == seq).values(seq=seq + delta))


def test_an_inserted_event_is_detected(chain: KeyRegistry, engine: sa.Engine) -> None:
    table = _events(engine)
    with engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.seq == 5)).mappings().one()
    _renumber(engine, 6, +1)  # make room at 6 for a forged event
    with engine.begin() as conn:
        conn.execute(sa.insert(table).values({**row, "seq": 6, "reason": "forged"}))
    assert _problem(chain) == (6, "inserted")
    # Also appended after the newest.
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(table.c.seq == 6))
    _renumber(engine, 7, -1)
    assert chain.verify_events().ok
    with engine.begin() as conn:
        conn.execute(sa.insert(table).values({**row, "seq": 13, "reason": "forged"}))
    assert _problem(chain)[0] == 13


def test_a_deleted_event_is_detected(chain: KeyRegistry, engine: sa.Engine) -> None:
    table = _events(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(table.c.seq == 7))
    assert _problem(chain) == (7, "deleted")
    _renumber(engine, 8, -1)  # the gap closed
    assert _problem(chain) == (7, "deleted")
    with engine.begin() as conn:  # the oldest ones, the anchor included
        conn.execute(sa.delete(table).where(table.c.seq <= 2))
    assert _problem(chain) == (1, "deleted")


def test_reordered_events_are_detected(chain: KeyRegistry, engine: sa.Engine) -> None:
    _renumber(engine, 5, 100)
    _update(engine, 105, seq=6)
    _update(engine, 106, seq=5)
    _renumber(engine, 107, -100)
    assert _problem(chain) == (5, "reordered")


def test_deleting_the_newest_events_is_detected_with_the_recorded_head(
    chain: KeyRegistry, engine: sa.Engine
) -> None:
    head = chain.status().events_head
    assert head == chain.verify_events().head
    chain.rotate()  # events after the recorded head are fine
    assert chain.verify_events(expected_head=head).ok
    table = _events(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(table.c.seq >= 12))
    assert chain.verify_events().ok  # undetectable without a recorded head...
    assert _problem(chain, expected_head=head) == (12, "deleted")  # ...detected with it
    with engine.begin() as conn:
        conn.execute(sa.delete(table))
    assert _problem(chain) == (1, "deleted")  # data_keys holds keys, the events are gone


def test_deleted_events_are_never_restarted_silently(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """After every event is deleted, no key change (by hand, init() at an
    application's start, a policy rotation, a tenant created on first use)
    starts a new chain over the keys: each is refused, typed, with nothing
    written, until the chain is started on purpose, which verify shows."""
    registry = KeyRegistry(
        engine,
        root_key,
        actor="ops",
        rotate_after=timedelta(days=30),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init()
    registry.rotate(reason="CHG-1")
    registry.disable(1, reason="who did this?")
    recorded = registry.verify_events().head
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(_events(engine)))
    keys = _rows(engine, "data_keys")
    clocks.advance(timedelta(days=31))  # the policy's rotation is due
    changes = [
        lambda: registry.rotate(reason="routine"),
        registry.init,
        lambda: registry.create_scope("acme"),
        lambda: registry.enable(1),
        lambda: registry.rewrap(StaticRootKey(os.urandom(32))),
    ]
    for change in changes:
        for _ in range(2):
            with pytest.raises(KeyEventsTamperedError, match="'data_keys' holds 3 keys"):
                change()
    for scope in (None, "globex"):  # the encrypt path: by policy, on first use
        options = {} if scope is None else {SCOPE_OPTION: scope}
        for _ in range(2):
            with pytest.raises(KeyEventsTamperedError), engine.begin() as conn:
                conn.execute(notes.insert(), {"id": 1, "body": "x"}, execution_options=options)
            with pytest.raises(KeyEventsTamperedError), Session(engine) as session:
                session.execute(notes.insert(), {"id": 2, "body": "x"}, execution_options=options)
                session.commit()
    assert _rows(engine, "data_keys") == keys and registry.events() == []
    assert _problem(registry) == (1, "deleted")
    anchor = registry.start_events(reason="events deleted by mistake, INC-7")
    assert (anchor.outcome, anchor.actor) == ("chain started over 3 existing keys", "ops")
    report = registry.verify_events()
    assert report.ok and report.start == anchor  # an auditor sees the restart
    assert _problem(registry, expected_head=recorded) == (2, "deleted")
    registry.rotate(reason="routine")
    assert registry.verify_events().ok
    registry.close()


def test_a_forged_anchor_is_detected(
    chain: KeyRegistry, engine: sa.Engine, root_key: StaticRootKey
) -> None:
    """Even by someone who may wrap under the root key (a KMS's Encrypt
    right) but not unwrap: an anchor they make has a secret of their own,
    and its mac must be made under the chain's."""
    table = _events(engine)
    with engine.connect() as conn:
        anchor = conn.execute(sa.select(table).where(table.c.seq == 1)).mappings().one()
    context = {"key_id": "13", "kind": "key-events", "scope": EVENTS, "version": "1"}
    forged = {
        **anchor,
        "seq": 13,
        "wrapped_secret": root_key.wrap(os.urandom(32), context),
        "previous_secret": os.urandom(60),
    }
    with engine.begin() as conn:
        conn.execute(sa.insert(table).values(forged))
    assert _problem(chain) == (13, "unknown anchor")
    with pytest.raises(KeyEventsTamperedError, match="anchor"):
        chain.rotate()  # nothing is chained onto it
    # One whose secret does not unwrap at all.
    _update(engine, 13, wrapped_secret=os.urandom(60))
    assert _problem(chain) == (13, "unknown anchor")
    # The first anchor altered.
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(table.c.seq == 13))
    _update(engine, 1, wrapped_secret=anchor["wrapped_secret"][:-1] + b"\x00")
    assert _problem(chain) == (1, "unknown anchor")


def _old_mac(secret: bytes, row: sa.RowMapping, previous_mac: bytes) -> bytes:
    """The mac FORMAT.md section 12 gives ``row`` under the chain secret
    ``secret`` (as a first anchor's or any other event's)."""
    when = row["occurred_at"]
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    fields = {
        "seq": str(row["seq"]),
        "occurred_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "operation": row["operation"],
        "scope": row["scope"],
        "versions": row["versions"],
        "outcome": row["outcome"],
        "actor": row["actor"],
        "root_key_fingerprint": row["root_key_fingerprint"],
        "reason": row["reason"],
        "wrapped_secret": row["wrapped_secret"] and bytes(row["wrapped_secret"]).hex(),
        "previous_secret": row["previous_secret"] and bytes(row["previous_secret"]).hex(),
    }
    present = {k: v for k, v in fields.items() if v is not None}
    mac_key = HKDF(hashes.SHA256(), 32, None, b"sqlalchemy-envelope/key-events/v1").derive(secret)
    message = b"sqlalchemy-envelope/key-event/v1\x00" + canonical_json(present) + previous_mac
    return hmac.new(mac_key, message, hashlib.sha256).digest()


def _old_chain_secret(engine: sa.Engine, old: StaticRootKey) -> bytes:
    """The first chain secret, as the holder of the old root key opens it."""
    table = _events(engine)
    with engine.connect() as conn:
        first = conn.execute(sa.select(table).where(table.c.seq == 1)).mappings().one()
    context = {"key_id": "1", "kind": "key-events", "scope": EVENTS, "version": "1"}
    return old.unwrap(first["wrapped_secret"], context)


def test_a_rewrap_re_anchors_so_the_old_root_key_cannot_rewrite_history(
    engine: sa.Engine,
) -> None:
    """After a rewrap, the whole history verifies with the new root key; the
    old root key opens the old chain secret, but an event rewritten with it
    breaks the re-anchor's link."""
    old, new = StaticRootKey(os.urandom(32)), StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, old)
    registry.init()
    registry.rotate(reason="before")
    registry.rewrap(new)
    registry.rotate(reason="after")
    assert registry.verify_events().ok
    secret = _old_chain_secret(engine, old)
    table = _events(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).order_by(table.c.seq)).mappings().all()
    # Rewrite event 4 ("before") with a valid mac under the old chain secret.
    row = {**rows[3], "reason": "rewritten"}
    _update(engine, 4, reason="rewritten", mac=_old_mac(secret, row, rows[2]["mac"]))
    report = registry.verify_events()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (5, "altered")  # the rewrap event
    registry.close()


def test_the_old_root_key_cannot_rewrite_history_up_to_the_newest_re_anchor(
    engine: sa.Engine,
) -> None:
    """While the re-anchor is the newest event, the old root key's holder
    re-macs every event up to it, the re-anchor included: its mac is also
    under the new chain secret, which the old root key never opens."""
    old, new = StaticRootKey(os.urandom(32)), StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, old, actor="ops")
    registry.init()
    registry.rotate()
    registry.disable(1, reason="real reason")
    registry.rewrap(new, reason="root key rotation")
    assert registry.verify_events().ok
    secret = _old_chain_secret(engine, old)
    table = _events(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).order_by(table.c.seq)).mappings().all()
    assert rows[-1]["operation"] == "anchor"
    previous = b""
    for stored in rows:
        row = dict(stored)
        if row["operation"] == "disable":
            row.update(actor="intern", reason="forged reason")
        mac = _old_mac(secret, row, previous)
        _update(engine, row["seq"], actor=row["actor"], reason=row["reason"], mac=mac)
        previous = mac
    # The re-anchor's own secret unwraps, its mac no longer holds: altered.
    assert _problem(registry) == (rows[-1]["seq"], "altered")
    for _ in range(2):
        with pytest.raises(KeyEventsTamperedError):
            registry.rotate()
    registry.close()


def test_a_whole_chain_forged_by_whoever_may_wrap_is_caught_by_the_recorded_head(
    chain: KeyRegistry, engine: sa.Engine, root_key: StaticRootKey
) -> None:
    """Whoever may wrap under the root key (never unwrapping) and write the
    table replaces the whole chain with one of its own: a new first anchor,
    every event re-made under its secret. It verifies, as SECURITY.md says;
    only the head recorded before shows it."""
    recorded = chain.verify_events().head
    table = _events(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).order_by(table.c.seq)).mappings().all()
    secret = os.urandom(32)
    context = {"key_id": "1", "kind": "key-events", "scope": EVENTS, "version": "1"}
    previous = b""
    for stored in rows:
        row = dict(stored)
        if row["seq"] == 1:
            row["wrapped_secret"] = root_key.wrap(secret, context)
        elif row["operation"] == "rotate":
            row["reason"] = "forged"
        row["mac"] = previous = _old_mac(secret, row, previous)
        _update(engine, row["seq"], **{k: v for k, v in row.items() if k != "seq"})
    assert chain.verify_events().ok
    assert _problem(chain, expected_head=recorded) == (13, "deleted")


def test_another_root_key_cannot_verify(registry: KeyRegistry, engine: sa.Engine) -> None:
    other = KeyRegistry(engine, StaticRootKey(os.urandom(32)), attach=False)
    with pytest.raises(WrongRootKeyError):
        other.verify_events()
    with pytest.raises(WrongRootKeyError):
        other.rotate()
    other.close()
    assert registry.verify_events().ok


def test_no_secret_and_no_plaintext_in_any_event(db_url: str, clocks: Clocks) -> None:
    engine = sa.create_engine(db_url)
    seed, salt = os.urandom(32).hex(), "salt-of-the-test"
    root = PBKDF2RootKey(seed, salt)
    raw_new = os.urandom(32)
    registry = KeyRegistry(engine, root, actor="svc")
    registry.init(reason="setup")
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    plaintext = "patient 4711 has the flu"
    registry.create_scope("acme")
    with engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 1, "body": plaintext})
        conn.execute(
            notes.insert(), {"id": 2, "body": plaintext}, execution_options={SCOPE_OPTION: "acme"}
        )
    registry.rotate()
    registry.shred("acme")
    registry.rewrap(StaticRootKey(raw_new))
    registry.rotate()
    # Every secret there is: the root keys, the seed, the data and index keys,
    # the chain secrets; and the value encrypted.
    secrets = [seed.encode(), bytes.fromhex(seed), raw_new, plaintext.encode()]
    keys = sa.Table("data_keys", sa.MetaData(), autoload_with=engine)
    new_root = StaticRootKey(raw_new)
    with engine.connect() as conn:
        for row in conn.execute(sa.select(keys).where(keys.c.wrapped_key.is_not(None))).mappings():
            context = {
                "key_id": str(row["id"]),
                "kind": "index" if row["scope"].startswith("~index:") else "data",
                "scope": row["scope"],
                "version": str(row["version"]),
            }
            secrets.append(new_root.unwrap(bytes(row["wrapped_key"]), context))
    table = _events(engine)
    with engine.connect() as conn:
        anchors = (
            conn.execute(
                sa.select(table).where(table.c.operation == "anchor").order_by(table.c.seq)
            )
            .mappings()
            .all()
        )
    newest = anchors[-1]
    chain_secret = new_root.unwrap(
        bytes(newest["wrapped_secret"]),
        {"key_id": str(newest["seq"]), "kind": "key-events", "scope": EVENTS, "version": "1"},
    )
    secrets.append(chain_secret)
    assert len(secrets) >= 8
    dump = stored_bytes(engine, EVENTS)
    for secret in secrets:
        assert secret not in dump
        assert secret.hex().encode() not in dump
    for event in registry.events():
        text = repr(event) + str(event.to_dict())
        for secret in secrets:
            assert secret.hex() not in text
    assert plaintext not in repr(registry.events())
    registry.close()
    engine.dispose()


# -- the command line ------------------------------------------------------------


def _cli(db_url: str, root: bytes, *args: str, code: int = 0, **env: str) -> Any:
    """`sqlalchemy-envelope ARGS` as an operator runs it; its stdout and stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", *args],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": db_url,
            "ENVELOPE_ROOT_KEY": base64.b64encode(root).decode(),
            **env,
        },
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == code, (args, result.stdout, result.stderr)
    return result.stdout, result.stderr


def test_the_events_commands(db_url: str) -> None:
    raw, raw_new = os.urandom(32), os.urandom(32)
    _cli(db_url, raw, "init", "--reason", "first deployment")
    _cli(db_url, raw, "--scope", "acme", "init")
    _cli(db_url, raw, "rotate", "--reason", "yearly")
    _cli(db_url, raw, "--scope", "acme", "rotate")
    _cli(db_url, raw, "retire", "1", "--reason", "old")
    _cli(db_url, raw, "disable", "1", "--reason", "suspect")
    _cli(db_url, raw, "enable", "1", "--reason", "cleared")
    _cli(db_url, raw, "destroy", "1", "--force", "--reason", "shred v1")
    _cli(db_url, raw, "shred", "acme", "--yes", "--reason", "contract ended")
    _cli(
        db_url,
        raw,
        "rewrap",
        "--reason",
        "new root key",
        ENVELOPE_NEW_ROOT_KEY=base64.b64encode(raw_new).decode(),
    )
    _cli(db_url, raw_new, "rotate")
    listed = json.loads(_cli(db_url, raw_new, "events", "--json")[0])["events"]
    assert [(e["operation"], e["scope"], e["reason"]) for e in listed] == [
        ("anchor", None, None),
        ("init", "default", "first deployment"),
        ("init", "~index:default", "first deployment"),
        ("init", "acme", None),
        ("init", "~index:acme", None),
        ("rotate", "default", "yearly"),
        ("rotate", "acme", None),
        ("disable", "default", "suspect"),
        ("enable", "default", "cleared"),
        ("force_destroy", "default", "shred v1"),
        ("shred", "acme", "contract ended"),
        ("shred", "~index:acme", "contract ended"),
        ("rewrap", None, "new root key"),
        ("anchor", None, "new root key"),
        ("rotate", "default", None),
    ]
    assert [e["seq"] for e in listed] == list(range(1, 16))
    # --scope (its index scope's too), --limit, --since, global options after.
    acme = json.loads(_cli(db_url, raw_new, "events", "--scope", "acme", "--json")[0])
    assert [e["seq"] for e in acme["events"]] == [4, 5, 7, 11, 12]
    newest = json.loads(_cli(db_url, raw_new, "events", "--limit", "2", "--json")[0])
    assert [e["seq"] for e in newest["events"]] == [14, 15]
    later = json.loads(_cli(db_url, raw_new, "events", "--since", "2999-01-01", "--json")[0])
    assert later == {"events": []}
    text = _cli(db_url, raw_new, "events")[0].splitlines()
    assert len(text) == 15 and "rotate" in text[5] and "reason: yearly" in text[5]

    report = json.loads(_cli(db_url, raw_new, "events", "verify", "--json")[0])
    assert report["ok"] is True and report["events"] == 15 and report["problem"] is None
    status = json.loads(_cli(db_url, raw_new, "status", "--json")[0])
    assert (status["events"], status["events_head"]) == (15, report["head"])
    assert f"chain head {report['head']}" in _cli(db_url, raw_new, "status")[0]
    out, _ = _cli(db_url, raw_new, "events", "verify", "--expected-head", report["head"])
    assert f"15 events, chain head {report['head']}" in out
    # A broken chain: exit 1, one line naming the first bad event.
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {EVENTS} SET reason = 'nothing' WHERE seq = 6"))
    out, err = _cli(db_url, raw_new, "events", "verify", code=1)
    assert out == ""
    assert err.strip().splitlines() == [
        "error: the key events chain is broken at seq 6: altered (its fields do not match "
        "its mac); the 5 events before it verify"
    ]
    out, err = _cli(db_url, raw_new, "--json", "events", "verify", code=1)
    assert json.loads(out)["problem"] == {
        "seq": 6,
        "kind": "altered",
        "detail": "its fields do not match its mac",
    }
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {EVENTS} SET reason = 'yearly' WHERE seq = 6"))
        conn.execute(sa.text(f"DELETE FROM {EVENTS} WHERE seq = 15"))
    _cli(db_url, raw_new, "events", "verify")  # the newest deleted: unseen without a head
    _, err = _cli(db_url, raw_new, "events", "verify", "--expected-head", report["head"], code=1)
    assert "broken at seq 15: deleted" in err
    with engine.begin() as conn:  # the re-anchor too: seen even without a head
        conn.execute(sa.text(f"DELETE FROM {EVENTS} WHERE seq = 14"))
    _, err = _cli(db_url, raw_new, "events", "verify", code=1)
    assert "broken at seq 14: deleted (no anchor is under this root key" in err
    # The old root key no longer verifies: a configuration error, in one line.
    _, err = _cli(db_url, raw, "events", "verify", code=1)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    _, err = _cli(db_url, raw_new, "events", "--since", "yesterday", code=2)
    assert "--since takes an ISO 8601 time" in err
    engine.dispose()


# -- databases of earlier versions, Alembic, asyncio -------------------------------


def test_a_database_of_an_earlier_version_starts_its_events_on_purpose(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    """init() creates the table but starts no chain over existing keys: an
    empty table beside keys may be one whose events were deleted."""
    registry = KeyRegistry(engine, root_key)
    registry.init()
    registry.rotate()
    registry.close()
    with engine.begin() as conn:  # as a version without key events left it
        conn.exec_driver_sql(f"DROP TABLE {EVENTS}")
    keys = _rows(engine, "data_keys")
    upgraded = KeyRegistry(sa.create_engine(engine.url), root_key)
    for change in (upgraded.rotate, lambda: upgraded.create_scope("acme")):
        with pytest.raises(ConfigurationError, match=f"table '{EVENTS}' .* does not exist"):
            change()
        assert _rows(engine, "data_keys") == keys  # nothing changed unrecorded
    assert upgraded.status().events == 0
    for _ in range(2):
        with pytest.raises(KeyEventsTamperedError, match="events start"):
            upgraded.init(reason="upgrade")  # as at every application start
    assert _rows(engine, "data_keys") == keys and upgraded.events() == []
    upgraded.start_events(reason="upgrade to key events")
    started = [
        ("anchor", None, None, "chain started over 3 existing keys", "upgrade to key events")
    ]
    assert summary(upgraded) == started
    with pytest.raises(ConfigurationError, match="started already"):
        upgraded.start_events(reason="again")
    upgraded.init()
    upgraded.rotate()
    assert [e.operation for e in upgraded.events()] == ["anchor", "rotate"]
    report = upgraded.verify_events()
    assert report.ok and report.start is not None
    assert report.start.outcome == "chain started over 3 existing keys"
    upgraded.close()


def test_the_alembic_operation_for_existing_databases(db_url: str, tmp_path: Path) -> None:
    from test_alembic import ROOT, Project

    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    registry.init()
    registry.close()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {EVENTS}")
    project = Project(tmp_path, db_url, template="generic")
    project.migration(
        "0002_key_events.py",
        '''
        """the key events table"""
        from alembic import op

        revision = "0002_key_events"
        down_revision = None


        def upgrade():
            op.create_data_key_events_table()


        def downgrade():
            op.drop_data_key_events_table()
        ''',
    )
    project.alembic("upgrade", "head")
    assert EVENTS in project.tables()
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    with pytest.raises(KeyEventsTamperedError, match="events start"):
        registry.rotate(reason="before the chain is started")
    out, _ = _cli(db_url, ROOT, "events", "start", "--reason", "upgrade")
    assert "chain started over 2 existing keys" in out
    registry.rotate(reason="after the migration")
    assert [e.operation for e in registry.events()] == ["anchor", "rotate"]
    assert registry.verify_events().ok
    registry.close()
    project.alembic("downgrade", "base")
    assert EVENTS not in project.tables() and "data_keys" in project.tables()
    engine.dispose()


async def _async_events(url: str, root: StaticRootKey) -> None:
    from conftest import async_engine_for

    from sqlalchemy_envelope import AsyncKeyRegistry

    engine = async_engine_for(url)
    registry = AsyncKeyRegistry(engine, root, actor="async-worker")
    await registry.init(reason="a")
    with pytest.raises(ConfigurationError, match="started already"):
        await registry.start_events(reason="a new database starts its chain at init")
    await registry.create_scope("acme", reason="b")
    await registry.rotate(reason="c")
    await registry.retire(1, "acme", reason="d")
    await registry.disable(1, reason="e")
    await registry.enable(1, reason="f")
    await registry.destroy(1, force=True, reason="g")
    await registry.shred("acme", reason="h")
    await registry.rewrap(StaticRootKey(os.urandom(32)), reason="i")
    found = await registry.events()
    assert [(e.operation, e.reason) for e in found if e.reason] == [
        ("init", "a"),
        ("init", "a"),
        ("create_scope", "b"),
        ("create_scope", "b"),
        ("rotate", "c"),
        ("retire", "d"),
        ("disable", "e"),
        ("enable", "f"),
        ("force_destroy", "g"),
        ("shred", "h"),
        ("shred", "h"),
        ("rewrap", "i"),
        ("anchor", "i"),
    ]
    assert {e.actor for e in found} == {"async-worker"}
    assert [e.seq for e in await registry.events("acme", limit=1)] == [12]
    report = await registry.verify_events(found[-1].mac.hex())
    assert report.ok and report.events == len(found) == 14
    await registry.close()
    await engine.dispose()


def test_async_registry_records_and_verifies(db_url: str, root_key: StaticRootKey) -> None:
    import asyncio

    asyncio.run(_async_events(db_url, root_key))


@pytest.mark.parametrize("vector", format_vectors("key_events"), ids=lambda v: v["name"])
def test_the_format_vectors(vector: dict[str, Any]) -> None:
    """FORMAT.md section 12, with HKDF and HMAC alone; a re-anchor's mac is
    under its new chain secret, over the message and its link."""
    secret = bytes.fromhex(vector["chain_secret"])
    key = HKDF(hashes.SHA256(), 32, None, b"sqlalchemy-envelope/key-events/v1").derive(secret)
    message = (
        b"sqlalchemy-envelope/key-event/v1\x00"
        + canonical_json(vector["fields"])
        + bytes.fromhex(vector["previous_mac"])
    )
    mac = hmac.new(key, message, hashlib.sha256).digest()
    if "new_chain_secret" in vector:
        assert mac.hex() == vector["link"]
        info = b"sqlalchemy-envelope/key-events/re-anchor/v1"
        new_key = HKDF(hashes.SHA256(), 32, None, info).derive(
            bytes.fromhex(vector["new_chain_secret"])
        )
        mac = hmac.new(new_key, message + mac, hashlib.sha256).digest()
    assert mac.hex() == vector["mac"]
