"""Blind indexes stay in step with their sources on every write path: ORM
unit of work, ORM bulk operations, Core INSERT / UPDATE (single and
executemany), upserts, merge; writes whose index cannot be computed are
refused with an error naming the index, never a value."""

from __future__ import annotations

import functools
import itertools
import traceback
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from conftest import stored_bytes
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, load_only, mapped_column

from sqlalchemy_envelope import (
    BlindDigest,
    BlindIndexError,
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    blind_index,
    blind_index_column,
)
from sqlalchemy_envelope.keys.storage import MYSQL_DIALECTS


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


class Person(Base):
    """Joined- and single-table inheritance: the index lives in the base table."""

    __tablename__ = "person"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))
    name_index: Mapped[str | None] = blind_index("name", normalize="casefold")
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "person",
    }


class Employee(Person):
    """Joined, with a blind index of its own."""

    __tablename__ = "employee"
    id: Mapped[int] = mapped_column(sa.ForeignKey("person.id"), primary_key=True)
    badge: Mapped[str] = mapped_column(EncryptedType(sa.String(20)))
    badge_index: Mapped[str | None] = blind_index("badge", normalize="casefold")
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "employee"}


class Contractor(Person):
    """Joined, without a blind index of its own."""

    __tablename__ = "contractor"
    id: Mapped[int] = mapped_column(sa.ForeignKey("person.id"), primary_key=True)
    company: Mapped[str] = mapped_column(sa.String(50))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "contractor"}


class Visitor(Person):
    """Single-table."""

    host: Mapped[str | None] = mapped_column(sa.String(50))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "visitor"}


_numbers = itertools.count()


def _next_code() -> str:
    """A default computed in Python without arguments: a new value each call."""
    return f"T-{next(_numbers)}"


def _next_stamp() -> str:
    return f"stamp-{next(_numbers)}"


class Ticket(Base):
    """Sources with Python-side defaults and onupdates."""

    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(EncryptedType(sa.String(40)), default=_next_code)
    code_index: Mapped[str | None] = blind_index("code")
    status: Mapped[str] = mapped_column(
        EncryptedType(sa.String(30)), default="new", onupdate="modified"
    )
    status_index: Mapped[str | None] = blind_index("status")
    stamp: Mapped[str | None] = mapped_column(EncryptedType(sa.String(30)), onupdate=_next_stamp)
    stamp_index: Mapped[str | None] = blind_index("stamp")
    note: Mapped[str | None] = mapped_column(sa.String(50))


class Route(Base):
    """A compound index, one of whose sources has an onupdate."""

    __tablename__ = "routes"
    id: Mapped[int] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(EncryptedType(sa.String(30)))
    status: Mapped[str] = mapped_column(
        EncryptedType(sa.String(30)), default="new", onupdate="modified"
    )
    route_index: Mapped[str | None] = blind_index("queue", "status")
    note: Mapped[str | None] = mapped_column(sa.String(50))


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


def _named(engine: sa.Engine, name: str) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(sa.select(Person.id).where(Person.name_index.matches(name))))


def _badged(engine: sa.Engine, badge: str) -> list[int]:
    with Session(engine) as session:
        found = session.scalars(sa.select(Employee.id).where(Employee.badge_index.matches(badge)))
        return sorted(found)


