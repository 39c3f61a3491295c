"""Another language reads and writes the same rows: the Node.js implementation
of FORMAT.md (``interop/node``), driven through its command
``interop/node/bin/envelope.js`` as /INTEROP.md's contract describes.

Python to Node: rows written through the library (Session and Connection)
with every column kind, both storages, deterministic, scope-bound and renamed
columns, across rotations, tenants and schemas, are exported with plain SQL
and decrypted by Node exactly; Node recomputes every stored blind index.
Node to Python: the data keys, values, blind indexes and ``hash_field``
digests Node writes are inserted with plain SQL and read through the
library: ORM columns, equality lookups on deterministic columns,
``matches()`` on blind indexes.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import math
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import Null

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    SCOPE_OPTION,
    BlindIndex,
    EncryptedType,
    KeyDisabledError,
    KeyRegistry,
    PBKDF2RootKey,
    StaticRootKey,
    blind_index,
    session_scope,
    set_session_scope,
)

NODE = shutil.which("node")
ENVELOPE_JS = Path(__file__).resolve().parent.parent / "interop" / "node" / "bin" / "envelope.js"
NO_NODE = (
    "the interop tests need Node.js 18 or later on PATH as `node` (Debian 12: "
    "`apt-get install nodejs`; .ci/run installs it)"
)


class Color(enum.Enum):
    """Values differ from names: the names are what is stored."""

    RED = "r"
    BLUE = "b"
    ULTRAVIOLET = "uv"


def _kind_columns(storage: str) -> list[sa.Column[Any]]:
    """One encrypted column of every kind the codec supports."""
    kinds: dict[str, Any] = {
        "string": sa.String(40),
        "text": sa.Text,
        "padded": sa.String(40),
        "blob": sa.LargeBinary,
        "integer": sa.Integer,
        "big": sa.BigInteger,
        "real": sa.Float,
        "number": sa.Numeric,
        "money": sa.Numeric(10, 2),
        "flag": sa.Boolean,
        "day": sa.Date,
        "moment": sa.DateTime,
        "moment_tz": sa.DateTime(timezone=True),
        "clock": sa.Time,
        "span": sa.Interval,
        "ident": sa.Uuid,
        "doc": sa.JSON,
        "color": sa.Enum(Color, values_callable=lambda members: [m.value for m in members]),
        "shade": sa.Enum("pâle", "vif", "très foncé", name="interop_shade"),
    }
    return [
        sa.Column(
            name,
            EncryptedType(value_type, storage=storage, pad_to=16 if name == "padded" else None),
        )
        for name, value_type in kinds.items()
    ]


class Base(DeclarativeBase):
    pass


class BinaryKinds(Base):
    __table__ = sa.Table(
        "interop_kinds_binary",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        *_kind_columns("binary"),
    )


class TextKinds(Base):
    __table__ = sa.Table(
        "interop_kinds_text",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        *_kind_columns("text"),
    )


class Lookups(Base):
    """Deterministic, scope-bound and renamed columns, and blind indexes."""

    __tablename__ = "interop_lookups"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"])
    email_16: Mapped[str | None] = blind_index("email", bits=16)
    email_12: Mapped[str | None] = blind_index("email", normalize="lower", bits=12)
    email_given: Mapped[str | None] = blind_index("email", context="interop_people.email")
    first: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))
    last: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50), storage="text"))
    name_index: Mapped[str | None] = blind_index("first", "last", normalize="casefold")
    phone: Mapped[str | None] = mapped_column(EncryptedType(sa.String(30)))
    phone_index: Mapped[str | None] = blind_index("phone", normalize="digits")
    handle: Mapped[str | None] = mapped_column(EncryptedType(sa.String(60)))
    handle_index: Mapped[str | None] = blind_index(
        "handle", normalize=["collapse_spaces", "alphanumeric"]
    )
    age: Mapped[int | None] = mapped_column(EncryptedType(sa.Integer))
    active: Mapped[bool | None] = mapped_column(EncryptedType(sa.Boolean))
    token: Mapped[bytes | None] = mapped_column(EncryptedType(sa.LargeBinary))
    mixed_index: Mapped[str | None] = blind_index("age", "active", "token", bits=64)
    code: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20), deterministic=True))
    code_text: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(20), deterministic=True, storage="text")
    )
    det_int: Mapped[int | None] = mapped_column(EncryptedType(sa.BigInteger, deterministic=True))
    det_money: Mapped[Decimal | None] = mapped_column(
        EncryptedType(sa.Numeric(10, 2), deterministic=True)
    )
    det_color: Mapped[Color | None] = mapped_column(
        EncryptedType(sa.Enum(Color), deterministic=True, storage="text")
    )
    det_day: Mapped[dt.date | None] = mapped_column(EncryptedType(sa.Date, deterministic=True))
    det_ident: Mapped[uuid.UUID | None] = mapped_column(EncryptedType(sa.Uuid, deterministic=True))
    bound: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50), bind_scope=True))
    bound_text: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(50), bind_scope=True, storage="text")
    )
    renamed: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(50), context="interop_old_table.old_column")
    )
    renamed_text: Mapped[int | None] = mapped_column(
        EncryptedType(sa.Integer, context="interop_undotted", storage="text")
    )


class Elsewhere(Base):
    """A table in another schema: its name in each statement comes from
    ``schema_translate_map``."""

    __tablename__ = "interop_elsewhere"
    __table_args__: ClassVar[dict[str, Any]] = {"schema": "interop_schema"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))
    note_text: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50), storage="text"))
    code: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20), deterministic=True))
    bound: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50), bind_scope=True))
    note_index: Mapped[str | None] = blind_index("note", normalize="casefold")


class Derived(Base):
    """The table of the PBKDF2 root key's case."""

    __tablename__ = "interop_derived"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    secret: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))
    amount: Mapped[Decimal | None] = mapped_column(EncryptedType(sa.Numeric(8, 3), storage="text"))
    code: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20), deterministic=True))
    secret_index: Mapped[str | None] = blind_index("secret", bits=16)


