"""Blind indexes stay in step with their sources on every write path: ORM
unit of work, ORM bulk operations, Core INSERT / UPDATE (single and
executemany), upserts, merge; writes whose index cannot be computed are
refused with an error naming the index, never a value."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import stored_bytes
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    BlindDigest,
    BlindIndexError,
    EncryptedType,
    KeyRegistry,
    blind_index,
)
from sqlalchemy_envelope.storage import MYSQL_DIALECTS


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index(
        "email", normalize=["strip", "casefold"], unique=True
    )
    first: Mapped[str] = mapped_column(EncryptedType(sa.String(50)))
    last: Mapped[str] = mapped_column(EncryptedType(sa.String(50)))
    name_index: Mapped[str | None] = blind_index("first", "last", normalize="casefold")


users = User.__table__
VIA = ["session", "connection"]


@pytest.fixture
def db(engine: sa.Engine, registry: KeyRegistry) -> Iterator[sa.Engine]:
    """Two users, Alice and Bob, written by the unit of work."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                User(id=1, email="alice@example.com", first="Ada", last="Lovelace"),
                User(id=2, email="bob@example.com", first="Bob", last="Smith"),
            ]
        )
        session.commit()
    yield engine
    Base.metadata.drop_all(engine)


def _run(engine: sa.Engine, via: str, statement: Any, params: Any = None) -> None:
    if via == "session":
        with Session(engine) as session:
            session.execute(statement, params)
            session.commit()
    else:
        with engine.begin() as conn:
            conn.execute(statement, params)


def _ids(engine: sa.Engine, *values: str) -> list[int]:
    index = User.email_index if len(values) == 1 else User.name_index
    with Session(engine) as session:
        return sorted(session.scalars(sa.select(User.id).where(index.matches(*values))))


def _moved(engine: sa.Engine, id_: int, old: str, new: str) -> None:
    """A lookup by the new email finds exactly the row, one by the old
    email nothing."""
    assert _ids(engine, new) == [id_]
    assert _ids(engine, old) == []


def _stored(bind: Any, id_: int) -> tuple[Any, ...]:
    """The row's two indexes as stored, read in ``bind``'s transaction."""
    statement = sa.select(users.c.email_index, users.c.name_index).where(users.c.id == id_)
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return tuple(conn.execute(statement).one())
    return tuple(bind.execute(statement).one())


@pytest.mark.parametrize("via", VIA)
def test_core_update_statements(db: sa.Engine, via: str) -> None:
    old = {1: "alice@example.com", 2: "bob@example.com"}
    for round_ in range(2):
        new = {i: f"user{i}.{round_}@example.com" for i in old}
        _run(db, via, sa.update(users).where(users.c.id == 1).values(email=new[1]))
        _moved(db, 1, old[1], new[1])
        old[1] = new[1]

        new = {i: f"many{i}.{round_}@example.com" for i in old}
        _run(
            db,
            via,
            sa.update(users)
            .where(users.c.id == sa.bindparam("user_id"))
            .values(email=sa.bindparam("new_email")),
            [{"user_id": i, "new_email": email} for i, email in new.items()],
        )
        for i in old:
            _moved(db, i, old[i], new[i])
        old = new

        new = {i: f"keyed{i}.{round_}@example.com" for i in old}
        _run(
            db,
            via,
            sa.update(users).where(users.c.id == sa.bindparam("user_id")),
            [{"user_id": i, "email": email} for i, email in new.items()],
        )
        for i in old:
            _moved(db, i, old[i], new[i])
        old = new

        new = {2: f"ordered.{round_}@example.com"}
        _run(db, via, sa.update(users).where(users.c.id == 2).ordered_values(("email", new[2])))
        _moved(db, 2, old[2], new[2])
        old[2] = new[2]

        _run(
            db,
            via,
            sa.update(users).where(users.c.id == 1).values(first=f"Ada{round_}", last="King"),
        )
        assert _ids(db, f"ADA{round_}", "king") == [1]


