"""A rewrap racing a process that still runs with the old root key.

Each test runs the other process for real (a second Python process with its
own engine) and interleaves it with the rewrap deterministically: one side
is held in the middle of its transaction (in its root key's ``wrap``, where
a new data key is wrapped just before its row is written) while the other
runs as far as the database's locks let it. Whatever the order, afterwards a
registry holding only the new root key reads every key and every value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import encrypted_table

from sqlalchemy_envelope import KeyRegistry, StaticRootKey

# The other process: a registry with the old root key, already running (its
# keys cached), that then meets something new to write under. With "pause"
# it stops in its root key's first wrap until told to go on; with "signal"
# it says "writing" when it starts its first statement that locks or writes
# data_keys. Then it prints its outcome.
_OTHER_PROCESS = r"""
import json, sys
from datetime import UTC, datetime, timedelta
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy_envelope import SCOPE_OPTION, EncryptedType, KeyRegistry, StaticRootKey

url, key, action, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3], sys.argv[4]


class PausingRootKey:
    def __init__(self, inner):
        self.inner, self.paused = inner, False
        self.fingerprint, self.description = inner.fingerprint, inner.description

    def wrap(self, data_key, context):
        if mode == "pause" and not self.paused:
            self.paused = True
            print("paused", flush=True)
            sys.stdin.readline()
        return self.inner.wrap(data_key, context)

    def unwrap(self, wrapped, context):
        return self.inner.unwrap(wrapped, context)


said = []


@event.listens_for(sa.Engine, "before_cursor_execute")
def writing(conn, cursor, statement, parameters, context, executemany):
    text = " ".join(statement.split()).upper()
    locks = text.startswith(("UPDATE", "INSERT", "DELETE", "LOCK")) or "FOR UPDATE" in text
    if mode == "signal" and not said and "DATA_KEYS" in text and locks:
        said.append(True)
        print("writing", flush=True)


engine = sa.create_engine(url)
root_key = PausingRootKey(StaticRootKey(key))
options = {}
if action == "policy":  # its clock says the active key is due for rotation by age
    later = datetime.now(UTC) + timedelta(days=91)
    options = {"rotate_after": timedelta(days=90), "wall_clock": lambda: later}
registry = KeyRegistry(engine, root_key, **options)
registry.init()
records = sa.Table(
    "records", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", EncryptedType(sa.String(100))),
)
try:
    if action == "tenant":
        with engine.begin() as conn:
            conn.execute(records.insert(), {"id": 2, "body": "acme's first"},
                         execution_options={SCOPE_OPTION: "acme"})
    elif action == "policy":
        with engine.begin() as conn:
            conn.execute(records.insert(), {"id": 2, "body": "default's second"})
    elif action == "rotate":
        registry.rotate()
    elif action == "create_scope":
        registry.create_scope("acme")
    elif action == "init":
        KeyRegistry(engine, root_key, scope="acme", attach=False).init()
    outcome = "ok"
except Exception as error:
    outcome = type(error).__name__
print(json.dumps({"outcome": outcome}), flush=True)
"""

ACTIONS = ["tenant", "policy", "rotate", "create_scope", "init"]
# The row each action writes besides the first one, if it succeeds.
WRITES = {"tenant": (2, "acme's first"), "policy": (2, "default's second")}


class PausingRootKey:
    """The new root key of a rewrap, holding the rewrap's transaction open
    in its first wrap until the test lets it go on."""

    def __init__(self, inner: StaticRootKey) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.description = inner.description
        self.paused = threading.Event()
        self.go = threading.Event()

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        if not self.paused.is_set():
            self.paused.set()
            assert self.go.wait(120)
        return self.inner.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self.inner.unwrap(wrapped, context)


class OtherProcess:
    """The process still running with the old root key."""

    def __init__(self, url: str, key: bytes, action: str, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _OTHER_PROCESS, url, key.hex(), action, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def outcome(self, line: str | None = None) -> str:
        result = json.loads(line or self.line())["outcome"]
        assert self.proc.wait(120) == 0
        return str(result)


class Rewrap:
    """``registry.rewrap(new_root)`` running in a thread of its own."""

    def __init__(self, registry: KeyRegistry, new_root: Any) -> None:
        self.registry = registry
        self.new_root = new_root
        self.locking = threading.Event()  # started to lock or write data_keys, or done
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.registry.rewrap(self.new_root)
        except BaseException as error:  # re-raised in the test's thread
            self.errors.append(error)
        finally:
            self.locking.set()
            self.done.set()

    def _statement(self, _: Any, __: Any, statement: str, *args: Any) -> None:
        if threading.current_thread() is self.thread and _locks_data_keys(statement):
            self.locking.set()


@contextmanager
def rewrap_in_thread(registry: KeyRegistry, new_root: Any) -> Iterator[Rewrap]:
    """Run the rewrap while the block runs; its outcome is checked on exit."""
    rewrap = Rewrap(registry, new_root)
    sa.event.listen(sa.Engine, "before_cursor_execute", rewrap._statement)
    try:
        rewrap.thread.start()
        yield rewrap
        rewrap.thread.join(120)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", rewrap._statement)
    assert not rewrap.thread.is_alive()
    if rewrap.errors:
        raise rewrap.errors[0]


def _locks_data_keys(statement: str) -> bool:
    text = " ".join(statement.split()).upper()
    writes = text.startswith(("UPDATE", "INSERT", "DELETE", "LOCK")) or "FOR UPDATE" in text
    return writes and "DATA_KEYS" in text


def writers_would_wait(db_url: str) -> bool:
    """Whether a transaction writing every row of data_keys would wait, now,
    for a lock another transaction holds (asked without waiting)."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    statements = {
        "sqlite": ["PRAGMA busy_timeout = 0", "BEGIN IMMEDIATE"],
        "postgresql": [
            "LOCK TABLE data_keys IN ROW EXCLUSIVE MODE NOWAIT",
            "SELECT id FROM data_keys FOR UPDATE NOWAIT",
        ],
    }.get(engine.dialect.name, ["SELECT id FROM data_keys FOR UPDATE NOWAIT"])
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.rollback()
        return False
    except sa.exc.OperationalError:
        return True
    finally:
        engine.dispose()


