"""What a job (re-encrypt, decrypt in place, backfill) may be pointed at:
never the registry's own keys table, never a column the loaded models define
as something else than an encrypted column (a blind index, a plain column);
and under a column's definition, never a value of another format than the
definition's, which it leaves as it is. Through the command line, as the
README tells users to run it, and through the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from job_targets_models import Base, Code, Patient, Record, Room
from sqlalchemy.orm import DeclarativeBase, Session
from test_cli import ROOT, Cli

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    blind_index_column,
    data_keys_table,
)

TESTS = str(Path(__file__).parent)
MODELS = "job_targets_models"
EMAILS = ["Ada@Example.org", "grace@example.org", "Edsger@Example.org"]


def _keys(engine: sa.Engine, table: str = "data_keys") -> list[tuple[Any, ...]]:
    """Every key of a keys table, as stored (but its count of encryptions,
    which encrypting claims from)."""
    columns = "id, scope, version, algorithm, wrapped_key, root_key_fingerprint, state"
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {columns} FROM {table} ORDER BY id")).all()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def _visits(engine: sa.Engine) -> sa.Table:
    """An application table with encrypted values, under key version 1."""
    visits = sa.Table(
        "visits",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("reason", EncryptedType(sa.String(40), storage="text")),
    )
    visits.create(engine)
    with engine.begin() as conn:
        conn.execute(visits.insert(), [{"id": i, "reason": f"reason {i}"} for i in range(5)])
    return visits


def _reasons(engine: sa.Engine, visits: sa.Table) -> list[str]:
    """The visits' values, read through a Session and a Connection."""
    with Session(engine) as session:
        read = list(session.scalars(sa.select(visits.c.reason).order_by(visits.c.id)))
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(visits.c.reason).order_by(visits.c.id)).scalars()) == (
            read
        )
    return read


# -- the registry's keys table ------------------------------------------------------


def test_the_command_line_refuses_jobs_on_the_keys_table(db_url: str, tmp_path: Path) -> None:
    """Following the README, a user points a job at data_keys (by any name of
    it): every job is refused, exit 2, before anything is written; the keys
    and every value under them stay as they were."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    visits = _visits(engine)
    cli("rotate")
    before = _keys(engine)
    (key_id, *_) = before[0]
    default = sa.inspect(engine).default_schema_name
    names = [
        "data_keys.wrapped_key",
        "data_keys.root_key_fingerprint",
        f"{default}.data_keys.scope",
    ]
    if engine.dialect.name != "postgresql":  # case-insensitive table names
        names.append("DATA_KEYS.wrapped_key")
    runs = [
        ("reencrypt", "--encrypt-plaintext"),
        ("reencrypt", "--plaintext-row", f"data_keys.wrapped_key={key_id}"),
        ("decrypt-in-place", "--yes"),
        ("reencrypt", "--shard", "0/2", "--encrypt-plaintext"),
    ]
    for name in names:
        for command, *options in runs:
            for _ in range(2):
                cli(command, name, *options, code=2)
                (line,) = cli.outputs[-1].splitlines()
                assert (
                    line.startswith("configuration error: ") and "the registry's keys table" in line
                )
    assert _keys(engine) == before

    cli("--table", "vault_keys", "init")
    vault = _keys(engine, "vault_keys")
    cli(
        "--table",
        "vault_keys",
        "reencrypt",
        "vault_keys.wrapped_key",
        "--encrypt-plaintext",
        code=2,
    )
    assert "vault_keys, the registry's keys table" in cli.outputs[-1]
    assert _keys(engine, "vault_keys") == vault

    report = cli.json("reencrypt", "visits.reason")
    assert report["values_by_version"] == {"1": 5} and report["left_behind"] == 0
    assert _reasons(engine, visits) == [f"reason {i}" for i in range(5)]
    registry.close()
    engine.dispose()


def test_the_api_refuses_jobs_on_the_keys_table(db_url: str) -> None:
    """By name, Table, Column, ORM attribute or mapped class, and among the
    columns a job finds by itself: the keys table is never a job's."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    visits = _visits(engine)
    registry.rotate()
    before = _keys(engine)

    keys = data_keys_table(sa.MetaData())
    # Models that (wrongly) map data_keys with an encrypted column: a job
    # taking every defined column must still leave data_keys out.
    mapped = sa.Table(
        "data_keys",
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("wrapped_key", EncryptedType(sa.LargeBinary)),
        sa.Column("scope", EncryptedType(sa.String(40), storage="text")),
        blind_index_column("scope_index", "scope"),
    )

    class Base(DeclarativeBase):
        pass

    class Key(Base):
        __table__ = mapped

    targets: list[Any] = [
        "data_keys.wrapped_key",
        "data_keys.algorithm",
        keys,
        keys.c.wrapped_key,
        keys.c.state,
        mapped,
        mapped.c.wrapped_key,
        Key,
        Key.wrapped_key,
    ]
    for target in targets:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="the registry's keys table"):
                registry.reencrypt(target, encrypt_plaintext=True)
            with pytest.raises(ConfigurationError, match="the registry's keys table"):
                registry.reencrypt(target, plaintext_rows={"data_keys.wrapped_key": [before[0][0]]})
            with pytest.raises(ConfigurationError, match="the registry's keys table"):
                registry.decrypt_in_place(target)
    with pytest.raises(ConfigurationError, match="the registry's keys table"):
        registry.backfill_index(mapped.c.scope_index)
    for _ in range(2):
        report = registry.reencrypt(encrypt_plaintext=True)  # every defined column
        assert "data_keys.wrapped_key" not in report.columns and "visits.reason" in report.columns
    assert _keys(engine) == before
    assert _reasons(engine, visits) == [f"reason {i}" for i in range(5)]
    registry.close()
    engine.dispose()


