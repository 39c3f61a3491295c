"""The census and the destroy guard: rows per data key, NULLs and plaintext,
counted in SQL."""

from __future__ import annotations

from typing import ClassVar

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    DestroyedKeyError,
    EncryptedType,
    KeyInUseError,
    KeyRegistry,
    StaticRootKey,
)
from sqlalchemy_envelope.crypto import format as fmt


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "census_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    iban: Mapped[str | None] = mapped_column(EncryptedType(sa.String(34), storage="text"))
    plain: Mapped[str | None] = mapped_column(sa.String(10))


def test_census_counts_versions_nulls_and_plaintext(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    table = Account.__table__
    with engine.begin() as conn:
        conn.execute(
            sa.insert(table), [{"id": i, "owner": f"o{i}", "iban": f"DE{i}"} for i in range(3)]
        )
    v2 = registry.rotate()
    with engine.begin() as conn:
        conn.execute(sa.insert(table), [{"id": 10 + i, "owner": f"n{i}"} for i in range(4)])
        conn.execute(sa.insert(table), {"id": 20, "owner": None, "iban": None})
    raw = sa.Table("census_accounts", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(
            raw.insert(), {"id": 30, "owner": b"legacy plaintext", "iban": "DE00 legacy plain"}
        )
        conn.execute(raw.insert(), {"id": 31, "owner": b"\x07" + b"x" * 40, "iban": "short"})

    by_name = {c.column: c for c in registry.census(Account)}
    owner, iban = by_name["census_accounts.owner"], by_name["census_accounts.iban"]
    assert owner.rows == iban.rows == 10
    assert {k.version: k.rows for k in owner.keys} == {1: 3, 2: 4}
    assert owner.nulls == 1 and owner.not_ciphertext == 2 and owner.unknown_key_rows == 0
    assert {k.version: k.rows for k in iban.keys} == {1: 3}
    assert iban.nulls == 5 and iban.not_ciphertext == 2
    assert owner.rows_under(v2.id) == 4

    same = [
        registry.census("census_accounts.owner"),
        registry.census(Account.owner),
        registry.census(table.c.owner),
    ]
    assert all(c == [owner] for c in same)
    columns = {"census_accounts.owner", "census_accounts.iban"}
    assert {c.column for c in registry.census(table)} == columns
    assert columns <= {c.column for c in registry.census()}
    assert owner.to_dict()["keys"][0]["version"] == 1


def test_census_by_reflection_sees_storage(engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Account.__table__), {"id": 1, "owner": "o", "iban": "DE1"})
    # "table.column" needs no model: the storage is read from the reflected type.
    (iban,) = registry.census("census_accounts.iban")
    assert [k.version for k in iban.keys] == [1]


def test_destroy_guard_counts_every_row_of_every_column(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    Base.metadata.create_all(engine)
    things = sa.Table(
        "things",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Enum("small", "large", name="thing_kind")),
        sa.Column("label", sa.String(60)),
        sa.Column("blob", sa.LargeBinary),
    )
    things.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Account.__table__), [{"id": 1, "owner": "o", "iban": "DE1"}])
        conn.execute(
            things.insert(),
            [
                {"id": 1, "kind": "small", "label": "", "blob": b""},
                {"id": 2, "kind": "large", "label": "plain", "blob": b"plain"},
            ],
        )
    registry.rotate()
    clocks.advance(2)
    for _ in range(2):  # every text and binary column of every table, enums skipped
        with pytest.raises(KeyInUseError) as in_use:
            registry.destroy(1)
        assert in_use.value.rows == {"census_accounts.owner": 1, "census_accounts.iban": 1}
    label, blob = registry.census("things.label", "things.blob")
    assert (label.not_ciphertext, blob.not_ciphertext) == (2, 2)
    assert registry.reencrypt(Account).values_by_version == {1: 2}
    assert registry.destroy(1).version == 1
    registry.close()


