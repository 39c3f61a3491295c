"""A sqlalchemy-utils AesEngine column declared with the wrong padding
(docs/migrating-from-sqlalchemy-utils.md, step 3): each of the 16 pairs of
declared and actual paddings either moves every value exactly or is refused
with LegacyDecryptionError before anything is written, naming the padding the
values read with; the application's reads refuse them too."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import fresh_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesEngine

from sqlalchemy_envelope import (
    EncryptedType,
    KeyRegistry,
    LegacyDecryptionError,
    StaticRootKey,
    ValuesLeftBehindError,
)

KEY = "the sqlalchemy-utils key of the application"
PADDINGS = ("pkcs5", "oneandzeroes", "zeroes", "naive")
# Lengths around AES's block, text whose UTF-8 ends in 0x80 ("Ā"), and values
# ending in each padding's kind of byte.
VALUES = [
    "",
    "a",
    "x" * 15,
    "y" * 16,
    "z" * 17,
    "w" * 31,
    "v" * 32,
    "Zoë Ångström 🦄",
    "Ā",
    "é" * 8,
    "ends with *",
    "*",
    "ends with \n",
    "a" * 14 + "\n",
]


def _utils_type(padding: str) -> Any:
    return StringEncryptedType(sa.Unicode(60), KEY, AesEngine, padding, length=255)


def _window_type(padding: str) -> EncryptedType:
    return EncryptedType(sa.Unicode(60), storage="text", migrating=_utils_type(padding))


def _table(name: str, column_type: Any) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", column_type),
    )


def _model(table: str, padding: str) -> type[Any]:
    """The application's model during the migration window."""

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str | None] = mapped_column(_window_type(padding))

    return Account


def _written(engine: sa.Engine, name: str, padding: str, values: list[str]) -> None:
    """The table (already widened to the window type) as sqlalchemy-utils
    wrote it with ``padding``."""
    _table(name, _window_type(padding)).create(engine)
    with engine.begin() as conn:
        conn.execute(
            _table(name, _utils_type(padding)).insert(),
            [{"id": i, "name": v} for i, v in enumerate(values, 1)],
        )


def _raw(engine: sa.Engine, name: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT id, name FROM {name} ORDER BY id")).all()


def _exact(actual: str, values: list[str]) -> list[str]:
    """What moving the values must give: each as written, but under naive
    padding, whose own trailing '*' sqlalchemy-utils wrote as padding (and
    always read so)."""
    return [v.rstrip("*") if actual == "naive" else v for v in values]


def _read_core(engine: sa.Engine, name: str, padding: str) -> list[Any]:
    table = _table(name, _window_type(padding))
    readings = []
    for _ in range(2):
        with engine.connect() as conn:
            readings.append(conn.execute(sa.select(table.c.name).order_by(table.c.id)).all())
    assert readings[0] == readings[1]
    return [row[0] for row in readings[0]]


def _read(engine: sa.Engine, name: str, padding: str) -> list[Any]:
    """The column through Connection and Session, each statement twice."""
    account = _model(name, padding)
    readings = [_read_core(engine, name, padding)]
    for _ in range(2):
        with Session(engine) as session:
            readings.append(list(session.scalars(sa.select(account.name).order_by(account.id))))
            assert [session.get(account, i).name for i in (1, 2)] == readings[-1][:2]
    assert all(reading == readings[0] for reading in readings)
    return readings[0]


def test_each_declared_and_actual_padding_moves_exactly_or_is_refused(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    for number, (actual, declared) in enumerate(itertools.product(PADDINGS, PADDINGS)):
        name = f"accounts_{number}"
        _written(engine, name, actual, VALUES)
        before = _raw(engine, name)
        window = _model(name, declared)
        if declared != actual:
            for _ in range(2):
                with pytest.raises(LegacyDecryptionError) as caught:
                    registry.migrate_from_sqlalchemy_utils(window.name, progress=False)
                assert f"{name}.name: " in str(caught.value)
                assert f"padding {actual!r}: declare that padding" in str(caught.value)
                error = caught.value
                assert error.__cause__ is None
                assert error.__context__ is None or error.__suppress_context__
                assert not any(v in str(error) for v in VALUES if len(v) > 5)
                assert _raw(engine, name) == before
                with pytest.raises(LegacyDecryptionError), Session(engine) as session:
                    session.scalars(sa.select(window.name)).all()
                with pytest.raises(LegacyDecryptionError), engine.connect() as conn:
                    conn.execute(sa.select(window.__table__)).all()
        for _ in range(2):  # the second run finds nothing left to move
            report = registry.migrate_from_sqlalchemy_utils(
                _model(name, actual).name, batch_size=5, progress=False
            )
            assert report.left_behind == 0
        assert report.rows_updated == 0
        assert _read(engine, name, actual) == _exact(actual, VALUES)
    registry.close()
    engine.dispose()


def test_a_padding_error_past_the_sample_leaves_the_value(db_url: str) -> None:
    """A value written under another padding after the first hundred: the
    job moves the others, leaves that one as it was and names its row."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    _written(engine, "accounts", "zeroes", [f"name {i}" for i in range(1, 151)])
    with engine.begin() as conn:
        odd = _table("accounts", _utils_type("oneandzeroes"))
        conn.execute(odd.update().where(odd.c.id == 120).values(name="Séverine"))
    stored = _raw(engine, "accounts")[119]

    with pytest.raises(LegacyDecryptionError):
        _read_core(engine, "accounts", "zeroes")
    window = _model("accounts", "zeroes")
    with pytest.raises(ValuesLeftBehindError, match=r"accounts\.name=120: Legacy") as caught:
        registry.migrate_from_sqlalchemy_utils(window.name, batch_size=40, progress=False)
    assert "Séverine" not in str(caught.value)
    assert _raw(engine, "accounts")[119] == stored
    with engine.connect() as conn:
        moved = conn.execute(sa.select(window.name).where(window.id != 120).order_by(window.id))
        assert moved.scalars().all() == [f"name {i}" for i in range(1, 151) if i != 120]
    registry.close()
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite"])
def test_any_values_under_any_pair_of_paddings(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """Generated values: the declared padding moves them exactly, a wrong one
    moves them exactly (where both read alike) or is refused having written
    nothing, and the padding the refusal names moves them exactly."""
    with fresh_database(request, kind, tmp_path) as url:
        engine = sa.create_engine(url)
        registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
        registry.init()
        tables = itertools.count()

        @settings(
            max_examples=80,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(
            actual=st.sampled_from(PADDINGS),
            declared=st.sampled_from(PADDINGS),
            values=st.lists(st.text(max_size=40) | st.sampled_from(VALUES), min_size=1, max_size=8),
        )
        def moves_exactly_or_is_refused(actual: str, declared: str, values: list[str]) -> None:
            name = f"generated_{next(tables)}"
            _written(engine, name, actual, values)
            before = _raw(engine, name)
            try:
                registry.migrate_from_sqlalchemy_utils(_model(name, declared).name, progress=False)
            except LegacyDecryptionError as error:
                assert declared != actual
                assert _raw(engine, name) == before
                named = str(error).split("AesEngine padding '")[1].split("'")[0]
                registry.migrate_from_sqlalchemy_utils(_model(name, named).name, progress=False)
                declared = named
            assert _read_core(engine, name, declared) == _exact(actual, values)

        moves_exactly_or_is_refused()
        registry.close()
        engine.dispose()
