"""EncryptedType: every supported type round-trips on SQLite and PostgreSQL,
through Core and the ORM, and the database only ever holds ciphertext."""

from __future__ import annotations

import binascii
import datetime as dt
import enum
import itertools
import os
import re
import string
import traceback
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import stored_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    ConfigurationError,
    DecryptionError,
    EncryptedComparisonError,
    EncryptedType,
    InvalidValueError,
    KeyRegistry,
    NotCiphertextError,
)
from sqlalchemy_envelope.crypto.format import OVERHEAD, text_length


class Mood(enum.Enum):
    HAPPY = "h"
    GRUMPY = "g"


TZ = dt.timezone(dt.timedelta(hours=5, minutes=30))

# column name -> (wrapped type, sample values that must come back equal and of the same type)
CASES: dict[str, tuple[Any, list[Any]]] = {
    "string": (sa.String(200), ["Alice", "", "ünïcödé ✓ 日本語 🎉", "x" * 200]),
    "text": (sa.Text(), ["long " * 5000, ""]),
    "unicode": (sa.Unicode(50), ["Ωmega"]),
    "binary": (sa.LargeBinary(), [b"\x00\xff" * 100, b""]),
    "integer": (sa.Integer(), [0, -1, 2**31 - 1, -(2**31)]),
    "bigint": (sa.BigInteger(), [2**63 - 1, -(2**63)]),
    "small": (sa.SmallInteger(), [12]),
    "float": (sa.Float(), [3.141592653589793, -0.0, 1e308]),
    "numeric": (
        sa.Numeric(38, 20),
        [
            Decimal("12345678901234567.12345678901234567891"),
            Decimal("0.10000000000000000000"),
            Decimal("-1E-20"),
        ],
    ),
    "boolean": (sa.Boolean(), [True, False]),
    "date": (sa.Date(), [dt.date(1999, 12, 31), dt.date(1, 1, 1)]),
    "naive_dt": (sa.DateTime(), [dt.datetime(2024, 2, 29, 23, 59, 59, 999999)]),
    "aware_dt": (sa.DateTime(timezone=True), [dt.datetime(2024, 1, 1, 12, 0, tzinfo=TZ)]),
    "time": (sa.Time(), [dt.time(8, 30, 1, 5)]),
    "interval": (sa.Interval(), [dt.timedelta(days=-3, seconds=5, microseconds=7)]),
    "uuid": (sa.Uuid(), [uuid.UUID("12345678-1234-5678-1234-567812345678")]),
    "json": (
        sa.JSON(),
        [
            {"a": [1, 2, {"b": None}], "ü": "✓", "n": 1.5, "t": True},
            [1, "two", [3.0]],
            {"big": [{"i": i, "s": "v" * 50} for i in range(2000)]},
            "just a string",
        ],
    ),
    "enum": (Mood, [Mood.HAPPY, Mood.GRUMPY]),
    "string_enum": (sa.Enum("low", "high", name="level"), ["low", "high"]),
}


def _table(storage: str) -> sa.Table:
    md = sa.MetaData()
    return sa.Table(
        f"everything_{storage}",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        *(
            sa.Column(name, EncryptedType(type_, storage=storage), nullable=True)
            for name, (type_, _) in CASES.items()
        ),
    )


def _rows() -> list[dict[str, Any]]:
    width = max(len(values) for _, values in CASES.values())
    rows = []
    for i in range(width):
        row: dict[str, Any] = {"id": i + 1}
        for name, (_, values) in CASES.items():
            row[name] = values[i] if i < len(values) else None
        rows.append(row)
    return rows


def _same(expected: Any, actual: Any) -> None:
    assert actual == expected
    assert type(actual) is type(expected)
    if isinstance(expected, dt.datetime):
        assert actual.utcoffset() == expected.utcoffset()
    if isinstance(expected, Decimal):
        assert str(actual) == str(expected)


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_every_type_round_trips_through_core_executemany(
    engine: sa.Engine, registry: KeyRegistry, storage: str
) -> None:
    table = _table(storage)
    table.metadata.create_all(engine)
    rows = _rows()
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    with engine.connect() as conn:
        got = conn.execute(table.select().order_by(table.c.id)).mappings().all()
    assert len(got) == len(rows)
    for want, have in zip(rows, got, strict=True):
        for name in CASES:
            if want[name] is None:
                assert have[name] is None
            else:
                _same(want[name], have[name])


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_database_holds_no_plaintext(
    engine: sa.Engine, registry: KeyRegistry, storage: str
) -> None:
    table = _table(storage)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), _rows())
    blob = stored_bytes(engine, table.name)
    secrets = [
        "Alice",
        "ünïcödé",
        "Ωmega",
        "just a string",
        "12345678901234567",
        "1999-12-31",
        "HAPPY",
        "GRUMPY",
    ]
    for secret in secrets:
        assert secret.encode() not in blob


