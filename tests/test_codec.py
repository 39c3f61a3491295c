"""Codecs: every value a codec accepts fits the storage sized from its
``max_bytes``, on every database (MariaDB also without strict mode, where an
over-long value would be cut short silently); what it refuses never reaches
the database; Numeric rounds as the plain column does; JSON is standard."""

from __future__ import annotations

import datetime as dt
import enum
import os
import uuid
import zoneinfo
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    InvalidValueError,
    KeyRegistry,
    StaticRootKey,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.sqla.codec import Codec, codec_for, unpadded

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Mood(enum.Enum):
    HAPPY = "h"
    GRUMPY = "g"


class Shade(enum.Enum):
    """Names longer than the values, which values_callable makes the plain
    column store: the encrypted column stores the names."""

    VERY_DARK_GREY = "d"
    LIGHT = "l"


_MICRO = dt.timedelta(microseconds=1)
_DAY = dt.timedelta(hours=24)
# UTC offsets as Python allows them: seconds and microseconds included.
_offsets = st.timedeltas(min_value=-_DAY + _MICRO, max_value=_DAY - _MICRO).map(dt.timezone)
_FARTHEST = (dt.timezone(-_DAY + _MICRO), dt.timezone(_DAY - _MICRO))
_TINY = dt.timezone(-_MICRO)  # CPython's fromisoformat reads it as UTC
_AMSTERDAM_1890 = dt.datetime(1890, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Amsterdam"))
_wide_text = st.characters(min_codepoint=0x10000)  # four UTF-8 bytes each

# column -> (wrapped type, the longest values it accepts, a strategy of long
# values it accepts). Each value must read back equal and of the same type.
TYPES: dict[str, tuple[Any, list[Any], st.SearchStrategy[Any]]] = {
    "string": (
        sa.String(20),
        ["\U0010ffff" * 20, "🎉" * 20],
        st.text(min_size=20, max_size=20) | st.text(_wide_text, min_size=20, max_size=20),
    ),
    "unicode": (sa.Unicode(7), ["𝄞" * 7], st.text(_wide_text, min_size=7, max_size=7)),
    "text": (sa.Text(), ["🎉" * 5000], st.text(min_size=100)),
    "binary": (sa.LargeBinary(50), [b"\xff" * 50], st.binary(min_size=50, max_size=50)),
    "blob": (sa.LargeBinary(), [b"\x00" * 70000], st.binary(min_size=100)),
    "integer": (sa.Integer(), [-(2**63)], st.integers(-(2**63), 2**63 - 1)),
    "small": (sa.SmallInteger(), [2**63 - 1], st.integers(-(2**63), 2**63 - 1)),
    "bigint": (sa.BigInteger(), [-(2**63)], st.integers(-(2**63), 2**63 - 1)),
    "float": (sa.Float(), [-1.7976931348623157e308, 5e-324, float("-inf")], st.floats()),
    "numeric": (
        sa.Numeric(5, 2),
        [Decimal("-999.99"), Decimal("-0.01")],
        st.decimals(min_value=-1000, max_value=1000, places=2).filter(lambda d: abs(d) < 1000),
    ),
    "numeric_integer": (
        sa.Numeric(10),
        [Decimal("-9999999999")],
        st.integers(-(10**10) + 1, 10**10 - 1).map(Decimal),
    ),
    "numeric_wide": (
        sa.Numeric(38, 20),
        [Decimal("-999999999999999999.99999999999999999999")],
        st.decimals(min_value=-(10**18) + 1, max_value=10**18 - 1, places=20),
    ),
    "numeric_any": (
        sa.Numeric(),
        [Decimal("-" + "9" * 2000 + "." + "9" * 2000), Decimal("NaN"), Decimal("-Infinity")],
        st.decimals(allow_nan=False),
    ),
    "numeric_float": (
        sa.Numeric(6, 3, asdecimal=False),
        [-999.999],
        st.integers(-999999, 999999).map(lambda n: n / 1000),
    ),
    "boolean": (sa.Boolean(), [True, False], st.booleans()),
    "date": (sa.Date(), [dt.date.max, dt.date.min], st.dates()),
    "naive": (  # a column declared without time zone keeps an aware value's offset too
        sa.DateTime(),
        [dt.datetime.max, dt.datetime.max.replace(tzinfo=_FARTHEST[0])],
        st.datetimes(timezones=st.none() | _offsets),
    ),
    "aware": (
        sa.DateTime(timezone=True),
        [
            dt.datetime.max.replace(tzinfo=_FARTHEST[0]),
            dt.datetime.min.replace(tzinfo=_FARTHEST[1]),
            _AMSTERDAM_1890,
            dt.datetime(2024, 1, 1, tzinfo=_TINY),
            dt.datetime(2024, 1, 1),  # naive stays naive
        ],
        st.datetimes(timezones=_offsets),
    ),
    "time": (
        sa.Time(timezone=True),
        [dt.time.max.replace(tzinfo=_FARTHEST[0]), dt.time(tzinfo=_TINY), dt.time.max],
        st.times(timezones=_offsets),
    ),
    "interval": (
        sa.Interval(),
        [dt.timedelta.max, dt.timedelta.min],
        st.timedeltas(),
    ),
    "uuid": (sa.Uuid(), [uuid.UUID(int=2**128 - 1)], st.uuids()),
    "uuid_str": (
        sa.Uuid(as_uuid=False),
        ["ffffffff-ffff-ffff-ffff-ffffffffffff"],
        st.uuids().map(str),
    ),
    "json": (
        sa.JSON(),
        [{"k": "🎉" * 2000, "n": [-1.7976931348623157e308, 2**53]}],
        st.dictionaries(st.text(), st.text() | st.floats(allow_nan=False, allow_infinity=False)),
    ),
    "enum": (Mood, [Mood.GRUMPY], st.sampled_from(Mood)),
    "enum_values": (
        sa.Enum(Shade, values_callable=lambda members: [m.value for m in members]),
        [Shade.VERY_DARK_GREY],
        st.sampled_from(Shade),
    ),
    "string_enum": (
        sa.Enum("ü" * 9, "x", name="marks"),
        ["ü" * 9],
        st.sampled_from(["ü" * 9, "x"]),
    ),
    "string_padded": (
        sa.String(20),
        ["\U0010ffff" * 20, "", "x" * 20],
        st.text(max_size=20) | st.text(_wide_text, min_size=20, max_size=20),
    ),
    "unicode_padded": (sa.Unicode(7), ["𝄞" * 7, "ü"], st.text(_wide_text, max_size=7)),
    "text_padded": (sa.Text(), ["🎉" * 5000, ""], st.text()),
}

# column -> EncryptedType options besides the wrapped type and storage
OPTIONS: dict[str, dict[str, Any]] = {
    "string_padded": {"pad_to": 24},
    "unicode_padded": {"pad_to": 5},
    "text_padded": {"pad_to": 1000},
}

# column -> values just beyond what it accepts, which must never reach a database
BEYOND: dict[str, list[Any]] = {
    "string": ["\U0010ffff" * 21],
    "unicode": ["x" * 8],
    "binary": [b"\xff" * 51],
    "integer": [2**63],
    "numeric": [Decimal("1000"), Decimal("999.995"), Decimal("NaN"), float("inf")],
    "numeric_integer": [Decimal("9999999999.5"), 10**10],
    "numeric_wide": [Decimal("1E18")],
    "numeric_float": [1000.0],
    "uuid_str": ["ffffffff-ffff-ffff-ffff-ffffffffffff0"],
    "json": [{"k": float("nan")}, [float("inf")]],
    "enum": ["SAD"],
    "enum_values": ["d"],  # a value; the column takes members and their names
    "string_enum": ["ü" * 10],
    "string_padded": ["x" * 21],
}


def _codec(name: str) -> Codec:
    value_type = TYPES[name][0]
    value_type = sa.Enum(value_type) if isinstance(value_type, type) else value_type
    return codec_for(value_type, **OPTIONS.get(name, {}))


def _same(expected: Any, actual: Any) -> None:
    assert actual == expected or (expected != expected and actual != actual)
    assert type(actual) is type(expected)
    if isinstance(expected, dt.datetime | dt.time):
        assert actual.utcoffset() == expected.utcoffset()
    if isinstance(expected, Decimal):
        assert actual.as_tuple() == expected.as_tuple()


def test_max_bytes_is_what_storage_is_sized_for() -> None:
    for name, (value_type, longest, _) in TYPES.items():
        codec = _codec(name)
        if codec.max_bytes is None:
            continue
        sizes = [len(codec.encode(value)) for value in longest]
        assert max(sizes) <= codec.max_bytes, name
        keeps_earlier_size = isinstance(value_type, sa.Numeric) and not isinstance(
            value_type, sa.Float
        )
        counts_four_bytes_a_character = isinstance(value_type, sa.Enum | type)
        if not (keeps_earlier_size or counts_four_bytes_a_character):
            assert max(sizes) == codec.max_bytes, name
    shades = EncryptedType(
        sa.Enum(Shade, values_callable=lambda members: [m.value for m in members]),
        storage="text",
    ).impl_instance
    assert isinstance(shades, sa.String)
    assert shades.length == fmt.text_length(4 * len("VERY_DARK_GREY"))


@SETTINGS
@given(data=st.data())
def test_accepted_values_fit_and_round_trip(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(TYPES)))
    _, _, values = TYPES[name]
    codec = _codec(name)
    value = data.draw(values)
    plaintext = codec.encode(value)
    assert codec.max_bytes is None or len(plaintext) <= codec.max_bytes
    _same(value, codec.decode(plaintext))


