"""A column's definition (its `EncryptedType`) is the one source of truth of
how its values are sealed, for every job, whether given the column or its
name: by name, a job uses the loaded models' definition (in this process, or
imported by the command line's ``--models``, ``ENVELOPE_MODELS`` or entry
points, or by Alembic's env.py); with none loaded, it never turns a value into
another format, and refuses values it cannot read with the default options
as of an unknown definition, not as tampering."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from column_definitions_models import Base, Citizen, Memo, Passport
from sqlalchemy.orm import Session
from test_alembic import Project
from test_cli import ROOT, Cli

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    LeftRow,
    StaticRootKey,
    ValuesLeftBehindError,
)
from sqlalchemy_envelope.crypto import format as fmt

TESTS = str(Path(__file__).parent)
MODELS = "column_definitions_models"
SSNS = ["123-45-6789", "987-65-4321", "555-12-3456"]
SSN, BODY = fmt.given_context("ledgers.ssn"), fmt.given_context("ledgers.body")


def _registry(engine: sa.Engine) -> KeyRegistry:
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    registry.create_scope("acme")
    return registry


def _stored(engine: sa.Engine, table: str, column: str) -> dict[int, Any]:
    raw = sa.Table(table, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(raw.c.id, raw.c[column])).all()
    return {key: bytes(v) if isinstance(v, memoryview) else v for key, v in rows}


def _first_bytes(values: dict[int, Any]) -> set[int]:
    return {(fmt.from_text(v) if isinstance(v, str) else bytes(v))[0] for v in values.values()}


def _citizens(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine, tables=[Citizen.__table__])
    with Session(engine) as session:
        session.add_all(
            Citizen(id=i, ssn=ssn, badge=f"B-{i}", name=f"citizen {i}")
            for i, ssn in enumerate(SSNS)
        )
        session.commit()


def _memos(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine, tables=[Memo.__table__])
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        session.add_all(Memo(id=i, body=f"body {i}", note=f"note {i}") for i in range(4))
        session.commit()


def _check_lookups(engine: sa.Engine) -> None:
    """Equality lookups on the deterministic columns, by Session and by
    Connection, each statement executed twice."""
    for i, ssn in enumerate(SSNS):
        with Session(engine) as session:
            for _ in range(2):
                found = session.scalars(sa.select(Citizen).where(Citizen.ssn == ssn)).one()
                assert (found.id, found.badge, found.name) == (i, f"B-{i}", f"citizen {i}")
                assert session.scalars(
                    sa.select(Citizen.id).where(Citizen.badge == f"B-{i}")
                ).all() == [i]
                session.expire_all()
        with engine.connect() as conn:
            for _ in range(2):
                stmt = sa.select(Citizen.__table__.c.id).where(Citizen.__table__.c.ssn == ssn)
                assert conn.execute(stmt).scalars().all() == [i]


def _check_memos(engine: sa.Engine) -> None:
    for _ in range(2):
        with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
            rows = session.execute(sa.select(Memo.id, Memo.body, Memo.note).order_by(Memo.id))
            assert [tuple(r) for r in rows] == [(i, f"body {i}", f"note {i}") for i in range(4)]
        with engine.connect() as conn:
            stmt = sa.select(Memo.__table__.c.body, Memo.__table__.c.note).order_by(Memo.id)
            assert [tuple(r) for r in conn.execute(stmt)] == [
                (f"body {i}", f"note {i}") for i in range(4)
            ]


# -- defect 2: a deterministic column re-encrypted by name -----------------


def test_deterministic_column_by_name_with_its_model_keeps_its_format(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    registry = _registry(engine)
    _citizens(engine)
    before = _stored(engine, "citizens", "ssn")
    registry.rotate()

    for _ in range(2):
        report = registry.reencrypt("citizens.ssn", "citizens.badge", "citizens.name")
        assert report.left_behind == 0
        assert _stored(engine, "citizens", "ssn") == before  # deterministic: never rotated
    assert _first_bytes(_stored(engine, "citizens", "badge")) == {fmt.DETERMINISTIC_VERSION}
    (name,) = registry.census("citizens.name")
    assert {k.version: k.rows for k in name.keys} == {2: 3}
    _check_lookups(engine)
    registry.close()
    engine.dispose()


def test_deterministic_column_by_name_on_the_command_line(db_url: str, tmp_path: Path) -> None:
    cli = Cli(db_url, tmp_path)
    engine = sa.create_engine(db_url)
    registry = _registry(engine)
    _citizens(engine)
    before = {c: _stored(engine, "citizens", c) for c in ("ssn", "badge")}
    cli("rotate")

    # Without the models: the deterministic values keep their format; those
    # that do not read with the default context are refused as such.
    text = cli("reencrypt", "citizens.ssn", "citizens.badge", code=4)
    assert "citizens.badge=0: UnknownDefinition" in text and "--models" in text
    assert "DecryptionError" not in text
    report = cli.json("reencrypt", "citizens.ssn", "citizens.badge", code=4)
    assert report["failures"] == {"UnknownDefinition": 3} and report["values_by_version"] == {}
    assert {c: _stored(engine, "citizens", c) for c in ("ssn", "badge")} == before
    _check_lookups(engine)

    # With them: the job knows the columns' options.
    report = cli.json("reencrypt", "citizens.ssn", "citizens.badge", "citizens.name",
                      "--models", MODELS, PYTHONPATH=TESTS)  # fmt: skip
    assert report["left_behind"] == 0 and report["values_by_version"] == {"1": 3}
    assert {c: _stored(engine, "citizens", c) for c in ("ssn", "badge")} == before
    _check_lookups(engine)
    registry.close()
    engine.dispose()


def test_by_name_without_a_definition_never_changes_a_value_format(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """An operations script names columns, and imports no model: the rows were
    written by the application (as here, through the registry's own calls)."""
    ledgers = sa.Table(
        "ledgers",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *(sa.Column(name, sa.LargeBinary) for name in ("ssn", "body", "note", "memo")),
    )
    ledgers.create(engine)
    registry.create_scope("acme")
    rows = [
        {
            "id": i,
            "ssn": registry.envelope.encrypt_deterministic(ssn.encode(), SSN.current),
            "body": registry.envelope.encrypt_bytes(
                f"body {i}".encode(), fmt.scoped_context(BODY, "acme").current, "acme"
            ),
            "note": registry.encrypt(f"note {i}".encode(), "old_ledgers.note"),
            "memo": registry.encrypt(f"memo {i}".encode(), "ledgers.memo"),
        }
        for i, ssn in enumerate(SSNS)
    ]
    with engine.begin() as conn:
        conn.execute(ledgers.insert(), rows)
    registry.rotate()
    registry.rotate("acme")
    before = {c: _stored(engine, "ledgers", c) for c in ("ssn", "body", "note")}

    for run in range(2):
        report = registry.reencrypt("ledgers.ssn", "ledgers.note", "ledgers.memo")
        assert report.failures == {"UnknownDefinition": 3}
        assert {r.column for r in report.left_rows} == {"ledgers.note"}
        assert report.values_by_version == ({1: 3} if run == 0 else {})
        scoped = registry.reencrypt("ledgers.body", scope="acme")
        assert scoped.left_rows == [LeftRow("ledgers.body", (i,), "UnknownDefinition")
                                    for i in range(3)]  # fmt: skip
        back = registry.decrypt_in_place("ledgers.body", "ledgers.note")
        assert back.values_decrypted == 0 and back.failures == {"UnknownDefinition": 6}
        assert {c: _stored(engine, "ledgers", c) for c in before} == before
    with engine.connect() as conn:
        for _ in range(2):
            for i, ssn in enumerate(SSNS):  # a lookup by the value's deterministic form
                probe = registry.envelope.encrypt_deterministic(ssn.encode(), SSN.current)
                found = conn.execute(sa.select(ledgers.c.id).where(ledgers.c.ssn == probe))
                assert found.scalars().all() == [i]
    assert "UnknownDefinition: does not decrypt with the default options" in "\n".join(
        report.left_lines()
    )


# -- defect 3: bind_scope and context= columns by name ---------------------


def test_scoped_and_context_columns_by_name_with_their_model(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    registry = _registry(engine)
    _memos(engine)
    registry.rotate("acme")

    report = registry.reencrypt("memos.body", "memos.note", scope="acme")
    assert report.left_behind == 0 and report.values_by_version == {1: 8}
    assert registry.reencrypt("memos.body", "memos.note", scope="acme").rows_scanned == 0
    _check_memos(engine)
    (body,) = registry.census("memos.body", scope="acme")
    assert {k.version: k.rows for k in body.keys} == {2: 4}

    back = registry.decrypt_in_place("memos.body", "memos.note")
    assert back.values_decrypted == 8 and back.left_behind == 0
    assert _stored(engine, "memos", "body") == {i: f"body {i}".encode() for i in range(4)}
    registry.close()
    engine.dispose()


def test_scoped_and_context_columns_by_name_on_the_command_line(
    db_url: str, tmp_path: Path
) -> None:
    cli = Cli(db_url, tmp_path)
    engine = sa.create_engine(db_url)
    registry = _registry(engine)
    _memos(engine)
    cli("--scope", "acme", "rotate")
    before = {c: _stored(engine, "memos", c) for c in ("body", "note")}

    text = cli("--scope", "acme", "reencrypt", "memos.body", "memos.note", code=4)
    assert "memos.body=0: UnknownDefinition" in text and "memos.note=3: UnknownDefinition" in text
    assert "DecryptionError" not in text and "pass --models your.models" in text
    text = cli("decrypt-in-place", "memos.body", "--yes", code=4)
    assert "memos.body=2: UnknownDefinition" in text and "DecryptionError" not in text
    assert {c: _stored(engine, "memos", c) for c in ("body", "note")} == before

    cli("reencrypt", "memos.body", "--models", "no_such_models", code=2)
    assert "cannot import the models module 'no_such_models'" in cli.outputs[-1]
    report = cli.json("--models", MODELS, "--scope", "acme", "reencrypt", "memos.body",
                      PYTHONPATH=TESTS)  # fmt: skip
    assert report["left_behind"] == 0 and report["values_by_version"] == {"1": 4}
    report = cli.json("reencrypt", "memos.note", "--scope", "acme",
                      PYTHONPATH=TESTS, ENVELOPE_MODELS=f"os, {MODELS}")  # fmt: skip
    assert report["left_behind"] == 0 and report["values_by_version"] == {"1": 4}
    _check_memos(engine)
    registry.close()
    engine.dispose()


def test_models_from_an_entry_point(db_url: str, tmp_path: Path) -> None:
    """An application can declare its models once, as an entry point of the
    ``sqlalchemy_envelope.models`` group, instead of passing --models."""
    site = tmp_path / "site"
    info = site / "ledger_app-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ledger-app\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[sqlalchemy_envelope.models]\napp = {MODELS}\n")
    cli = Cli(db_url, tmp_path)
    engine = sa.create_engine(db_url)
    registry = _registry(engine)
    _memos(engine)
    cli("--scope", "acme", "rotate")

    report = cli.json("--scope", "acme", "reencrypt", "memos.body", "memos.note",
                      PYTHONPATH=f"{site}{os.pathsep}{TESTS}")  # fmt: skip
    assert report["left_behind"] == 0 and report["values_by_version"] == {"1": 8}
    _check_memos(engine)
    (info / "entry_points.txt").write_text("[sqlalchemy_envelope.models]\napp = no_such_app\n")
    cli("census", "memos.body", code=2, PYTHONPATH=str(site))
    assert "entry point 'app'" in cli.outputs[-1]
    registry.close()
    engine.dispose()


# -- resolution: schema, disagreeing definitions, another database ----------


def test_a_definition_applies_to_its_own_schema_only(
    other_schema: tuple[sa.Engine, str], root_key: Any
) -> None:
    engine, schema = other_schema
    registry = KeyRegistry(engine, root_key)
    registry.init()
    registry.create_scope("acme")
    archive = sa.Table(
        "archive",
        sa.MetaData(schema=schema),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(40), bind_scope=True)),
    )
    plain = sa.Table(  # the same name in the default schema, of no model
        "archive",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    archive.create(engine)
    plain.create(engine)
    with sqlalchemy_envelope.scope("acme"), engine.begin() as conn:
        conn.execute(archive.insert(), [{"id": i, "body": f"kept {i}"} for i in range(3)])
    with engine.begin() as conn:
        conn.execute(
            plain.insert(),
            [{"id": i, "body": registry.encrypt(b"x", "archive.body")} for i in range(2)],
        )
    registry.rotate("acme")
    registry.rotate()

    moved = registry.reencrypt(f"{schema}.archive.body", scope="acme")
    assert moved.values_by_version == {1: 3} and moved.left_behind == 0
    assert registry.reencrypt("archive.body").values_by_version == {1: 2}
    with sqlalchemy_envelope.scope("acme"), engine.connect() as conn:
        for _ in range(2):
            got = conn.execute(sa.select(archive.c.body).order_by(archive.c.id)).scalars().all()
            assert got == [f"kept {i}" for i in range(3)]
    registry.close()


def test_definitions_that_disagree_are_refused(engine: sa.Engine, registry: KeyRegistry) -> None:
    def define(**options: Any) -> sa.Table:
        return sa.Table(
            "dossiers",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("code", EncryptedType(sa.String(20), **options)),
        )

    first, second = define(), define(deterministic=True)
    first.create(engine)
    for run in (registry.reencrypt, registry.decrypt_in_place, registry.census):
        with pytest.raises(ConfigurationError, match=r"dossiers\.code has 2 loaded definitions"):
            run("dossiers.code")
    with pytest.raises(ConfigurationError, match=r"disagree \(deterministic\)"):
        registry.census()
    with engine.begin() as conn:
        conn.execute(first.insert(), {"id": 1, "code": "A-1"})
    registry.rotate()
    assert registry.reencrypt(first.c.code).values_by_version == {1: 1}  # the column says which
    assert registry.census(second.c.code)[0].keys[0].version == 2


def test_a_definition_of_another_storage_is_refused(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    receipts = sa.Table(  # a model of another database, by the same name
        "receipts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("total", EncryptedType(sa.Integer, storage="text")),
    )
    sa.Table(  # this database's column is binary, of no model
        "receipts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("total", sa.LargeBinary),
    ).create(engine)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="storage='text', but the database column"):
            registry.reencrypt("receipts.total")
    assert receipts.c.total.type.storage == "text"


# -- the Alembic operations --------------------------------------------------


def test_alembic_operations_use_the_models_env_py_imports(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, db_url)
    project.alembic("upgrade", "head")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(
        engine, environ={"ENVELOPE_ROOT_KEY": project.env["ENVELOPE_ROOT_KEY"]}
    )
    registry.init()
    registry.create_scope("acme")
    _memos(engine)
    Base.metadata.create_all(engine, tables=[Passport.__table__])
    raw = sa.Table("passports", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(raw.insert(), [{"id": i, "number": f"P{i:04}"} for i in range(3)])
    before = _stored(engine, "memos", "body")
    versions = tmp_path / "migrations" / "versions"
    (versions / "0002_columns.py").write_text(
        '"""Convert two columns in place."""\n'
        "from alembic import op\n\n"
        'revision = "0002"\ndown_revision = "0001_data_keys"\n'
        "branch_labels = depends_on = None\n\n\n"
        "def upgrade():\n"
        '    op.decrypt_column("memos", "body")\n'
        '    op.encrypt_column("passports", "number")\n\n\n'
        "def downgrade():\n    pass\n"
    )

    failed = project.alembic("upgrade", "head", check=False)  # env.py imports no model
    assert failed.returncode != 0
    assert ValuesLeftBehindError.__name__ in failed.stderr
    assert "memos.body=0: UnknownDefinition" in failed.stderr and "env.py" in failed.stderr
    assert "DecryptionError" not in failed.stderr
    assert _stored(engine, "memos", "body") == before

    project.use_models((Path(TESTS) / f"{MODELS}.py").read_text())
    project.alembic("upgrade", "head")
    assert _stored(engine, "memos", "body") == {i: f"body {i}".encode() for i in range(4)}
    assert _first_bytes(_stored(engine, "passports", "number")) == {fmt.DETERMINISTIC_VERSION}
    with Session(engine) as session:
        for _ in range(2):
            found = session.scalars(sa.select(Passport.id).where(Passport.number == "P0002"))
            assert found.all() == [2]
    registry.close()
    engine.dispose()


def test_a_definition_goes_with_its_table(
    db_url: str, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    """Jobs by name know only the definitions still loaded: a table that is
    gone (a test's, with the engine whose statement cache held it) no longer
    counts, even after its column served statements, so a new definition of
    the same name is the only one."""

    def define(**options: Any) -> sa.Table:
        return sa.Table(
            "transient_dossiers",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("code", EncryptedType(sa.String(20), **options)),
        )

    engine = sa.create_engine(db_url)
    other = KeyRegistry(engine, root_key)  # another process's view: its own engine
    first = define()
    first.create(engine)
    for _ in range(2):
        with engine.begin() as conn:
            conn.execute(first.insert(), {"id": 1, "code": "A-1"})
            assert conn.execute(sa.select(first.c.code)).scalar_one() == "A-1"
            conn.execute(first.delete())
    other.close()
    engine.dispose()
    del first, engine, other, conn
    gc.collect()
    second = define(deterministic=True)
    assert [census.column for census in registry.census("transient_dossiers.code")] == [
        "transient_dossiers.code"
    ]
    assert second.c.code.type.deterministic