def test_values_are_randomized_and_sized(engine: sa.Engine, registry: KeyRegistry) -> None:
    table = _table("binary")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "string": "same"}, {"id": 2, "string": "same"}])
    raw = sa.Table(table.name, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        a, b = conn.execute(sa.select(raw.c.string).order_by(raw.c.id)).scalars()
    assert a != b
    assert len(a) == len(b) == OVERHEAD + len(b"same")


def test_text_storage_is_sized_from_the_plaintext_length() -> None:
    column_type = EncryptedType(sa.String(200), storage="text")
    assert isinstance(column_type.impl, sa.String)
    assert column_type.impl.length == text_length(4 * 200) == 4 * -(-(800 + OVERHEAD) // 3)
    assert isinstance(EncryptedType(sa.Text, storage="text").impl, sa.Text)
    assert isinstance(EncryptedType(sa.String(10)).impl, sa.LargeBinary)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    born: Mapped[dt.date] = mapped_column(EncryptedType(sa.Date))
    notes: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(sa.JSON))
    mood: Mapped[Mood | None] = mapped_column(EncryptedType(Mood, storage="text"))
    balance: Mapped[Decimal | None] = mapped_column(EncryptedType(sa.Numeric(12, 2)))


def test_orm_insert_select_update_merge_and_bulk(engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(id=1, name="Ada", born=dt.date(1815, 12, 10), notes={"x": [1]}))
        session.add_all(
            [Patient(id=i, name=f"p{i}", born=dt.date(2000, 1, i % 28 + 1)) for i in range(2, 60)]
        )
        session.commit()

    with Session(engine) as session:
        ada = session.get(Patient, 1)
        assert ada is not None
        assert (ada.name, ada.born, ada.notes, ada.mood) == (
            "Ada",
            dt.date(1815, 12, 10),
            {"x": [1]},
            None,
        )
        ada.name = "Ada Lovelace"
        ada.mood = Mood.HAPPY
        ada.balance = Decimal("10.25")
        session.commit()

    with Session(engine) as session:
        session.merge(Patient(id=2, name="merged", born=dt.date(1970, 1, 1), notes=None))
        session.execute(
            sa.insert(Patient),
            [{"id": 100 + i, "name": f"bulk{i}", "born": dt.date(1990, 1, 1)} for i in range(5)],
        )
        session.execute(sa.update(Patient), [{"id": 100, "name": "bulk-updated"}])
        session.commit()

    with Session(engine) as session:
        got = {p.id: p for p in session.scalars(sa.select(Patient))}
        assert got[1].name == "Ada Lovelace" and got[1].mood is Mood.HAPPY
        assert got[1].balance == Decimal("10.25")
        assert got[2].name == "merged" and got[2].born == dt.date(1970, 1, 1)
        assert got[100].name == "bulk-updated" and got[104].name == "bulk4"
        assert len(got) == 64
        nulls = session.scalars(sa.select(Patient.id).where(Patient.notes.is_(None))).all()
        assert 2 in nulls and 1 not in nulls


@pytest.mark.parametrize("none_as_null", [False, True])
def test_json_nulls_are_stored_as_the_plain_column_stores_them(
    engine: sa.Engine, registry: KeyRegistry, none_as_null: bool
) -> None:
    """``JSON.NULL`` is JSON ``null``, ``null()`` SQL NULL, and None JSON
    ``null`` unless ``none_as_null=True`` makes it SQL NULL: the encrypted
    column stores what the plain one does (encrypting JSON ``null``), in
    every statement form, and reads None back."""
    table = sa.Table(
        f"nulls_{none_as_null}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("plain", sa.JSON(none_as_null=none_as_null), nullable=True),
        sa.Column("binary", EncryptedType(sa.JSON(none_as_null=none_as_null)), nullable=True),
        sa.Column(
            "text",
            EncryptedType(sa.JSON(none_as_null=none_as_null), storage="text"),
            nullable=True,
        ),
    )
    table.create(engine)

    class Base(DeclarativeBase):
        pass

    row_class = type("Doc", (Base,), {"__table__": table})
    columns = ("plain", "binary", "text")
    values = {"none": None, "json_null": sa.JSON.NULL, "sql_null": sa.null()}

    def each(value: Any) -> dict[str, Any]:
        return dict.fromkeys(columns, value)

    written: dict[int, str] = {}  # id -> what was written
    ids = itertools.count(1)
    for _ in range(2):
        for name, value in values.items():
            with engine.begin() as conn:
                if name != "sql_null":  # a null() parameter is SQL, not a value
                    written[row_id := next(ids)] = name
                    conn.execute(table.insert(), {"id": row_id, **each(value)})
                written[row_id := next(ids)] = name
                conn.execute(table.insert().values(id=row_id, **each(value)))
                written[row_id := next(ids)] = name
                conn.execute(table.insert(), {"id": row_id, **each({"a": 1})})
                conn.execute(table.update().where(table.c.id == row_id).values(**each(value)))
            with Session(engine) as session:
                written[row_id := next(ids)] = name
                session.add(row_class(id=row_id, **each(value)))
                written[row_id := next(ids)] = name
                session.add(row_class(id=row_id, **each([1])))
                session.flush()
                row = session.get(row_class, row_id)
                for column in columns:
                    setattr(row, column, value)
                if name != "sql_null":
                    written[row_id := next(ids)] = name
                    session.execute(sa.insert(row_class), [{"id": row_id, **each(value)}])
                    written[row_id := next(ids)] = name
                    session.add(row_class(id=row_id, **each("x")))
                    session.flush()
                    session.execute(sa.update(row_class), [{"id": row_id, **each(value)}])
                session.commit()
        with engine.begin() as conn:
            written[row_id := next(ids)] = "omitted"
            conn.execute(table.insert(), {"id": row_id})

    sql_null = {"sql_null", "omitted"} | ({"none"} if none_as_null else set())
    for _ in range(2):
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(table, *(table.c[c].is_(None) for c in columns)).order_by(table.c.id)
            ).all()
        assert [row.id for row in rows] == list(written)
        for row in rows:
            assert tuple(row)[1:4] == (None, None, None), written[row.id]
            assert tuple(row)[4:] == (written[row.id] in sql_null,) * 3, written[row.id]


