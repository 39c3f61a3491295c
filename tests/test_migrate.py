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
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from conftest import column_storage, kill_when, type_storage
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from test_cli import ROOT, Cli

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    KeyState,
    LeftRow,
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


class Author(Base):
    """A column being encrypted in place: legacy plaintext in any script."""

    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(50), storage="text", migrating=True)
    )


NAMES = {
    1: "Zoë Ångström",
    2: "emoji 🦄🎉 too",
    3: "漢字かな交じり文",
    4: "plain ASCII",
    5: "Ωmega, then a space ",
    6: None,
}


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


def test_decrypt_in_place_writes_padded_values_without_their_padding(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """A ``pad_to`` string and an enum (padded to its longest name) decrypt
    in place to the text itself, in text and in binary storage."""
    padded = sa.Table(
        "padded_notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", EncryptedType(sa.String(40), pad_to=32, storage="text")),
        sa.Column("kind", EncryptedType(sa.Enum("a", "long", name="k"), storage="text")),
        sa.Column("raw", EncryptedType(sa.String(40), pad_to=16)),
    )
    padded.metadata.create_all(engine)
    rows = [{"id": i, "note": f"n{i}", "kind": "a", "raw": f"r{i}"} for i in range(3)]
    with engine.begin() as conn:
        conn.execute(padded.insert(), rows)
    report = registry.decrypt_in_place(padded)
    assert report.values_decrypted == 9 and report.left_behind == 0
    plain = sa.table("padded_notes", *(sa.column(c) for c in ("id", "note", "kind", "raw")))
    with engine.connect() as conn:
        got = [r._asdict() for r in conn.execute(sa.select(plain).order_by(plain.c.id))]
    assert got == [{**row, "raw": row["raw"].encode()} for row in rows]


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
    with pytest.raises(
        ConfigurationError, match=r"is a plain column \(VARCHAR\(5\)\), not an encrypted column"
    ):
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


def _alter_name(engine: sa.Engine, new: Any, existing: Any) -> None:
    """``op.alter_column`` as a migration runs it (batch mode for SQLite)."""
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        with op.batch_alter_table("authors") as batch:
            batch.alter_column("name", type_=new, existing_type=existing)


def _stored_names(engine: sa.Engine) -> dict[int, Any]:
    raw = sa.Table("authors", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(raw.c.id, raw.c.name)).all())


def _read_names(engine: sa.Engine) -> dict[int, str | None]:
    """The names as the application reads them, through a Session and a
    Connection, each statement twice; the same every time."""
    seen = []
    with Session(engine) as session:
        for _ in range(2):
            seen.append(dict(session.execute(sa.select(Author.id, Author.name)).all()))
    with engine.connect() as conn:
        for _ in range(2):
            seen.append(dict(conn.execute(sa.select(Author.id, Author.name)).all()))
    assert all(names == seen[0] for names in seen)
    return seen[0]


def _migrating() -> EncryptedType:
    return EncryptedType(sa.String(50), storage="text", migrating=True)


def _check_encrypted(engine: sa.Engine) -> None:
    """Every value is ciphertext, read back exactly, in the encrypted type's
    storage (ASCII text on MySQL/MariaDB)."""
    stored = _stored_names(engine)
    assert stored[6] is None
    for key in range(1, 6):
        assert stored[key].isascii() and NAMES[key] not in stored[key]
    assert _read_names(engine) == NAMES
    encrypted = EncryptedType(sa.String(50), storage="text")
    assert column_storage(engine, "authors", "name") == type_storage(engine, encrypted)


def _check_decrypted(engine: sa.Engine) -> None:
    """Every value is its plaintext again, exactly, in storage that holds any
    text: the migrating type's (utf8mb4 on MySQL/MariaDB)."""
    assert _stored_names(engine) == NAMES
    assert _read_names(engine) == NAMES
    assert column_storage(engine, "authors", "name") == type_storage(engine, _migrating())