# -- columns the models define as something else --------------------------------------


def _clinic(engine: sa.Engine) -> None:
    """Patients (with a blind index filled by the application), records with
    a plain tenant column, rooms; then a rotation, so that there is work."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Patient(id=i, email=e) for i, e in enumerate(EMAILS))
        session.add_all(Record(id=i, tenant=f"tenant-{i}", note=f"note {i}") for i in range(3))
        session.add_all(Room(id=i, label=f"room {i}") for i in range(3))
        session.commit()


def _plain_values(engine: sa.Engine) -> dict[str, list[Any]]:
    """What the non-encrypted columns hold, as stored."""
    with engine.connect() as conn:
        return {
            column: list(
                conn.execute(sa.text(f"SELECT {column} FROM {table} ORDER BY id")).scalars()
            )
            for table, column in [
                ("clinic_patients", "email_index"),
                ("clinic_records", "tenant"),
                ("clinic_rooms", "label"),
            ]
        }


def _check_clinic(engine: sa.Engine) -> None:
    """Every lookup by the blind index still finds its patient, and the plain
    columns read as written, through a Session and a Connection, twice."""
    for _ in range(2):
        with Session(engine) as session:
            for i, email in enumerate(EMAILS):
                found = session.scalars(
                    sa.select(Patient.id).where(Patient.email_index.matches(email.upper()))
                )
                assert found.all() == [i]
            assert session.scalars(sa.select(Record.tenant).order_by(Record.id)).all() == [
                f"tenant-{i}" for i in range(3)
            ]
        with engine.connect() as conn:
            patients = Patient.__table__
            for i, email in enumerate(EMAILS):
                stmt = sa.select(patients.c.id).where(patients.c.email_index.matches(email))
                assert conn.execute(stmt).scalars().all() == [i]


def test_the_command_line_refuses_columns_the_models_define_otherwise(
    db_url: str, tmp_path: Path
) -> None:
    """With --models, a blind index column or a plain column named to a job
    is refused (exit 2) before anything is written: encrypting digests would
    break every lookup, and a plain column is read as it is."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    _clinic(engine)
    cli("rotate")
    before = _plain_values(engine)
    models = ("--models", MODELS)
    runs = {
        "clinic_patients.email_index": "is a blind index column in your models, not an encrypted",
        "clinic_records.tenant": "is a plain column in your models (VARCHAR(50)), not an",
        "clinic_rooms.label": "is a plain column in your models (VARCHAR(20)), not an",
    }
    for name, refusal in runs.items():
        for args in [
            ("reencrypt", name, "--encrypt-plaintext"),
            ("reencrypt", name, "--plaintext-row", f"{name}=1"),
            ("reencrypt", name, "--encrypt-plaintext", "--shard", "1/2", "--workers", "2"),
            ("decrypt-in-place", name, "--yes"),
            ("census", name),
        ]:
            for _ in range(2):
                cli(*args, *models, code=2, PYTHONPATH=TESTS)
                (line,) = cli.outputs[-1].splitlines()
                assert line.startswith(f"configuration error: {name} {refusal}"), line
    assert _plain_values(engine) == before
    report = cli.json("reencrypt", "clinic_patients.email", "clinic_records.note", *models,
                      PYTHONPATH=TESTS)  # fmt: skip
    assert report["values_by_version"] == {"1": 6} and report["left_behind"] == 0
    assert _plain_values(engine) == before
    _check_clinic(engine)
    registry.close()
    engine.dispose()


