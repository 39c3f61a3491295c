"""What SQL can mean on encrypted columns: comparisons and ORDER BY that
cannot mean anything are refused, each with its true reason, where the user
writes or compiles them; literal values render as ciphertext or digests, and
a value that cannot be rendered is never quoted in an error."""

from __future__ import annotations

import datetime as dt
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedComparisonError,
    EncryptedType,
    EnvelopeError,
    InvalidValueError,
    KeyRegistry,
    blind_index,
)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(sa.String(50))
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    code: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(20), deterministic=True, storage="text")
    )
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100), storage="text"))
    limit: Mapped[int | None] = mapped_column(EncryptedType(sa.Integer))
    opened: Mapped[dt.date | None] = mapped_column(EncryptedType(sa.Date, storage="text"))
    profile: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(sa.JSON))
    first: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20)))
    last: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20)))
    name_index: Mapped[str | None] = blind_index("first", "last", normalize="casefold")


RANDOMIZED = ("accounts.email", "fresh nonce")
DETERMINISTIC = ("accounts.ssn", "deterministic ciphertext")
BLIND_INDEX = ("accounts.email_index", "keyed digests")

ORDERINGS: list[Callable[[Any], Any]] = [
    lambda c: c < "m",
    lambda c: c <= "m",
    lambda c: c > "m",
    lambda c: c >= "m",
    lambda c: c.between("a", "z"),
    lambda c: c.like("a%"),
    lambda c: c.not_like("a%"),
    lambda c: c.ilike("a%"),
    lambda c: c.startswith("a"),
    lambda c: c.endswith("a"),
    lambda c: c.contains("a"),
    lambda c: c.regexp_match("a"),
    lambda c: c.match("a"),
]
EQUALITIES: list[Callable[[Any], Any]] = [
    lambda c: c == "a",
    lambda c: c != "a",
    lambda c: c.in_(["a", "b"]),
    lambda c: c.not_in(["a", "b"]),
    lambda c: c.is_distinct_from("a"),
    lambda c: c.is_not_distinct_from("a"),
]


def _refused(make: Callable[[], Any], where: tuple[str, str]) -> str:
    with pytest.raises(EncryptedComparisonError) as caught:
        make()
    message = str(caught.value)
    column, reason = where
    assert column in message and reason in message, message
    return message


def test_each_kind_of_column_refuses_what_cannot_mean_anything_with_its_reason() -> None:
    for make in ORDERINGS + EQUALITIES:
        message = _refused(lambda make=make: make(Account.email), RANDOMIZED)
        assert "blind index" in message  # what to use instead
    for make in ORDERINGS:
        for column, where in ((Account.ssn, DETERMINISTIC), (Account.email_index, BLIND_INDEX)):
            message = _refused(lambda make=make, column=column: make(column), where)
            assert "nonce" not in message and "only equality" in message
    sql_of = str
    for make in EQUALITIES:
        assert "accounts.ssn" in sql_of(make(Account.ssn))
        assert "accounts.email_index" in sql_of(make(Account.email_index))
    assert "accounts.name_index" in sql_of(Account.name_index.matches("ada", "lovelace"))
    for column in (Account.email, Account.ssn, Account.email_index, Account.limit):
        assert "IS NULL" in sql_of(column.is_(None))
        assert "IS NOT NULL" in sql_of(column.is_not(None))
        assert "IS NULL" in sql_of(column == None)  # noqa: E711
    # Other types' orderings are no concern of the library's.
    _refused(lambda: Account.limit > 5, ("accounts.limit", "fresh nonce"))
    assert "accounts.owner" in sql_of(Account.owner < "m")


@pytest.fixture
def accounts(engine: sa.Engine, registry: KeyRegistry) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Account(id=1, owner="a", email="Ann@x.org", ssn="111", code="A", note="n1"),
                Account(id=2, owner="b", email="bob@x.org", ssn="222", code="B", note="n2"),
            ]
        )
        session.commit()
    yield engine


def _refused_twice(engine: sa.Engine, stmt: Any, where: tuple[str, str]) -> None:
    """Executing ``stmt`` is refused on a Connection and in a Session, the
    second time as the first (a refused statement is never cached)."""
    for run in range(2):
        with engine.connect() as conn:
            _refused(lambda: conn.execute(stmt), where)
        with Session(engine) as session:
            _refused(lambda: session.execute(stmt), where)
        assert run in (0, 1)