@pytest.mark.parametrize("synchronize", [False, "auto", "evaluate", "fetch"])
def test_orm_update_statements(db: sa.Engine, synchronize: Any) -> None:
    old = "alice@example.com"
    for round_ in range(2):
        new = f"alice.{synchronize}.{round_}@example.com"
        with Session(db) as session:
            alice = session.get(User, 1)
            assert alice is not None
            session.execute(
                sa.update(User).where(User.id == 1).values(email=new),
                execution_options={"synchronize_session": synchronize},
            )
            if synchronize:  # the object in the session holds the new index too
                assert alice.email == new
                assert alice.email_index == _stored(session, 1)[0]
            session.commit()
        _moved(db, 1, old, new)
        old = new


def test_orm_bulk_updates(db: sa.Engine) -> None:
    old = {1: "alice@example.com", 2: "bob@example.com"}
    for round_ in range(2):
        new = {i: f"bulk{i}.{round_}@example.com" for i in old}
        with Session(db) as session:
            alice = session.get(User, 1)
            assert alice is not None
            session.execute(sa.update(User), [{"id": i, "email": e} for i, e in new.items()])
            assert alice.email == new[1]
            assert alice.email_index == _stored(session, 1)[0]
            session.commit()
        for i in old:
            _moved(db, i, old[i], new[i])
        old = new

        new = {i: f"mappings{i}.{round_}@example.com" for i in old}
        with Session(db) as session:
            session.bulk_update_mappings(User, [{"id": i, "email": e} for i, e in new.items()])
            session.commit()
        for i in old:
            _moved(db, i, old[i], new[i])
        old = new

        new = {i: f"objects{i}.{round_}@example.com" for i in old}
        with Session(db) as session:
            objects = list(session.scalars(sa.select(User).order_by(User.id)))
            session.expunge_all()
            for user in objects:
                user.email = new[user.id]
            session.bulk_save_objects(objects)
            session.commit()
        for i in old:
            _moved(db, i, old[i], new[i])
        old = new


def test_unit_of_work_and_merge(db: sa.Engine) -> None:
    old = "alice@example.com"
    for round_ in range(2):
        new = f"alice.uow.{round_}@example.com"
        with Session(db) as session:
            alice = session.get(User, 1)
            assert alice is not None
            alice.email = new
            alice.first = f"Augusta{round_}"  # one source of the compound index
            session.flush()
            # the object holds the digests the database holds, no stale value
            assert (alice.email_index, alice.name_index) == _stored(session, 1)
            session.commit()
        _moved(db, 1, old, new)
        assert _ids(db, f"augusta{round_}", "LOVELACE") == [1]
        old = new

        new = f"alice.merge.{round_}@example.com"
        with Session(db) as session:
            session.merge(User(id=1, email=new, first="Ada", last="Lovelace"))
            session.commit()
        _moved(db, 1, old, new)
        assert _ids(db, "ada", "lovelace") == [1]
        old = new


@pytest.mark.parametrize("via", VIA)
def test_inserts(db: sa.Engine, via: str) -> None:
    for round_ in range(2):
        ids = iter(range(10 + 10 * round_, 20 + 10 * round_))

        def person(ids: Iterator[int] = ids) -> dict[str, Any]:
            i = next(ids)
            return {"id": i, "email": f"user{i}@example.com", "first": "Ada", "last": f"L{i}"}

        written = [person(), person()]
        _run(db, via, sa.insert(users), written)
        multi = [person(), person()]
        _run(db, via, sa.insert(users).values(multi))
        orm = [person()]
        _run(db, via, sa.insert(User), orm)
        written += multi + orm
        with Session(db) as session:
            written += [mapping := person()]
            session.bulk_insert_mappings(User, [mapping])
            written += [saved := person()]
            session.bulk_save_objects([User(**saved)])
            written += [added := person()]
            user = User(**added)
            session.add(user)
            session.flush()
            assert (user.email_index, user.name_index) == _stored(session, added["id"])
            session.commit()
        for row in written:
            assert _ids(db, row["email"].upper()) == [row["id"]]
            assert _ids(db, "ADA", row["last"]) == [row["id"]]


