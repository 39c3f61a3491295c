"""Rotation policies, by age and by use, with clocks the test controls; the
bound on encryptions per key when the database or the KMS does not answer,
and across fork; status and maintenance."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Clocks, KMSServer, encrypted_table, fresh_database
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    AWSKMSRootKey,
    ConfigurationError,
    EncryptedType,
    EncryptionLimitError,
    KeyRegistry,
    RotationPolicy,
    StaticRootKey,
)


def test_rotation_by_age(engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks) -> None:
    registry = KeyRegistry(
        engine,
        root_key,
        rotate_after=timedelta(days=90),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init()
    first = registry.encrypt(b"day one", "t.c")
    clocks.advance(timedelta(days=89))
    registry.encrypt(b"day 89", "t.c")
    assert registry.status().active_version == 1
    assert registry.status().rotation_due is None

    clocks.advance(timedelta(days=2))
    assert registry.status().rotation_due == "older than 90 days, 0:00:00"
    later = registry.encrypt(b"day 91", "t.c")
    status = registry.status()
    assert status.active_version == 2 and status.rotation_due is None
    assert later[1:6] != first[1:6]
    assert registry.decrypt(first, "t.c") == b"day one"
    registry.encrypt(b"again", "t.c")
    assert registry.status().active_version == 2  # one decision, one rotation
    registry.close()


def test_rotation_by_use_never_passes_the_limit(engine: sa.Engine, root_key: StaticRootKey) -> None:
    registry = KeyRegistry(engine, root_key, max_encryptions=640)
    assert registry.policy.block == 10
    registry.init()
    sealed = [registry.encrypt(f"value {i}".encode(), "t.c") for i in range(2000)]
    status = registry.status()
    assert status.active_version is not None and status.active_version >= 4
    for key in status.keys:
        assert key.encryptions <= 640
    for key in status.keys[:-1]:
        assert key.encryptions > 640 - 10
    assert sum(k.encryptions for k in status.keys) >= 2000
    assert [registry.decrypt(c, "t.c") for c in sealed] == [
        f"value {i}".encode() for i in range(2000)
    ]
    registry.close()


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_rotation_by_use_inside_one_statement(
    engine: sa.Engine, root_key: StaticRootKey, storage: str
) -> None:
    """A column's values of one executemany cross several rotations: each is
    encrypted under the key active at that moment, and every one reads back."""
    registry = KeyRegistry(engine, root_key, max_encryptions=640)  # blocks of 10
    registry.init()
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(100), storage=storage)),
    )
    table.metadata.create_all(engine)
    rows = [{"id": i, "body": f"note {i}"} for i in range(1500)]
    for _ in range(2):  # the second time from the compiled cache
        with engine.begin() as conn:
            conn.execute(table.delete())
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
        with engine.connect() as conn:
            read = conn.execute(sa.select(table.c.id, table.c.body).order_by(table.c.id)).all()
        assert [tuple(row) for row in read] == [(i, f"note {i}") for i in range(1500)]
    status = registry.status()
    assert status.active_version is not None and status.active_version >= 5
    assert all(key.encryptions <= 640 for key in status.keys)
    assert sum(key.encryptions for key in status.keys) >= 3000
    registry.close()


def _claimed(registry: KeyRegistry) -> int:
    """Encryptions claimed in data_keys under every key of the scope."""
    return sum(key.encryptions for key in registry.status().keys)


@pytest.mark.parametrize("how", ["connection", "session"])
def test_the_counter_bounds_use_in_long_and_rolled_back_transactions(
    engine: sa.Engine, root_key: StaticRootKey, how: str
) -> None:
    registry = KeyRegistry(engine, root_key, max_encryptions=6400)  # blocks of 100
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)

    def write(ids: range, commit: bool) -> None:
        # One statement per row, all in one transaction: on SQLite the
        # transaction holds the database's write lock from its first row on.
        if how == "connection":
            with engine.connect() as conn:
                for i in ids:
                    conn.execute(table.insert(), {"id": i, "body": f"note {i}"})
                if commit:
                    conn.commit()
        else:
            with Session(engine) as session:
                for i in ids:
                    session.execute(table.insert(), {"id": i, "body": f"note {i}"})
                if commit:
                    session.commit()

    write(range(350), commit=True)
    assert _claimed(registry) >= 350
    write(range(1000, 1350), commit=False)  # rolled back: its encryptions still count
    write(range(2000, 2010), commit=True)
    assert _claimed(registry) >= 710
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 360
    registry.close()


def test_policy_validation() -> None:
    for beyond_nist in (2**32 + 1, 2**33):
        with pytest.raises(ConfigurationError, match="2\\*\\*32"):
            RotationPolicy(max_encryptions=beyond_nist)
    assert RotationPolicy(max_encryptions=2**32).block == 65_536
    with pytest.raises(ConfigurationError, match="positive"):
        RotationPolicy(rotate_after=timedelta(0))
    assert RotationPolicy().max_encryptions == 2**30
    assert RotationPolicy().block == 65_536


def test_status_and_maintenance(engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks) -> None:
    registry = KeyRegistry(
        engine,
        root_key,
        rotate_after=timedelta(days=30),
        cache_max_age=60,
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init()
    table = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.Text)),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": "v1 note"} for i in range(3)])
    registry.rotate()
    registry.rotate()  # version 2 holds no rows
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 9, "body": "v3 note"})

    status = registry.status(census=True)
    assert status.rows_by_version == {1: 3, 3: 1}
    assert status.active_encryptions is not None and status.active_encryptions >= 1
    as_json = json.loads(status.to_json())
    assert as_json["active_version"] == 3 and as_json["rows_by_version"] == {"1": 3, "3": 1}
    assert as_json["root_key_fingerprint"] == root_key.fingerprint

    report = registry.maintenance()
    assert report.rotated is None
    assert report.destroyable == ()  # retired moments ago: caches may still use them
    assert report.still_referenced == {1: 3}

    clocks.advance(timedelta(days=31))
    report = registry.maintenance()
    assert report.rotated is not None and report.rotated.version == 4
    assert report.rotation_reason is not None and "older than" in report.rotation_reason
    assert report.destroyable == (2,)
    assert report.still_referenced == {1: 3, 3: 1}
    assert json.loads(report.to_json())["destroyable"] == [2]
    assert registry.status().keys_by_state == {"retired": 3, "active": 1}  # nothing deleted
    registry.close()


def _encrypt_until_refused(registry: KeyRegistry, attempts: int = 1000) -> int:
    """Encrypt until the registry refuses (`EncryptionLimitError`); how many
    encryptions it made."""
    done = 0
    with pytest.raises(EncryptionLimitError) as refused:
        for _ in range(attempts):
            registry.encrypt(b"value", "t.c")
            done += 1
    assert "nothing was encrypted" in str(refused.value)
    return done


def test_a_key_at_its_limit_that_cannot_be_rotated_encrypts_no_more(
    kms: KMSServer, engine: sa.Engine
) -> None:
    """max_encryptions is a hard bound: past it, with the KMS unreachable
    for the successor's wrapping, the encrypt path fails closed."""
    root_key = AWSKMSRootKey(kms.create_key(), max_attempts=1)
    registry = KeyRegistry(engine, root_key, max_encryptions=640)  # blocks of 10
    registry.init()
    kms.stop()  # cached keys keep working; a new key cannot be wrapped
    done = _encrypt_until_refused(registry)
    assert 500 < done <= 640
    status = registry.status()
    assert status.active_version == 1
    assert status.active_encryptions is not None and status.active_encryptions <= 640
    with pytest.raises(EncryptionLimitError, match="reached max_encryptions"):
        registry.encrypt(b"value", "t.c")
    registry.close()


