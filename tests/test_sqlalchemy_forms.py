"""SQLAlchemy in all its forms on a table of encrypted columns (randomized,
deterministic, a blind index, text storage) beside plain ones: Core and ORM,
through a Connection and a Session, every statement run twice (the second run
comes from the compiled cache), on SQLite, PostgreSQL and MariaDB. Results
are checked as decrypted values and row counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.orm import (
    Bundle,
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    contains_eager,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
    with_parent,
)

from sqlalchemy_envelope import EncryptedExpressionError, EncryptedType, KeyRegistry, blind_index
from sqlalchemy_envelope.crypto import format as fmt


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"])
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    notes: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100), storage="text"))
    cards: Mapped[list[Card]] = relationship(back_populates="person", order_by="Card.id")
    cards_by_ssn: Mapped[list[Card]] = relationship(
        primaryjoin="Person.ssn == foreign(Card.holder_ssn)", viewonly=True, order_by="Card.id"
    )


class Card(Base):
    __tablename__ = "cards"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    person_id: Mapped[int | None] = mapped_column(sa.ForeignKey("people.id"))
    number: Mapped[str] = mapped_column(EncryptedType(sa.String(19)))
    holder_ssn: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(11), deterministic=True, context="people.ssn")
    )
    person: Mapped[Person | None] = relationship(back_populates="cards")


ANN = (1, "ann", "Ann@Example.org", "111-11-1111", "likes tea")
BOB = (2, "bob", "bob@example.org", "222-22-2222", None)
CY = (3, "cy", "cy@example.org", None, "no ssn")
CARDS = [(10, 1, "4111-1111", "111-11-1111"), (11, 2, "5222-2222", "222-22-2222")]
CARDS += [(12, None, "6333-3333", "111-11-1111")]


@pytest.fixture
def people(engine: sa.Engine, registry: KeyRegistry) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for id_, name, email, ssn, notes in (ANN, BOB, CY):
            session.add(Person(id=id_, name=name, email=email, ssn=ssn, notes=notes))
        session.flush()
        for id_, person_id, number, holder_ssn in CARDS:
            session.add(Card(id=id_, person_id=person_id, number=number, holder_ssn=holder_ssn))
        session.commit()
    yield engine


def _plain(value: Any) -> Any:
    """An entity as the tuple of its values, a bundle as a tuple."""
    if isinstance(value, Person):
        return (value.id, value.name, value.email, value.ssn, value.notes)
    if isinstance(value, Card):
        return (value.id, value.person_id, value.number, value.holder_ssn)
    if isinstance(value, sa.Row):
        return tuple(value)
    return value


def _rows(result: sa.Result[Any]) -> list[Any]:
    return [tuple(_plain(value) for value in row) for row in result]


def _sorted(result: sa.Result[Any]) -> list[Any]:
    return sorted(_rows(result), key=repr)


def _person_rows(result: sa.Result[Any]) -> list[Any]:
    """select(Person) gives entities in a Session and columns on a Connection."""
    out = []
    for row in result:
        if isinstance(row[0], Person):
            out.append(_plain(row[0]))
        else:
            out.append((row.id, row.name, row.email, row.ssn, row.notes))
    return out


def _cache_hit(result: Any) -> bool:
    cursor = getattr(result, "raw", None) or result
    return bool(cursor.context.cache_hit is CacheStats.CACHE_HIT)


def _twice(
    engine: sa.Engine, stmt: Any, read: Callable[[Any], Any] = _rows, **params: Any
) -> tuple[Any, Any]:
    """Run ``stmt`` twice on a Connection and twice in a Session: the second
    run of each is a hit in the compiled cache, and gives what the first gave.
    Returns what the Connection and the Session read."""
    seen = []
    with engine.connect() as conn:
        first = read(conn.execute(stmt, params))
        result = conn.execute(stmt, params)
        assert _cache_hit(result)
        assert read(result) == first
        seen.append(first)
    with Session(engine) as session:
        first = read(session.execute(stmt, params))
        result = session.execute(stmt, params)
        assert _cache_hit(result)
        assert read(result) == first
        seen.append(first)
    return seen[0], seen[1]


def _select_forms() -> list[tuple[str, Any, Callable[[Any], Any], Any]]:
    """(name, statement, how to read it, the rows expected) for each form."""
    ann, bob, cy = ANN[:5], BOB[:5], CY[:5]
    P = aliased(Person)
    C2 = aliased(Card)
    sub = sa.select(Person.id, Person.email, Person.ssn, Person.email_index)
    sub = sub.where(Person.id > 1).subquery()
    entity_sub = aliased(Person, sa.select(Person).where(Person.ssn.is_not(None)).subquery())
    cte = sa.select(Person.id, Person.email, Person.ssn, Person.email_index).cte("found")
    union = sa.union_all(
        sa.select(Person.id, Person.email).where(Person.ssn == "111-11-1111"),
        sa.select(Person.id, Person.email).where(Person.email_index.matches("CY@example.org")),
    )
    entity_union = aliased(
        Person,
        sa.union_all(
            sa.select(Person).where(Person.id == 1), sa.select(Person).where(Person.id == 3)
        ).subquery(),
    )
    return [
        ("select(Model)", sa.select(Person).order_by(Person.id), _person_rows, [ann, bob, cy]),
        ("select(Model.attr)", sa.select(Person.email).where(Person.id == 2), _rows, [(BOB[2],)]),
        (
            "several attributes",
            sa.select(Person.id, Person.email, Person.ssn, Person.notes).order_by(Person.id),
            _rows,
            [(p[0], p[2], p[3], p[4]) for p in (ann, bob, cy)],
        ),
        (
            "deterministic ==",
            sa.select(Person.email).where(Person.ssn == "111-11-1111"),
            _rows,
            [(ANN[2],)],
        ),
        (
            "deterministic IN",
            sa.select(Person.id).where(Person.ssn.in_(["222-22-2222", "999-99-9999"])),
            _rows,
            [(2,)],
        ),
        (
            "deterministic !=",
            sa.select(Person.id).where(Person.ssn != "111-11-1111"),
            _rows,
            [(2,)],
        ),
        (
            "deterministic IS NULL",
            sa.select(Person.id).where(Person.ssn.is_(None)),
            _rows,
            [(3,)],
        ),
        (
            "blind index matches",
            sa.select(Person.id, Person.email).where(
                Person.email_index.matches(" ANN@example.ORG")
            ),
            _rows,
            [(1, ANN[2])],
        ),
        (
            "blind index IN",
            sa.select(Person.id).where(Person.email_index.in_(["BOB@example.org", "x@y.z"])),
            _rows,
            [(2,)],
        ),
        (
            "aliased entity",
            sa.select(P).where(P.ssn == "222-22-2222"),
            _person_rows,
            [bob],
        ),
        (
            "aliased entity, blind index",
            sa.select(P.id, P.email).where(P.email_index.matches("cy@example.org")),
            _rows,
            [(3, CY[2])],
        ),
        (
            "self-join on a deterministic column",
            sa.select(Card.id, C2.id)
            .join(C2, C2.holder_ssn == Card.holder_ssn)
            .where(Card.id < C2.id),
            _rows,
            [(10, 12)],
        ),
        (
            "join on a plain foreign key",
            sa.select(Person.email, Card.number)
            .join(Card, Card.person_id == Person.id)
            .order_by(Card.id),
            _rows,
            [(ANN[2], "4111-1111"), (BOB[2], "5222-2222")],
        ),
        (
            "join on a deterministic column",
            sa.select(Person.email, Card.number)
            .join(Card, Card.holder_ssn == Person.ssn)
            .order_by(Card.id),
            _rows,
            [(ANN[2], "4111-1111"), (BOB[2], "5222-2222"), (ANN[2], "6333-3333")],
        ),
        (
            "join along a relationship on a deterministic column",
            sa.select(Person.email, Card.number)
            .join(Person.cards_by_ssn)
            .where(Person.email_index.matches("ann@example.org"))
            .order_by(Card.id),
            _rows,
            [(ANN[2], "4111-1111"), (ANN[2], "6333-3333")],
        ),
        (
            "outer join",
            sa.select(Person.id, Card.number).outerjoin(Person.cards).order_by(Person.id, Card.id),
            _rows,
            [(1, "4111-1111"), (2, "5222-2222"), (3, None)],
        ),
        (
            "subquery",
            sa.select(sub.c.email).where(sub.c.ssn == "222-22-2222"),
            _rows,
            [(BOB[2],)],
        ),
        (
            "subquery, blind index",
            sa.select(sub.c.id).where(sub.c.email_index.matches("Cy@Example.org")),
            _rows,
            [(3,)],
        ),
        (
            "entity aliased to a subquery",
            sa.select(entity_sub).order_by(entity_sub.id),
            _person_rows,
            [ann, bob],
        ),
        (
            "CTE",
            sa.select(cte.c.id, cte.c.email).where(cte.c.email_index.matches("BOB@example.org")),
            _rows,
            [(2, BOB[2])],
        ),
        (
            "CTE, deterministic",
            sa.select(cte.c.email).where(cte.c.ssn == "111-11-1111"),
            _rows,
            [(ANN[2],)],
        ),
        ("UNION ALL", union, _sorted, [(1, ANN[2]), (3, CY[2])]),
        (
            "entity aliased to a UNION",
            sa.select(entity_union).where(entity_union.ssn == "111-11-1111"),
            _person_rows,
            [ann],
        ),
        (
            "scalar subquery",
            sa.select(
                Person.id,
                sa.select(Card.number).where(Card.person_id == Person.id).scalar_subquery(),
            ).order_by(Person.id),
            _rows,
            [(1, "4111-1111"), (2, "5222-2222"), (3, None)],
        ),
        (
            "correlated count on a deterministic column",
            sa.select(
                Person.id,
                sa.select(sa.func.count())
                .where(Card.holder_ssn == Person.ssn)
                .correlate(Person)
                .scalar_subquery(),
            ).order_by(Person.id),
            _rows,
            [(1, 2), (2, 1), (3, 0)],
        ),
        (
            "EXISTS",
            sa.select(Person.id)
            .where(sa.exists().where(Card.holder_ssn == Person.ssn))
            .order_by(Person.id),
            _rows,
            [(1,), (2,)],
        ),
        (
            "relationship any()",
            sa.select(Person.id).where(Person.cards_by_ssn.any(Card.number.is_not(None))),
            _sorted,
            [(1,), (2,)],
        ),
        (
            "IN a subquery of a deterministic column",
            sa.select(Person.id).where(Person.ssn.in_(sa.select(Card.holder_ssn))),
            _sorted,
            [(1,), (2,)],
        ),
        (
            "Bundle",
            sa.select(Bundle("b", Person.email, Person.ssn)).where(Person.id == 1),
            _rows,
            ([(ANN[2], ANN[3])], [((ANN[2], ANN[3]),)]),
        ),
        (
            "with_only_columns",
            sa.select(Person).with_only_columns(Person.email, Person.ssn).where(Person.id == 2),
            _rows,
            [(BOB[2], BOB[3])],
        ),
        (
            "window partitioned by a deterministic column",
            sa.select(Card.id, sa.func.count().over(partition_by=Card.holder_ssn)).order_by(
                Card.id
            ),
            _rows,
            [(10, 2), (11, 1), (12, 2)],
        ),
        (
            "GROUP BY a deterministic column",
            sa.select(Card.holder_ssn, sa.func.count()).group_by(Card.holder_ssn),
            _sorted,
            [("111-11-1111", 2), ("222-22-2222", 1)],
        ),
        (
            "DISTINCT",
            sa.select(Card.holder_ssn).distinct(),
            _sorted,
            [("111-11-1111",), ("222-22-2222",)],
        ),
        (
            "LIMIT and OFFSET",
            sa.select(Person.email).order_by(Person.id).limit(1).offset(1),
            _rows,
            [(BOB[2],)],
        ),
        (
            "textual SQL typed by the model's columns",
            sa.text("SELECT id, email, notes FROM people WHERE id = 1").columns(
                Person.id, Person.email, Person.notes
            ),
            _rows,
            [(1, ANN[2], ANN[4])],
        ),
        (
            "lambda statement",
            sa.lambda_stmt(lambda: sa.select(Person.email).where(Person.ssn == "222-22-2222")),
            _rows,
            [(BOB[2],)],
        ),
    ]


def test_selects_in_every_form(people: sa.Engine) -> None:
    for name, stmt, read, expected in _select_forms():
        on_connection, in_session = expected if isinstance(expected, tuple) else (expected,) * 2
        assert _twice(people, stmt, read) == (on_connection, in_session), name


def test_bound_parameters_in_cached_statements(people: sa.Engine) -> None:
    """One cached statement, other values each time: what is compared is
    the value given, not the one the statement was first compiled with."""
    by_ssn = sa.select(Person.id).where(Person.ssn == sa.bindparam("ssn"))
    by_email = sa.select(Person.id).where(Person.email_index == sa.bindparam("email"))
    for ssn, email, expected in (
        ("111-11-1111", "ANN@example.org", 1),
        ("222-22-2222", "bob@example.org", 2),
    ):
        assert _twice(people, by_ssn, ssn=ssn) == ([(expected,)], [(expected,)])
        assert _twice(people, by_email, email=email) == ([(expected,)], [(expected,)])


def test_orm_loading_and_session_operations(people: sa.Engine) -> None:
    for run in range(2):
        with Session(people) as session:
            ann = session.get(Person, 1)
            assert ann is not None and _plain(ann) == ANN
            assert [c.number for c in ann.cards] == ["4111-1111"]
            assert [c.number for c in ann.cards_by_ssn] == ["4111-1111", "6333-3333"]
            card = session.get(Card, 11)
            assert card is not None and card.person is not None and card.person.email == BOB[2]

        for option in (selectinload, joinedload, subqueryload):
            with Session(people) as session:
                stmt = (
                    sa.select(Person)
                    .options(option(Person.cards_by_ssn), option(Person.cards))
                    .order_by(Person.id)
                )
                loaded = [
                    (p.email, [c.number for c in p.cards], [c.number for c in p.cards_by_ssn])
                    for p in session.scalars(stmt).unique()
                ]
                assert loaded == [
                    (ANN[2], ["4111-1111"], ["4111-1111", "6333-3333"]),
                    (BOB[2], ["5222-2222"], ["5222-2222"]),
                    (CY[2], [], []),
                ], (option, run)

        with Session(people) as session:
            eager = (
                sa.select(Person)
                .join(Person.cards)
                .options(contains_eager(Person.cards))
                .where(Card.holder_ssn == ANN[3])
            )
            found = session.scalars(eager).unique().all()
            assert [(p.id, [c.number for c in p.cards]) for p in found] == [(1, ["4111-1111"])]
            union = sa.union_all(
                sa.select(Person).where(Person.ssn == ANN[3]),
                sa.select(Person).where(Person.email_index.matches(CY[2])),
            )
            from_union = session.scalars(sa.select(Person).from_statement(union)).all()
            assert sorted(_plain(p) for p in from_union) == [ANN, CY]
            has = sa.select(Card.id).where(Card.person.has(Person.ssn == BOB[3]))
            assert session.scalars(has).all() == [11]
            parent = sa.select(Card.number).where(with_parent(found[0], Person.cards_by_ssn))
            assert sorted(session.scalars(parent)) == ["4111-1111", "6333-3333"]
            legacy = session.query(Person).filter_by(ssn=BOB[3]).one()
            assert legacy.email == BOB[2]

        with Session(people) as session:
            # joinedload with LIMIT wraps the query in a subquery and adapts the WHERE.
            stmt = (
                sa.select(Person)
                .options(joinedload(Person.cards_by_ssn))
                .where(Person.email_index.matches("ann@example.org") | (Person.ssn == BOB[3]))
                .order_by(Person.id)
                .limit(5)
            )
            found = session.scalars(stmt).unique().all()
            assert [(p.id, len(p.cards_by_ssn)) for p in found] == [(1, 2), (2, 1)]

            merged = session.merge(Person(id=2, name="bob", email=BOB[2], ssn=BOB[3]))
            assert merged is found[1] and not session.is_modified(merged)
            merged.notes = f"merged {run}"
            session.flush()
            again = session.execute(
                sa.select(Person).where(Person.id == 2).execution_options(populate_existing=True)
            ).scalar_one()
            assert again is merged and again.notes == f"merged {run}"
            session.expire(again)
            session.refresh(again)
            assert again.notes == f"merged {run}" and again.email == BOB[2]
            session.commit()

        with Session(people) as session:
            assert session.scalars(sa.select(Person.notes).where(Person.id == 2)).one() == (
                f"merged {run}"
            )


SYNCS = [False, "auto", "evaluate", "fetch"]


def _where(kind: str) -> Any:
    return {
        "plain id": Person.id == 1,
        "deterministic ==": Person.ssn == ANN[3],
        "blind index matches": Person.email_index.matches("ann@EXAMPLE.org"),
    }[kind]


@pytest.mark.parametrize("sync", SYNCS)
def test_orm_update_with_every_synchronize_session(people: sa.Engine, sync: Any) -> None:
    for kind in ("plain id", "deterministic ==", "blind index matches"):
        for run in range(2):
            notes = f"{sync} {kind} {run}"
            stmt = (
                sa.update(Person)
                .where(_where(kind))
                .values(name=notes, notes=notes)
                .execution_options(synchronize_session=sync)
            )
            with Session(people) as session:
                ann = session.get(Person, 1)
                assert ann is not None and ann.notes != notes
                before = ann.notes
                if sync == "evaluate" and kind == "blind index matches":
                    # A digest cannot be compared with a plaintext in Python.
                    with pytest.raises(sa.exc.InvalidRequestError, match="evaluate"):
                        session.execute(stmt)
                    continue
                result = session.execute(stmt)
                assert result.rowcount == 1
                # False leaves loaded objects as they were; the others update them.
                assert ann.notes == (before if sync is False else notes), (kind, run)
                session.commit()
            with Session(people) as session:
                assert _plain(session.get(Person, 1)) == (1, notes, ANN[2], ANN[3], notes)


@pytest.mark.parametrize("sync", SYNCS)
def test_orm_delete_with_every_synchronize_session(people: sa.Engine, sync: Any) -> None:
    def where(kind: str, id_: int) -> Any:
        return {
            "plain id": Person.id == id_,
            "deterministic ==": Person.ssn == f"{id_:03}-00-0000",
            "blind index matches": Person.email_index.matches(f"P{id_}@example.org"),
        }[kind]

    id_ = 100
    for kind in ("plain id", "deterministic ==", "blind index matches"):
        for run in range(2):
            id_ += 1
            with Session(people) as session:
                session.add(
                    Person(id=id_, name="tmp", email=f"p{id_}@example.org", ssn=f"{id_:03}-00-0000")
                )
                session.commit()
            stmt = sa.delete(Person).where(where(kind, id_))
            stmt = stmt.execution_options(synchronize_session=sync)
            with Session(people) as session:
                loaded = session.get(Person, id_)
                assert loaded is not None
                if sync == "evaluate" and kind == "blind index matches":
                    with pytest.raises(sa.exc.InvalidRequestError, match="evaluate"):
                        session.execute(stmt)
                    session.delete(loaded)
                    session.commit()
                    continue
                assert session.execute(stmt).rowcount == 1
                assert (loaded in session) is (sync is False), (kind, run)
                session.commit()
            with Session(people) as session:
                assert session.get(Person, id_) is None
                assert session.scalar(sa.select(sa.func.count()).select_from(Person)) == 3


def test_bulk_insert_and_update_by_primary_key(people: sa.Engine) -> None:
    table = Person.__table__
    for run in range(2):
        first = 20 + 10 * run
        rows = [
            {
                "id": first + i,
                "name": f"n{i}",
                "email": f"bulk{first + i}@example.org",
                "ssn": f"{first + i:03}-20-0000",
                "notes": f"bulk {i}",
            }
            for i in range(3)
        ]
        with Session(people) as session:
            session.execute(sa.insert(Person), rows)
            session.execute(
                sa.update(Person),
                [{"id": row["id"], "notes": f"updated {row['id']}"} for row in rows],
            )
            session.commit()
        with people.begin() as conn:
            core_rows = [
                {**row, "id": row["id"] + 5, "email": f"core{row['id']}@example.org", "ssn": None}
                for row in rows
            ]
            conn.execute(table.insert(), core_rows)  # type: ignore[attr-defined]
            conn.execute(
                table.update()  # type: ignore[attr-defined]
                .where(table.c.id == sa.bindparam("pid"))  # type: ignore[attr-defined]
                .values(notes=sa.bindparam("new_notes")),
                [{"pid": row["id"], "new_notes": f"core {row['id']}"} for row in core_rows],
            )
        with Session(people) as session:
            got = session.execute(
                sa.select(Person.id, Person.email, Person.ssn, Person.notes)
                .where(Person.id >= first, Person.id < first + 10)
                .order_by(Person.id)
            ).all()
            assert got == [(r["id"], r["email"], r["ssn"], f"updated {r['id']}") for r in rows] + [
                (r["id"], r["email"], None, f"core {r['id']}") for r in core_rows
            ]
            # The index was filled on insert, by the column default.
            found = session.scalars(
                sa.select(Person.id).where(Person.email_index.matches(f"BULK{first}@example.org"))
            ).all()
            assert found == [first]
            assert session.scalars(
                sa.select(Person.id).where(Person.ssn == f"{first + 2:03}-20-0000")
            ).all() == [first + 2]


def test_returning(people: sa.Engine) -> None:
    dialect = people.dialect
    for run in range(2):
        id_ = 40 + run
        values = {
            "id": id_,
            "name": "r",
            "email": f"r{id_}@example.org",
            "ssn": f"{id_:03}-40-0000",
        }
        insert = sa.insert(Person).values(**values, notes="inserted")
        update = sa.update(Person).where(Person.ssn == values["ssn"]).values(notes=f"updated {run}")
        delete = sa.delete(Person).where(Person.email_index.matches(values["email"].upper()))
        with people.begin() as conn:
            if dialect.insert_returning:
                returned = conn.execute(insert.returning(Person.id, Person.email, Person.notes))
                assert returned.all() == [(id_, values["email"], "inserted")]
            else:
                conn.execute(insert)
            if dialect.update_returning:
                returned = conn.execute(update.returning(Person.email, Person.notes))
                assert returned.all() == [(values["email"], f"updated {run}")]
            else:
                assert conn.execute(update).rowcount == 1
            if dialect.delete_returning:
                returned = conn.execute(delete.returning(Person.id, Person.ssn, Person.notes))
                assert returned.all() == [(id_, values["ssn"], f"updated {run}")]
            else:
                assert conn.execute(delete).rowcount == 1
            assert conn.execute(sa.select(Person.id).where(Person.id == id_)).all() == []

        with Session(people) as session:
            if dialect.insert_returning:
                created = session.scalars(
                    sa.insert(Person).returning(Person),
                    [{**values, "notes": "orm"}],
                ).all()
                assert [_plain(p) for p in created] == [
                    (id_, "r", values["email"], values["ssn"], "orm")
                ]
            else:
                session.execute(sa.insert(Person), [{**values, "notes": "orm"}])
            orm_update = (
                sa.update(Person)
                .where(Person.email_index.matches(values["email"]))
                .values(notes="orm updated")
            )
            if dialect.update_returning:
                updated = session.execute(orm_update.returning(Person)).scalars().all()
                assert [p.notes for p in updated] == ["orm updated"]
            else:
                assert session.execute(orm_update).rowcount == 1
            orm_delete = sa.delete(Person).where(Person.ssn == values["ssn"])
            if dialect.delete_returning:
                deleted = session.execute(orm_delete.returning(Person.id, Person.notes)).all()
                assert deleted == [(id_, "orm updated")]
            else:
                assert session.execute(orm_delete).rowcount == 1
            session.commit()


def test_values_copied_between_columns(people: sa.Engine) -> None:
    """An encrypted column can be set to, and compared with, the values of a
    column that stores them alike (same context and storage: holder_ssn is
    a deterministic copy of people.ssn); the values of any other encrypted
    column are refused, as their ciphertext would not decrypt there."""
    bob = sa.select(Person.ssn).where(Person.id == 2).scalar_subquery()
    copy = sa.update(Card).where(Card.id == 12).values(holder_ssn=bob)
    restore = sa.update(Card).where(Card.id == 12).values(holder_ssn=CARDS[2][3])
    held_by_bob = (
        sa.select(Card.id).join(Person, Card.holder_ssn == Person.ssn).where(Person.id == 2)
    )
    for via in ("connection", "session"):
        for _ in range(2):
            if via == "connection":
                with people.begin() as conn:
                    conn.execute(copy)
            else:
                with Session(people) as session:
                    session.execute(copy)
                    session.commit()
            assert _twice(people, held_by_bob, _sorted) == ([(11,), (12,)], [(11,), (12,)])
            with people.begin() as conn:
                conn.execute(restore)
    email = sa.select(Person.email).where(Person.id == 1).scalar_subquery()
    notes = sa.select(Person.notes).where(Person.id == 1).scalar_subquery()
    for column, stmt in (
        ("cards.number", sa.update(Card).where(Card.id == 12).values(number=email)),
        ("cards.holder_ssn", sa.update(Card).where(Card.id == 12).values(holder_ssn=notes)),
        ("cards.holder_ssn", sa.update(Card).values(holder_ssn=Person.email)),
    ):
        for _ in range(2):
            with people.begin() as conn, pytest.raises(EncryptedExpressionError) as caught:
                conn.execute(stmt)
            assert column in str(caught.value)
            with Session(people) as session, pytest.raises(EncryptedExpressionError) as caught:
                session.execute(stmt)
            assert column in str(caught.value)
    with Session(people) as session:
        assert [_plain(c) for c in session.scalars(sa.select(Card).order_by(Card.id))] == CARDS


def test_reflection_of_a_table_with_encrypted_columns(
    people: sa.Engine, registry: KeyRegistry
) -> None:
    for run in range(2):
        metadata = sa.MetaData()
        metadata.reflect(people, only=["people", "cards"])
        people_table, cards_table = metadata.tables["people"], metadata.tables["cards"]
        # BLOB, bytea, TINYBLOB...: binary storage reflects as bytes, text storage as a string.
        assert people_table.c.email.type.python_type is bytes
        assert people_table.c.ssn.type.python_type is bytes
        assert isinstance(people_table.c.notes.type, sa.String)
        if people.dialect.name == "mysql":  # TEXT(580), created as TEXT
            assert isinstance(people_table.c.notes.type, mysql.TEXT)
        else:
            assert people_table.c.notes.type.length == fmt.text_length(4 * 100)
        assert isinstance(people_table.c.email_index.type, sa.String)
        columns = {c["name"]: c for c in sa.inspect(people).get_columns("people")}
        assert set(columns) == {"id", "name", "email", "email_index", "ssn", "notes"}
        assert columns["email"]["type"].python_type is bytes

        # Reflected, the columns are plain: they hold ciphertext, which the
        # registry decrypts, and compare as bytes.
        raw, _ = _twice(
            people,
            sa.select(people_table.c.email, people_table.c.ssn, people_table.c.notes).where(
                people_table.c.id == 1
            ),
        )
        email, ssn, notes = raw[0]
        assert registry.decrypt(bytes(email), "people.email") == ANN[2].encode()
        assert registry.decrypt(fmt.from_text(notes), "people.notes") == ANN[4].encode()
        same_ssn, _ = _twice(
            people,
            sa.select(cards_table.c.id)
            .where(cards_table.c.holder_ssn == ssn)
            .order_by(cards_table.c.id),
        )
        assert same_ssn == [(10,), (12,)]

        # A reflected table whose encrypted columns are declared decrypts them.
        declared = sa.Table(
            "people",
            sa.MetaData(),
            sa.Column("email", EncryptedType(sa.String(200))),
            sa.Column("ssn", EncryptedType(sa.String(11), deterministic=True)),
            autoload_with=people,
        )
        assert _twice(
            people, sa.select(declared.c.id, declared.c.email).where(declared.c.ssn == BOB[3])
        ) == ([(2, BOB[2])], [(2, BOB[2])]), run