def _rounded(number: Decimal, precision: int, scale: int) -> Decimal | None:
    """What PostgreSQL's numeric(p, s) holds for ``number``, None if it refuses it."""
    if not number.is_finite() or (number and number.adjusted() >= precision - scale):
        return None
    with localcontext() as context:
        context.prec = precision + 2
        rounded = number.quantize(Decimal(1).scaleb(-scale), ROUND_HALF_UP)
    if rounded and rounded.adjusted() >= precision - scale:
        return None
    return rounded if rounded else rounded.copy_abs()


@SETTINGS
@given(number=st.decimals() | st.floats(), data=st.data())
def test_numeric_rounds_like_the_database_and_refuses_what_it_refuses(
    number: Decimal | float, data: st.DataObject
) -> None:
    precision = data.draw(st.integers(1, 40))
    scale = data.draw(st.integers(0, precision))
    codec = codec_for(sa.Numeric(precision, scale))
    expected = _rounded(
        Decimal(repr(number)) if isinstance(number, float) else number, precision, scale
    )
    if expected is None:
        with pytest.raises(InvalidValueError, match=f"Numeric\\({precision}, {scale}\\)"):
            codec.encode(number)
        return
    plaintext = codec.encode(number)
    assert codec.max_bytes is not None and len(plaintext) <= codec.max_bytes
    _same(expected, codec.decode(plaintext))