@pytest.mark.parametrize("model", [Employee, Contractor, Visitor])
def test_inheritance(db: sa.Engine, model: type[Person]) -> None:
    """ORM bulk operations on a subclass write the base table's index too."""
    own = {Employee: {"badge": "B0"}, Contractor: {"company": "Acme"}, Visitor: {"host": "Bob"}}
    extra = own[model]
    for round_ in range(2):
        first = 10 + 10 * round_
        ids = list(range(first, first + 3))
        with Session(db) as session:
            session.execute(
                sa.insert(model), [{"id": i, "name": f"Ada{i}", **extra} for i in ids[:2]]
            )
            session.bulk_insert_mappings(model, [{"id": ids[2], "name": f"Ada{ids[2]}", **extra}])
            session.commit()
        for i in ids:
            assert _named(db, f"ADA{i}") == [i]
        if model is Employee:
            assert _badged(db, "b0") == ids

        with Session(db) as session:
            held = session.get(model, ids[0])
            assert held is not None
            rows = [{"id": i, "name": f"Eva{i}", **extra} for i in ids]
            if model is Employee:
                rows = [{**row, "badge": f"B{row['id']}"} for row in rows]
            session.execute(sa.update(model), rows)
            assert held.name == f"Eva{ids[0]}"
            stored = session.scalars(sa.select(Person.name_index).where(Person.id == ids[0]))
            assert held.name_index == stored.one()
            session.commit()
        for i in ids:
            assert _named(db, f"eva{i}") == [i]
            assert _named(db, f"ada{i}") == []
            if model is Employee:
                assert _badged(db, f"b{i}") == [i]

        with Session(db) as session:
            session.bulk_update_mappings(model, [{"id": i, "name": f"Ida{i}"} for i in ids])
            session.commit()
        for i in ids:
            assert _named(db, f"ida{i}") == [i]
            assert _named(db, f"eva{i}") == []

        with Session(db) as session:
            objects = list(session.scalars(sa.select(model).where(model.id.in_(ids))))
            session.expunge_all()
            for person in objects:
                person.name = f"Uma{person.id}"
            session.bulk_save_objects(objects)
            session.commit()
        for i in ids:
            assert _named(db, f"uma{i}") == [i]
            assert _named(db, f"ida{i}") == []

        with Session(db) as session:
            person = session.get(model, ids[0])
            assert person is not None
            person.name = f"Zoe{round_}"
            session.commit()
        assert _named(db, f"zoe{round_}") == [ids[0]]
        assert _named(db, f"uma{ids[0]}") == []
        if model is Visitor:  # one table: a WHERE-criteria UPDATE works everywhere
            with Session(db) as session:
                session.execute(
                    sa.update(model).where(model.id == ids[1]).values(name=f"Max{round_}")
                )
                session.commit()
            assert _named(db, f"max{round_}") == [ids[1]]


def _tickets(engine: sa.Engine, index: Any, value: Any) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(sa.select(Ticket.id).where(index.matches(value))))


def _in_step(engine: sa.Engine, ids: list[int], status: str) -> None:
    """Each ticket's indexes find it by the values it holds."""
    with Session(engine) as session:
        rows = session.execute(
            sa.select(Ticket.id, Ticket.code, Ticket.status, Ticket.stamp).where(Ticket.id.in_(ids))
        ).all()
    assert sorted(row.id for row in rows) == ids
    for row in rows:
        assert row.status == status
        assert _tickets(engine, Ticket.code_index, row.code) == [row.id]
        if row.stamp is not None:  # one value per execution, shared by its rows
            assert row.id in _tickets(engine, Ticket.stamp_index, row.stamp)
    assert set(ids) <= set(_tickets(engine, Ticket.status_index, status))
    other = "new" if status == "modified" else "modified"
    assert set(ids).isdisjoint(_tickets(engine, Ticket.status_index, other))