def _text_in_place_and_back(url: str, tmp_path: Path, *, non_strict: bool) -> None:
    """Encrypt a populated column of text in any script in place, as the
    README says (widen it to the migrating type, declare it so, reencrypt),
    then back with decrypt_in_place and with the command line."""
    engine = sa.create_engine(url)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(ROOT)), allow_non_strict_mysql=non_strict
    )
    registry.init()
    plain = sa.Table(
        "authors",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    )
    plain.metadata.create_all(engine)
    with engine.begin() as conn:  # what the table held before encryption
        for key, name in NAMES.items():
            conn.execute(plain.insert(), {"id": key, "name": name})

    _alter_name(engine, _migrating(), sa.String(50))  # step 1: widen
    assert _read_names(engine) == NAMES  # step 2: plaintext reads as it is
    report = registry.reencrypt(Author.name, encrypt_plaintext=True, batch_size=2)
    assert report.plaintext_encrypted == 5 and report.rows_updated == 5
    assert report.left_behind == 0 and report.skipped == 0
    _check_encrypted(engine)
    assert registry.reencrypt(Author.name, encrypt_plaintext=True).rows_scanned == 0

    back = registry.decrypt_in_place(Author.name, batch_size=2)
    assert back.values_decrypted == 5 and back.left_behind == 0
    _check_decrypted(engine)

    assert registry.reencrypt(Author.name).plaintext_encrypted == 5  # migrating=True
    _check_encrypted(engine)
    cli = Cli(url, tmp_path)
    allow = {}
    if non_strict:  # refused until the environment accepts the risk
        cli("decrypt-in-place", "authors.name", "--yes", code=2)
        assert "ENVELOPE_ALLOW_NON_STRICT_MYSQL=1" in cli.outputs[-1]
        allow = {"ENVELOPE_ALLOW_NON_STRICT_MYSQL": "1"}
    by_cli = cli.json("decrypt-in-place", "authors.name", "--yes", **allow)
    assert by_cli["values_decrypted"] == 5 and by_cli["left_behind"] == 0
    _check_decrypted(engine)

    _alter_name(engine, sa.String(50), _migrating())  # the plain type again
    assert _stored_names(engine) == NAMES
    assert column_storage(engine, "authors", "name") == type_storage(engine, sa.String(50))
    registry.close()
    engine.dispose()


def test_text_in_any_script_encrypted_in_place_and_back(db_url: str, tmp_path: Path) -> None:
    _text_in_place_and_back(db_url, tmp_path, non_strict=False)


def test_text_in_any_script_in_place_and_back_without_strict_mode(
    non_strict_mariadb_url: str, tmp_path: Path
) -> None:
    _text_in_place_and_back(non_strict_mariadb_url, tmp_path, non_strict=True)


def test_a_value_the_column_cannot_hold_is_refused_before_writing(
    non_strict_mariadb_url: str,
) -> None:
    """Without strict mode the server cuts a value too long for its column
    with only a warning: the job refuses, before writing anything, values
    longer than the column it reflected, rather than leave a cut ciphertext."""
    engine = sa.create_engine(non_strict_mariadb_url)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(ROOT)), allow_non_strict_mysql=True
    )
    registry.init()
    plain = sa.Table(
        "authors",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),  # not widened: no ciphertext fits
    )
    plain.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": k, "name": v} for k, v in NAMES.items()])

    for _ in range(2):
        with pytest.raises(ConfigurationError, match=r"authors\.name: .* widen the column first"):
            registry.reencrypt(Author.name, batch_size=2)
    assert _stored_names(engine) == NAMES
    assert column_storage(engine, "authors", "name") == type_storage(engine, sa.String(50))
    registry.close()
    engine.dispose()


def test_a_plaintext_stored_otherwise_is_put_back_and_named(non_strict_mariadb_url: str) -> None:
    """A decrypted value the column does not give back as written (a CHAR
    column drops trailing spaces) keeps its ciphertext and is named."""
    engine = sa.create_engine(non_strict_mariadb_url)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(ROOT)), allow_non_strict_mysql=True
    )
    registry.init()
    authors = sa.Table(
        "authors",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.CHAR(200)),
    )
    authors.metadata.create_all(engine)
    with Session(engine) as session:  # the application writes ciphertext
        session.add_all(Author(id=k, name=v) for k, v in NAMES.items())
        session.commit()
    ciphertext = _stored_names(engine)[5]

    back = registry.decrypt_in_place(Author.name)
    assert back.values_decrypted == 4 and back.left_behind == 1
    assert back.left_rows == [LeftRow("authors.name", (5,), "NotStoredExactly")]
    stored = _stored_names(engine)
    assert stored[5] == ciphertext
    assert {k: v for k, v in stored.items() if k != 5} == {k: v for k, v in NAMES.items() if k != 5}
    assert _read_names(engine) == NAMES
    registry.close()
    engine.dispose()