def _start(engine: sa.Engine, old: StaticRootKey) -> KeyRegistry:
    registry = KeyRegistry(engine, old)
    registry.init()
    records = encrypted_table("records")
    records.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(records.insert(), {"id": 1, "body": "default's first"})
    return registry


def _only_the_new_root_reads_everything(
    db_url: str, new: StaticRootKey, written: tuple[int, str] | None
) -> None:
    """A process started with the new root key alone reads every key (a
    rewrap unwraps each) and every value; status finds no key under
    another root key."""
    engine = sa.create_engine(db_url)
    fresh = KeyRegistry(engine, new)
    status = fresh.status()
    assert status.other_root_keys == {}
    assert status.other_root_keys_needed is False
    records = encrypted_table("records")
    expected = [(1, "default's first")] + ([written] if written else [])
    for _ in range(2):
        with engine.connect() as conn:
            rows = conn.execute(sa.select(records).order_by(records.c.id)).all()
        assert [tuple(r) for r in rows] == expected
    assert fresh.rewrap(StaticRootKey(os.urandom(32))) >= 2
    fresh.close()
    engine.dispose()


@pytest.mark.parametrize("action", ACTIONS)
def test_a_key_written_by_the_old_root_during_a_rewrap_ends_under_the_new_root(
    db_url: str, engine: sa.Engine, action: str
) -> None:
    """The other process is stopped right before it writes its new key,
    having checked the root key; the rewrap runs as far as the locks let
    it (to its end, if nothing holds it back), then the other process goes
    on. Its key must end under the new root key: it held the lock, so the
    rewrap waited for it and re-wrapped its key too."""
    raw_old = os.urandom(32)
    old, new = StaticRootKey(raw_old), StaticRootKey(os.urandom(32))
    registry = _start(engine, old)
    other = OtherProcess(db_url, raw_old, action, "pause")
    assert other.line() == "paused"
    held = writers_would_wait(db_url)
    with rewrap_in_thread(registry, new) as rewrap:
        # Held back, the rewrap can only wait for the other process: let that
        # go on once the rewrap asks for its lock. Else the rewrap finishes first.
        assert (rewrap.locking if held else rewrap.done).wait(120)
        other.go_on()
        outcome = other.outcome()
    assert outcome == "ok"
    registry.close()
    _only_the_new_root_reads_everything(db_url, new, WRITES.get(action))


@pytest.mark.parametrize("action", ACTIONS)
def test_the_old_root_writes_nothing_while_a_rewrap_runs(
    db_url: str, engine: sa.Engine, action: str
) -> None:
    """The rewrap is stopped in the middle of its transaction; the other
    process starts its write, and the rewrap goes on as soon as that write
    starts to lock or write data_keys. The other process must fail without
    writing a key: WrongRootKeyError. The encrypt path never waits long:
    a first-use tenant may find data_keys busy and give up
    (ConfigurationError), and a rotation by policy is put off, the value
    then written under the key in hand (which the rewrap re-wrapped)."""
    raw_old = os.urandom(32)
    old = StaticRootKey(raw_old)
    new = PausingRootKey(StaticRootKey(os.urandom(32)))
    registry = _start(engine, old)
    with rewrap_in_thread(registry, new):
        assert new.paused.wait(120)
        other = OtherProcess(db_url, raw_old, action, "signal")
        line = other.line()
        new.go.set()
        outcome = other.outcome(None if line == "writing" else line)
    allowed = {"WrongRootKeyError"} | {"tenant": {"ConfigurationError"}, "policy": {"ok"}}.get(
        action, set()
    )
    assert outcome in allowed
    registry.close()
    written = WRITES["policy"] if action == "policy" and outcome == "ok" else None
    _only_the_new_root_reads_everything(db_url, new.inner, written)
