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
from conftest import stored_bytes
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedComparisonError,
    EncryptedExpressionError,
    EncryptedType,
    EnvelopeError,
    InvalidValueError,
    KeyRegistry,
    blind_index,
)
from sqlalchemy_envelope.keys.storage import MYSQL_DIALECTS


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


# -- Typed SQL values: bound parameters, literals, other expressions ---------------

VIA = ["connection", "session"]
OWN_VALUES = "its own values"  # what a comparison with another expression is told


def _execute(engine: sa.Engine, via: str, stmt: Any) -> None:
    if via == "session":
        with Session(engine) as session:
            session.execute(stmt)
            session.commit()
    else:
        with engine.begin() as conn:
            conn.execute(stmt)


def _upsert(engine: sa.Engine, set_: Callable[[Any], dict[str, Any]]) -> Any:
    """INSERT ... ON CONFLICT (id) DO UPDATE, or ON DUPLICATE KEY UPDATE, of
    accounts; ``set_`` maps the inserted row (``excluded`` / ``inserted``)
    to the SET."""
    table = Account.__table__
    if engine.dialect.name in MYSQL_DIALECTS:
        insert = mysql.insert(table)
        return insert.on_duplicate_key_update(set_(insert.inserted))
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    return statement.on_conflict_do_update(index_elements=["id"], set_=set_(statement.excluded))


def _account(engine: sa.Engine, id_: int) -> tuple[Any, ...]:
    with Session(engine) as session:
        account = session.get(Account, id_)
        assert account is not None
        return (account.email, account.ssn, account.note, account.limit)


def _found_by_email(engine: sa.Engine, email: str) -> list[int]:
    with Session(engine) as session:
        return list(
            session.scalars(sa.select(Account.id).where(Account.email_index.matches(email)))
        )


@pytest.mark.parametrize("via", VIA)
def test_typed_parameters_and_literals_written_are_encrypted(accounts: sa.Engine, via: str) -> None:
    """A bound parameter or literal written to an encrypted column or a blind
    index is encrypted or hashed by the column's type, whatever type it was
    created with: in every form of INSERT and UPDATE, each run twice with
    other values (the second run's statement comes from the compiled cache)."""
    table = Account.__table__
    written: list[str] = []
    for run in range(2):
        # Values that fit each column: note String(100), ssn String(11).
        note, ssn, email, limit = (
            f"{SECRET}-n{run}",
            f"SSN-0815-{run}",
            f"{SECRET}-{run}@x.org",
            8150_8150 + run,
        )
        written += [note, ssn, email, str(limit)]
        base = 100 + 10 * run
        new = {"owner": "typed", "email": email, "note": note}
        forms: list[tuple[Any, int, tuple[Any, ...]]] = [
            (
                sa.update(table)
                .where(table.c.id == 1)
                .values(note=sa.literal(note), ssn=sa.literal(ssn), limit=sa.literal(limit)),
                1,
                ("Ann@x.org", ssn, note, limit),
            ),
            (
                sa.update(Account)
                .where(Account.id == 2)
                .values(
                    note=sa.bindparam("new_note", note, type_=sa.String(100)),
                    ssn=sa.bindparam("new_ssn", ssn),
                    email=sa.literal(email),
                ),
                2,
                (email, ssn, note, None),
            ),
            (
                sa.insert(table).values(
                    id=base, owner="typed", email=sa.literal(email), note=sa.bindparam("n", note)
                ),
                base,
                (email, None, note, None),
            ),
            (
                sa.insert(Account).values(
                    id=base + 1,
                    owner="typed",
                    email=email,
                    ssn=sa.literal(ssn),
                    limit=sa.literal(limit),
                ),
                base + 1,
                (email, ssn, None, limit),
            ),
            (
                sa.insert(table).values(
                    [{"id": base + 2, **new, "note": sa.literal(note)}, {"id": base + 3, **new}]
                ),
                base + 2,
                (email, None, note, None),
            ),
            (
                _upsert(
                    accounts,
                    lambda inserted, note=note: {"note": sa.literal(note), "ssn": inserted.ssn},
                ).values(id=1, owner="a", email="ignored@x.org", ssn=sa.literal(ssn)),
                1,
                ("Ann@x.org", ssn, note, limit),
            ),
            (
                sa.insert(table).from_select(
                    ["id", "owner", "email", "email_index", "note"],
                    sa.select(
                        sa.literal(base + 4),
                        sa.literal("typed"),
                        sa.literal(email),
                        sa.null(),
                        sa.literal(note),
                    ),
                ),
                base + 4,
                (email, None, note, None),
            ),
        ]
        for stmt, id_, expected in forms:
            _execute(accounts, via, stmt)
            assert _account(accounts, id_) == expected
        # The blind index of an email written as a literal, and an index given
        # as a literal itself, are digests of the value.
        assert _found_by_email(accounts, email.upper()) == [2, base, base + 1, base + 2, base + 3]
        given = (
            sa.update(Account).where(Account.id == 1).values(email_index=sa.literal(email.upper()))
        )
        _execute(accounts, via, given)
        assert 1 in _found_by_email(accounts, email)
        _execute(accounts, via, sa.update(table).where(table.c.id == 1).values(email="Ann@x.org"))
    stored = stored_bytes(accounts, "accounts")
    for value in written:
        assert value.encode() not in stored