def _upsert(engine: sa.Engine, table: Any, set_: Callable[[Any], dict[str, Any]]) -> Any:
    """INSERT ... ON CONFLICT (id) DO UPDATE, or ON DUPLICATE KEY UPDATE;
    ``set_`` maps the inserted row (``excluded`` / ``inserted``) to the SET."""
    if engine.dialect.name in MYSQL_DIALECTS:
        mysql_insert = mysql.insert(table)
        return mysql_insert.on_duplicate_key_update(set_(mysql_insert.inserted))
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    return statement.on_conflict_do_update(index_elements=["id"], set_=set_(statement.excluded))


@pytest.mark.parametrize("via", VIA)
def test_upserts(db: sa.Engine, via: str) -> None:
    old = "alice@example.com"
    for round_ in range(2):
        new = f"alice.upsert.{round_}@example.com"
        row = {"id": 1, "email": new, "first": "Ada", "last": f"Byron{round_}"}
        statement = _upsert(
            db,
            users,
            lambda inserted: {
                "email": inserted.email,
                "first": inserted.first,
                "last": inserted.last,
            },
        )
        _run(db, via, statement.values(**row))
        _moved(db, 1, old, new)
        assert _ids(db, "ada", f"byron{round_}") == [1]
        old = new

        new = f"alice.constant.{round_}@example.com"
        statement = _upsert(db, User, lambda inserted, new=new: {"email": new})
        ignored = {"id": 1, "email": "ignored@example.com", "first": "A", "last": "B"}
        _run(db, via, statement, [ignored])
        _moved(db, 1, old, new)
        assert _ids(db, "ignored@example.com") == []
        old = new

        new = f"carol.{round_}@example.com"
        _run(db, via, statement, [{"id": 3 + round_, "email": new, "first": "C", "last": "D"}])
        assert _ids(db, new) == [3 + round_]  # inserted, not updated


@pytest.mark.parametrize("via", VIA)
def test_explicit_index_values_are_kept(db: sa.Engine, via: str) -> None:
    alice = users.c.id == 1
    for round_ in range(2):
        bob = {"id": 2, "email": "bob@example.com", "first": "Bob", "last": "Smith"}
        bob_digest = _stored(db, 2)[0]
        assert isinstance(bob_digest, BlindDigest)
        _run(db, via, sa.delete(users).where(users.c.id == 2))
        # a copy: the digest read, written back with the email it belongs to
        copy = {**bob, "email": " BOB@Example.com", "email_index": bob_digest, "name_index": None}
        _run(db, via, sa.insert(users), [copy])
        assert _stored(db, 2) == (bob_digest, None)
        assert _ids(db, "bob@example.com") == [2]
        with Session(db) as session:
            user = session.get(User, 1)
            assert user is not None
            user.email = f"alice.uow{round_}@example.com"
            user.first = "Augusta"
            user.email_index = user.name_index = None
            session.commit()
        assert _stored(db, 1) == (None, None)
        restore = {"email": "alice@example.com", "first": "Ada", "last": "Lovelace"}
        _run(db, via, sa.update(users).where(alice).values(restore))
        assert _ids(db, "alice@example.com") == [1]
        new = f"alice{round_}@example.com"
        _run(db, via, sa.update(users).where(alice).values(email=new, email_index=None))
        assert _stored(db, 1)[0] is None
        _run(db, via, sa.update(users).where(alice).values(email="alice@example.com"))
        _run(db, via, sa.update(users).where(users.c.id == 2).values(first="Bob", last="Smith"))