def test_the_api_refuses_columns_that_are_not_encrypted(db_url: str) -> None:
    """By name (the models being loaded in this process), Column or ORM
    attribute: a blind index or plain column is refused, whichever job."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    _clinic(engine)
    registry.rotate()
    before = _plain_values(engine)
    refusals: list[tuple[Any, str]] = [
        ("clinic_patients.email_index", "is a blind index column in your models"),
        (Patient.email_index, "is a blind index column, not an encrypted column"),
        (Patient.__table__.c.email_index, "is a blind index column, not an encrypted column"),
        ("clinic_records.tenant", "is a plain column in your models"),
        (Record.tenant, r"is a plain column \(VARCHAR\(50\)\), not an encrypted column"),
        ("clinic_rooms.label", "is a plain column in your models"),
        (Room.__table__.c.label, r"is a plain column \(VARCHAR\(20\)\), not an encrypted column"),
    ]
    for target, refusal in refusals:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match=refusal):
                registry.reencrypt(target, encrypt_plaintext=True)
            with pytest.raises(ConfigurationError, match=refusal):
                registry.decrypt_in_place(target)
    for _ in range(2):
        report = registry.reencrypt(Patient, Record, Room)  # their encrypted columns only
        assert report.columns == ["clinic_patients.email", "clinic_records.note"]
    assert report.values_by_version == {} and report.left_behind == 0
    assert _plain_values(engine) == before
    _check_clinic(engine)
    registry.close()
    engine.dispose()


# -- values of another format than the definition's -----------------------------------


def _codes_of_the_other_format(engine: sa.Engine) -> sa.Table:
    """clinic_codes as another version of the models wrote it: ``code``
    deterministic and ``tag`` randomized, the reverse of job_targets_models;
    the writer's table, to read the values back with."""
    writer = sa.Table(
        "clinic_codes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", EncryptedType(sa.String(20), deterministic=True)),
        sa.Column("tag", EncryptedType(sa.String(20))),
    )
    writer.create(engine)
    with engine.begin() as conn:
        conn.execute(
            writer.insert(), [{"id": i, "code": f"C-{i}", "tag": f"T-{i}"} for i in range(20)]
        )
    return writer


def _stored(engine: sa.Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id")).all()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def _check_codes(engine: sa.Engine, writer: sa.Table) -> None:
    """The values read as their writer wrote them, and the deterministic ones
    are found by equality: by a Session and a Connection, twice."""
    expected = [(i, f"C-{i}", f"T-{i}") for i in range(20)]
    for _ in range(2):
        with Session(engine) as session:
            assert [tuple(r) for r in session.execute(writer.select().order_by(writer.c.id))] == (
                expected
            )
            assert session.scalars(sa.select(writer.c.id).where(writer.c.code == "C-7")).all() == [
                7
            ]
        with engine.connect() as conn:
            found = conn.execute(sa.select(writer.c.id).where(writer.c.code == "C-3"))
            assert found.scalars().all() == [3]


def test_the_command_line_leaves_values_of_another_format_than_the_models(
    db_url: str, tmp_path: Path
) -> None:
    """Models that say randomized where the database holds deterministic
    values (or the reverse): re-encrypt leaves them as they are, named with
    the reason OtherFormat, exit 4; it never reports a version 0. Without
    models, each value keeps its format and moves if it has to."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    writer = _codes_of_the_other_format(engine)
    cli("rotate")
    before = _stored(engine, "clinic_codes")
    columns = ("clinic_codes.code", "clinic_codes.tag")
    for _ in range(2):
        report = cli.json("reencrypt", *columns, "--models", MODELS, code=4, PYTHONPATH=TESTS)
        assert report["values_by_version"] == {} and report["left_behind"] == 40
        assert report["failures"] == {"OtherFormat": 40}
        assert {r["reason"] for r in report["left_rows"]} == {"OtherFormat"}
        text = cli("reencrypt", *columns, "--models", MODELS, code=4, PYTHONPATH=TESTS)
        assert (
            "clinic_codes.code=0: OtherFormat" in text
            and "clinic_codes.tag=19: OtherFormat" in text
        )
        assert (
            "OtherFormat: the value is deterministic (or randomized) but the column's definition"
            in text
        )
        assert "left behind 40 (OtherFormat: 40)" in text
        assert _stored(engine, "clinic_codes") == before
    _check_codes(engine, writer)

    report = cli.json("reencrypt", *columns)  # by reflection: each value keeps its format
    assert report["values_by_version"] == {"1": 20} and report["left_behind"] == 0
    assert cli.json("reencrypt", *columns)["values_by_version"] == {}
    after = _stored(engine, "clinic_codes")
    assert [row[1] for row in after] == [row[1] for row in before]  # deterministic: as it was
    _check_codes(engine, writer)
    registry.close()
    engine.dispose()


def test_the_api_leaves_values_of_another_format_than_the_definition(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    writer = _codes_of_the_other_format(engine)
    registry.rotate()
    before = _stored(engine, "clinic_codes")
    for targets in [(Code.code, Code.tag), (Code,), (Code.__table__,)]:
        for workers in (1, 2):
            report = registry.reencrypt(*targets, workers=workers, progress=False)
            assert report.values_by_version == {} and report.failures == {"OtherFormat": 40}
            assert report.left_by_reason() == {"OtherFormat": 40}
            assert 0 not in report.values_by_version
    assert _stored(engine, "clinic_codes") == before
    _check_codes(engine, writer)
    registry.close()
    engine.dispose()