def test_numeric_examples() -> None:
    money = codec_for(sa.Numeric(5, 2))
    deterministic = codec_for(sa.Numeric(5, 2), fixed_width=False)
    for given_value, stored in [
        (Decimal("1.005"), "1.01"),
        (Decimal("-1.005"), "-1.01"),
        (Decimal("0.125"), "0.13"),
        (0.1 + 0.2, "0.30"),
        (Decimal("123.456789012345678901"), "123.46"),
        (7, "7.00"),
        (Decimal("-0.001"), "0.00"),
    ]:
        assert money.encode(given_value) == stored.rjust(7).encode()  # "-999.99" is 7 long
        assert deterministic.encode(given_value) == stored.encode()
    assert codec_for(sa.Numeric(10)).encode(Decimal("2.5")) == b"3".rjust(11)
    assert codec_for(sa.Numeric(10, 2)).encode(Decimal(100) / 3) == b"33.33".rjust(12)
    assert money.decode(b"1.01") == Decimal("1.01")  # as earlier versions wrote it
    unbounded = codec_for(sa.Numeric())
    assert unbounded.encode(Decimal("123.456789012345678901")) == b"123.456789012345678901"
    assert unbounded.encode(10**5000) == b"1" + b"0" * 5000  # past int's str() limit
    with pytest.raises(InvalidValueError, match="signaling NaN"):
        unbounded.encode(Decimal("sNaN"))