@pytest.mark.parametrize("via", VIA)
def test_writes_that_leave_the_sources_leave_the_index(db: sa.Engine, via: str) -> None:
    for round_ in range(2):
        unset = sa.update(users).where(users.c.id == 1).values(email_index=None, name_index=None)
        _run(db, via, unset)
        _run(db, via, sa.update(users).where(users.c.id == 1).values(first="Ada", last="Byron"))
        email_index, name_index = _stored(db, 1)
        assert email_index is None and name_index is not None
        new = f"alice{round_}@example.com"
        _run(db, via, sa.update(users).where(users.c.id == 1).values(email=new))
        assert _stored(db, 1)[1] == name_index
        _moved(db, 1, "alice@example.com", new)
        with Session(db) as session:
            alice = session.get(User, 1)
            assert alice is not None
            alice.email_index = None
            alice.last = f"Lovelace{round_}"
            session.commit()
        assert _stored(db, 1)[0] is None
        assert _ids(db, "ada", f"lovelace{round_}") == [1]
        _run(db, via, sa.update(users).where(users.c.id == 1).values(email="alice@example.com"))


@pytest.mark.parametrize("via", VIA)
def test_sources_and_indexes_given_as_bound_parameters_or_literals(db: sa.Engine, via: str) -> None:
    """A bound parameter or literal, whatever type it was created with, is a
    Python value: a source set to one is encrypted and its index computed
    from it; an index given one hashes it."""
    old = "alice@example.com"
    written = []
    for round_ in range(2):
        for i, make in enumerate(
            (
                sa.literal,
                lambda value: sa.bindparam("new_email", value),
                lambda value: sa.bindparam("new_email", value, type_=sa.String(200)),
            )
        ):
            new = f"typed.{round_}.{i}@example.com"
            _run(db, via, sa.update(users).where(users.c.id == 1).values(email=make(new)))
            _moved(db, 1, old, new)
            with Session(db) as session:
                assert session.scalar(sa.select(User.email).where(User.id == 1)) == new
            written.append(new)
            old = new
        last = f"Typed{round_}"
        names = {"first": sa.literal("Ada"), "last": sa.bindparam("new_last", last)}
        _run(db, via, sa.update(User).where(User.id == 1).values(names))
        assert _ids(db, "ada", last) == [1]
        new = f"inserted.{round_}@example.com"
        row = {"id": 10 + round_, "first": sa.literal("F"), "last": sa.literal(last)}
        _run(db, via, sa.insert(users).values(**row, email=sa.literal(new)))
        assert _ids(db, new.upper()) == [10 + round_]
        given = f"given.{round_}@example.com"
        _run(db, via, sa.update(users).where(users.c.id == 2).values(email_index=sa.literal(given)))
        assert _ids(db, given) == [2]
        with Session(db) as session:
            user = session.get(User, 2)
            assert user is not None
            user.email = sa.literal(f"uow.{round_}@example.com")  # type: ignore[assignment]
            session.commit()
            assert user.email == f"uow.{round_}@example.com"
        assert _ids(db, f"UOW.{round_}@example.com") == [2]
        written += [last, new, given, f"uow.{round_}@example.com"]
    stored = stored_bytes(db, "users")
    assert not [value for value in written if value.encode() in stored]


SECRET = "Grace.Hopper" + "@example.com"  # must appear in no error


def _refused(
    engine: sa.Engine, index: str, write: Callable[[], None], before: tuple[Any, ...]
) -> None:
    with pytest.raises(BlindIndexError) as caught:
        write()
    error = caught.value
    assert index in str(error)
    assert SECRET not in "".join(traceback.format_exception(error))
    assert SECRET.casefold() not in "".join(traceback.format_exception(error)).casefold()
    assert error.__cause__ in (None, error) and error.__context__ in (None, error)
    assert _stored(engine, 1) == before  # nothing written
    assert _ids(engine, SECRET) == []


