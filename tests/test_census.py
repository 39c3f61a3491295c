"""The census and the destroy guard: rows per data key, NULLs and plaintext,
counted in SQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import EncryptedType, KeyInUseError, KeyRegistry, StaticRootKey


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
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
    raw = sa.Table("accounts", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(
            raw.insert(), {"id": 30, "owner": b"legacy plaintext", "iban": "DE00 legacy plain"}
        )
        conn.execute(raw.insert(), {"id": 31, "owner": b"\x07" + b"x" * 40, "iban": "short"})

    by_name = {c.column: c for c in registry.census(Account)}
    owner, iban = by_name["accounts.owner"], by_name["accounts.iban"]
    assert owner.rows == iban.rows == 10
    assert {k.version: k.rows for k in owner.keys} == {1: 3, 2: 4}
    assert owner.nulls == 1 and owner.not_ciphertext == 2 and owner.unknown_key_rows == 0
    assert {k.version: k.rows for k in iban.keys} == {1: 3}
    assert iban.nulls == 5 and iban.not_ciphertext == 2
    assert owner.rows_under(v2.id) == 4

    same = [
        registry.census("accounts.owner"),
        registry.census(Account.owner),
        registry.census(table.c.owner),
    ]
    assert all(c == [owner] for c in same)
    assert {c.column for c in registry.census(table)} == {"accounts.owner", "accounts.iban"}
    assert {"accounts.owner", "accounts.iban"} <= {c.column for c in registry.census()}
    assert owner.to_dict()["keys"][0]["version"] == 1


def test_census_by_reflection_sees_storage(engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Account.__table__), {"id": 1, "owner": "o", "iban": "DE1"})
    # "table.column" needs no model: the storage is read from the reflected type.
    (iban,) = registry.census("accounts.iban")
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
        assert in_use.value.rows == {"accounts.owner": 1, "accounts.iban": 1}
    label, blob = registry.census("things.label", "things.blob")
    assert (label.not_ciphertext, blob.not_ciphertext) == (2, 2)
    assert registry.reencrypt(Account).values_by_version == {1: 2}
    assert registry.destroy(1).version == 1
    registry.close()