def test_json_is_standard_json() -> None:
    codec = codec_for(sa.JSON())
    for value in (float("nan"), {"a": [float("inf")]}, {float("-inf"): 1}):
        with pytest.raises(InvalidValueError, match="not standard JSON"):
            codec.encode(value)
    assert codec.decode(b'{"legacy":NaN}')["legacy"] != codec.decode(b'{"legacy":NaN}')["legacy"]


def test_json_null_is_json_null_and_none_follows_none_as_null() -> None:
    codec = codec_for(sa.JSON())
    assert codec.encode(sa.JSON.NULL) == codec.encode(None) == b"null"  # not the symbol's int
    assert codec.decode(b"null") is None
    assert not codec.none_as_null
    assert codec_for(sa.JSON(none_as_null=True)).none_as_null
    assert codec_for(sa.String()).none_as_null


# -- the database: the longest values fit, in strict and non-strict mode ------------


def _engines(url: str) -> Iterator[tuple[str, sa.Engine]]:
    """The database as an application would use it; on MariaDB also without
    strict mode, where a value longer than its column is cut short with only a
    warning."""
    yield "default", sa.create_engine(url)
    if sa.make_url(url).get_backend_name() == "mysql":
        engine = sa.create_engine(url)

        @sa.event.listens_for(engine, "connect")
        def _non_strict(dbapi_connection: Any, _: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET SESSION sql_mode = ''")

        yield "non-strict", engine


def _table(storage: str) -> sa.Table:
    return sa.Table(
        f"longest_{storage}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        *(
            sa.Column(name, EncryptedType(value_type, storage=storage, **OPTIONS.get(name, {})))
            for name, (value_type, _, _) in TYPES.items()
        ),
    )


def _round_trips(engine: sa.Engine, table: sa.Table, ids: Iterator[int]) -> None:
    """The longest values, then generated ones, read back as written."""

    def round_trip(row: dict[str, Any]) -> None:
        row_id = next(ids)
        with engine.begin() as conn:
            conn.execute(table.insert(), {"id": row_id, **row})
        with engine.connect() as conn:
            got = conn.execute(table.select().where(table.c.id == row_id)).one()._mapping
        for name, value in row.items():
            _same(value, got[name])

    width = max(len(longest) for _, longest, _ in TYPES.values())
    for i in range(width):
        round_trip({name: longest[i % len(longest)] for name, (_, longest, _) in TYPES.items()})
    rows = st.fixed_dictionaries({name: values for name, (_, _, values) in TYPES.items()})
    SETTINGS(given(row=rows)(round_trip))()


def _refusals(engine: sa.Engine, table: sa.Table, ids: Iterator[int]) -> None:
    """Values beyond a column's limits are refused before the database."""
    count = sa.select(sa.func.count()).select_from(table)
    with engine.connect() as conn:
        before = conn.execute(count).scalar()
    for name, values in BEYOND.items():
        for value in values:
            for _ in range(2):
                with (
                    engine.begin() as conn,
                    pytest.raises(InvalidValueError, match=f"{table.name}.{name} "),
                ):
                    conn.execute(table.insert(), {"id": next(ids), name: value})
    with engine.connect() as conn:
        assert conn.execute(count).scalar() == before


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_longest_values_fit_their_column(db_url: str, storage: str) -> None:
    root_key = StaticRootKey(os.urandom(32))
    table = _table(storage)
    ids = iter(range(1, 10**6))
    for mode, engine in _engines(db_url):
        registry = KeyRegistry(engine, root_key, allow_non_strict_mysql=mode == "non-strict")
        registry.init()
        table.metadata.create_all(engine)
        with engine.connect() as conn:
            strict = conn.dialect.name != "mysql" or "STRICT" in str(
                conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
            )
        assert strict == (mode == "default")
        _round_trips(engine, table, ids)
        _refusals(engine, table, ids)
        registry.close()
        engine.dispose()


