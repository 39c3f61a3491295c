"""Re-encrypt and decrypt-in-place reports: every value is either done or
counted and named with its reason (empty values, legacy plaintext that looks
like ciphertext, keys data_keys does not hold, other tenants' values, rows the
application wrote meanwhile), through the API, the Alembic op and the CLI."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, encrypted_table
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from test_alembic import Project
from test_cli import ROOT, Cli

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyInUseError,
    KeyRegistry,
    LeftRow,
    StaticRootKey,
)


class Base(DeclarativeBase):
    pass


class Blob(Base):
    __tablename__ = "blobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes | None] = mapped_column(EncryptedType(sa.LargeBinary, migrating=True))
    note: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(20), storage="text", migrating=True)
    )


class Vault(Base):
    __tablename__ = "vault"
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[bytes | None] = mapped_column(EncryptedType(sa.LargeBinary, migrating=True))
    code: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(60), storage="text", migrating=True)
    )
    tag: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(60), storage="text", deterministic=True, migrating=True)
    )


class Seat(Base):
    __tablename__ = "seats"
    region: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    holder: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40)))


class Record(Base):
    __tablename__ = "records"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40), bind_scope=True))
    mail: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40), context="old_users.mail"))


def _lookalike(first: int = 1, size: int = 41) -> bytes:
    """Legacy bytes that parse as ciphertext: the format byte, then random
    bytes (about 1 in 128 random binary values look like this)."""
    return bytes([first]) + os.urandom(size - 1)


def _raw(engine: sa.Engine, name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), autoload_with=engine)


def _stored(engine: sa.Engine, table: sa.Table, column: str) -> dict[Any, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.id, table.c[column])).all()
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in rows}


def test_empty_values_are_encrypted_and_counted(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    Base.metadata.create_all(engine)
    raw = _raw(engine, "blobs")
    with engine.begin() as conn:  # what the table held before encryption
        conn.execute(
            raw.insert(),
            [
                {"id": 1, "data": b"", "note": None},
                {"id": 2, "data": b"x", "note": "x"},
                {"id": 3, "data": None, "note": None},
                {"id": 4, "data": None, "note": ""},
            ],
        )
    data, note = registry.census(Blob)
    assert (data.not_ciphertext, data.nulls, note.not_ciphertext, note.nulls) == (2, 2, 2, 2)

    report = registry.reencrypt(Blob, batch_size=1, progress=False)
    for column in registry.census(Blob):
        assert column.not_ciphertext == 0 and {k.version: k.rows for k in column.keys} == {1: 2}
    assert report.plaintext_encrypted == 4 and report.rows_updated == 3
    assert report.left_behind == 0 and report.left_rows == []
    assert registry.reencrypt(Blob).rows_scanned == 0

    with Session(engine) as session:
        for _ in range(2):
            got = {b.id: (b.data, b.note) for b in session.scalars(sa.select(Blob))}
            assert got == {1: (b"", None), 2: (b"x", "x"), 3: (None, None), 4: (None, "")}
            session.expire_all()

    registry.rotate()
    clocks.advance(2)
    with pytest.raises(KeyInUseError) as refused:  # the destroy guard counts empty values too
        registry.destroy(1, columns=["blobs.data", "blobs.note"])
    assert refused.value.rows == {"blobs.data": 2, "blobs.note": 2}
    assert registry.reencrypt(Blob).values_by_version == {1: 4}
    assert registry.destroy(1, columns=["blobs.data", "blobs.note"]).version == 1
    with engine.connect() as conn:
        for _ in range(2):
            rows = conn.execute(sa.select(Blob.data, Blob.note).order_by(Blob.id)).all()
            assert [tuple(r) for r in rows] == [(b"", None), (b"x", "x"), (None, None), (None, "")]
    registry.close()


def test_plaintext_that_looks_like_ciphertext_is_named_then_encrypted_on_request(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    raw = _raw(engine, "vault")
    token = _lookalike()
    code = base64.b64encode(_lookalike()).decode()  # legacy text that is base64 of such bytes
    tag = base64.b64encode(_lookalike(first=2, size=30)).decode()
    copied = registry.encrypt(b"another column's value", "vault.code")
    with engine.begin() as conn:
        conn.execute(
            raw.insert(),
            [
                {"id": 1, "token": b"plain", "code": "plain", "tag": "plain"},
                {"id": 2, "token": token, "code": code, "tag": tag},
                {"id": 3, "token": copied, "code": None, "tag": None},
            ],
        )
    with engine.begin() as conn:
        conn.execute(
            sa.update(Vault).where(Vault.id == 3).values(code="written by the application")
        )
    registry.rotate()

    report = registry.reencrypt(Vault, batch_size=2, progress=False)
    assert report.plaintext_encrypted == 3 and report.values_by_version == {1: 1}
    assert report.left_behind == 4
    assert report.failures == {"UnknownKeyError": 3, "DecryptionError": 1}
    assert sorted(report.left_rows, key=lambda r: (r.column, r.primary_key)) == [
        LeftRow("vault.code", (2,), "UnknownKeyError"),
        LeftRow("vault.tag", (2,), "UnknownKeyError"),
        LeftRow("vault.token", (2,), "UnknownKeyError"),
        LeftRow("vault.token", (3,), "DecryptionError"),
    ]
    assert report.to_dict()["left_rows"][0] == {
        "column": "vault.code",
        "primary_key": [2],
        "reason": "UnknownKeyError",
    }
    assert _stored(engine, raw, "token")[2] == token and _stored(engine, raw, "code")[2] == code
    assert registry.reencrypt(Vault).left_behind == 4  # still named, run after run

    with pytest.raises(ConfigurationError, match="not a column of this job"):
        registry.reencrypt(Vault, plaintext_rows={"vault.nothing": [2]})
    with pytest.raises(ConfigurationError, match="primary key of 1 column"):
        registry.reencrypt(Vault, plaintext_rows={"vault.code": [(2, 3)]})

    named = registry.reencrypt(
        Vault,
        plaintext_rows={"vault.token": [2], "vault.code": [1, 2], "vault.tag": ["2"]},
    )
    assert named.plaintext_encrypted == 3 and named.values_by_version == {}
    assert named.left_rows == [LeftRow("vault.token", (3,), "DecryptionError")]
    with Session(engine) as session:
        for _ in range(2):
            rows = session.scalars(sa.select(Vault).where(Vault.id < 3).order_by(Vault.id))
            got = [(v.token, v.code, v.tag) for v in rows]
            assert got == [(b"plain", "plain", "plain"), (token, code, tag)]  # 1: listed, kept
            assert session.scalars(sa.select(Vault.code).where(Vault.id == 3)).all() == [
                "written by the application"
            ]
            assert session.scalars(sa.select(Vault.id).where(Vault.tag == tag)).all() == [2]
            session.expire_all()
    assert _stored(engine, raw, "token")[3] == copied  # never named: never touched


def test_named_rows_by_composite_key_never_overwrite_this_registrys_ciphertext(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Seat(region="eu", number=1, holder="Ada"), Seat(region="eu", number=2)])
        session.commit()
    lookalike = b"\x01legacy text that starts with byte 1"  # plaintext, as UTF-8
    raw = _raw(engine, "seats")
    with engine.begin() as conn:
        conn.execute(raw.update().where(raw.c.number == 2).values(holder=lookalike))
    registry.rotate()
    registry.disable(1)

    listed = {"seats.holder": [("eu", 1), ["eu", "2"]]}
    report = registry.reencrypt(Seat, plaintext_rows=listed)
    assert report.plaintext_encrypted == 1
    assert report.left_rows == [LeftRow("seats.holder", ("eu", 1), "KeyDisabledError")]
    assert report.failures == {"KeyDisabledError": 1}
    registry.enable(1)
    again = registry.reencrypt(Seat, plaintext_rows=listed)
    assert again.values_by_version == {1: 1} and again.left_behind == 0
    with Session(engine) as session:
        for _ in range(2):
            holders = dict(session.execute(sa.select(Seat.number, Seat.holder)).all())
            assert holders == {1: "Ada", 2: lookalike.decode()}


def test_named_rows_under_a_known_key_are_never_taken_as_plaintext(
    db_url: str, tmp_path: Path
) -> None:
    """A job by name without the models assumes the default options, so
    values of a bind_scope or context column fail authentication; naming
    their rows as plaintext must not encrypt the ciphertext again (the value
    would be lost). With the models, by name or not, they move."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    Base.metadata.create_all(engine, tables=[Record.__table__])
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        session.add_all([Record(id=1, body="Ada", mail="ada@example.org"), Record(id=2)])
        session.commit()
    raw = _raw(engine, "records")
    before = {c: _stored(engine, raw, c) for c in ("body", "mail")}
    registry.rotate("acme")

    text = cli(
        "--scope",
        "acme",
        "reencrypt",
        "records.body",
        "records.mail",
        "--plaintext-row",
        "records.body=1",
        "--plaintext-row",
        "records.mail=1",
        code=4,
    )
    assert "records.body=1: UnknownDefinition" in text
    assert "records.mail=1: UnknownDefinition" in text
    assert "run again with --plaintext-row" not in text and "--models" in text
    assert {c: _stored(engine, raw, c) for c in ("body", "mail")} == before

    listed = {"records.body": [1], "records.mail": [1]}
    moved = registry.reencrypt(  # in this process, the models give their options
        "records.body", "records.mail", scope="acme", plaintext_rows=listed
    )
    assert moved.values_by_version == {1: 2} and moved.left_behind == 0
    assert moved.plaintext_encrypted == 0
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        for _ in range(2):
            rows = session.execute(sa.select(Record.body, Record.mail).where(Record.id == 1))
            assert rows.one() == ("Ada", "ada@example.org")
            session.expire_all()
    registry.close()
    engine.dispose()