@pytest.mark.parametrize("via", VIA)
def test_other_sql_expressions_written_are_refused(accounts: sa.Engine, via: str) -> None:
    """A SQL expression the library cannot encrypt or hash (a cast, a
    function, arithmetic, a column of another type or another encrypted
    column) is refused before anything is written, naming the column and
    never the value; NULL and the column's own values are written."""
    table = Account.__table__
    other = aliased(Account)
    row = {"id": 9, "owner": "x", "email": "e@x.org"}
    refused: list[tuple[str, Any]] = [
        (
            "accounts.note",
            sa.update(table).where(table.c.id == 1).values(note=sa.cast(SECRET, sa.String)),
        ),
        (
            "accounts.note",
            sa.update(Account).where(Account.id == 1).values(note=sa.func.coalesce(None, SECRET)),
        ),
        (
            "accounts.ssn",
            sa.update(Account).where(Account.id == 1).values(ssn=sa.func.lower(SECRET)),
        ),
        ("accounts.ssn", sa.update(Account).where(Account.id == 1).values(ssn=Account.code)),
        ("accounts.note", sa.update(Account).where(Account.id == 1).values(note=Account.owner)),
        ("accounts.note", sa.update(table).where(table.c.id == 1).values(note=Account.email)),
        (
            "accounts.limit",
            sa.update(table).where(table.c.id == 1).values(limit=sa.literal(815) + 1),
        ),
        (
            "accounts.note",
            sa.update(table).where(table.c.id == 1).values(note=sa.literal_column(f"'{SECRET}'")),
        ),
        (
            "accounts.email_index",
            sa.update(Account).where(Account.id == 1).values(email_index=sa.func.lower(SECRET)),
        ),
        (
            "accounts.note",
            sa.update(Account)
            .where(Account.id == 1)
            .values(note=sa.case((Account.id == 1, Account.note), else_=Account.owner)),
        ),
        ("accounts.note", sa.insert(table).values(**row, note=sa.cast(SECRET, sa.String))),
        ("accounts.note", sa.insert(Account).values([{**row, "note": sa.func.upper(SECRET)}])),
        (
            "accounts.note",
            _upsert(accounts, lambda inserted: {"note": sa.cast(SECRET, sa.String)}).values(
                id=1, owner="a", email="Ann@x.org"
            ),
        ),
        (
            "accounts.note",
            sa.insert(table).from_select(
                ["id", "owner", "email", "email_index", "note"],
                sa.select(
                    sa.literal(9),
                    sa.literal("x"),
                    sa.literal("e@x.org"),
                    sa.null(),
                    sa.func.upper(SECRET),
                ),
            ),
        ),
        (
            "accounts.ssn",
            sa.insert(table).from_select(
                ["id", "owner", "email", "email_index", "ssn"],
                sa.select(other.id + 9, other.owner, other.email, sa.null(), other.code).where(
                    other.id == 1
                ),
            ),
        ),
    ]
    before = _account(accounts, 1)
    for _ in range(2):
        for column, stmt in refused:
            with pytest.raises(EncryptedExpressionError) as caught:
                _execute(accounts, via, stmt)
            assert column in str(caught.value) and isinstance(caught.value, EnvelopeError)
            _no_plaintext(caught.value)
            assert _account(accounts, 1) == before
            with Session(accounts) as session:
                assert session.get(Account, 9) is None
    # NULL, and the column's own values, are written as they are.
    email, ssn = before[:2]
    for run in range(2):
        note = f"upserted {run}"
        upsert = _upsert(accounts, lambda inserted: {"note": inserted.note, "ssn": inserted.ssn})
        _execute(accounts, via, upsert.values(id=1, owner="a", email="x@x.org", note=note, ssn=ssn))
        assert _account(accounts, 1) == (email, ssn, note, None)
        _execute(accounts, via, sa.update(Account).where(Account.id == 1).values(note=Account.note))
        assert _account(accounts, 1) == (email, ssn, note, None)
        null = sa.update(table).where(table.c.id == 1).values(note=sa.null(), ssn=None)
        _execute(accounts, via, null)
        assert _account(accounts, 1) == (email, None, None, None)