def test_numeric_matches_the_plain_column(server_url: str) -> None:
    """PostgreSQL's numeric and MariaDB's DECIMAL (strict mode): the
    encrypted column stores what the plain one holds, and refuses what the
    plain one refuses."""
    engine = sa.create_engine(server_url)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    table = sa.Table(
        "amounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("plain", sa.Numeric(5, 2)),
        sa.Column("encrypted", EncryptedType(sa.Numeric(5, 2), storage="text")),
        sa.Column("plain_integer", sa.Numeric(10)),
        sa.Column("encrypted_integer", EncryptedType(sa.Numeric(10))),
    )
    table.metadata.create_all(engine)
    ids = iter(range(1, 10**6))

    def stored(column: str, value: Any) -> Any:
        """What the column holds after inserting ``value``, or "refused"."""
        row_id = next(ids)
        refusal = InvalidValueError if column.startswith("encrypted") else sa.exc.DataError
        try:
            with engine.begin() as conn:
                conn.execute(table.insert(), {"id": row_id, column: value})
        except refusal:
            return "refused"
        with engine.connect() as conn:
            return conn.execute(sa.select(table.c[column]).where(table.c.id == row_id)).scalar()

    @SETTINGS
    @given(
        number=st.decimals(min_value=-2000, max_value=2000, places=4)
        | st.decimals(min_value=-(10**11), max_value=10**11, places=1)
        | st.sampled_from(
            [Decimal(v) for v in ("1.005", "-1.005", "0.125", "999.995", "-999.994", "2.5")]
        )
    )
    def same(number: Decimal) -> None:
        for plain, encrypted in (("plain", "encrypted"), ("plain_integer", "encrypted_integer")):
            expected = stored(plain, number)
            got = stored(encrypted, number)
            assert got == expected
            if isinstance(expected, Decimal):
                assert got.as_tuple() == expected.as_tuple()

    same()
    assert stored("encrypted", 0.1 + 0.2) == stored("plain", 0.1 + 0.2) == Decimal("0.30")
    registry.close()
    engine.dispose()


# -- lengths: what a ciphertext's length reveals ------------------------------------


class Verdict(enum.Enum):
    UNKNOWN = 1
    INCONCLUSIVE = 2
    OK = 3


def _stored_lengths(engine: sa.Engine, table: str, column: str) -> set[int]:
    raw = sa.table(table, sa.column(column))
    with engine.connect() as conn:
        return {len(v) for v in conn.execute(sa.select(raw.c[column])).scalars()}


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_enum_and_numeric_values_are_stored_at_one_length(
    engine: sa.Engine, registry: KeyRegistry, storage: str
) -> None:
    """An enum member and a ``Numeric(p, s)`` value are stored at one length
    whatever the value, so the ciphertext's length tells ``UNKNOWN`` from
    ``INCONCLUSIVE`` no more than a salary's magnitude."""
    table = sa.Table(
        f"verdicts_{storage}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("verdict", EncryptedType(Verdict, storage=storage)),
        sa.Column("label", EncryptedType(sa.Enum("ü", "ok", "pending", name="l"), storage=storage)),
        sa.Column("salary", EncryptedType(sa.Numeric(10, 2), storage=storage)),
        sa.Column("count", EncryptedType(sa.Numeric(6, asdecimal=False), storage=storage)),
    )
    table.metadata.create_all(engine)
    rows = [
        {"id": 1, "verdict": Verdict.OK, "label": "ü", "salary": Decimal("0.01"), "count": 7.0},
        {
            "id": 2,
            "verdict": Verdict.INCONCLUSIVE,
            "label": "pending",
            "salary": Decimal("-99999999.99"),
            "count": -999999.0,
        },
        {"id": 3, "verdict": Verdict.UNKNOWN, "label": "ok", "salary": 1000, "count": 0},
    ]
    for row in rows:
        for _ in range(2):
            with engine.begin() as conn:
                conn.execute(table.delete().where(table.c.id == row["id"]))
                conn.execute(table.insert(), row)
    with engine.connect() as conn:
        got = [r._asdict() for r in conn.execute(table.select().order_by(table.c.id))]
    assert got == [{**row, "salary": Decimal(row["salary"])} for row in rows]
    for column in ("verdict", "label", "salary", "count"):
        assert len(_stored_lengths(engine, table.name, column)) == 1, column