def test_comparisons_with_sql_expressions(accounts: sa.Engine) -> None:
    """SQLAlchemy compares columns with == and != to find them in its lists
    and dicts: those comparisons are refused when compiled into a statement,
    all others as they are written."""
    other = aliased(Account)
    for stmt, where in (
        (sa.select(Account.id).where(Account.email == other.email), RANDOMIZED),
        (sa.select(Account.id).where(Account.email != sa.bindparam("e")), RANDOMIZED),
        (sa.select(Account.id).where(sa.literal("Ann@x.org") == Account.email), RANDOMIZED),
        (sa.select(Account.id).where(Account.ssn == other.email), RANDOMIZED),
        (sa.update(Account).where(Account.email == other.email).values(owner="x"), RANDOMIZED),
    ):
        _refused_twice(accounts, stmt, where)
    for make, where in (
        (lambda: Account.ssn < other.ssn, DETERMINISTIC),
        (lambda: Account.ssn.like(sa.literal("1%")), DETERMINISTIC),
        (lambda: Account.email_index > other.email_index, BLIND_INDEX),
        (lambda: Account.email.in_(sa.select(other.email)), RANDOMIZED),
    ):
        _refused(make, where)
    # Equality of two deterministic columns, or two blind indexes, is a join.
    joined = (
        sa.select(Account.id, other.id)
        .join(other, (other.ssn == Account.ssn) & (other.email_index == Account.email_index))
        .order_by(Account.id)
    )
    with accounts.connect() as conn:
        for _ in range(2):
            assert conn.execute(joined).all() == [(1, 1), (2, 2)]


def test_order_by_is_refused_when_compiled(accounts: sa.Engine) -> None:
    other = aliased(Account)
    sub = sa.select(Account.id, Account.ssn).subquery()
    union = sa.union(sa.select(Account.id, Account.email), sa.select(Account.id, Account.email))
    for stmt, where in (
        (sa.select(Account.id).order_by(Account.email), RANDOMIZED),
        (sa.select(Account).order_by(Account.id, Account.email.desc()), RANDOMIZED),
        (sa.select(Account.id).order_by(Account.email.asc().nulls_first()), RANDOMIZED),
        (sa.select(Account.id).order_by(Account.ssn), DETERMINISTIC),
        (sa.select(Account.id).order_by(sa.nulls_last(sa.desc(Account.ssn))), DETERMINISTIC),
        (sa.select(Account.id).order_by(Account.email_index), BLIND_INDEX),
        (sa.select(Account.id, Account.email).order_by("email"), RANDOMIZED),
        (sa.select(Account.id).order_by("ssn"), DETERMINISTIC),
        (sa.select(Account.ssn.label("s")).order_by("s"), DETERMINISTIC),
        (sa.select(other).order_by(other.ssn), DETERMINISTIC),
        (sa.select(sub.c.id).order_by(sub.c.ssn), DETERMINISTIC),
        (union.order_by(union.selected_columns.email), RANDOMIZED),
        (sa.select(sa.func.row_number().over(order_by=Account.ssn)), DETERMINISTIC),
        (
            sa.select(sa.func.rank().over(partition_by=Account.owner, order_by=Account.email)),
            RANDOMIZED,
        ),
        (
            sa.select(Account.id).where(
                Account.id.in_(sa.select(Account.id).order_by(Account.email).limit(1))
            ),
            RANDOMIZED,
        ),
    ):
        _refused_twice(accounts, stmt, where)
    # Orderings by plain columns, and grouping by a deterministic one, work.
    grouped = sa.select(Account.ssn, sa.func.count()).group_by(Account.ssn).order_by(Account.ssn)
    _refused_twice(accounts, grouped, DETERMINISTIC)
    grouped = sa.select(Account.ssn, sa.func.max(Account.id)).group_by(Account.ssn)
    with Session(accounts) as session:
        for _ in range(2):
            assert sorted(session.execute(grouped).all()) == [("111", 1), ("222", 2)]
            ranked = sa.select(
                Account.email, sa.func.row_number().over(order_by=Account.id.desc())
            ).order_by(Account.id)
            assert session.execute(ranked).all() == [("Ann@x.org", 2), ("bob@x.org", 1)]


SECRET = "supersecret-0815"


def _no_plaintext(error: BaseException) -> None:
    """Neither the error nor anything chained to it, nor the whole printed
    traceback, shows the plaintext."""
    assert not isinstance(error, sa.exc.CompileError)
    assert SECRET not in "".join(traceback.format_exception(error))
    seen: BaseException | None = error
    while seen is not None:
        assert SECRET not in str(seen) and SECRET not in repr(seen.args)
        seen = seen.__cause__ or seen.__context__