def test_lookups_by_typed_parameters_and_literals(accounts: sa.Engine) -> None:
    """A bound parameter or literal compared with a deterministic column or
    a blind index is encrypted or hashed as a Python value is: each lookup
    finds its rows, through a Connection and a Session, twice, and with
    literal_binds (where the plaintext would find nothing)."""
    lookups: list[tuple[Any, list[int]]] = [
        (Account.ssn == sa.bindparam("ssn", "111"), [1]),
        (Account.ssn == sa.literal("222"), [2]),
        (sa.literal("111") == Account.ssn, [1]),
        (Account.code == sa.bindparam("code", "B", type_=sa.String), [2]),
        (Account.email_index == sa.bindparam("email", "ANN@x.org"), [1]),
        (Account.email_index == sa.literal("bob@X.org"), [2]),
        (sa.literal("ann@x.org") == Account.email_index, [1]),
        (Account.email_index.in_([sa.literal("bob@x.org"), "nobody@x.org"]), [2]),
        (Account.ssn.in_([sa.literal("111"), "222"]), [1, 2]),
        (Account.ssn.in_(sa.select(sa.literal("222"))), [2]),
        (Account.ssn.in_(sa.bindparam("ssns", ["222", "333"], expanding=True)), [2]),
        (Account.email_index.in_(sa.bindparam("emails", ["BOB@x.org"], expanding=True)), [2]),
        (Account.ssn.not_in([sa.literal("111")]), [2]),
        (Account.ssn.op("=")("222"), [2]),
        (Account.ssn.op("=")(sa.literal("111")), [1]),
        (Account.email_index.op("=")("Ann@x.org"), [1]),
        (sa.tuple_(Account.ssn, Account.id) == sa.tuple_(sa.literal("222"), 2), [2]),
        (sa.tuple_(Account.ssn, Account.id).in_([sa.tuple_(sa.literal("111"), 1)]), [1]),
        (sa.case({sa.literal("111"): "one"}, value=Account.ssn, else_="other") == "one", [1]),
        (sa.func.coalesce(Account.ssn, sa.literal("222")) == "222", [2]),
    ]
    for condition, expected in lookups:
        stmt = sa.select(Account.id).where(condition).order_by(Account.id)
        for _ in range(2):
            with accounts.connect() as conn:
                assert list(conn.scalars(stmt)) == expected, stmt
            with Session(accounts) as session:
                assert list(session.scalars(stmt)) == expected, stmt
        with accounts.connect() as conn:
            sql = _literal_sql(stmt, accounts.dialect)
            assert list(conn.exec_driver_sql(sql).scalars()) == expected, sql
    # A literal among a column's values, in a SELECT: encrypted, read back.
    defaulted = sa.select(sa.func.coalesce(Account.limit, sa.literal(SECRET_NUMBER))).order_by(
        Account.id
    )
    for _ in range(2):
        with Session(accounts) as session:
            assert list(session.scalars(defaulted)) == [SECRET_NUMBER, SECRET_NUMBER]
        assert str(SECRET_NUMBER) not in _literal_sql(defaulted, accounts.dialect)