@pytest.mark.parametrize("via", VIA)
def test_defaults_and_onupdates_fill_the_index(db: sa.Engine, via: str) -> None:
    """A source left to its default (INSERT) or onupdate (UPDATE) has its
    index filled from it: a constant, or a function without arguments called
    once per row for the source and the index."""
    tickets = Ticket.__table__
    for round_ in range(2):
        base = 100 * (round_ + 1)
        ids = [base + i for i in range(7)]
        _run(db, via, sa.insert(tickets), [{"id": ids[0]}, {"id": ids[1]}])
        _run(db, via, sa.insert(tickets).values([{"id": ids[2]}, {"id": ids[3], "note": "n"}]))
        _run(db, "session", sa.insert(Ticket), [{"id": ids[4]}])
        with Session(db) as session:
            ticket = Ticket(id=ids[5])
            session.add(ticket)
            session.flush()
            assert ticket.code.startswith("T-")  # the value written, read back
            code_index = Ticket.__table__.c.code_index
            stored = session.scalars(sa.select(code_index).where(Ticket.id == ticket.id))
            assert ticket.code_index == stored.one() is not None
            assert _tickets(db, Ticket.code_index, ticket.code) == []  # not committed
            session.add(Ticket(id=ids[6], code=f"given{round_}"))
            session.commit()
        assert _tickets(db, Ticket.code_index, f"given{round_}") == [ids[6]]
        _in_step(db, ids, "new")

        with Session(db) as session:
            read = _tickets_index(session, ids[0])  # the digest of "new"
        assert isinstance(read, BlindDigest)
        stale = sa.update(tickets).where(tickets.c.id == ids[0]).values(status_index=read)
        with pytest.raises(BlindIndexError, match=r"tickets\.status_index"):
            _run(db, via, stale.values(note="stale"))  # status becomes "modified"
        _in_step(db, ids, "new")

        where = tickets.c.id.in_(ids)
        _run(db, via, sa.update(tickets).where(where).values(note="core"))
        _in_step(db, ids, "modified")
        _run(db, via, sa.update(tickets).where(where).values(status="new"))
        _in_step(db, ids, "new")
        _run(
            db,
            via,
            sa.update(tickets).where(tickets.c.id == sa.bindparam("i")),
            [{"i": i, "note": "many"} for i in ids],
        )
        _in_step(db, ids, "modified")
        _run(db, via, sa.update(tickets).where(where).values(status="new"))
        with Session(db) as session:
            session.execute(sa.update(Ticket).where(Ticket.id.in_(ids)).values(note="orm"))
            session.commit()
        _in_step(db, ids, "modified")
        _run(db, via, sa.update(tickets).where(where).values(status="new"))
        with Session(db) as session:
            session.execute(sa.update(Ticket), [{"id": i, "note": "bulk"} for i in ids])
            session.commit()
        _in_step(db, ids, "modified")
        _run(db, via, sa.update(tickets).where(where).values(status="new"))
        with Session(db) as session:
            for ticket in session.scalars(sa.select(Ticket).where(Ticket.id.in_(ids))):
                ticket.note = f"uow{round_}"
            session.commit()
            assert ticket.status == "modified"
            assert ticket.status_index == _tickets_index(session, ticket.id)
        _in_step(db, ids, "modified")


def _routes(engine: sa.Engine, queue: str, status: str) -> list[int]:
    with Session(engine) as session:
        found = session.scalars(sa.select(Route.id).where(Route.route_index.matches(queue, status)))
        return sorted(found)


@pytest.mark.parametrize("via", VIA)
def test_compound_index_with_an_onupdate_source(db: sa.Engine, via: str) -> None:
    """The unit of work carries the other sources (loading those it has not)
    into an UPDATE that applies a source's onupdate; a statement that does
    not set them is refused."""
    routes = Route.__table__
    loads = [
        lambda session: session.get(Route, 1),
        lambda session: session.scalars(sa.select(Route).options(load_only(Route.note))).one(),
        lambda session: session.scalars(
            sa.select(Route).options(load_only(Route.note, raiseload=True))
        ).one(),
    ]
    _run(db, via, sa.insert(routes), [{"id": 1, "queue": "Q0"}])
    for round_ in range(2):
        for n, load in enumerate(loads):
            _run(db, via, sa.update(routes).values(status="new", queue="Q0"))
            assert _routes(db, "Q0", "new") == [1]
            with Session(db) as session:
                route = load(session)
                route.note = f"note{round_}.{n}"
                session.commit()
            assert _routes(db, "Q0", "modified") == [1]
            assert _routes(db, "Q0", "new") == []
        _run(db, via, sa.update(routes).values(queue="Q1", note="x"))  # with the other source
        assert _routes(db, "Q1", "modified") == [1]
        with pytest.raises(BlindIndexError) as caught:
            _run(db, via, sa.update(routes).values(note=SECRET))
        assert "routes.route_index" in str(caught.value)
        assert "routes.status by its onupdate" in str(caught.value)
        assert SECRET not in "".join(traceback.format_exception(caught.value))
        assert _routes(db, "Q1", "modified") == [1]


