"""No plaintext in SQLAlchemy's errors or SQL log. A statement that writes an
encrypted column and fails, before it reaches the database (a value another
column's type refuses) or in it (a unique violation, a value out of range, a
connection lost), raises an error whose text lists the encrypted column's and
the blind index's parameters redacted, and the plain columns' as given. The
SQL log shows ciphertext, digests and redacted rows, at every echo level."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import async_engine_for
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    EncryptedType,
    KeyRegistry,
    StaticRootKey,
    blind_index,
)

MARKER = "SECRET-"
REDACTED = "(redacted by sqlalchemy-envelope)"
_serial = itertools.count(10)


def _secret() -> str:
    """A fresh plaintext: a compiled-cache hit must not replay an old one."""
    return f"{MARKER}{uuid.uuid4().hex[:12]}"


def _models(blind: bool) -> Any:
    """A table with an encrypted email, its blind index (if ``blind``), and
    plain columns whose values the databases can refuse."""

    class Base(DeclarativeBase):
        pass

    columns: dict[str, Any] = {
        "__tablename__": "docs",
        "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
        "email": mapped_column(EncryptedType(sa.String(100))),
        "kind": mapped_column(sa.Enum("a", "b", name="doc_kind", validate_strings=True)),
        "tag": mapped_column(sa.String(20), unique=True),
        "small": mapped_column(sa.SmallInteger, nullable=True),
        "day": mapped_column(sa.Date, nullable=True),
        "code": mapped_column(EncryptedType(sa.String(40), deterministic=True), nullable=True),
    }
    if blind:
        columns["email_index"] = blind_index("email")
    return type("Doc", (Base,), columns)


@dataclass
class Write:
    """One failing write: the changes it makes to row 2 (or the row it inserts)."""

    doc: Any
    engine: sa.Engine
    secret: str
    tag: str
    changes: dict[str, Any]

    def row(self, row_id: int) -> dict[str, Any]:
        return {"id": row_id, "email": self.secret, "kind": "a", "tag": self.tag, **self.changes}


Form = Callable[[Write, Callable[[Any], None]], None]


def core_insert(write: Write, before: Callable[[Any], None]) -> None:
    with write.engine.begin() as conn:
        before(conn)
        conn.execute(sa.insert(write.doc), write.row(next(_serial)))


VALID = {"kind": "b", "small": 1, "day": dt.date(2024, 1, 1)}


def core_executemany(write: Write, before: Callable[[Any], None]) -> None:
    good = {**write.row(next(_serial)), **{k: VALID[k] for k in write.changes if k in VALID}}
    good.update(email=_secret(), tag=f"g{next(_serial)}")
    with write.engine.begin() as conn:
        before(conn)
        conn.execute(sa.insert(write.doc), [good, write.row(next(_serial))])


def unit_of_work(write: Write, before: Callable[[Any], None]) -> None:
    with Session(write.engine) as session:
        before(session.connection())
        session.add(write.doc(**write.row(next(_serial))))
        session.flush()


def orm_update_values(write: Write, before: Callable[[Any], None]) -> None:
    doc = write.doc
    with Session(write.engine) as session:
        before(session.connection())
        row = write.row(2)
        del row["id"]
        session.execute(sa.update(doc).where(doc.id == 2).values(**row))


def orm_bulk_by_primary_key(write: Write, before: Callable[[Any], None]) -> None:
    with Session(write.engine) as session:
        before(session.connection())
        session.execute(sa.update(write.doc), [write.row(2)])


# Whether the form gives the plain columns' values as parameters (an UPDATE's
# values() puts them in the statement, where SQLAlchemy does not list them).
FORMS: dict[Form, bool] = {
    core_insert: True,
    core_executemany: True,
    unit_of_work: True,
    orm_update_values: False,
    orm_bulk_by_primary_key: True,
}


@dataclass
class Fault:
    error: type[Exception]
    changes: Callable[[], dict[str, Any]]
    before: Callable[[sa.Engine, Any], None] = lambda engine, conn: None
    raised_in_database: bool = True


def _lose_connection(engine: sa.Engine, conn: sa.Connection) -> None:
    """End ``conn``'s session on the server (PostgreSQL, MariaDB), or hold
    the SQLite database's write lock from another connection."""
    if engine.dialect.name == "sqlite":
        _lock_sqlite(engine)
        return
    if engine.dialect.name == "postgresql":
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        kill = f"SELECT pg_terminate_backend({pid})"
    else:
        pid = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        kill = f"KILL {pid}"
    with engine.connect() as other:
        other.exec_driver_sql(kill)


_locks: list[Any] = []