def test_unknown_keys_are_left_behind_and_other_scopes_counted_apart(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(5)])
    with sqlalchemy_envelope.scope("acme"), engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 10, "body": "acme's note"})
    elsewhere = KeyRegistry(engine, root_key, table_name="other_keys", attach=False)
    elsewhere.init()
    foreign = elsewhere.encrypt(b"another database's value", "notes.body")
    raw = _raw(engine, "notes")
    with engine.begin() as conn:
        conn.execute(raw.update().where(raw.c.id == 1).values(body=foreign))
    registry.rotate()

    report = registry.reencrypt("notes.body", batch_size=2)
    assert report.values_by_version == {1: 4} and report.rows_updated == 4
    assert report.left_behind == 1 and report.failures == {"UnknownKeyError": 1}
    assert report.left_rows == [LeftRow("notes.body", (1,), "UnknownKeyError")]
    assert report.other_scopes == 1
    data = json.loads(report.to_json())
    assert data["other_scopes"] == 1 and data["left_behind"] == 1
    assert data["left_rows"] == [
        {"column": "notes.body", "primary_key": [1], "reason": "UnknownKeyError"}
    ]

    rerun = registry.reencrypt("notes.body")
    assert (rerun.rows_scanned, rerun.left_behind, rerun.other_scopes) == (2, 1, 1)
    registry.rotate("acme")
    tenant = registry.reencrypt("notes.body", scope="acme")
    assert tenant.values_by_version == {1: 1} and tenant.other_scopes == 4
    assert tenant.left_behind == 1 and tenant.failures == {"UnknownKeyError": 1}

    back = registry.decrypt_in_place("notes.body")
    assert back.values_decrypted == 5 and back.left_behind == 1
    assert back.left_rows == [LeftRow("notes.body", (1,), "UnknownKeyError")]
    assert _stored(engine, raw, "body")[1] == foreign
    elsewhere.close()