KIND_MODELS: tuple[type[Base], ...] = (BinaryKinds, TextKinds)

# Three sets of values of every kind: ordinary ones, then edges.
KIND_VALUES: list[dict[str, Any]] = [
    {
        "string": "Ada Lovelace",
        "text": "a longer text\nwith two lines",
        "padded": "short",
        "blob": b"\x00\x01\xfe\xff",
        "integer": 42,
        "big": 2**62 + 5,
        "real": 0.1,
        "number": Decimal("1E+2"),
        "money": Decimal("1234.50"),
        "flag": True,
        "day": dt.date(1815, 12, 10),
        "moment": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        "moment_tz": dt.datetime(
            2024, 3, 1, 12, 30, 45, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
        ),
        "clock": dt.time(7, 5, 3),
        "span": dt.timedelta(days=-3, seconds=5, microseconds=7),
        "ident": uuid.UUID("12345678-9abc-4def-8123-456789abcdef"),
        "doc": {"a": [1, 2.5, "é", None, True], "b": {}, "c": "東京"},
        "color": Color.RED,
        "shade": "très foncé",
    },
    {
        "string": "",
        "text": "東京 🎉 Zoë",
        "padded": "exactly sixteen!",
        "blob": b"",
        "integer": -(2**63),
        "big": 2**63 - 1,
        "real": -0.0,
        "number": Decimal("-0.000123"),
        "money": Decimal("-99999999.99"),
        "flag": False,
        "day": dt.date(1, 1, 1),
        "moment": dt.datetime(9999, 12, 31, 23, 59, 59),
        "moment_tz": dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        "clock": dt.time(23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=-2))),
        "span": dt.timedelta(0),
        "ident": uuid.UUID(int=0),
        "doc": None,  # JSON null: encrypted, not SQL NULL
        "color": Color.ULTRAVIOLET,
        "shade": "pâle",
    },
    {
        "string": "Ünïcödé Straße",
        "text": "",
        "padded": "seventeen bytes!!",
        "blob": bytes(range(256)),
        "integer": 0,
        "big": -1,
        "real": 1e16,
        "number": Decimal("NaN"),
        "money": Decimal("0.00"),
        "flag": True,
        "day": dt.date(2024, 1, 1),
        "moment": dt.datetime(1970, 1, 1),
        "moment_tz": dt.datetime(
            1899, 6, 1, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=-9, minutes=-30, seconds=-7))
        ),
        "clock": dt.time(0, 0, tzinfo=dt.timezone(-dt.timedelta(microseconds=1))),
        "span": dt.timedelta(days=999999999, seconds=86399, microseconds=999999),
        "ident": uuid.UUID(int=2**128 - 1),
        "doc": ["x", {"nested": [False, -7, 1.5e300]}, ""],
        "color": Color.BLUE,
        "shade": "vif",
    },
]
# Floats of the binary table's later rows: the contract's names, a subnormal.
FLOATS = {3: float("nan"), 4: float("inf"), 5: float("-inf"), 7: 5e-324}