def test_compound_index_sources_the_unit_of_work_has_not_loaded(db: sa.Engine) -> None:
    """Setting one source of a compound index, the others deferred, expired
    or left out by load_only (even with raiseload): the unit of work loads
    them to compute the index."""
    alice = sa.select(User).where(User.id == 1)
    options = [
        sa.orm.defer(User.last),
        load_only(User.first),
        load_only(User.first, raiseload=True),
        sa.orm.defer(User.last, raiseload=True),
    ]
    for round_ in range(2):
        for n, option in enumerate(options):
            first = f"Grace{round_}.{n}"
            with Session(db) as session:
                user = session.scalars(alice.options(option)).one()
                session.expire(user, ["email"])
                user.first = first
                session.commit()
            assert _ids(db, first, "lovelace") == [1]
            with Session(db) as session:
                user = session.scalars(alice.options(load_only(User.last))).one()
                user.last = "Lovelace"  # the other way round
                session.commit()
            assert _ids(db, first, "lovelace") == [1]


def _of_context(context: Any) -> str:
    return "from the context"


@pytest.mark.parametrize("via", VIA)
def test_generated_values_the_hook_cannot_know_are_refused(db: sa.Engine, via: str) -> None:
    """An onupdate that is SQL, a function of the execution context, or the
    database's own makes every UPDATE leaving its source out change it
    unseen: refused when the mapper is configured or the table first written.
    Such a default refuses the INSERTs that leave its source out."""
    onupdates: list[dict[str, Any]] = [
        {"onupdate": sa.func.lower("x")},
        {"onupdate": _of_context},
        {"server_onupdate": sa.FetchedValue()},
    ]
    for options in onupdates:
        for _ in range(2):
            metadata = sa.MetaData()
            table = sa.Table(
                "generated",
                metadata,
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("code", EncryptedType(sa.String(30)), **options),
                blind_index_column("code_index", "code"),
            )
            with pytest.raises(ConfigurationError, match=r"generated\.code_index.*generated\.code"):
                _run(db, via, sa.insert(table), [{"id": 1, "code": SECRET}])
            mapper_registry = sa.orm.registry()
            try:

                class Generated(mapper_registry.generate_base()):
                    __tablename__ = "generated"
                    id = sa.Column(sa.Integer, primary_key=True)
                    code = sa.Column(EncryptedType(sa.String(30)), **options)
                    code_index = blind_index("code")

                with pytest.raises(ConfigurationError, match=r"generated\.code_index"):
                    mapper_registry.configure()
            finally:
                mapper_registry.dispose()
    metadata = sa.MetaData()
    table = sa.Table(
        "generated",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", EncryptedType(sa.String(30)), default=_of_context),
        blind_index_column("code_index", "code"),
    )
    metadata.create_all(db)
    for _ in range(2):
        with pytest.raises(BlindIndexError, match="function of the execution context"):
            _run(db, via, sa.insert(table), [{"id": 1}])
        _run(db, via, sa.insert(table), [{"id": 2, "code": "given"}])
        _run(db, via, sa.delete(table))


def _tickets_index(session: Session, id_: int) -> Any:
    statement = sa.select(Ticket.__table__.c.status_index).where(Ticket.__table__.c.id == id_)
    return session.execute(statement).scalar_one()


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


@pytest.mark.parametrize("via", VIA)
def test_multi_table_updates_of_another_tables_sources(db: sa.Engine, via: str) -> None:
    """An UPDATE of one table that sets columns of another (MySQL, MariaDB)
    is refused where it sets an index's sources without the index."""
    person, employee = Person.__table__, Employee.__table__
    _run(db, "session", sa.insert(Employee), [{"id": 1, "name": "Ada", "badge": "B1"}])
    joined = employee.c.id == person.c.id
    refused = [
        sa.update(employee).values({person.c.name: SECRET}).where(joined),
        sa.update(employee).values({person.c.name: SECRET, employee.c.badge: "B2"}).where(joined),
        sa.update(Employee).values({Person.name: SECRET}).where(Employee.id == Person.id),
    ]
    for _ in range(2):
        for statement in refused:
            with pytest.raises(BlindIndexError) as caught:
                _run(db, via, statement)
            assert "person.name_index" in str(caught.value)
            assert SECRET not in "".join(traceback.format_exception(caught.value))
            assert _named(db, "ada") == [1]
    if db.dialect.name in MYSQL_DIALECTS:  # the only ones that SET another table's columns
        for round_ in range(2):
            name = f"Eva{round_}"
            sets = {person.c.name: name, person.c.name_index: name}
            _run(db, via, sa.update(employee).values(sets).where(joined))
            assert _named(db, name.lower()) == [1]


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