def test_rows_written_meanwhile_are_only_skipped(
    db_url: str, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    engine = registry.engine
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(10)])
    raw = _raw(engine, "notes")
    with engine.begin() as conn:  # one value that fails: counted once, in every pass
        good = conn.execute(sa.select(raw.c.body).where(raw.c.id == 9)).scalar_one()
        conn.execute(raw.update().where(raw.c.id == 9).values(body=bytes(good)[:-1] + b"\x00"))
    registry.rotate()
    application = sa.create_engine(db_url)  # another process's connection
    written = registry.encrypt(b"written by the application", "notes.body")
    seen: list[str] = []

    def meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        """Once, between the job's read and its compare-and-swap write, the
        application overwrites one row of the batch and deletes another."""
        if statement.lstrip().upper().startswith("UPDATE NOTES") and not seen:
            seen.append(statement)
            with application.begin() as other:
                other.execute(raw.update().where(raw.c.id == 1).values(body=written))
                other.execute(raw.delete().where(raw.c.id == 2))

    sa.event.listen(engine, "before_cursor_execute", meanwhile)
    try:
        report = registry.reencrypt("notes.body", batch_size=4, progress=False)
    finally:
        sa.event.remove(engine, "before_cursor_execute", meanwhile)
    assert seen
    assert report.skipped == 2
    assert report.values_by_version == {1: 7} and report.rows_updated == 7
    assert report.left_behind == 1 and report.failures == {"DecryptionError": 1}
    stored = _stored(engine, raw, "body")
    assert stored[1] == written and 2 not in stored
    (census,) = registry.census("notes.body")
    assert {k.version: k.rows for k in census.keys} == {1: 1, 2: 8}
    expected = {i: f"note {i}" for i in (0, 3, 4, 5, 6, 7, 8)}
    with engine.connect() as conn:
        bodies = dict(conn.execute(sa.select(notes.c.id, notes.c.body).where(notes.c.id < 9)).all())
    assert bodies == expected | {1: "written by the application"}
    application.dispose()