def test_sqlalchemy_internals_may_compare_a_column_with_itself(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """SQLAlchemy looks columns up in dicts, which compares an annotated
    column with its original using ==: on a cached statement's second run,
    and in ORM update() bookkeeping. Neither is a comparison of values."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Patient(id=i, name=f"p{i}", born=dt.date(2000, 1, i)) for i in (1, 2)])
        session.commit()
    for _ in range(2):
        with engine.connect() as conn:
            assert conn.execute(sa.select(Patient.name).where(Patient.id == 2)).all() == [("p2",)]
    for sync in ("auto", "evaluate", "fetch", False):
        for run in range(2):
            with Session(engine) as session:
                ada = session.get(Patient, 1)
                assert ada is not None
                session.execute(
                    sa.update(Patient)
                    .where(Patient.id == 1)
                    .values(name=f"{sync}-{run}")
                    .execution_options(synchronize_session=sync)
                )
                if sync is not False:
                    assert ada.name == f"{sync}-{run}"
                session.commit()
            with Session(engine) as session:
                assert session.get(Patient, 1).name == f"{sync}-{run}"  # type: ignore[union-attr]


def test_comparisons_on_encrypted_columns_are_refused() -> None:
    for make in (
        lambda: Patient.name == "Ada",
        lambda: Patient.name != "Ada",
        lambda: Patient.name.in_(["Ada"]),
        lambda: Patient.name.like("A%"),
        lambda: Patient.born > dt.date(2000, 1, 1),
        lambda: Patient.name == "Ada",
    ):
        with pytest.raises(EncryptedComparisonError, match="blind index"):
            make()
    assert "IS NULL" in str(Patient.notes == None)  # noqa: E711
    assert "IS NOT NULL" in str(Patient.notes.is_not(None))


def test_wrong_python_types_and_overlong_values_are_clear_errors(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    table = _table("binary")
    table.metadata.create_all(engine)
    bad = [
        ("string", 42, "expected str"),
        ("string", "y" * 201, "too long for String(200)"),
        ("integer", "7", "expected int"),
        ("bigint", 2**64, "64-bit"),
        ("date", dt.datetime(2020, 1, 1), "expected date"),
        ("json", {1, 2}, "JSON serializable"),
        ("enum", "SAD", "expected Mood"),
        ("uuid", "not-a-uuid", "not a valid UUID"),
        ("boolean", "yes", "expected bool"),
    ]
    for column, value, message in bad:
        with (
            engine.begin() as conn,
            pytest.raises(InvalidValueError, match=re.escape(message)) as info,
        ):
            conn.execute(table.insert(), {"id": 1, column: value})
        assert str(value) not in str(info.value)
        assert f"{table.name}.{column} (" in str(info.value)


def test_context_binds_values_to_their_column(engine: sa.Engine, registry: KeyRegistry) -> None:
    md = sa.MetaData()
    table = sa.Table(
        "people",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("first", EncryptedType(sa.String(50))),
        sa.Column("last", EncryptedType(sa.String(50))),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "first": "Grace", "last": "Hopper"}])
    raw = sa.Table("people", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        stolen = conn.execute(sa.select(raw.c.first)).scalar_one()
        conn.execute(raw.update().values(last=stolen))
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.first)).scalar_one() == "Grace"
        with pytest.raises(DecryptionError, match=r"people\.last"):
            conn.execute(sa.select(table.c.last)).scalar_one()


def test_explicit_context_survives_a_rename(engine: sa.Engine, registry: KeyRegistry) -> None:
    old = sa.Table(
        "clients",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(100))),
    )
    old.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old.insert(), [{"id": 1, "email": "a@example.com"}])
        conn.execute(sa.text("ALTER TABLE clients RENAME TO customers"))
    new = sa.Table(
        "customers",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(100), context="clients.email")),
    )
    wrong = sa.Table(
        "customers",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(100))),
    )
    with engine.connect() as conn:
        assert conn.execute(sa.select(new.c.email)).scalar_one() == "a@example.com"
        with pytest.raises(DecryptionError):
            conn.execute(sa.select(wrong.c.email)).scalar_one()


def test_plaintext_where_ciphertext_was_expected(engine: sa.Engine, registry: KeyRegistry) -> None:
    for storage, raw_value in (("binary", b"legacy plaintext"), ("text", "legacy plaintext!")):
        md = sa.MetaData()
        table = sa.Table(
            f"legacy_{storage}",
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("v", EncryptedType(sa.String(100), storage=storage)),
        )
        md.create_all(engine)
        raw = sa.Table(table.name, sa.MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            conn.execute(raw.insert(), {"id": 1, "v": raw_value})
        with engine.connect() as conn, pytest.raises(NotCiphertextError, match="plaintext"):
            conn.execute(sa.select(table.c.v)).scalar_one()


def test_one_type_instance_cannot_serve_two_columns() -> None:
    shared = EncryptedType(sa.String(10))
    md = sa.MetaData()
    sa.Table("a", md, sa.Column("x", shared))
    with pytest.raises(ConfigurationError, match="one EncryptedType per column"):
        sa.Table("b", md, sa.Column("y", shared))


def test_copied_columns_get_their_own_context(engine: sa.Engine, registry: KeyRegistry) -> None:
    class MixinBase(DeclarativeBase):
        pass

    class HasSecret:
        secret: Mapped[str] = mapped_column(EncryptedType(sa.String(20)))

    class One(HasSecret, MixinBase):
        __tablename__ = "one"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Two(HasSecret, MixinBase):
        __tablename__ = "two"
        id: Mapped[int] = mapped_column(primary_key=True)

    MixinBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([One(id=1, secret="uno"), Two(id=1, secret="dos")])
        session.commit()
        assert session.scalars(sa.select(One.secret)).one() == "uno"
        assert session.scalars(sa.select(Two.secret)).one() == "dos"
    raw_one = sa.Table("one", sa.MetaData(), autoload_with=engine)
    raw_two = sa.Table("two", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(raw_two.update().values(secret=sa.select(raw_one.c.secret).scalar_subquery()))
    with Session(engine) as session, pytest.raises(DecryptionError, match=r"two\.secret"):
        session.scalars(sa.select(Two.secret)).one()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="cannot wrap"):
        EncryptedType(sa.ARRAY(sa.Integer))
    with pytest.raises(ConfigurationError, match="storage"):
        EncryptedType(sa.String, storage="hex")
    with pytest.raises(ConfigurationError, match="context"):
        EncryptedType(sa.String, context="")
    with pytest.raises(ConfigurationError, match="another EncryptedType"):
        EncryptedType(EncryptedType(sa.String))


def test_python_type_is_the_wrapped_type() -> None:
    assert EncryptedType(sa.String).python_type is str
    assert EncryptedType(sa.Numeric).python_type is Decimal
    assert EncryptedType(Mood).python_type is Mood
    assert EncryptedType(sa.Date).python_type is dt.date


# -- refused values never show up in errors or tracebacks --------------------------

SETTINGS = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _Leaky:
    """A value of no column's type whose str() and repr() are its plaintext."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return self.secret

    __str__ = __repr__


class _LeakyStr(str):
    """A str whose own encode() fails with an error quoting the plaintext."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        raise ValueError(f"cannot encode {str.__str__(self)}")


class _Swollen(str):
    """A str whose encode() returns more bytes than its length allows."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.__str__(self).encode() * 1000


class _LeakyZone(dt.tzinfo):
    """A tzinfo that fails with an error quoting the plaintext."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def utcoffset(self, when: Any) -> dt.timedelta:
        raise ValueError(self.secret)


def _nested(depth: int, secret: str) -> Any:
    value: Any = [secret]
    for _ in range(depth):
        value = [value]
    return value


def _circular(secret: str) -> list[Any]:
    value: list[Any] = [secret]
    value.append(value)
    return value


def _bad_values(secret: str, digits: str) -> dict[str, list[Any]]:
    """Values each column refuses, holding ``secret`` (or ``digits``, for
    numbers) in their text, repr or errors."""
    surrogate = secret + "\ud800"
    big = int(digits) * 10**20
    return {
        "string": [surrogate, secret * 30, secret.encode(), _LeakyStr(secret), _Swollen(secret)],
        "text": [surrogate, _LeakyStr(secret)],
        "unicode": [surrogate, secret * 10],
        "binary": [secret],
        "integer": [big, secret, _Leaky(secret)],
        "bigint": [-big],
        "float": [10**400 + int(digits), Decimal(f"sNaN{digits}"), secret],
        "numeric": [Decimal(f"NaN{digits}"), Decimal(f"{digits}{digits}.5"), float("inf"), secret],
        "boolean": [secret, 2],
        "date": [dt.datetime(3141, 5, 9), secret],
        "naive_dt": [dt.datetime(2024, 1, 1, tzinfo=_LeakyZone(secret)), secret],
        "aware_dt": [dt.datetime(2024, 1, 1, tzinfo=_LeakyZone(secret))],
        "time": [dt.time(8, tzinfo=_LeakyZone(secret)), secret],
        "interval": [secret],
        "uuid": [secret, surrogate],
        "json": [
            {"k": surrogate},
            {secret: float("nan")},
            [secret, {1, 2}],
            _circular(secret),
            _nested(100_000, secret),
        ],
        "enum": [secret, _Leaky(secret)],
        "string_enum": [secret, surrogate],
    }


def _assert_clean(error: BaseException, table: str, column: str, *secrets: str) -> None:
    assert isinstance(error, InvalidValueError)
    text = str(error)
    assert text.startswith(f"{table}.{column} (")
    whole = "".join(traceback.format_exception(error))
    for secret in secrets:
        assert secret not in text and secret not in whole


def _refuse_everywhere(
    engine: sa.Engine, table: sa.Table, row_class: Any, column: str, value: Any, *secrets: str
) -> None:
    """Write ``value`` through Core (insert, executemany, update) and a
    Session flush, each twice: every one is refused with a clean error."""
    for _ in range(2):
        row_id = next(_ids)
        for statement, parameters in (
            (table.insert(), {"id": row_id, column: value}),
            (table.insert(), [{"id": row_id, column: None}, {"id": row_id + 1, column: value}]),
            (table.update().where(table.c.id == 1), {column: value}),
        ):
            with pytest.raises(InvalidValueError) as info, engine.begin() as conn:
                conn.execute(statement, parameters)
            _assert_clean(info.value, table.name, column, *secrets)
        with pytest.raises(InvalidValueError) as info, Session(engine) as session:
            session.add(row_class(id=row_id, **{column: value}))
            session.flush()
        _assert_clean(info.value, table.name, column, *secrets)


_ids = itertools.count(10, 2)


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_refused_values_are_never_in_errors_or_tracebacks(
    engine: sa.Engine, registry: KeyRegistry, storage: str
) -> None:
    table = _table(storage)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1})

    class RowBase(DeclarativeBase):
        pass

    row_class = type("Row", (RowBase,), {"__table__": table})
    letters = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=6, max_size=12)

    @SETTINGS
    @given(word=letters, digits=st.integers(10**17, 10**18 - 1).map(str))
    def refused(word: str, digits: str) -> None:
        secret = f"SECRET-{word}"
        for column, values in _bad_values(secret, digits).items():
            for value in values:
                _refuse_everywhere(engine, table, row_class, column, value, secret, digits, "3141")

    refused()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 1


def test_every_single_character_change_of_a_text_value_fails_to_read(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """Text storage is canonical base64: a stored value with any one
    character changed no longer reads, not even as the original."""
    table = sa.Table(
        "canonical",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", EncryptedType(sa.String(30), storage="text")),
        sa.Column("d", EncryptedType(sa.String(30), storage="text", deterministic=True)),
    )
    table.metadata.create_all(engine)
    values = ["", "a", "ab", "abc"]  # every length modulo 3
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "v": v, "d": v} for i, v in enumerate(values)])
    raw = sa.Table("canonical", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(raw.c.id, raw.c.v, raw.c.d).order_by(raw.c.id)).all()
    alphabet = string.ascii_letters + string.digits + "+/= -_!"
    lookalikes = 0
    for row_id, *texts in stored:
        for name, text in zip(("v", "d"), texts, strict=True):
            read = table.c[name].type.result_processor(engine.dialect, None)
            assert read(text) == values[row_id]
            for position, replacement in itertools.product(range(len(text)), alphabet):
                if replacement == text[position]:
                    continue
                changed = text[:position] + replacement + text[position + 1 :]
                with pytest.raises(DecryptionError):
                    read(changed)
                if _decodes_as(changed, text):  # what lenient base64 read as the original
                    lookalikes += 1
                    with engine.begin() as conn:
                        conn.execute(raw.update().where(raw.c.id == row_id).values({name: changed}))
                    for _ in range(2):
                        with engine.connect() as conn, pytest.raises(DecryptionError):
                            conn.execute(sa.select(table.c[name]).where(table.c.id == row_id)).one()
            with engine.begin() as conn:
                conn.execute(raw.update().where(raw.c.id == row_id).values({name: text}))
    assert lookalikes > 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.v).order_by(table.c.id)).scalars().all() == values


def _decodes_as(changed: str, original: str) -> bool:
    try:
        return binascii.a2b_base64(changed, strict_mode=True) == binascii.a2b_base64(original)
    except binascii.Error:
        return False


def test_a_schema_that_fits_in_plaintext_fits_encrypted(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """MySQL/MariaDB limit a row's VARCHARs to 64 KB together, and one VARCHAR
    to 64 KB: fifteen String(1000) columns, or one String(16380), are about
    the most a utf8mb4 table holds there. Encrypted, in either storage, such
    tables hold their longest values."""
    md = sa.MetaData()
    schemas = {
        "wide": {f"c{i}": 1000 for i in range(15)},
        "longest": {"c": 16380},
    }

    def table(name: str, columns: dict[str, int], wrap: Any) -> sa.Table:
        return sa.Table(
            name,
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(column, wrap(sa.String(n))) for column, n in columns.items()),
        )

    for schema, columns in schemas.items():
        table(f"plain_{schema}", columns, lambda t: t)
        for storage in ("binary", "text"):
            encrypted = table(
                f"{storage}_{schema}", columns, lambda t, s=storage: EncryptedType(t, storage=s)
            )
            encrypted.create(engine)
            row = {"id": 1, **{column: "😀" * n for column, n in columns.items()}}
            for _ in range(2):
                with engine.begin() as conn:
                    conn.execute(encrypted.delete())
                    conn.execute(encrypted.insert(), row)
                with engine.connect() as conn:
                    assert dict(conn.execute(encrypted.select()).one()._mapping) == row
    md.create_all(engine)  # the plaintext tables fit too: the premise holds


def test_types_sized_beyond_postgresqls_varchar_fit_encrypted(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """PostgreSQL's VARCHAR holds at most 10485760 characters, its BYTEA any
    length: a LargeBinary(16777215) or a String(10485760) column fits there
    in plaintext, so it fits encrypted, in text storage too, with a value
    whose base64 is longer than any VARCHAR. (MySQL/MariaDB take no
    String(10485760) in plaintext.)"""
    md = sa.MetaData()
    sizes: dict[str, Any] = {"blob": sa.LargeBinary(16_777_215)}
    if engine.dialect.name != "mysql":
        sizes["chars"] = sa.String(10_485_760)
    values = {"blob": b"\x00\xff" * 3_950_000, "chars": "x" * 7_900_000}
    plain = sa.Table("plain_huge", md, sa.Column("id", sa.Integer, primary_key=True))
    for name, value_type in sizes.items():
        plain.append_column(sa.Column(name, value_type))
    for storage in ("binary", "text"):
        table = sa.Table(
            f"huge_{storage}",
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(name, EncryptedType(t, storage=storage)) for name, t in sizes.items()),
        )

        class Row(DeclarativeBase):
            pass

        row_class = type("Huge", (Row,), {"__table__": table})
        table.create(engine)
        for name in sizes:
            for _ in range(2):
                with engine.begin() as conn:
                    conn.execute(table.delete())
                    conn.execute(table.insert(), {"id": 1, name: values[name]})
                with engine.connect() as conn:
                    assert conn.execute(sa.select(table.c[name])).scalar_one() == values[name]
                with Session(engine) as session:
                    session.execute(sa.delete(table))
                    session.add(row_class(id=2, **{name: values[name]}))
                    session.commit()
                    assert session.scalars(sa.select(table.c[name])).one() == values[name]
    plain.create(engine)  # the premise holds


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_deterministic_columns_take_indexes_and_unique_constraints(
    engine: sa.Engine, registry: KeyRegistry, storage: str
) -> None:
    """The README's promise for MySQL/MariaDB's BLOB and TEXT storage (a
    prefix index, a hashed unique constraint), held on every database."""
    table = sa.Table(
        f"people_{storage}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "ssn", EncryptedType(sa.String(11), deterministic=True, storage=storage), index=True
        ),
        sa.Column(
            "tax_id",
            EncryptedType(sa.String(500), deterministic=True, storage=storage),
            unique=True,
        ),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "ssn": "123-45-6789", "tax_id": "T" * 500}])
    for _ in range(2):
        with engine.connect() as conn:
            found = conn.execute(sa.select(table.c.id).where(table.c.ssn == "123-45-6789"))
            assert found.scalars().all() == [1]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(table.insert(), {"id": 2, "ssn": "x", "tax_id": "T" * 500})


def test_a_migrating_column_reads_plaintext_that_looks_like_ciphertext(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """Binary plaintext starting with byte 1 and long enough (about 1 in 128
    random values) reads as it is during the migration window; a value under
    a key of this registry that fails authentication is still an error."""
    table = sa.Table(
        "lookalike_files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.LargeBinary(), migrating=True)),
    )
    table.metadata.create_all(engine)
    lookalike = b"\x01" + os.urandom(40)
    raw = sa.table("lookalike_files", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        conn.execute(raw.insert(), [{"id": 1, "body": lookalike}, {"id": 2, "body": b"short"}])
        conn.execute(table.insert(), {"id": 3, "body": b"encrypted"})
    for _ in range(2):
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all()
        assert rows == [lookalike, b"short", b"encrypted"]
    with engine.begin() as conn:
        stored = conn.execute(sa.select(raw.c.body).where(raw.c.id == 3)).scalar_one()
        tampered = bytes(stored)[:-1] + bytes([bytes(stored)[-1] ^ 1])
        conn.execute(raw.update().where(raw.c.id == 3).values(body=tampered))
    with engine.connect() as conn, pytest.raises(DecryptionError):
        conn.execute(sa.select(table.c.body).where(table.c.id == 3)).scalar_one()