@contextmanager
def _data_keys_locked(engine: sa.Engine) -> Iterator[None]:
    """Another writer holds data_keys: SQLite's write lock, or on PostgreSQL
    the row of the active key."""
    with engine.connect() as holder:
        if engine.dialect.name == "sqlite":
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            holder.begin()
            lock = "SELECT id FROM data_keys WHERE active_scope = 'default' FOR UPDATE"
            holder.execute(sa.text(lock)).all()
        yield
        holder.rollback()


# MariaDB is not among them: there a claim waits for innodb_lock_wait_timeout.
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_encryptions_the_database_cannot_record_are_bounded(
    request: pytest.FixtureRequest, tmp_path: Path, root_key: StaticRootKey, kind: str
) -> None:
    """While claims cannot be written, the process goes on with at most one
    block it has not recorded, then fails closed; the next claim records them."""
    with fresh_database(request, kind, tmp_path) as url:
        engine = sa.create_engine(url)
        registry = KeyRegistry(engine, root_key, max_encryptions=6400)  # blocks of 100
        registry.init()
        for _ in range(50):
            registry.encrypt(b"value", "t.c")
        recorded = registry.status().active_encryptions
        assert recorded is not None
        with _data_keys_locked(engine):
            done = _encrypt_until_refused(registry)
            assert 50 + done <= recorded + registry.policy.block
            with pytest.raises(EncryptionLimitError, match="could not record"):
                registry.encrypt(b"value", "t.c")
        registry.encrypt(b"value", "t.c")
        now_recorded = registry.status().active_encryptions
        assert now_recorded is not None and now_recorded >= 50 + done + 1
        registry.close()
        engine.dispose()


def test_a_forked_child_claims_a_block_of_its_own(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    """The parent's unspent block is the parent's: a child that used it too
    would encrypt under the key more than data_keys counts."""
    registry = KeyRegistry(engine, root_key, max_encryptions=6400)  # blocks of 100
    registry.init()
    registry.encrypt(b"parent", "t.c")
    before = registry.status().active_encryptions
    assert before is not None and before >= 100
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return to pytest
        code = 1
        try:
            os.close(read)
            os.write(write, registry.encrypt(b"child", "t.c"))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        from_child = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert registry.decrypt(from_child, "t.c") == b"child"
    after = registry.status().active_encryptions
    assert after is not None and after >= before + registry.policy.block
    registry.encrypt(b"parent again", "t.c")  # within the parent's own block
    assert registry.status().active_encryptions == after
    registry.close()
