"""Key states: every transition, every illegal one, reading under each state,
and the destroy guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from conftest import Clocks

from sqlalchemy_envelope import (
    DestroyedKeyError,
    EncryptedType,
    KeyDisabledError,
    KeyInUseError,
    KeyRegistry,
    KeyState,
    KeyStateError,
    StaticRootKey,
    UnknownKeyError,
)


@pytest.fixture
def reg(engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks) -> Iterator[KeyRegistry]:
    registry = KeyRegistry(
        engine, root_key, cache_max_age=60, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    yield registry
    registry.close()


def _table() -> sa.Table:
    return sa.Table(
        "records",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(50))),
    )


def test_every_transition_and_reading_under_each_state(
    engine: sa.Engine, reg: KeyRegistry, clocks: Clocks
) -> None:
    table = _table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "value": "under v1"})
    assert reg.rotate().version == 2

    def read() -> str:
        with engine.connect() as conn:
            return str(conn.execute(sa.select(table.c.value)).scalar_one())

    for action in (reg.disable, reg.destroy):
        with pytest.raises(KeyStateError, match="active key"):
            action(2)
    with pytest.raises(KeyStateError, match="already"):
        reg.enable(2)

    assert reg.retire(1).state is KeyState.RETIRED  # already retired: allowed, no change
    assert read() == "under v1"
    assert reg.disable(1).state is KeyState.DISABLED
    assert reg.disable(1).state is KeyState.DISABLED
    with pytest.raises(KeyDisabledError, match="version 1") as disabled:
        read()
    assert "enable" in str(disabled.value)
    with pytest.raises(KeyStateError, match="enable"):
        reg.retire(1)
    assert reg.enable(1).state is KeyState.RETIRED
    assert read() == "under v1"

    clocks.advance(120)
    assert reg.destroy(1, force=True).state is KeyState.DESTROYED
    with pytest.raises(DestroyedKeyError, match="version 1") as destroyed:
        read()
    assert destroyed.value.version == 1
    assert reg.destroy(1).state is KeyState.DESTROYED  # again: no change
    for action in (reg.enable, reg.disable, reg.retire):
        with pytest.raises(KeyStateError, match="destroyed"):
            action(1)
    with engine.connect() as conn:
        tombstone = (
            conn.execute(
                sa.select(reg.table).where(reg.table.c.version == 1, reg.table.c.scope == "default")
            )
            .mappings()
            .one()
        )
    assert tombstone["wrapped_key"] is None and tombstone["state"] == "destroyed"

    retired = reg.retire(2)  # retiring the active key rotates
    assert retired.state is KeyState.RETIRED
    status = reg.status()
    assert status.active_version == 3
    assert status.keys_by_state == {"destroyed": 1, "retired": 1, "active": 1}
    with pytest.raises(UnknownKeyError, match="no data key version 9"):
        reg.disable(9)


def test_other_processes_see_state_changes_within_the_cache_age(
    db_url: str, reg: KeyRegistry, root_key: StaticRootKey, clocks: Clocks
) -> None:
    other_engine = sa.create_engine(db_url)
    other = KeyRegistry(other_engine, root_key, clock=clocks.monotonic, wall_clock=clocks.now)
    old_value = reg.encrypt(b"old", "t.c")
    reg.rotate()
    assert other.decrypt(old_value, "t.c") == b"old"
    reg.disable(1)
    assert other.decrypt(old_value, "t.c") == b"old"  # its cache is still fresh
    clocks.advance(61)
    with pytest.raises(KeyDisabledError):
        other.decrypt(old_value, "t.c")
    reg.enable(1)
    clocks.advance(61)
    assert other.decrypt(old_value, "t.c") == b"old"
    other.close()
    other_engine.dispose()


def test_destroy_guard(engine: sa.Engine, reg: KeyRegistry, clocks: Clocks) -> None:
    table = _table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "value": f"v{i}"} for i in range(5)])
        conn.execute(table.insert(), {"id": 99, "value": None})
    reg.rotate()

    with pytest.raises(KeyStateError, match="caches refresh"):
        reg.destroy(1)
    clocks.advance(61)
    with pytest.raises(KeyInUseError, match=r"records\.value: 5") as in_use:
        reg.destroy(1)
    assert in_use.value.rows == {"records.value": 5}
    with pytest.raises(KeyInUseError):
        reg.destroy(1, columns=[table.c.value])

    with engine.begin() as conn:  # move the rows to the active key by hand
        rows = conn.execute(sa.select(table.c.id, table.c.value)).all()
        for row_id, value in rows:
            conn.execute(table.update().where(table.c.id == row_id).values(value=value))
    census = reg.census(table)
    assert [c.rows_under(reg.status().active_key_id or 0) for c in census] == [5]
    assert reg.destroy(1).state is KeyState.DESTROYED
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.value).where(table.c.id == 3)).scalar() == "v3"