def _lookup_values(row: int) -> dict[str, Any]:
    """Values of every Lookups column for ``row``: normalizers have work to do."""
    return {
        "email": f"\u00a0 Straße.{row}@Example.COM\u3000",  # Unicode spaces to strip
        "first": f"Ada{row}",
        "last": None if row % 2 else f"LOVELACE {row}",  # a compound index with a NULL part
        "phone": f"+33 (0)6 12-34-{row:02d} \u0663",  # digits: an Arabic-Indic one too
        "handle": f"  the \t  Dév_{row}-x!  ",
        "age": row * 7 - 20,
        "active": bool(row % 2),
        "token": bytes([row, 0, 255]),
        "code": f"CODE-{row}",
        "code_text": f"ÇODE-{row}",
        "det_int": -(2**40) - row,
        "det_money": Decimal(f"{row}.25"),
        "det_color": list(Color)[row % 3],
        "det_day": dt.date(2000, 1, 1 + row),
        "det_ident": uuid.UUID(int=row),
        "bound": f"bound to a tenant {row}",
        "bound_text": f"bound text {row}",
        "renamed": f"from an old column {row}",
        "renamed_text": row,
    }


# -- the contract's representations -----------------------------------------


def _type_of(column_type: EncryptedType) -> dict[str, Any]:
    """The contract's ``type`` object of an encrypted column."""
    value_type = column_type.value_type
    if isinstance(value_type, sa.Enum):
        enum_class = value_type.enum_class
        names = list(value_type.enums if enum_class is None else enum_class.__members__)
        return {"kind": "enum", "names": names}
    simple = [
        (sa.JSON, "json"),
        (sa.Boolean, "boolean"),
        (sa.Uuid, "uuid"),
        (sa.String, "string"),
        (sa.LargeBinary, "bytes"),
        (sa.Integer, "integer"),
        (sa.Float, "float"),
        (sa.Numeric, "numeric"),
        (sa.DateTime, "datetime"),
        (sa.Date, "date"),
        (sa.Time, "time"),
        (sa.Interval, "interval"),
    ]
    kind = next(name for cls, name in simple if isinstance(value_type, cls))
    described: dict[str, Any] = {"kind": kind}
    if kind == "string" and column_type.pad_to is not None:
        described["pad_to"] = column_type.pad_to
    if kind == "numeric" and isinstance(value_type, sa.Numeric) and value_type.precision:
        described["precision"] = value_type.precision
        described["scale"] = value_type.scale or 0
    return described


