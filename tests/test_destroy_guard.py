"""The destroy guard and transactions still open (docs/key-lifecycle.md, "The
destroy guard"): a writer that encrypted under a key before every cache had
refreshed and commits later must not find the key destroyed meanwhile."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    EncryptedType,
    KeyInUseError,
    KeyRegistry,
    KeyStateError,
    StaticRootKey,
)

MAX_AGE = 60


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))


def _engine(url: str) -> sa.Engine:
    """An engine whose SQLite connections wait half a second for a lock."""
    if sa.make_url(url).get_backend_name() == "sqlite":
        return sa.create_engine(url, connect_args={"timeout": 0.5})
    return sa.create_engine(url)


def _registry(engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks) -> KeyRegistry:
    return KeyRegistry(
        engine, root_key, cache_max_age=MAX_AGE, clock=clocks.monotonic, wall_clock=clocks.now
    )


def _bodies(engine: sa.Engine) -> dict[int, str]:
    """Every note through Connection and Session, each statement twice."""
    readings = []
    for _ in range(2):
        with engine.connect() as conn:
            readings.append({i: b for i, b in conn.execute(sa.select(Note.id, Note.body))})
        with Session(engine) as session:
            readings.append({n.id: n.body for n in session.scalars(sa.select(Note))})
    assert all(reading == readings[0] for reading in readings)
    return readings[0]


@contextmanager
def _writing(engine: sa.Engine, note_id: int, body: str) -> Iterator[Session]:
    """A transaction that wrote a note (encrypted under the key the
    application's cache holds) and stays open until the block ends."""
    with Session(engine) as session:
        session.add(Note(id=note_id, body=body))
        session.flush()
        yield session
        session.commit()


def test_destroy_waits_for_a_transaction_that_wrote_under_the_key(
    db_url: str, root_key: StaticRootKey, clocks: Clocks
) -> None:
    admin_engine, app_engine = _engine(db_url), _engine(db_url)
    admin = _registry(admin_engine, root_key, clocks)
    admin.init()
    Base.metadata.create_all(admin_engine)
    app = _registry(app_engine, root_key, clocks)  # another process, its own cache
    with Session(app_engine) as session:
        session.add(Note(id=1, body="committed under version 1"))
        session.commit()
    admin.rotate()
    admin.reencrypt(Note, progress=False)

    # The application's cache still holds version 1 as active: its slow
    # transaction encrypts under it, and commits only later.
    with _writing(app_engine, 2, "written under version 1 in a slow transaction"):
        clocks.advance(MAX_AGE)  # every cache has refreshed since the rotation
        for _ in range(2):
            with pytest.raises(KeyStateError, match="may still write under it") as caught:
                admin.destroy(1)
            assert "data key version 1 of scope 'default'" in str(caught.value)
            assert "wait for it to end" in str(caught.value)
            assert admin.key_info(1).state == "retired"
    with pytest.raises(KeyInUseError, match=r"notes\.body: 1"):
        admin.destroy(1)  # the census sees what it committed
    admin.reencrypt(Note, progress=False)

    clocks.advance(3600)
    if admin_engine.dialect.name == "sqlite":
        assert admin.destroy(1).state.value == "destroyed"
    else:  # a transaction begun since every cache refreshed writes under version 2
        with _writing(app_engine, 3, "written under version 2"):
            assert admin.destroy(1).state.value == "destroyed"
    assert _bodies(app_engine) == {
        1: "committed under version 1",
        2: "written under version 1 in a slow transaction",
        **({} if admin_engine.dialect.name == "sqlite" else {3: "written under version 2"}),
    }
    app.close()
    admin.close()
    admin_engine.dispose()
    app_engine.dispose()


def test_a_role_that_cannot_see_other_transactions_is_refused(
    pg_url: str, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """PostgreSQL shows a role the transactions of others only with
    pg_read_all_stats: without it the guard cannot tell, and says what to grant."""
    owner = _engine(pg_url)
    app = _registry(owner, root_key, clocks)
    app.init()
    Base.metadata.create_all(owner)
    role = f"limited_{secrets.token_hex(4)}"
    schema = pg_url.rsplit("%3D", 1)[1]
    with owner.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    limited = _engine(sa.make_url(pg_url).set(username=role).render_as_string(False))
    admin = _registry(limited, root_key, clocks)
    try:
        admin.rotate()
        with _writing(owner, 1, "under version 1, by another role") as session:
            clocks.advance(MAX_AGE)
            for _ in range(2):
                with pytest.raises(KeyStateError, match="GRANT pg_read_all_stats TO"):
                    admin.destroy(1)
            with owner.begin() as conn:
                conn.exec_driver_sql(f"GRANT pg_read_all_stats TO {role}")
            with pytest.raises(KeyStateError, match=r"backend \d+, writing to notes\)"):
                admin.destroy(1)
            assert session.get(Note, 1) is not None
        admin.reencrypt(Note, progress=False)
        assert admin.destroy(1).state.value == "destroyed"
        assert _bodies(owner) == {1: "under version 1, by another role"}
    finally:
        admin.close()
        limited.dispose()
        with owner.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        app.close()
        owner.dispose()