def test_encrypt_column_fails_loudly_then_takes_named_rows(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, db_url)
    project.alembic("upgrade", "head")  # data_keys
    engine = sa.create_engine(db_url)
    files = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    files.metadata.create_all(engine)
    lookalike = _lookalike()
    legacy = {1: b"", 2: b"legacy", 3: lookalike, 4: None}
    with engine.begin() as conn:
        conn.execute(files.insert(), [{"id": k, "body": v} for k, v in legacy.items()])
    migration = """
        from alembic import op

        revision = "0002_encrypt_files"
        down_revision = "0001_data_keys"

        def upgrade():
            op.encrypt_column("files", "body"{named})

        def downgrade():
            op.decrypt_column("files", "body")
        """
    project.migration("0002_encrypt_files.py", migration.format(named=""))
    failed = project.alembic("upgrade", "head", check=False)
    assert failed.returncode != 0
    assert "ValuesLeftBehindError" in failed.stderr
    assert "files.body: 1 values left behind" in failed.stderr
    assert "files.body=3: UnknownKeyError" in failed.stderr
    assert "plaintext_rows" in failed.stderr
    assert _stored(engine, files, "body")[3] == lookalike

    project.migration("0002_encrypt_files.py", migration.format(named=", plaintext_rows=[3]"))
    project.alembic("upgrade", "head")
    encrypted = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.LargeBinary)),
    )
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(project.env["ENVELOPE_ROOT_KEY"]))
    )
    stored = _stored(engine, files, "body")
    assert all(stored[k] != v for k, v in legacy.items() if v is not None)
    with engine.connect() as conn:
        for _ in range(2):
            assert dict(conn.execute(sa.select(encrypted.c.id, encrypted.c.body)).all()) == legacy
    (census,) = registry.census("files.body")
    assert census.not_ciphertext == 0 and census.nulls == 1
    registry.close()

    project.alembic("downgrade", "0001_data_keys")
    assert _stored(engine, files, "body") == legacy
    engine.dispose()