def test_pad_to_stores_strings_at_a_multiple_of_its_length(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """``pad_to=32``: a value of 0 to 32 UTF-8 bytes is stored as 32, one of
    33 to 64 as 64. Values written before ``pad_to`` was set, and padded
    values once it is removed, read back as written."""
    columns = {
        "short": EncryptedType(sa.String(40), pad_to=32),
        "texts": EncryptedType(sa.Text(), pad_to=32, storage="text"),
    }
    table = sa.Table(
        "padded",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        *(sa.Column(name, column_type) for name, column_type in columns.items()),
    )
    table.metadata.create_all(engine)
    values = ["", "a", "ü" * 16, "x" * 32, "y" * 33, "\U0010ffff" * 10]
    for row_id, value in enumerate(values):
        for _ in range(2):
            with engine.begin() as conn:
                conn.execute(table.delete().where(table.c.id == row_id))
                conn.execute(table.insert(), {"id": row_id, "short": value, "texts": value})
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(table.select().order_by(table.c.id))] == [
            (i, v, v) for i, v in enumerate(values)
        ]
        raw = sa.table("padded", sa.column("id"), sa.column("short"), sa.column("texts"))
        stored = conn.execute(sa.select(raw).order_by(raw.c.id)).all()
    sizes = [len(short) - fmt.OVERHEAD for _, short, _ in stored]
    assert sizes == [32, 32, 32, 32, 64, 64]
    assert [len(fmt.from_text(texts)) - fmt.OVERHEAD for _, _, texts in stored] == sizes

    def read(column_type: EncryptedType) -> list[Any]:
        again = sa.Table(
            "padded",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("short", column_type),
        )
        with engine.connect() as conn:
            return list(conn.execute(sa.select(again.c.short).order_by(again.c.id)).scalars())

    assert read(EncryptedType(sa.String(40))) == values  # pad_to removed
    with engine.begin() as conn:
        unpadded = sa.Table(
            "padded", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("short", EncryptedType(sa.String(40))),
        )  # fmt: skip
        update = unpadded.update().where(unpadded.c.id == sa.bindparam("row"))
        conn.execute(update, [{"row": i, "short": v} for i, v in enumerate(values)])
    assert read(EncryptedType(sa.String(40), pad_to=32)) == values  # written before pad_to


def test_pad_to_is_refused_where_it_cannot_hold() -> None:
    """Only strings are padded: other types are fixed-width already, or (bytes)
    have no byte that could mark where padding starts; deterministic values
    must keep one ciphertext per value whatever the column's options."""
    for value_type in (sa.LargeBinary(), sa.Integer(), sa.JSON(), sa.Enum("a", name="e"), Mood):
        with pytest.raises(ConfigurationError, match="pad_to"):
            EncryptedType(value_type, pad_to=16)
    with pytest.raises(ConfigurationError, match="deterministic"):
        EncryptedType(sa.String(10), pad_to=16, deterministic=True)
    for wrong in (0, -1, True, 1.5, "16"):
        with pytest.raises(ConfigurationError, match="pad_to"):
            EncryptedType(sa.String(10), pad_to=wrong)


def test_only_exact_padding_is_removed() -> None:
    """Padding is 0xFF then only zeros; bytes with 0xFF elsewhere (another
    type's encoding, decrypted by name without the model: the integer -7 is
    ff ff ff ff ff ff ff f9) are left whole, never cut to what precedes it."""
    minus_seven = (-7).to_bytes(8, "big", signed=True)
    assert unpadded(minus_seven) == minus_seven
    assert unpadded(b"ab\xff\x00\x01") == b"ab\xff\x00\x01"
    assert unpadded(b"ab\xff\x00\x00") == b"ab"
    assert unpadded(b"ab\xff") == b"ab"
    assert unpadded("née".encode()) == "née".encode()