# Any name: one that merely starts like a server's own (temp...) is an application's too.
@pytest.mark.parametrize("other_schema", ["app", "temporary"], indirect=True)
def test_destroy_guard_maintenance_and_status_see_every_schema(
    other_schema: tuple[sa.Engine, str], root_key: StaticRootKey, clocks: Clocks
) -> None:
    engine, schema = other_schema

    class OtherBase(DeclarativeBase):
        pass

    class Note(OtherBase):
        __tablename__ = "t_other_schema"
        __table_args__: ClassVar[dict[str, str]] = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))

    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    Base.metadata.create_all(engine)
    OtherBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Note(id=1, body="in app"), Note(id=2, body="also in app")])
        session.commit()
    with engine.begin() as conn:
        conn.execute(sa.insert(Account.__table__), {"id": 1, "owner": "o"})
    registry.rotate()
    assert registry.reencrypt(Account).values_by_version == {1: 1}
    clocks.advance(2)
    for _ in range(2):  # the default schema read once, the other one too
        report = registry.maintenance()
        assert (report.destroyable, report.still_referenced) == ((), {1: 2})
        with pytest.raises(KeyInUseError) as in_use:
            registry.destroy(1)
        assert in_use.value.rows == {f"{schema}.t_other_schema.body": 2}
        status = registry.status(census=True)
        assert status.rows_by_version == {1: 2, 2: 1}
        assert {c.column: c.rows for c in status.columns or ()} == {
            "census_accounts.owner": 1,
            f"{schema}.t_other_schema.body": 2,
        }
    assert registry.reencrypt(Note).values_by_version == {1: 2}
    assert registry.maintenance().destroyable == (1,)
    assert registry.destroy(1).version == 1
    with Session(engine) as session:
        for _ in range(2):
            assert session.scalars(sa.select(Note.body).order_by(Note.id)).all() == [
                "in app",
                "also in app",
            ]
    registry.close()


def test_maintenance_counts_tables_without_models(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    big = sa.Table(  # no EncryptedType: this process has no model for it
        "big",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.LargeBinary(200)),
        sa.Column("w", sa.Text),
    )
    big.metadata.create_all(engine)
    value = registry.envelope.encrypt_bytes(b"secret", b"big.v")
    with engine.begin() as conn:
        conn.execute(
            big.insert(), [{"id": i, "v": value, "w": fmt.to_text(value)} for i in range(3)]
        )
    registry.rotate()
    clocks.advance(2)
    for _ in range(2):
        report = registry.maintenance()
        assert (report.destroyable, report.still_referenced) == ((), {1: 6})
        assert registry.status(census=True).rows_by_version == {1: 6}
        with pytest.raises(KeyInUseError) as in_use:
            registry.destroy(1)
        assert in_use.value.rows == {"big.v": 3, "big.w": 3}
    with engine.begin() as conn:
        conn.execute(big.delete())
    assert registry.maintenance().destroyable == (1,)
    assert registry.destroy(1).version == 1
    with pytest.raises(DestroyedKeyError):
        registry.envelope.decrypt_bytes(value, fmt.given_context("big.v"))
    registry.close()


def test_census_applies_each_format_versions_minimum_length(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    raw = sa.Table(
        "raw",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("b", sa.LargeBinary(200)),
        sa.Column("t", sa.Text),
    )
    raw.metadata.create_all(engine)
    key_id = registry.status().active_key_id or 0
    randomized, deterministic = fmt.header(key_id), fmt.header(key_id, fmt.DETERMINISTIC_VERSION)
    unknown = fmt.header(77777)
    values = [
        randomized + b"x" * (fmt.OVERHEAD - 7),  # 33 bytes: too short for version 1
        randomized + b"x" * (fmt.OVERHEAD - 6),  # 34 bytes: the shortest version 1
        deterministic + b"x" * (fmt.DETERMINISTIC_OVERHEAD - 7),  # 21 bytes: too short
        deterministic + b"x" * (fmt.DETERMINISTIC_OVERHEAD - 6),  # 22: shortest version 2
        unknown + b"x" * 40,  # a key data_keys does not hold
        unknown + b"y" * 40,
    ]
    with engine.begin() as conn:
        conn.execute(
            raw.insert(), [{"id": i, "b": v, "t": fmt.to_text(v)} for i, v in enumerate(values)]
        )
    for _ in range(2):
        for column in registry.census("raw.b", "raw.t"):
            assert (column.rows, column.not_ciphertext, column.unknown_key_rows) == (6, 2, 2)
            assert [(k.key_id, k.version, k.rows) for k in column.keys] == [(key_id, 1, 2)]
            assert "77777" not in str(column.to_dict())
    registry.rotate()
    clocks.advance(2)
    with pytest.raises(KeyInUseError) as in_use:  # the guard counts as the census does
        registry.destroy(1)
    assert in_use.value.rows == {"raw.b": 2, "raw.t": 2}
    registry.close()
