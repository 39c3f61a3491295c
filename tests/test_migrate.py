"""Re-encrypt and decrypt-in-place: batches, compare-and-swap, plaintext
migration, failures left alone, parallel workers."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    KeyState,
    StaticRootKey,
)


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    region: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40)))
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.Text, storage="text"))


class Legacy(Base):
    __tablename__ = "legacy"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(60), storage="text", migrating=True)
    )


def _members(engine: sa.Engine) -> dict[tuple[str, int], tuple[str | None, str | None]]:
    with Session(engine) as session:
        return {(m.region, m.number): (m.name, m.note) for m in session.scalars(sa.select(Member))}


def test_reencrypt_moves_every_value_to_the_active_key(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    registry = KeyRegistry(engine, root_key, cache_max_age=0.05)
    registry.init()
    Base.metadata.create_all(engine)
    for version in range(3):
        with Session(engine) as session:
            session.add_all(
                Member(
                    region=region,
                    number=version * 100 + i,
                    name=f"{region} {i} v{version}",
                    note=None if i % 4 == 0 else f"note {i}",
                )
                for region in ("eu", "us")
                for i in range(20)
            )
            session.commit()
        registry.rotate()
    before = _members(engine)

    report = registry.reencrypt(Member, batch_size=7, progress=False)
    assert report.columns == ["members.name", "members.note"]
    assert report.rows_scanned == report.rows_updated == 120
    assert report.values_by_version == {1: 40 + 30, 2: 40 + 30, 3: 40 + 30}
    assert report.skipped == report.left_behind == 0
    assert report.elapsed > 0 and report.rows_per_second > 0
    assert _members(engine) == before

    active = registry.status().active_version
    for column in registry.census(Member):
        assert {k.version for k in column.keys} == {active}
    assert registry.reencrypt(Member.name).rows_scanned == 0  # nothing left: a rerun is free

    time.sleep(0.1)
    for version in (1, 2, 3):  # the destroy guard now lets the old keys go
        assert registry.destroy(version).state is KeyState.DESTROYED
    assert _members(engine) == before
    registry.close()


def test_plaintext_column_converted_in_place_and_back(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    raw = sa.Table("legacy", sa.MetaData(), autoload_with=engine)
    emails = [f"user{i}@example.com" for i in range(25)]
    with engine.begin() as conn:  # what the table held before encryption
        conn.execute(raw.insert(), [{"id": i, "email": e} for i, e in enumerate(emails)])
        conn.execute(raw.insert(), {"id": 99, "email": None})
    with Session(engine) as session:  # migrating: plaintext still reads...
        assert session.get(Legacy, 3).email == "user3@example.com"  # type: ignore[union-attr]
        session.add(Legacy(id=50, email="new@example.com"))  # ...and writes encrypt
        session.commit()
    (census,) = registry.census(Legacy)
    assert census.not_ciphertext == 25 and census.nulls == 1

    report = registry.reencrypt(Legacy)
    assert report.plaintext_encrypted == 25 and report.rows_updated == 25
    (census,) = registry.census(Legacy)
    assert census.not_ciphertext == 0 and sum(k.rows for k in census.keys) == 26
    with engine.connect() as conn:
        stored = conn.execute(sa.select(raw.c.email).where(raw.c.id < 25)).scalars().all()
    assert not any("@" in s for s in stored)
    with Session(engine) as session:
        got = {x.id: x.email for x in session.scalars(sa.select(Legacy))}
    assert [got[i] for i in range(25)] == emails

    back = registry.decrypt_in_place(Legacy)
    assert back.values_decrypted == 26
    with engine.connect() as conn:
        plain = dict(conn.execute(sa.select(raw.c.id, raw.c.email)).all())
    assert [plain[i] for i in range(25)] == emails and plain[50] == "new@example.com"


def test_values_that_cannot_be_moved_are_left_untouched(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Member(region="eu", number=i, name=f"n{i}") for i in range(5))
        session.commit()
    registry.rotate()
    raw = sa.Table("members", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        good = conn.execute(sa.select(raw.c.name).where(raw.c.number == 1)).scalar_one()
        tampered = bytes(good)[:-1] + bytes([bytes(good)[-1] ^ 1])
        conn.execute(raw.update().where(raw.c.number == 1).values(name=tampered))
        conn.execute(raw.update().where(raw.c.number == 2).values(name=b"old plaintext"))

    report = registry.reencrypt(Member.name)
    assert report.rows_updated == 3 and report.left_behind == 2
    assert report.failures == {"DecryptionError": 1}
    with engine.connect() as conn:
        kept = dict(conn.execute(sa.select(raw.c.number, raw.c.name)).all())
    assert bytes(kept[1]) == tampered and bytes(kept[2]) == b"old plaintext"

    forced = registry.reencrypt(Member.name, encrypt_plaintext=True)
    assert forced.plaintext_encrypted == 1 and forced.left_behind == 1


def test_bad_targets(engine: sa.Engine, registry: KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE nokey (v bytea)"
                if engine.dialect.name == "postgresql"
                else "CREATE TABLE nokey (v BLOB)"
            )
        )
    with pytest.raises(ConfigurationError, match="no primary key"):
        registry.reencrypt("nokey.v")
    with pytest.raises(ConfigurationError, match="no column"):
        registry.reencrypt("nokey.missing")
    with pytest.raises(ConfigurationError, match="is not an encrypted column"):
        registry.reencrypt(Member.region)


def test_parallel_workers(pg_url: str, root_key: StaticRootKey) -> None:
    engine = sa.create_engine(pg_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Member),
            [{"region": "eu", "number": i, "name": f"name {i}"} for i in range(3000)],
        )
    registry.rotate()
    report = registry.reencrypt(Member, workers=3, batch_size=100, progress=False)
    assert report.rows_updated == 3000 and report.values_by_version == {1: 3000}
    (name, note) = registry.census(Member)
    assert [k.version for k in name.keys] == [2] and note.nulls == 3000
    with Session(engine) as session:
        assert session.scalars(sa.select(Member.name).where(Member.number == 2999)).one() == (
            "name 2999"
        )
    registry.close()
    engine.dispose()


def test_progress_bar_on_request_and_silence_otherwise(
    engine: sa.Engine, registry: KeyRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Member(region="eu", number=i, name=f"n{i}") for i in range(40))
        session.commit()
    registry.rotate()
    registry.reencrypt(Member.name, batch_size=10)  # stderr is not a terminal here
    assert capfd.readouterr().err == ""
    registry.rotate()
    registry.reencrypt(Member.name, batch_size=10, progress=True)
    err = capfd.readouterr().err
    assert "re-encrypt" in err and "40/40" in err


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie no one reaped has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_stop_when_the_job_is_killed(pg_url: str, tmp_path: Path) -> None:
    """kill -9 of `reencrypt --workers 2` stops its workers too (after the
    batch at hand); the job stays resumable."""
    root = base64.b64encode(os.urandom(32)).decode()
    engine = sa.create_engine(pg_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": root})
    registry.init()
    Base.metadata.create_all(engine)
    rows = 4000
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Member),
            [{"region": "eu", "number": i, "name": f"n {i}"} for i in range(rows)],
        )
    registry.rotate()

    def moved() -> int:
        (name, _) = registry.census(Member)
        return sum(k.rows for k in name.keys if k.version == 2)

    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": pg_url, "ENVELOPE_ROOT_KEY": root}
    command = [sys.executable, "-m", "sqlalchemy_envelope", "reencrypt", "members.name"]
    job = subprocess.Popen(
        [*command, "--workers", "2", "--batch-size", "1"], env=env, stdout=subprocess.DEVNULL
    )
    while moved() < 20 and job.poll() is None:
        time.sleep(0.01)
    workers = [int(p) for p in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()]
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert len(workers) == 2
    while any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert 0 < moved() < rows  # the workers stopped with the job
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    assert moved() == rows
    registry.close()
    engine.dispose()