def _lock_sqlite(engine: sa.Engine) -> None:
    locker = engine.raw_connection()
    locker.driver_connection.execute("BEGIN IMMEDIATE")
    _locks.append(locker)


def _unlock_sqlite() -> None:
    while _locks:
        locker = _locks.pop()
        locker.driver_connection.rollback()
        locker.close()


def _faults(dialect: str) -> dict[str, Fault]:
    faults = {
        # Another column's type refuses its value: SQLAlchemy's StatementError.
        "enum": Fault(sa.exc.StatementError, lambda: {"kind": "zzz"}, raised_in_database=False),
        "unique": Fault(sa.exc.IntegrityError, lambda: {"tag": "taken"}),
        "connection": Fault(sa.exc.OperationalError, dict, _lose_connection),
    }
    if dialect == "sqlite":  # the others parse a date from a string
        faults["date"] = Fault(
            sa.exc.StatementError, lambda: {"day": "2024-01-01"}, raised_in_database=False
        )
    else:  # SQLite stores any integer
        faults["range"] = Fault(sa.exc.DataError, lambda: {"small": 99_999})
    return faults


def _log_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.orm", "sqlalchemy_envelope"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test


@pytest.mark.parametrize("blind", [False, True], ids=["plain", "blind_index"])
def test_failed_writes_list_no_plaintext(
    db_url: str, root_key: StaticRootKey, caplog: pytest.LogCaptureFixture, blind: bool
) -> None:
    """Every kind of failure, in every statement form, with and without a
    blind index: the plaintext is neither in the traceback nor in the log."""
    _log_everything(caplog)
    sqlite = sa.make_url(db_url).get_backend_name() == "sqlite"
    engine = sa.create_engine(db_url, echo="debug", connect_args={"timeout": 0} if sqlite else {})
    registry = KeyRegistry(engine, root_key)
    registry.init()
    doc = _models(blind)
    doc.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                doc(id=1, email=_secret(), kind="a", tag="taken"),
                doc(id=2, email="", kind="b", tag="t2"),
            ]
        )
        session.commit()

    for name, fault in _faults(engine.dialect.name).items():
        for form, lists_values in FORMS.items():
            for _ in range(2):  # the second run takes the compiled cache's paths
                changes = fault.changes()
                write = Write(doc, engine, _secret(), f"t{next(_serial)}", changes)
                tag = changes.get("tag", write.tag)
                try:
                    with pytest.raises(fault.error) as info:
                        form(write, lambda conn, f=fault: f.before(engine, conn))
                finally:
                    _unlock_sqlite()
                text = "".join(traceback.format_exception(info.value))
                where = f"{name} / {form.__name__}"
                assert write.secret not in text, where
                assert MARKER not in str(info.value.params), where
                if lists_values:  # plain columns' values stay visible
                    assert repr(tag) in text, where
                if not fault.raised_in_database and (blind or lists_values):
                    assert REDACTED in text, where  # the plaintext was listed before
    assert caplog.text.count("INSERT INTO docs") > 10  # the log was captured
    assert MARKER not in caplog.text
    registry.close()
    engine.dispose()


@pytest.mark.parametrize("echo", [True, "debug", False], ids=["echo", "debug", "logger"])
def test_the_sql_log_holds_no_plaintext(
    db_url: str, root_key: StaticRootKey, caplog: pytest.LogCaptureFixture, echo: Any
) -> None:
    """``echo=True`` logs statements and parameters, ``echo="debug"`` rows
    too, and so does the ``sqlalchemy.engine`` logger at DEBUG without echo:
    parameters as sent (ciphertext, digests, the blind index's included),
    rows redacted, also on a connection with a ``logging_token``."""
    _log_everything(caplog)
    engine = sa.create_engine(db_url, echo=echo)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    doc = _models(blind=True)
    doc.metadata.create_all(engine)
    known = _secret()
    for _ in range(2):
        first = next(_serial)
        with engine.begin() as conn:
            conn.execute(sa.insert(doc), _row(first))
            conn.execute(sa.insert(doc), [_row(next(_serial)), _row(next(_serial))])
        with Session(engine) as session:
            session.add(doc(**_row(next(_serial))))
            session.flush()
            session.execute(sa.update(doc).where(doc.id >= first).values(email=_secret()))
            session.execute(sa.update(doc), [{"id": first, "email": _secret()}])
            session.execute(sa.update(doc).values(code=_secret()))
            session.commit()
            session.execute(sa.update(doc).values(code=known, email=known))
            session.commit()
            assert session.scalars(sa.select(doc.id).where(doc.email_index.matches(known))).all()
            assert session.scalars(sa.select(doc.id).where(doc.code == known)).all()
            assert {d.email for d in session.scalars(sa.select(doc))} == {known}
        with engine.connect() as conn:
            tokened = conn.execution_options(logging_token="tok")
            assert tokened.execute(sa.select(doc.email, doc.code)).all()
            assert tokened.execute(sa.select(doc.email).where(doc.code == known)).all()
    registry.close()
    engine.dispose()
    logged = caplog.text
    assert "UPDATE docs SET" in logged and "[tok]" in logged  # the log was captured
    assert MARKER not in logged
    if echo != True:  # noqa: E712 (echo=True logs no rows)
        assert "[tok] Row (row redacted" in logged