def test_cli_reports_rows_left_behind_and_takes_named_rows(db_url: str, tmp_path: Path) -> None:
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    files = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    files.metadata.create_all(engine)
    elsewhere = KeyRegistry(
        engine, StaticRootKey(os.urandom(32)), table_name="other_keys", attach=False
    )
    elsewhere.init()
    foreign = elsewhere.encrypt(b"another database's value", "files.body")
    elsewhere.close()
    lookalike = _lookalike()
    with engine.begin() as conn:
        conn.execute(
            files.insert(),
            [
                {"id": 1, "body": b""},
                {"id": 2, "body": b"legacy"},
                {"id": 3, "body": lookalike},
                {"id": 4, "body": foreign},
            ],
        )

    first = cli.json("reencrypt", "files.body", "--encrypt-plaintext", code=4)
    assert first["plaintext_encrypted"] == 2 and first["left_behind"] == 2
    assert first["failures"] == {"UnknownKeyError": 2}
    assert first["left_rows"] == [
        {"column": "files.body", "primary_key": [3], "reason": "UnknownKeyError"},
        {"column": "files.body", "primary_key": [4], "reason": "UnknownKeyError"},
    ]
    text = cli("reencrypt", "files.body", code=4)
    assert "files.body=3: UnknownKeyError" in text and "files.body=4: UnknownKeyError" in text
    assert "--plaintext-row" in text

    named = cli.json("reencrypt", "files.body", "--plaintext-row", "files.body=3", code=4)
    assert named["plaintext_encrypted"] == 1
    assert named["left_rows"] == [
        {"column": "files.body", "primary_key": [4], "reason": "UnknownKeyError"}
    ]
    cli("reencrypt", "files.body", "--plaintext-row", "files.body", code=2)
    cli("reencrypt", "files.body", "--plaintext-row", "files.body=[3", code=2)
    cli("reencrypt", "files.body", "--plaintext-row", "files.other=3", code=2)

    back = cli.json("decrypt-in-place", "files.body", "--yes", code=4)
    assert back["values_decrypted"] == 3 and back["failures"] == {"UnknownKeyError": 1}
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(files.c.id, files.c.body)).all())
    assert {k: bytes(v) for k, v in stored.items()} == {
        1: b"",
        2: b"legacy",
        3: lookalike,
        4: foreign,
    }
    engine.dispose()
    assert ROOT not in "\n".join(cli.outputs)


def test_cli_text_report_breaks_every_value_left_behind_down_by_reason(
    db_url: str, tmp_path: Path
) -> None:
    """The text report's reasons add up to the values left behind, the
    plaintext ones included; the JSON counts failures apart, as documented."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    drafts = sa.Table(
        "drafts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    drafts.metadata.create_all(engine)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    renamed = [registry.encrypt(f"draft {i}".encode(), "old_drafts.body") for i in range(2)]
    foreign = KeyRegistry(
        engine, StaticRootKey(os.urandom(32)), table_name="other_keys", attach=False
    )
    foreign.init()
    lost = foreign.encrypt(b"another database's value", "drafts.body")
    foreign.close()
    registry.rotate()
    bodies = [b"legacy one", b"legacy two", *renamed, lost]
    with engine.begin() as conn:
        conn.execute(drafts.insert(), [{"id": i, "body": b} for i, b in enumerate(bodies)])

    expected = {"plaintext": 2, "UnknownDefinition": 2, "UnknownKeyError": 1}
    for workers in ("1", "2"):
        for _ in range(2):
            text = cli("reencrypt", "drafts.body", "--workers", workers, code=4)
            line = "left behind 5 (plaintext: 2, UnknownDefinition: 2, UnknownKeyError: 1)"
            assert line in text.splitlines()
            report = cli.json("reencrypt", "drafts.body", "--workers", workers, code=4)
            assert report["left_behind"] == 5
            assert report["failures"] == {"UnknownDefinition": 2, "UnknownKeyError": 1}
            api = registry.reencrypt("drafts.body", workers=int(workers), progress=False)
            assert api.left_by_reason() == expected and api.left_behind == 5
    done = cli("reencrypt", "drafts.body", "--encrypt-plaintext", code=4)
    assert "left behind 3 (UnknownDefinition: 2, UnknownKeyError: 1)" in done.splitlines()
    registry.close()
    engine.dispose()


def test_cli_database_errors_are_one_line_without_values(db_url: str, tmp_path: Path) -> None:
    """A statement the database refuses is one line naming the command and the
    driver's reason, exit 6, never a traceback with the statement's values; a
    value longer than its (unwidened) column is refused before any write."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    secret = "carol@secret.example"
    engine = sa.create_engine(db_url)
    metadata = sa.MetaData()
    checked = sa.Table(  # ciphertext has no '@': encrypting breaks the check
        "checked",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(400)),
        sa.CheckConstraint("email LIKE '%@%'", name="checked_email"),
    )
    sealed = sa.Table(  # plaintext has an '@': decrypting breaks the check
        "sealed",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(50), storage="text")),
        sa.CheckConstraint("email NOT LIKE '%@%'", name="sealed_email"),
    )
    notwide = sa.Table(
        "notwide",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(50)),
    )
    metadata.create_all(engine)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    with engine.begin() as conn:
        for table in (checked, sealed, notwide):
            conn.execute(table.insert(), [{"id": i, "email": secret} for i in range(1, 5)])
    before = {t.name: _stored(engine, t, "email") for t in (checked, sealed, notwide)}

    def failing(*args: str, code: int) -> str:
        cli(*args, code=code)
        (line,) = cli.outputs[-1].splitlines()
        assert cli.outputs[-2] == "" and "Traceback" not in line
        return line

    for workers in ("1", "2"):
        for _ in range(2):
            line = failing(
                "reencrypt", "checked.email", "--encrypt-plaintext", "--workers", workers, code=6
            )
            assert line.startswith("error: reencrypt: checked: the database refused a statement")
    assert "CHECK" in line.upper() or "constraint" in line
    line = failing("decrypt-in-place", "sealed.email", "--yes", code=6)
    assert line.startswith("error: decrypt-in-place: sealed: the database refused a statement")

    for workers in ("1", "2"):
        if engine.dialect.name == "sqlite":  # SQLite does not enforce VARCHAR lengths
            break
        line = failing(
            "reencrypt", "notwide.email", "--encrypt-plaintext", "--workers", workers, code=2
        )
        assert "notwide.email" in line and "widen the column first" in line
    assert {t.name: _stored(engine, t, "email") for t in (checked, sealed, notwide)} == before
    everything = "\n".join(cli.outputs)
    assert secret not in everything and "secret.example" not in everything
    registry.close()
    engine.dispose()