def _literal_sql(stmt: Any, dialect: Any) -> str:
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def test_literal_binds_render_ciphertext_that_the_database_reads_back(
    accounts: sa.Engine,
) -> None:
    dialect = accounts.dialect
    table = Account.__table__
    for run in range(2):
        id_ = 10 + run
        values = {
            "id": id_,
            "owner": "lit",
            "email": f"{SECRET}@x.org",
            "email_index": f"{SECRET}@X.org",
            "ssn": SECRET[:11],
            "code": SECRET,
            "note": SECRET,
            "limit": 815_0815 + run,
            "opened": dt.date(2015, 8, 15),
            "profile": {"secret": SECRET},
            "first": SECRET[:10],
            "last": SECRET[10:],
            "name_index": (SECRET[:10], SECRET[10:]),
        }
        insert = _literal_sql(sa.insert(table).values(**values), dialect)  # type: ignore[attr-defined]
        assert SECRET not in insert and SECRET[:10] not in insert and "8150815" not in insert
        with accounts.begin() as conn:
            conn.exec_driver_sql(insert)
        with Session(accounts) as session:
            account = session.get(Account, id_)
            assert account is not None
            assert (account.email, account.ssn, account.code, account.note) == (
                f"{SECRET}@x.org",
                SECRET[:11],
                SECRET,
                SECRET,
            )
            assert (account.limit, account.opened, account.profile) == (
                815_0815 + run,
                dt.date(2015, 8, 15),
                {"secret": SECRET},
            )

        lookups = [
            sa.select(Account.id).where(Account.ssn == SECRET[:11], Account.id == id_),
            sa.select(Account.id).where(Account.code.in_([SECRET, "other"]), Account.id == id_),
            sa.select(Account.id).where(Account.email_index.matches(f"{SECRET}@x.ORG")),
            sa.select(Account.id).where(Account.name_index.matches(SECRET[:10], SECRET[10:])),
        ]
        for lookup in lookups:
            sql = _literal_sql(lookup, dialect)
            assert SECRET not in sql and SECRET[:10] not in sql
            with accounts.connect() as conn:
                assert conn.exec_driver_sql(sql).all() == [(id_,)], sql
        update = sa.update(Account).where(Account.ssn == SECRET[:11]).values(note="changed")
        with accounts.begin() as conn:
            conn.exec_driver_sql(_literal_sql(update, dialect))
        with Session(accounts) as session:
            assert session.scalar(sa.select(Account.note).where(Account.id == id_)) == "changed"
        with accounts.begin() as conn:
            conn.execute(sa.delete(Account).where(Account.id == id_))


def test_literal_values_that_cannot_render_are_never_quoted(accounts: sa.Engine) -> None:
    table = Account.__table__
    unattached = sa.literal(SECRET, EncryptedType(sa.String(50)))
    for stmt, dialect, error in (
        (sa.insert(table).values(id=1, email=SECRET * 10), accounts.dialect, InvalidValueError),  # type: ignore[attr-defined]
        (sa.insert(table).values(id=1, ssn=SECRET), accounts.dialect, InvalidValueError),  # type: ignore[attr-defined]
        (sa.insert(table).values(id=1, limit=SECRET), accounts.dialect, InvalidValueError),  # type: ignore[attr-defined]
        (sa.insert(table).values(id=1, note=SECRET * 10), accounts.dialect, InvalidValueError),  # type: ignore[attr-defined]
        (
            sa.select(Account.id).where(Account.code.in_(["x", SECRET * 2])),
            accounts.dialect,
            InvalidValueError,
        ),
        (
            sa.select(Account.id).where(Account.name_index.matches(SECRET)),
            accounts.dialect,
            InvalidValueError,
        ),
        (sa.select(unattached), accounts.dialect, ConfigurationError),
        # A dialect no registry serves: no key to encrypt with.
        (sa.insert(table).values(id=1, email=SECRET), postgresql.dialect(), ConfigurationError),  # type: ignore[attr-defined]
        (sa.select(Account.id).where(Account.email_index == SECRET), None, ConfigurationError),
    ):
        for _ in range(2):
            with pytest.raises(error) as caught:
                stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            assert isinstance(caught.value, EnvelopeError)
            _no_plaintext(caught.value)