def _wire(value: Any, kind: str) -> Any:
    """A Python value as the contract represents it for a column of ``kind``."""
    if kind == "json":
        return value
    if kind == "bytes":
        return bytes(value).hex()
    if kind == "integer":
        return str(value)
    if kind == "float":
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if kind in ("numeric", "uuid"):
        return str(value)
    if kind in ("date", "datetime", "time"):
        return value.isoformat()
    if kind == "interval":
        return {"days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
    if kind == "enum" and isinstance(value, enum.Enum):
        return value.name
    return value  # string, enum name, boolean


def _part(value: Any) -> Any:
    """One source of a blind index, as the contract represents it."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return {"boolean": value}
    if isinstance(value, int):
        return {"integer": str(value)}
    return {"hex": bytes(value).hex()}


def _same(got: Any, expected: Any) -> bool:
    """Exactly the value written: same type, same digits, same UTC offset."""
    if isinstance(expected, dict | list):
        return bool(got == expected)
    return type(got) is type(expected) and repr(got) == repr(expected)


def _encrypted(model: type[Base]) -> list[sa.Column[Any]]:
    return [c for c in model.__table__.columns if isinstance(c.type, EncryptedType)]


def _indexes(model: type[Base]) -> list[sa.Column[Any]]:
    return [c for c in model.__table__.columns if isinstance(c.type, BlindIndex)]


def _item(column: sa.Column[Any], schema: str | None) -> dict[str, Any]:
    """The contract's description of an encrypted column's values."""
    column_type = column.type
    assert isinstance(column_type, EncryptedType)
    return {
        "schema": schema,
        "table": column.table.name,
        "column": column.name,
        "context": column_type.context,
        "type": _type_of(column_type),
        "storage": column_type.storage,
        "deterministic": column_type.deterministic,
        "bind_scope": column_type.bind_scope,
    }


def _index_item(index: sa.Column[Any], scope: str, values: dict[str, Any]) -> dict[str, Any]:
    """The contract's request for the digest of ``values`` in ``index``."""
    index_type = index.type
    assert isinstance(index_type, BlindIndex)
    assert index_type.normalize is None or not callable(index_type.normalize)
    return {
        "table": index.table.name,
        "column": index.name,
        "context": index_type.context,
        "bits": index_type.bits,
        "normalize": index_type.normalize,
        "scope": scope,
        "key_version": index_type.key_version,
        "sources": [_part(values[source]) for source in index_type.sources],
    }


def _root(root_key: bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(root_key, dict):
        return root_key
    return {"kind": "key", "base64": base64.b64encode(root_key).decode()}


# -- the Node command and plain SQL -------------------------------------------


def _node(command: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run ``envelope.js command`` on ``request``; its response."""
    assert NODE is not None, NO_NODE
    assert ENVELOPE_JS.is_file(), f"{ENVELOPE_JS} is missing: the Node package is not there"
    done = subprocess.run(
        [NODE, str(ENVELOPE_JS), command],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", (done.returncode, done.stderr)
    response: dict[str, Any] = json.loads(done.stdout)
    return response


def _key_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """data_keys as plain SQL returns it, in the contract's representation."""
    query = sa.text(
        "SELECT id, scope, version, algorithm, wrapped_key, root_key_fingerprint, "
        "root_key_description, state, active_scope, encryptions FROM data_keys ORDER BY id"
    )
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        {
            **row,
            "id": str(row["id"]),
            "wrapped_key": None if row["wrapped_key"] is None else bytes(row["wrapped_key"]).hex(),
            "encryptions": str(row["encryptions"]),
        }
        for row in rows
    ]


def _plain(conn: sa.Connection, name: str, schema: str | None = None) -> sa.Table:
    """The table as the database holds it (reflected: no type of ours)."""
    return sa.Table(name, sa.MetaData(), schema=schema, autoload_with=conn)


def _stored(engine: sa.Engine, model: type[Base], schema: str | None) -> dict[int, Any]:
    """Each row of ``model``'s table as stored, by id."""
    with engine.connect() as conn:
        table = _plain(conn, model.__table__.name, schema)
        return {row["id"]: row for row in conn.execute(sa.select(table)).mappings()}


def _ciphertext(stored: Any, storage: str) -> str | None:
    if stored is None:
        return None
    return bytes(stored).hex() if storage == "binary" else str(stored)


def _column_of(column: sa.Column[Any], stored: str | None) -> Any:
    """A value Node wrote, as the column stores it."""
    if stored is None:
        return None
    column_type = column.type
    assert isinstance(column_type, EncryptedType)
    return bytes.fromhex(stored) if column_type.storage == "binary" else stored


@contextmanager
def _session(engine: sa.Engine, scope: str | None = None) -> Iterator[Session]:
    with Session(engine) as session, session.begin():
        if scope is not None:
            set_session_scope(session, scope)
        yield session


# -- the tests -----------------------------------------------------------------


def test_node_is_there() -> None:
    """Fails, never skips, without Node: CI installs it (.ci/run). A
    malformed request is refused with exit 2 and one line on stderr."""
    assert NODE is not None, NO_NODE
    version = subprocess.run(
        [NODE, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert int(version.strip().lstrip("v").split(".")[0]) >= 18, (NO_NODE, version)
    assert ENVELOPE_JS.is_file(), f"{ENVELOPE_JS} is missing: the Node package is not there"
    done = subprocess.run(
        [NODE, str(ENVELOPE_JS), "read"],
        input="{not json",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


Step = tuple[str, str | None]

# How each row is written: (the SQLAlchemy form, the tenant scope), rotating
# the scope's data key before the rows marked by ROTATE_BEFORE.
STEPS: list[Step] = [
    ("session", None),
    ("connection", None),
    ("sessionmaker", "tenant-a"),
    ("connection", "tenant-a"),
    ("scope-block", "tenant-b"),
    ("scoped-registry", "café-東京"),
    ("session-scope", "tenant-b"),
    ("session", None),
]
ROTATE_BEFORE = {1: None, 3: "tenant-a", 7: None}
NULL_ROW = 6  # SQL NULL in every encrypted column (JSON too: sa.null())


def _row_values(row: int) -> dict[type[Base], dict[str, Any]]:
    """What row ``row`` holds in each table."""
    kinds = KIND_VALUES[row % len(KIND_VALUES)]
    if row == NULL_ROW:
        nulls: dict[str, Any] = dict.fromkeys(kinds)
        return {
            BinaryKinds: {**nulls, "doc": sa.null()},
            TextKinds: {**nulls, "doc": sa.null()},
            Lookups: dict.fromkeys(_lookup_values(row)),
            Elsewhere: {"note": None, "note_text": None, "code": None, "bound": None},
        }
    return {
        BinaryKinds: {**kinds, "real": FLOATS.get(row, kinds["real"])},
        TextKinds: dict(kinds),
        Lookups: _lookup_values(row),
        Elsewhere: {
            "note": f"Note {row} ÉTÉ",
            "note_text": f"note text {row}",
            "code": f"EL-{row % 3}",
            "bound": f"elsewhere bound {row}",
        },
    }


def _write(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey, schema_map: dict[str, str]
) -> None:
    """Every row of STEPS, written as a user would, each step in its form."""
    translated = engine.execution_options(schema_translate_map=schema_map)
    scoped = KeyRegistry(engine, root_key, scope="café-東京", attach=False)
    scoped.init()
    for row, (form, scope) in enumerate(STEPS):
        if row in ROTATE_BEFORE:
            registry.rotate(ROTATE_BEFORE[row])
        values = _row_values(row)
        if form == "connection":
            options = {} if scope is None else {SCOPE_OPTION: scope}
            with translated.begin() as conn:
                for model, row_values in values.items():
                    conn.execute(
                        sa.insert(model.__table__),
                        {"id": row, **row_values},
                        execution_options=options,
                    )
            continue
        objects = [model(id=row, **row_values) for model, row_values in values.items()]
        if form == "sessionmaker":
            factory = sessionmaker(translated)
            set_session_scope(factory, scope)
            with factory.begin() as session:
                session.add_all(objects)
        elif form == "scope-block":
            assert scope is not None
            with sqlalchemy_envelope.scope(scope), Session(translated) as session:
                session.add_all(objects)
                session.commit()
        elif form == "scoped-registry":
            with Session(translated) as session:
                scoped.bind(session)
                session.add_all(objects)
                session.commit()
        elif form == "session-scope":
            assert scope is not None
            with Session(translated) as session, session_scope(session, scope):
                session.add_all(objects)
                session.commit()
        else:
            with Session(translated) as session:
                session.add_all(objects)
                session.commit()
    scoped.close()


def _check_node_reads(
    engine: sa.Engine,
    root: dict[str, Any],
    written: dict[type[Base], dict[int, dict[str, Any]]],
    scopes: dict[int, str],
    schemas: dict[type[Base], str | None],
) -> None:
    """Node decrypts every stored value of ``written`` to exactly what was
    written, and recomputes every stored blind index digest."""
    items: list[dict[str, Any]] = []
    expected: list[tuple[str, Any]] = []
    indexes: list[dict[str, Any]] = []
    digests: list[tuple[str, str | None]] = []
    for model, rows in written.items():
        schema = schemas.get(model)
        stored = _stored(engine, model, schema)
        assert set(rows) <= set(stored)
        for row, values in rows.items():
            for column in _encrypted(model):
                item = _item(column, schema)
                value = values[column.name]
                items.append(
                    {**item, "ciphertext": _ciphertext(stored[row][column.name], item["storage"])}
                )
                where = f"{model.__table__.name}.{column.name} row {row}"
                sql_null = isinstance(value, Null) or (
                    value is None and item["type"]["kind"] != "json"
                )
                expected.append((where, None if sql_null else _wire(value, item["type"]["kind"])))
                assert (stored[row][column.name] is None) == sql_null, where
            for index in _indexes(model):
                indexes.append(_index_item(index, scopes[row], values))
                digests.append(
                    (f"{model.__table__.name}.{index.name} row {row}", stored[row][index.name])
                )
    data_keys = _key_rows(engine)
    read = _node("read", {"root_key": root, "data_keys": data_keys, "values": items})
    assert len(read["values"]) == len(items)
    for (where, value), got, item in zip(expected, read["values"], items, strict=True):
        assert "error" not in got, (where, got)
        if item["ciphertext"] is None:
            assert got == {"value": None}, where
        else:
            assert got == {"value": value}, where
    hashed = _node(
        "write",
        {
            "root_key": root,
            "data_keys": data_keys,
            "new_keys": [],
            "values": [],
            "blind_indexes": indexes,
            "hash_fields": [],
        },
    )
    assert hashed["data_keys"] == [] and hashed["values"] == []
    for (where, digest), got in zip(digests, hashed["blind_indexes"], strict=True):
        assert got == digest, where


@pytest.mark.parametrize("other_schema", ["interop"], indirect=True)
def test_node_reads_what_python_writes(other_schema: tuple[sa.Engine, str]) -> None:
    """Every kind, both storages, deterministic, scope-bound and renamed
    columns, blind indexes, written through Session and Connection across
    rotations and tenants, in the default schema and another one: Node reads
    each value exactly and recomputes each digest from plain SQL's export."""
    engine, other = other_schema
    key = os.urandom(32)
    root_key = StaticRootKey(key)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    registry.create_scope("tenant-a", "tenant-b")  # SQLite: ahead of write transactions
    schema_map = {"interop_schema": other}
    Base.metadata.create_all(engine.execution_options(schema_translate_map=schema_map))
    _write(engine, registry, root_key, schema_map)
    written = {
        model: {row: _row_values(row)[model] for row in range(len(STEPS))}
        for model in (BinaryKinds, TextKinds, Lookups, Elsewhere)
    }
    scopes = {row: scope or "default" for row, (_, scope) in enumerate(STEPS)}
    _check_node_reads(engine, _root(key), written, scopes, {Elsewhere: other})
    with engine.connect() as conn:
        versions = conn.execute(
            sa.text("SELECT scope, max(version) FROM data_keys GROUP BY scope")
        ).all()
    assert dict(versions).items() >= {"default": 3, "tenant-a": 2, "café-東京": 1}.items()
    registry.close()


def test_node_reads_under_a_pbkdf2_root_key(engine: sa.Engine) -> None:
    """A root key derived from a seed and a salt (UTF-8, not ASCII) with PBKDF2."""
    seed, salt = secrets.token_hex(32), "sel de Guérande"
    registry = KeyRegistry(engine, PBKDF2RootKey(seed, salt, iterations=600_000))
    registry.init()
    Derived.__table__.create(engine)
    written: dict[int, dict[str, Any]] = {}
    for row in range(4):
        if row == 2:
            registry.rotate()
        values = {
            "secret": f"sécret {row}",
            "amount": Decimal(f"-{row}.125"),
            "code": f"C{row % 2}",
        }
        written[row] = values
        if row % 2:
            with engine.begin() as conn:
                conn.execute(sa.insert(Derived), {"id": row, **values})
        else:
            with _session(engine) as session:
                session.add(Derived(id=row, **values))
    root = {"kind": "pbkdf2", "seed": seed, "salt": salt, "iterations": 600_000}
    scopes = dict.fromkeys(written, "default")
    _check_node_reads(engine, root, {Derived: written}, scopes, {})
    registry.close()


NODE_SCOPE = "node-tenant"


def test_python_reads_what_node_writes(engine: sa.Engine) -> None:
    """Node creates a new tenant's data key and index key, and writes values
    of every kind (under them, and under the active key of the registry's
    own scope), blind indexes and a hash_field. Inserted with plain SQL,
    they read through the library: ORM columns give the exact values, an
    equality lookup finds the deterministic value, ``matches()`` the blind
    index, ``hash_field`` gives Node's digest; the library then writes under
    Node's key."""
    key = os.urandom(24)
    registry = KeyRegistry(engine, StaticRootKey(key))
    registry.init()
    Base.metadata.create_all(engine, tables=[m.__table__ for m in (*KIND_MODELS, Lookups)])
    rows = {row: _row_values(row) for row in range(len(KIND_VALUES))}
    scopes = {0: NODE_SCOPE, 1: "default", 2: NODE_SCOPE}
    values: list[dict[str, Any]] = []
    where: list[tuple[type[Base], int, sa.Column[Any]]] = []
    for row, by_model in rows.items():
        for model in (*KIND_MODELS, Lookups):
            for column in _encrypted(model):
                item = _item(column, None)
                value = _wire(by_model[model][column.name], item["type"]["kind"])
                values.append({**item, "value": value, "scope": scopes[row]})
                where.append((model, row, column))
    indexes = [
        (row, index, _index_item(index, scopes[row], rows[row][Lookups]))
        for row in rows
        for index in _indexes(Lookups)
    ]
    hashes = [("interop.hash", b"\x00hash me\xff", NODE_SCOPE), ("x", b"", NODE_SCOPE)]
    written = _node(
        "write",
        {
            "root_key": _root(key),
            "data_keys": _key_rows(engine),
            "new_keys": [
                {"scope": NODE_SCOPE, "kind": "data"},
                {"scope": NODE_SCOPE, "kind": "index"},
            ],
            "values": values,
            "blind_indexes": [item for _, _, item in indexes],
            "hash_fields": [
                {"context": context, "value": value.hex(), "scope": scope, "version": 1}
                for context, value, scope in hashes
            ],
        },
    )
    new_keys = written["data_keys"]
    assert [(k["scope"], k["version"], k["state"]) for k in new_keys] == [
        (NODE_SCOPE, 1, "active"),
        (f"~index:{NODE_SCOPE}", 1, "active"),
    ]
    stored: dict[tuple[type[Base], int], dict[str, Any]] = {}
    for (model, row, column), ciphertext in zip(where, written["values"], strict=True):
        if column.name == "doc":  # JSON null is a value, encrypted: not SQL NULL
            assert ciphertext is not None, (model.__name__, row)
        stored.setdefault((model, row), {"id": row})[column.name] = _column_of(column, ciphertext)
    for (row, index, _), digest in zip(indexes, written["blind_indexes"], strict=True):
        stored[Lookups, row][index.name] = digest
    _insert(engine, new_keys, written["encryptions"], stored)

    for _ in range(2):  # the compiled cache's paths too
        for row, by_model in rows.items():  # bind_scope values: read in their scope
            with _session(engine, scopes[row]) as session:
                for model in (*KIND_MODELS, Lookups):
                    got = session.get(model, row, populate_existing=True)
                    assert got is not None
                    for column in _encrypted(model):
                        expected = by_model[model][column.name]
                        read = getattr(got, column.name)
                        assert _same(read, expected), (model.__name__, row, column.name, read)
        with _session(engine, NODE_SCOPE) as session:
            for column in ("code", "code_text", "det_int", "det_money", "det_color", "det_day"):
                wanted = rows[0][Lookups][column]
                found = session.scalars(
                    sa.select(Lookups.id).where(getattr(Lookups, column) == wanted)
                ).all()
                assert found == [0], column
            by_email = sa.select(Lookups.id).where(
                Lookups.email_index.matches(" STRASSE.2@example.com")
            )
            assert session.scalars(by_email).all() == [2]
            by_name = sa.select(Lookups.id).where(Lookups.name_index.matches("ada0", "lovelace 0"))
            assert session.scalars(by_name).all() == [0]
        with engine.connect() as conn:  # Core, in the registry's own scope
            by_mixed = sa.select(Lookups.__table__.c.id).where(
                Lookups.__table__.c.mixed_index.matches(-13, True, bytes([1, 0, 255]))
            )
            assert conn.execute(by_mixed).scalars().all() == [1]
            by_code = sa.select(Lookups.__table__.c.id).where(
                Lookups.__table__.c.det_ident == rows[1][Lookups]["det_ident"]
            )
            assert conn.execute(by_code).scalars().all() == [1]
            scoped = conn.execution_options(**{SCOPE_OPTION: NODE_SCOPE})
            by_phone = sa.select(Lookups.__table__.c.id).where(
                Lookups.__table__.c.phone_index.matches("0033 612 3400")
            )
            assert scoped.execute(by_phone).scalars().all() == []  # other digits
            by_phone = sa.select(Lookups.__table__.c.id).where(
                Lookups.__table__.c.phone_index.matches("33-0-6-12-34-00-\u0663")
            )
            assert scoped.execute(by_phone).scalars().all() == [0]
    for (context, value, scope), digest in zip(hashes, written["hash_fields"], strict=True):
        assert registry.hash_field(value, context, scope=scope) == digest

    # The library goes on writing under Node's key, and Node reads that back.
    with _session(engine, NODE_SCOPE) as session:
        session.add(Lookups(id=10, **_lookup_values(10)))
    with engine.connect() as conn:
        header = bytes(
            conn.execute(sa.text("SELECT email FROM interop_lookups WHERE id = 10")).scalar_one()
        )
    node_key_id = int(new_keys[0]["id"])
    assert int.from_bytes(header[1:6], "big") == node_key_id
    _check_node_reads(engine, _root(key), {Lookups: {10: _lookup_values(10)}}, {10: NODE_SCOPE}, {})
    registry.close()


def _insert(
    engine: sa.Engine,
    new_keys: list[dict[str, Any]],
    encryptions: dict[str, int],
    rows: dict[tuple[type[Base], int], dict[str, Any]],
) -> None:
    """Node's new data_keys rows, its encryptions added to every key it used,
    and the rows, all with plain SQL."""
    with engine.begin() as conn:
        keys = _plain(conn, "data_keys")
        for new in new_keys:
            created = dt.datetime.fromisoformat(new["created_at"].replace("Z", "+00:00"))
            conn.execute(
                sa.insert(keys),
                {
                    **{
                        c: new[c] for c in ("scope", "version", "algorithm", "root_key_fingerprint")
                    },
                    "id": int(new["id"]),
                    "wrapped_key": bytes.fromhex(new["wrapped_key"]),
                    "root_key_description": new["root_key_description"],
                    "state": new["state"],
                    "active_scope": new["active_scope"],
                    "encryptions": int(new["encryptions"]),
                    "created_at": created,
                    "state_changed_at": created,
                },
            )
        for key_id, count in encryptions.items():
            conn.execute(
                sa.update(keys)
                .where(keys.c.id == int(key_id))
                .values(encryptions=keys.c.encryptions + int(count))
            )
        for (model, _), values in rows.items():
            conn.execute(sa.insert(_plain(conn, model.__table__.name)), values)


def test_a_node_value_under_a_disabled_key_is_refused(engine: sa.Engine) -> None:
    """Node writes under a new tenant's key; once the library rotates that
    tenant and disables Node's key, reading the value raises
    `KeyDisabledError`, which does not hold the plaintext."""
    key = os.urandom(32)
    registry = KeyRegistry(engine, StaticRootKey(key))
    registry.init()
    Lookups.__table__.create(engine)
    plaintext = "a plaintext never to be shown"
    (column,) = [c for c in _encrypted(Lookups) if c.name == "email"]
    written = _node(
        "write",
        {
            "root_key": _root(key),
            "data_keys": _key_rows(engine),
            "new_keys": [{"scope": "node-doomed", "kind": "data"}],
            "values": [{**_item(column, None), "value": plaintext, "scope": "node-doomed"}],
            "blind_indexes": [],
            "hash_fields": [],
        },
    )
    (ciphertext,) = written["values"]
    _insert(
        engine,
        written["data_keys"],
        written["encryptions"],
        {(Lookups, 1): {"id": 1, "email": _column_of(column, ciphertext)}},
    )
    with _session(engine) as session:
        assert session.scalars(sa.select(Lookups.email)).all() == [plaintext]
    registry.rotate("node-doomed")
    registry.disable(1, "node-doomed")
    for _ in range(2):
        with pytest.raises(KeyDisabledError) as raised, _session(engine) as session:
            session.scalars(sa.select(Lookups.email)).all()
        assert plaintext not in str(raised.value)
        with pytest.raises(KeyDisabledError) as raised, engine.connect() as conn:
            conn.execute(sa.select(Lookups.__table__.c.email)).all()
        assert plaintext not in str(raised.value)
    registry.close()