@pytest.mark.parametrize("via", VIA)
def test_writes_whose_index_cannot_be_computed_are_refused(db: sa.Engine, via: str) -> None:
    alice = users.c.id == 1
    row = {"id": 1, "email": SECRET, "first": SECRET, "last": SECRET}
    refused: list[tuple[str, Any, Any]] = [
        (
            "users.email_index",
            sa.update(users).where(alice).values(email=sa.func.lower(SECRET)),
            None,
        ),
        (
            "users.email_index",
            sa.update(User).where(User.id == 1).values(email=sa.literal_column("'x'")),
            None,
        ),
        (
            "users.email_index",
            sa.update(User).where(User.id == 1).values(email=sa.cast(SECRET, sa.String)),
            None,
        ),
        ("users.name_index", sa.update(users).where(alice).values(first=SECRET), None),
        (
            "users.name_index",
            sa.update(users).where(users.c.id == sa.bindparam("i")),
            [{"i": 1, "last": SECRET}],
        ),
        (
            "users.email_index",
            sa.insert(users).values({**row, "id": 9, "email": sa.func.lower(SECRET)}),
            None,
        ),
        (
            "users.email_index",
            sa.insert(users).values([{**row, "id": 9, "email": sa.func.lower(SECRET)}]),
            None,
        ),
        (
            "users.email_index",
            sa.insert(users).from_select(
                ["id", "email", "first", "last"],
                sa.select(users.c.id + 100, users.c.email, users.c.first, users.c.last),
            ),
            None,
        ),
        (
            "users.name_index",
            _upsert(db, users, lambda inserted: {"first": inserted.first, "last": SECRET}),
            [row],
        ),
        (
            "users.email_index",
            _upsert(db, users, lambda inserted: {"email": sa.func.lower(inserted.email)}),
            [row],
        ),
    ]
    before = _stored(db, 1)
    # a digest read before the email changed, written back with the new email
    stale = sa.update(users).where(alice).values(email=SECRET, email_index=before[0])
    refused.append(("users.email_index", stale, None))
    for _ in range(2):
        for index, statement, params in refused:
            _refused(db, index, functools.partial(_run, db, via, statement, params), before)
    if via == "session":
        for _ in range(2):

            def bulk() -> None:
                with Session(db) as session:
                    session.execute(sa.update(User), [{"id": 1, "first": SECRET}])

            def mappings() -> None:
                with Session(db) as session:
                    session.bulk_update_mappings(User, [{"id": 1, "last": SECRET}])

            def stale_mappings() -> None:
                with Session(db) as session:
                    mapping = {"id": 1, "email": SECRET, "email_index": before[0]}
                    session.bulk_update_mappings(User, [mapping])

            def stale_objects() -> None:
                with Session(db) as session:
                    user = session.get(User, 1)
                    assert user is not None
                    session.expunge(user)
                    user.email = SECRET
                    session.bulk_save_objects([user], update_changed_only=False)

            _refused(db, "users.name_index", bulk, before)
            _refused(db, "users.name_index", mappings, before)
            _refused(db, "users.email_index", stale_mappings, before)
            _refused(db, "users.email_index", stale_objects, before)


class Contact(Base):
    """Attribute names that differ from the column names they map."""

    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column("email_address", EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")


def _contacts(engine: sa.Engine, email: str) -> list[int]:
    with Session(engine) as session:
        found = session.scalars(sa.select(Contact.id).where(Contact.email_index.matches(email)))
        return sorted(found)


@pytest.mark.parametrize("via", VIA)
def test_sources_are_found_by_attribute_and_by_column(db: sa.Engine, via: str) -> None:
    contacts = Contact.__table__
    for round_ in range(2):
        orm, core = 1 + 2 * round_, 2 + 2 * round_
        # ORM statements name attributes, which only a Session resolves
        _run(db, "session", sa.insert(Contact), [{"id": orm, "email": f"Orm{round_}@Example.com"}])
        _run(db, via, sa.insert(contacts), [{"id": core, "email_address": f"Core{round_}@x.org"}])
        assert _contacts(db, f"orm{round_}@example.com") == [orm]
        assert _contacts(db, f"core{round_}@x.org") == [core]
        moved = f"Moved{round_}@x.org"
        _run(db, via, sa.update(contacts).where(contacts.c.id == core).values(email_address=moved))
        assert _contacts(db, moved.lower()) == [core]
        assert _contacts(db, f"core{round_}@x.org") == []