class Counter(Base):
    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    as_text: Mapped[int | None] = mapped_column(EncryptedType(sa.Integer, storage="text"))
    as_bytes: Mapped[int | None] = mapped_column(EncryptedType(sa.Integer))


def test_decrypt_in_place_refuses_values_that_are_not_strings_or_bytes(
    db_url: str, tmp_path: Path
) -> None:
    """Decrypt in place writes strings (text storage) and bytes (binary
    storage): a model's non-string column is refused, also by name, and by
    name without the models (type unknown) a text value that is not UTF-8
    text without NUL is left behind, never written in an internal encoding."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    Base.metadata.create_all(engine, tables=[Counter.__table__])
    with Session(engine) as session:
        session.add_all([Counter(id=1, as_text=65, as_bytes=65), Counter(id=2, as_text=-7)])
        session.commit()
    raw = _raw(engine, "counters")
    before = {c: _stored(engine, raw, c) for c in ("as_text", "as_bytes")}
    for target in (Counter, Counter.as_text, Counter.as_bytes, "counters.as_text"):
        with pytest.raises(ConfigurationError, match=r"counters\.as_(text|bytes)"):
            registry.decrypt_in_place(target)
    for _ in range(2):
        report = cli.json("decrypt-in-place", "counters.as_text", "--yes", code=4)
        assert report["values_decrypted"] == 0 and report["failures"] == {"NotText": 2}
        assert report["left_rows"] == [
            {"column": "counters.as_text", "primary_key": [1], "reason": "NotText"},
            {"column": "counters.as_text", "primary_key": [2], "reason": "NotText"},
        ]
    text = cli("decrypt-in-place", "counters.as_text", "--yes", code=4)
    assert "counters.as_text=1: NotText" in text
    assert {c: _stored(engine, raw, c) for c in ("as_text", "as_bytes")} == before
    with Session(engine) as session:
        for _ in range(2):
            assert session.scalars(sa.select(Counter.as_text).order_by(Counter.id)).all() == [
                65,
                -7,
            ]
            session.expire_all()
    registry.close()
    engine.dispose()