SECRET_NUMBER = 8150815


def test_comparisons_with_other_sql_expressions_are_refused(accounts: sa.Engine) -> None:
    """A deterministic column or blind index compared with an expression of
    other values (a cast, a function, a plain column, another encrypted
    column) would be compared with them as they are: refused when compiled,
    as every comparison of randomized columns is; custom operators are
    refused as written unless they mean equality on a column that has it."""
    other = aliased(Account)
    for stmt in (
        sa.select(Account.id).where(Account.ssn == sa.cast(SECRET, sa.String)),
        sa.select(Account.id).where(Account.ssn == sa.func.lower(SECRET)),
        sa.select(Account.id).where(Account.ssn == Account.code),
        sa.select(Account.id).where(Account.ssn != Account.owner),
        sa.select(Account.id).where(Account.ssn.in_(sa.select(other.owner))),
        sa.select(Account.id).where(Account.ssn.op("=")(sa.func.upper(SECRET))),
        sa.select(Account.id).where(
            sa.tuple_(Account.ssn, Account.id) == sa.tuple_(sa.cast(SECRET, sa.String), 1)
        ),
        sa.update(Account).where(Account.ssn == sa.func.lower(SECRET)).values(owner="x"),
    ):
        _refused_twice(accounts, stmt, ("accounts.ssn", OWN_VALUES))
    _refused_twice(
        accounts,
        sa.select(Account.id).where(Account.email_index == Account.name_index),
        ("accounts.email_index", OWN_VALUES),
    )
    for stmt, where in (
        (sa.select(Account.id).where(sa.literal(SECRET).op("=")(Account.email)), RANDOMIZED),
        (sa.select(sa.case({SECRET: 1}, value=Account.email)), RANDOMIZED),
        (sa.select(Account.id).where(sa.literal(SECRET).op("LIKE")(Account.ssn)), DETERMINISTIC),
    ):
        _refused_twice(accounts, stmt, where)
    for make, where in (
        (lambda: Account.email.op("=")(SECRET), RANDOMIZED),
        (lambda: Account.ssn.op("LIKE")(SECRET), DETERMINISTIC),
        (lambda: Account.ssn.op("<")(other.ssn), DETERMINISTIC),
        (lambda: Account.email_index.op("~")(SECRET), BLIND_INDEX),
        (lambda: Account.ssn.concat(SECRET), DETERMINISTIC),
        (lambda: Account.ssn.collate("C"), DETERMINISTIC),
        (lambda: Account.limit + 1, ("accounts.limit", "fresh nonce")),
        (lambda: Account.ssn.is_(True), DETERMINISTIC),
    ):
        _refused(make, where)
        with pytest.raises(EncryptedComparisonError) as caught:
            make()
        _no_plaintext(caught.value)
    # SQL of the column's values that also holds other values is refused.
    for stmt in (
        sa.select(sa.func.coalesce(Account.ssn, sa.cast(SECRET, sa.String))),
        sa.select(sa.case((Account.id == 1, Account.note), else_=Account.owner)),
        # One parameter name, one value: encrypted for one use, wrong for the other.
        sa.select(Account.id).where(
            Account.ssn == sa.bindparam("v"), Account.owner == sa.bindparam("v")
        ),
    ):
        for _ in range(2):
            with accounts.connect() as conn, pytest.raises(EncryptedExpressionError) as caught:
                conn.execute(stmt, {"v": SECRET})
            _no_plaintext(caught.value)
            with Session(accounts) as session, pytest.raises(EncryptedExpressionError) as caught:
                session.execute(stmt, {"v": SECRET})
            _no_plaintext(caught.value)