def test_a_conversion_killed_midway_finishes_on_the_next_run(db_url: str) -> None:
    """SIGKILLed while encrypting text in any script in place, and while
    decrypting it, the command finishes on the next run: every value exact,
    and the column in the storage of what it holds."""
    rows = {i: f"{NAMES[1 + i % 5]} #{i}" for i in range(3000)}
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "sqlite":  # so that watching the job never waits on it
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(ROOT)))
    registry.init()
    plain = sa.Table(
        "authors",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    )
    plain.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": k, "name": v} for k, v in rows.items()])
    _alter_name(engine, _migrating(), sa.String(50))
    env = {**os.environ, "DATABASE_URL": db_url, "ENVELOPE_ROOT_KEY": ROOT}
    cli = [sys.executable, "-m", "sqlalchemy_envelope"]
    batches = ["--batch-size", "10", "--no-progress"]

    def plaintext() -> int:
        (census,) = registry.census("authors.name")
        return census.not_ciphertext

    def kill_then_finish(command: list[str], done: Any) -> None:
        caught = [
            kill_when(command, env, done, at) and 0 < done() < 3000 for at in (300, 1200, 2100)
        ]
        assert any(caught), "the job was never caught half way"
        finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        assert finished.returncode == 0, finished.stderr
        assert done() == 3000
        assert _read_names(engine) == rows

    encrypt = [*cli, "reencrypt", "authors.name", "--encrypt-plaintext", *batches]
    kill_then_finish(encrypt, lambda: 3000 - plaintext())
    encrypted = EncryptedType(sa.String(50), storage="text")
    assert column_storage(engine, "authors", "name") == type_storage(engine, encrypted)

    kill_then_finish([*cli, "decrypt-in-place", "authors.name", "--yes", *batches], plaintext)
    assert column_storage(engine, "authors", "name") == type_storage(engine, _migrating())
    assert _stored_names(engine) == rows
    registry.close()
    engine.dispose()


def test_plaintext_written_meanwhile_keeps_the_column_in_utf8mb4(
    non_strict_mariadb_url: str,
) -> None:
    """A non-ASCII plaintext an old application writes just before the switch
    to ASCII fails the switch, which runs in strict mode even here, instead of
    being garbled; the error does not quote it, and the next run finishes."""
    engine = sa.create_engine(non_strict_mariadb_url)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(ROOT)), allow_non_strict_mysql=True
    )
    registry.init()
    Author.__table__.create(engine)
    raw = sa.Table("authors", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(raw.insert(), [{"id": k, "name": v} for k, v in NAMES.items()])
    application = sa.create_engine(non_strict_mariadb_url)

    def meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("ALTER TABLE"):
            with application.begin() as other:
                other.execute(raw.insert(), {"id": 7, "name": "Zoë again"})

    sa.event.listen(engine, "before_cursor_execute", meanwhile)
    try:
        with pytest.raises(ConfigurationError, match=r"authors\.name: cannot give") as refused:
            registry.reencrypt(Author.name)
    finally:
        sa.event.remove(engine, "before_cursor_execute", meanwhile)
    assert "Zo" not in str(refused.value) and "xC3" not in str(refused.value)
    assert _stored_names(engine)[7] == "Zoë again"
    assert column_storage(engine, "authors", "name") == type_storage(engine, _migrating())

    assert registry.reencrypt(Author.name).plaintext_encrypted == 1
    assert _read_names(engine) == NAMES | {7: "Zoë again"}
    encrypted = EncryptedType(sa.String(50), storage="text")
    assert column_storage(engine, "authors", "name") == type_storage(engine, encrypted)
    application.dispose()
    registry.close()
    engine.dispose()


def test_a_column_too_long_for_utf8mb4_is_refused_before_decrypting(
    non_strict_mariadb_url: str,
) -> None:
    """Text storage is a TEXT type, which holds a long String's plaintext in
    utf8mb4 too; a VARCHAR made by earlier versions may not: decrypt_in_place
    refuses it before writing anything, naming the column and what to do."""
    engine = sa.create_engine(non_strict_mariadb_url)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(ROOT)), allow_non_strict_mysql=True
    )
    registry.init()
    long_text = sa.Table(
        "memoirs",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(4000), storage="text")),
    )
    long_text.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(long_text.insert(), {"id": 1, "body": "Zoë " * 900})
    report = registry.decrypt_in_place(long_text.c.body)
    assert (report.values_decrypted, report.left_behind) == (1, 0)
    raw = sa.table("memoirs", sa.column("body"))
    with engine.connect() as conn:
        assert conn.execute(sa.select(raw.c.body)).scalar_one() == "Zoë " * 900

    with engine.begin() as conn:  # as an earlier version created it
        conn.exec_driver_sql(
            "ALTER TABLE memoirs MODIFY body VARCHAR(21380) CHARACTER SET ascii COLLATE ascii_bin"
        )
        conn.execute(raw.delete())
        conn.execute(long_text.insert(), {"id": 1, "body": "Zoë " * 900})
    before = column_storage(engine, "memoirs", "body")
    with pytest.raises(ConfigurationError, match=r"memoirs\.body: .* through a new column"):
        registry.decrypt_in_place(long_text.c.body)
    assert column_storage(engine, "memoirs", "body") == before
    with engine.connect() as conn:
        assert conn.execute(sa.select(long_text.c.body)).scalar_one() == "Zoë " * 900
    registry.close()
    engine.dispose()


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