def _row(row_id: int) -> dict[str, Any]:
    return {"id": row_id, "email": _secret(), "code": _secret(), "kind": "a", "tag": f"t{row_id}"}


def test_async_failed_writes_list_no_plaintext(db_url: str, root_key: StaticRootKey) -> None:
    """The same through an AsyncEngine, which its AsyncKeyRegistry serves."""

    async def main() -> None:
        engine = async_engine_for(db_url)
        registry = AsyncKeyRegistry(engine, root_key)
        await registry.init()
        doc = _models(blind=True)
        async with engine.begin() as conn:
            await conn.run_sync(doc.metadata.create_all)
            await conn.execute(sa.insert(doc), {**_row(1), "tag": "taken"})
        texts = []
        for fault in ({"kind": "zzz"}, {"tag": "taken"}):
            for _ in range(2):
                secret = _secret()
                with pytest.raises(sa.exc.StatementError) as info:
                    async with engine.begin() as conn:
                        row = {**_row(next(_serial)), "email": secret, **fault}
                        await conn.execute(sa.insert(doc), row)
                texts.append((secret, info.value))
                with pytest.raises(sa.exc.StatementError) as info:
                    async with AsyncSession(engine) as session:
                        row = {**_row(next(_serial)), "email": secret, **fault}
                        session.add(doc(**row))
                        await session.flush()
                texts.append((secret, info.value))
        await registry.close()
        await engine.dispose()
        for secret, error in texts:
            text = "".join(traceback.format_exception(error))
            assert secret not in text
            assert "'kind': 'zzz'" in text or "taken" in text  # plain values stay visible

    asyncio.run(main())


class _Refusing(sa.types.TypeDecorator[str]):
    """A plain column's type whose bind processor fails for one value, as
    any validating or converting type of an application's can."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value == "refused":
            raise ValueError("this column refuses 'refused'")
        return value


def test_another_columns_failing_bind_processor_shows_no_plaintext(
    db_url: str, root_key: StaticRootKey
) -> None:
    """When any bind processor of a statement fails (here a plain column's),
    SQLAlchemy's StatementError lists the statement's parameters as given:
    the encrypted column's plaintext too. In its text, repr, traceback,
    ``params`` and ``args``, through Core (one row, many rows) and the ORM
    (unit of work, bulk INSERT), the encrypted value reads as the marker and
    the plain ones as given, with the engine's default ``hide_parameters``."""

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = "notes"
        id = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
        body = mapped_column(EncryptedType(sa.String(100)))
        code = mapped_column(EncryptedType(sa.String(40), deterministic=True))
        label = mapped_column(_Refusing)

    engine = sa.create_engine(db_url)
    assert not engine.hide_parameters
    registry = KeyRegistry(engine, root_key)
    registry.init()
    Base.metadata.create_all(engine)

    def rows(secret: str) -> list[dict[str, Any]]:
        first = next(_serial)
        return [
            {"id": first, "body": secret, "code": secret, "label": "fine"},
            {"id": next(_serial), "body": secret, "code": secret, "label": "refused"},
        ]

    def core_one(secret: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(Note), rows(secret)[1])

    def core_many(secret: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(Note), rows(secret))

    def unit_of_work(secret: str) -> None:
        with Session(engine) as session:
            session.add_all([Note(**row) for row in rows(secret)])
            session.flush()

    def orm_bulk(secret: str) -> None:
        with Session(engine) as session:
            session.execute(sa.insert(Note), rows(secret))

    for form in (core_one, core_many, unit_of_work, orm_bulk):
        for _ in range(2):  # the second run takes the compiled cache's paths
            secret = _secret()
            with pytest.raises(sa.exc.StatementError) as info:
                form(secret)
            error = info.value
            texts = {
                "str": str(error),
                "repr": repr(error),
                "traceback": "".join(traceback.format_exception(error)),
                "params": repr(error.params),
                "args": repr(error.args),
            }
            assert {k: secret in t for k, t in texts.items()} == dict.fromkeys(texts, False)
            assert REDACTED in texts["str"] and "'refused'" in texts["str"], form.__name__
    registry.close()
    engine.dispose()
