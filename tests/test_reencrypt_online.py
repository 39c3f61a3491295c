"""Re-encrypt on a live PostgreSQL database: killed with SIGKILL and resumed,
and racing an application that keeps writing."""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
import threading
import time

import sqlalchemy as sa
from conftest import kill_when

from sqlalchemy_envelope import EncryptedType, KeyRegistry, KeyState, StaticRootKey

ROWS = 20_000


def _table() -> sa.Table:
    return sa.Table(
        "online",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(60))),
    )


def _fill(engine: sa.Engine, table: sa.Table, rows: int) -> dict[int, str]:
    table.metadata.create_all(engine)
    values = {i: f"original value of row {i}" for i in range(rows)}
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "value": v} for i, v in values.items()])
    return values


def _versions(registry: KeyRegistry) -> dict[int, int]:
    (census,) = registry.census("online.value")
    return {k.version or -1: k.rows for k in census.keys}


def test_sigkill_then_resume(pg_url: str) -> None:
    root = os.urandom(32)
    engine = sa.create_engine(pg_url)
    registry = KeyRegistry(engine, StaticRootKey(root))
    registry.init()
    table = _table()
    values = _fill(engine, table, ROWS)
    registry.rotate()
    env = {**os.environ, "ENVELOPE_ROOT_KEY": base64.b64encode(root).decode()}
    command = [
        sys.executable,
        "-m",
        "sqlalchemy_envelope",
        "--url",
        pg_url,
        "reencrypt",
        "online.value",
        "--batch-size",
        "100",
        "--no-progress",
    ]
    interrupted = 0
    for at in (3_000, 7_000, 11_000, 15_000):  # kill it at points further and further along
        killed = kill_when(command, env, lambda: _versions(registry).get(2, 0), at)
        if killed and 0 < _versions(registry).get(2, 0) < ROWS:
            interrupted += 1
    assert interrupted >= 2, "the job was never caught half way"

    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert _versions(registry) == {2: ROWS}
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(table.c.id, table.c.value)).all())
    assert got == values
    registry.close()
    engine.dispose()


def test_a_concurrent_writer_loses_no_update(pg_url: str, root_key: StaticRootKey) -> None:
    engine = sa.create_engine(pg_url, pool_size=10)
    registry = KeyRegistry(engine, root_key, cache_max_age=0.05)
    registry.init()
    table = _table()
    expected = _fill(engine, table, 5000)
    registry.rotate()
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        rng = random.Random(11)
        while not stop.is_set():
            row = rng.randrange(5000)
            value = f"written by the application, #{writes}"
            with engine.begin() as conn:
                conn.execute(table.update().where(table.c.id == row).values(value=value))
            expected[row] = value
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = registry.reencrypt("online.value", batch_size=50, progress=False)
    finally:
        stop.set()
        thread.join()
    assert writes > 100
    assert report.left_behind == 0
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(table.c.id, table.c.value)).all())
    assert got == expected
    assert _versions(registry) == {2: 5000}
    time.sleep(0.1)
    assert registry.destroy(1).state is KeyState.DESTROYED
    registry.close()
    engine.dispose()
