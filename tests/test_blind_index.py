"""Equality lookups on encrypted columns: blind indexes and deterministic
columns, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import kill_when, stored_bytes
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    BlindIndex,
    ConfigurationError,
    EncryptedComparisonError,
    EncryptedType,
    InvalidValueError,
    KeyRegistry,
    StaticRootKey,
    blind_index,
    blind_index_column,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index(
        "email", normalize=["strip", "casefold"], unique=True
    )
    phone: Mapped[str | None] = mapped_column(EncryptedType(sa.String(30)))
    phone_index: Mapped[str | None] = blind_index("phone", normalize="digits", bits=16)
    first: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))
    last: Mapped[str | None] = mapped_column(EncryptedType(sa.String(50)))
    name_index: Mapped[str | None] = blind_index("first", "last", normalize="casefold")
    ssn: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(11), deterministic=True, context="person.ssn"), unique=True
    )


class Claim(Base):
    __tablename__ = "claims"
    id: Mapped[int] = mapped_column(primary_key=True)
    ssn: Mapped[str] = mapped_column(
        EncryptedType(sa.String(11), deterministic=True, context="person.ssn")
    )


PEOPLE = [
    (1, "Alice@Example.com", "+1 (555) 010-0001", "Ada", "Lovelace", "111-11-1111"),
    (2, "bob@example.com", "555 010 0002", "Bob", "Smith", "222-22-2222"),
    (3, "carol@example.com", None, "Carol", "Smith", None),
]


def _fill(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for id_, email, phone, first, last, ssn in PEOPLE[:2]:
            session.add(User(id=id_, email=email, phone=phone, first=first, last=last, ssn=ssn))
        session.commit()
        # ORM bulk insert: the index is filled by its column default.
        id_, email, phone, first, last, ssn = PEOPLE[2]
        session.execute(
            sa.insert(User),
            [{"id": id_, "email": email, "phone": phone, "first": first, "last": last, "ssn": ssn}],
        )
        session.add_all([Claim(id=10, ssn="111-11-1111"), Claim(id=11, ssn="333-33-3333")])
        session.commit()


def _ids(session: Session, where: sa.ColumnElement[bool]) -> list[int]:
    return sorted(session.scalars(sa.select(User.id).where(where)))


def test_lookups_by_blind_index_and_deterministic_columns(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    _fill(engine)
    with Session(engine) as session:
        assert _ids(session, User.email_index.matches("  ALICE@example.COM ")) == [1]
        assert _ids(session, User.email_index == "carol@example.com") == [3]
        assert _ids(session, User.email_index.matches("nobody@example.com")) == []
        assert _ids(session, User.phone_index.matches("15550100001")) == [1]
        assert _ids(session, User.name_index.matches("bob", "SMITH")) == [2]
        assert _ids(session, User.name_index.matches("Smith", "Bob")) == []
        assert _ids(session, User.ssn == "222-22-2222") == [2]
        assert _ids(session, User.ssn.in_(["111-11-1111", "999-99-9999"])) == [1]
        assert _ids(session, User.ssn != "111-11-1111") == [2]
        joined = session.execute(
            sa.select(User.id, Claim.id).join(Claim, Claim.ssn == User.ssn)
        ).all()
        assert joined == [(1, 10)]
        with pytest.raises(EncryptedComparisonError):
            User.ssn > "1"  # noqa: B015
        with pytest.raises(EncryptedComparisonError):
            User.email == "x"  # noqa: B015

        user = session.get(User, 2)
        assert user is not None
        user.email = "Robert@Example.com"  # an ORM update keeps the index in step
        session.commit()
        assert _ids(session, User.email_index.matches("robert@example.com")) == [2]
        assert _ids(session, User.email_index.matches("bob@example.com")) == []
        assert len(user.email_index or "") == 64 and len(user.phone_index or "") == 4


def test_compound_index_with_null_parts(engine: sa.Engine, registry: KeyRegistry) -> None:
    """A NULL part hashes as NULL, distinct from every value, the empty one
    too; an index whose parts are all NULL is NULL, as a single one's."""
    _fill(engine)
    users = User.__table__
    for round_ in range(2):
        cher, solo, none = 10 + 3 * round_, 11 + 3 * round_, 12 + 3 * round_
        name = f"Cher{round_}"
        with Session(engine) as session:
            session.add(User(id=cher, email=f"cher{round_}@x.org", first=name, last=None))
            session.commit()
        with engine.begin() as conn:
            conn.execute(
                users.insert(),
                [
                    {"id": solo, "email": f"solo{round_}@x.org", "first": None, "last": name},
                    {"id": none, "email": f"none{round_}@x.org", "first": None, "last": None},
                ],
            )
            stored = conn.execute(sa.select(users.c.name_index).where(users.c.id == none))
            assert stored.scalar_one() is None
        with Session(engine) as session:
            assert _ids(session, User.name_index.matches(name.upper(), None)) == [cher]
            assert _ids(session, User.name_index.matches(None, name)) == [solo]
            assert _ids(session, User.name_index.matches(name, "")) == []
            assert _ids(session, User.name_index.matches("", name)) == []
            user = session.get(User, cher)
            assert user is not None
            user.last = "Sarkisian"  # a NULL part given a value, then set to NULL again
            session.commit()
            assert _ids(session, User.name_index.matches(name, "sarkisian")) == [cher]
            assert _ids(session, User.name_index.matches(name, None)) == []
            user.last = None
            session.commit()
            assert _ids(session, User.name_index.matches(name, None)) == [cher]
        with engine.begin() as conn:
            conn.execute(users.update().where(users.c.id == solo).values(first=name, last=None))
        with Session(engine) as session:
            assert _ids(session, User.name_index.matches(name, None)) == [cher, solo]
            assert _ids(session, User.name_index.matches(None, name)) == []
        with engine.begin() as conn:
            conn.execute(users.update().values(name_index=None))
        registry.backfill_index(User.name_index)
        with Session(engine) as session:
            assert _ids(session, User.name_index.matches(name, None)) == [cher, solo]
            assert _ids(session, User.name_index.matches("bob", "smith")) == [2]


def test_digest_encoding_follows_format_md() -> None:
    """FORMAT.md: HMAC-SHA256 over each part's 4-byte big-endian length and
    UTF-8 bytes, a NULL part being the 4 bytes FF FF FF FF alone."""
    key = bytes(range(32))
    index = User.name_index.type
    assert isinstance(index, BlindIndex)

    def expected(message: bytes) -> str:
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    ada = b"\x00\x00\x00\x03ada"
    assert index.digest(key, ("Ada", "Lovelace")) == expected(ada + b"\x00\x00\x00\x08lovelace")
    assert index.digest(key, ("Ada", None)) == expected(ada + b"\xff\xff\xff\xff")
    # a known answer
    known = "55d3dd7cadcbf6820ea3a09dbe4337b64fbb7f63af4ca10f6fe037562a6e2753"
    assert index.digest(key, ("Ada", None)) == known
    assert index.digest(key, (None, "Ada")) == expected(b"\xff\xff\xff\xff" + ada)
    assert index.digest(key, ("Ada", "")) == expected(ada + b"\x00\x00\x00\x00")


BOB = "Bob@Example.com"  # a global a lambda statement reads


def _by_email(email: str) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(User.id).where(User.email_index.matches(email)))


def _equal(email: str) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(User.id).where(User.email_index == email))


def _other(email: str) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(User.id).where(User.email_index != email))


def _among(emails: list[str]) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(lambda: sa.select(User.id).where(User.email_index.in_(emails)))


def _by_name(name: tuple[str, str]) -> sa.StatementLambdaElement:
    statement = sa.lambda_stmt(lambda: sa.select(User.id))
    return statement + (lambda s: s.where(User.name_index.matches(name)))


def test_lookups_in_lambda_statements(engine: sa.Engine, registry: KeyRegistry) -> None:
    """A lambda statement hashes each call's values, cached once; the ORM
    still does not evaluate an UPDATE's WHERE on a blind index in Python."""
    _fill(engine)
    cases: list[tuple[sa.StatementLambdaElement, list[int]]] = []
    for _ in range(2):
        cases += [
            (_by_email(" ALICE@example.com"), [1]),
            (_by_email("bob@example.com"), [2]),
            (_equal("carol@example.com"), [3]),
            (_equal("alice@example.com"), [1]),
            (_other("alice@example.com"), [2, 3]),
            (_among(["bob@example.com", "carol@example.com"]), [2, 3]),
            (_among(["alice@example.com"]), [1]),
            (_by_name(("BOB", "smith")), [2]),
            (_by_name(("carol", "smith")), [3]),
            (sa.lambda_stmt(lambda: sa.select(User.id).where(User.email_index.matches(BOB))), [2]),
        ]
    for statement, expected in cases:
        with Session(engine) as session:
            assert sorted(session.scalars(statement)) == expected
        with engine.connect() as conn:
            assert sorted(conn.scalars(statement)) == expected
    first, last = "bob", "smith"
    for _ in range(2):
        with pytest.raises(EncryptedComparisonError, match=r"users\.name_index.*one tuple"):
            sa.lambda_stmt(lambda: sa.select(User.id).where(User.name_index.matches(first, last)))
    for email in ("alice@example.com", "Alice@Example.com"):
        with Session(engine) as session:
            for synchronize in ("evaluate", "auto"):
                statement = _renumbered(email)
                options = {"synchronize_session": synchronize}
                if synchronize == "evaluate":
                    with pytest.raises(sa.exc.InvalidRequestError, match="evaluate"):
                        session.execute(statement, execution_options=options)
                else:
                    assert session.execute(statement, execution_options=options).rowcount == 1
            session.rollback()


def _renumbered(email: str) -> sa.StatementLambdaElement:
    return sa.lambda_stmt(
        lambda: sa.update(User).where(User.email_index == email).values(first="Ada", last="King")
    )


def test_unique_constraints_are_enforced_by_the_database(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    _fill(engine)
    for duplicate in (
        User(id=9, email=" alice@EXAMPLE.com"),  # the same email, once normalized
        User(id=9, email="new@example.com", ssn="111-11-1111"),  # the same SSN
    ):
        with Session(engine) as session, pytest.raises(sa.exc.IntegrityError):
            session.add(duplicate)
            session.commit()


def test_lookups_survive_rotation_and_reencryption(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    _fill(engine)
    for _ in range(2):
        registry.rotate()
        report = registry.reencrypt(User, Claim)
        assert report.left_behind == 0
    with Session(engine) as session:
        assert _ids(session, User.email_index.matches("alice@example.com")) == [1]
        assert _ids(session, User.ssn == "111-11-1111") == [1]
        assert session.get(User, 1).email == "Alice@Example.com"  # type: ignore[union-attr]
    (ssn,) = registry.census(User.ssn)
    assert {k.scope for k in ssn.keys} == {"~index:default"}  # not moved by data key rotation


def test_no_plaintext_and_no_unkeyed_hash_in_the_database(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    _fill(engine)
    dump = stored_bytes(engine, "users", "claims", "data_keys")
    for person in PEOPLE:
        for value in person[1:]:
            if value is None:
                continue
            variants = {value, value.strip().casefold(), "".join(c for c in value if c.isdigit())}
            for variant in variants:
                if len(variant) < 4:
                    continue
                digest = hashlib.sha256(variant.encode()).digest()
                for form in (
                    variant.encode(),
                    digest,
                    digest.hex().encode(),
                    digest.hex()[:16].encode(),
                ):
                    assert form not in dump


def test_hash_field_is_keyed_and_bound_to_its_context(
    db_url: str, engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    value = b"alice@example.com"
    tag = registry.hash_field(value, "newsletter.email")
    assert tag != hashlib.sha256(value).hexdigest()
    assert tag != registry.hash_field(value, "billing.email")
    other_engine = sa.create_engine(db_url)
    other = KeyRegistry(other_engine, root_key)
    assert other.hash_field(value, "newsletter.email") == tag  # stable across processes
    registry.rotate()
    assert registry.hash_field(value, "newsletter.email") == tag  # and across rotations
    other.close()
    other_engine.dispose()


def test_core_columns_and_bad_configuration(engine: sa.Engine, registry: KeyRegistry) -> None:
    md = sa.MetaData()
    contacts = sa.Table(
        "contacts",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(100))),
        blind_index_column("email_index", "email", normalize="casefold"),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(contacts.insert(), [{"id": i, "email": f"User{i}@x.org"} for i in range(5)])
        found = (
            conn.execute(
                sa.select(contacts.c.id).where(contacts.c.email_index.matches("user3@X.ORG"))
            )
            .scalars()
            .all()
        )
    assert found == [3]
    with pytest.raises(ConfigurationError, match="normalizer"):
        blind_index("email", normalize="soundex")
    with pytest.raises(ConfigurationError, match="bits"):
        blind_index("email", bits=0)


FINDING_ROWS_MD = Path(__file__).resolve().parent.parent / "docs" / "finding-rows.md"


def _expected_digests(n: int, bits: int) -> float:
    """The mean number of distinct digests of n distinct values truncated to
    ``bits`` bits: n keys thrown at 2^bits buckets."""
    buckets = 2**bits
    return buckets * (1 - (1 - 1 / buckets) ** n)


def _collision_chance(n: int, bits: int) -> float:
    """The chance that some two of n distinct values share a digest."""
    buckets = 2**bits
    return 1 - math.prod(1 - i / buckets for i in range(n))


@functools.cache
def _digest_count_bounds(n: int, bits: int, tail: float = 1e-9) -> tuple[int, int]:
    """The narrowest counts of distinct digests that uniformly random digests
    of n distinct values fall below, or above, with a chance of at most
    ``tail`` each: from the exact distribution (the values hashed one after
    the other, each landing in one of the d buckets already taken with
    chance d / 2^bits), whose mean is `_expected_digests`."""
    buckets = 2**bits
    chances = [1.0]  # of 0, 1, ... distinct digests so far
    for _ in range(n):
        after = [0.0] * (min(len(chances), buckets) + 1)
        for taken, chance in enumerate(chances):
            after[taken] += chance * taken / buckets
            if taken < buckets:
                after[taken + 1] += chance * (buckets - taken) / buckets
        chances = after
    mean = sum(taken * chance for taken, chance in enumerate(chances))
    assert math.isclose(mean, _expected_digests(n, bits), rel_tol=1e-9)
    low = 0
    while sum(chances[: low + 1]) <= tail:
        low += 1
    high = len(chances) - 1
    while sum(chances[high:]) <= tail:
        high -= 1
    return low, high


def _documented_bits_table() -> tuple[int, list[tuple[int, str, str, str]]]:
    """docs/finding-rows.md's table of distinct digests per ``bits``: its number of values
    and its rows (bits, distinct digests, values per digest, collision chance)."""
    text = FINDING_ROWS_MD.read_text()
    header = re.search(
        r"^\| `bits` \| distinct digests of (\d+) values \|.*\n\|[-:|]+\|\n", text, re.M
    )
    assert header is not None, "docs/finding-rows.md: the table under 'Choosing `bits`'"
    rows = []
    for line in text[header.end() :].split("\n\n")[0].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((int(cells[0]), cells[1], cells[2], cells[3]))
    assert len(rows) >= 4
    return int(header.group(1)), rows


def test_documented_bits_table_and_rule_follow_the_formula() -> None:
    n, rows = _documented_bits_table()
    for bits, distinct, per_digest, collision in rows:
        expected = _expected_digests(n, bits)
        assert distinct == f"{expected:.1f}", bits
        assert per_digest == f"{n / expected:.1f}", bits
        assert collision == f"{_collision_chance(n, bits):.0%}", bits
    rule = re.search(r"\((\d+) values, k = (\d+): (\d+)\s+bits\)", FINDING_ROWS_MD.read_text())
    assert rule is not None, "docs/finding-rows.md: the worked example of floor(log2(n / k))"
    values, k, bits = map(int, rule.groups())
    assert bits == math.floor(math.log2(values / k))
    assert [per for b, _, per, _ in rows if b == bits] == [
        f"{values / _expected_digests(values, bits):.1f}"
    ]


def test_truncated_indexes_give_as_many_distinct_digests_as_the_formula_says(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """Real digests of n distinct values, for the documented n and for 1000,
    at the documented ``bits`` and 10: the count of distinct ones falls where the
    formula's distribution puts all but a 1e-9 chance of it."""
    documented_n, rows = _documented_bits_table()
    all_bits = sorted({bits for bits, *_ in rows} | {10})
    md = sa.MetaData()
    spread = sa.Table(
        "digest_spread",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(20))),
        *(blind_index_column(f"index_{bits}", "value", bits=bits) for bits in all_bits),
    )
    md.create_all(engine)
    values = [{"id": i, "value": f"value {i}"} for i in range(1000)]
    with engine.begin() as conn:  # the same statement twice: the compiled cache
        conn.execute(spread.insert(), values[:500])
        conn.execute(spread.insert(), values[500:])
    with engine.connect() as conn:
        for n in (documented_n, len(values)):
            for bits in all_bits:
                column = spread.c[f"index_{bits}"]
                distinct = conn.scalar(
                    sa.select(sa.func.count(sa.distinct(column))).where(spread.c.id < n)
                )
                low, high = _digest_count_bounds(n, bits)
                assert low <= distinct <= high, (n, bits, distinct, (low, high))


def _refusing_normalizer(value: str) -> str:
    raise ValueError(f"cannot normalize {value}")


def test_values_an_index_cannot_hash_are_refused_without_quoting_them(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """A lone surrogate (no UTF-8 form) or a normalizer failing with the value
    in its message: InvalidValueError naming the index, never the value."""
    md = sa.MetaData()
    tags = sa.Table(
        "tags",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tag", EncryptedType(sa.String(100))),
        blind_index_column("tag_index", "tag", normalize=_refusing_normalizer),
    )
    md.create_all(engine)
    Base.metadata.create_all(engine)
    secret = "SECRET-" + "QUARTZ"
    unencodable = secret + "\ud800"
    queries = [
        ("users.email_index", sa.select(User.id).where(User.email_index.matches(unencodable))),
        (
            "users.name_index",
            sa.select(User.id).where(User.name_index.matches("ada", unencodable)),
        ),
        ("tags.tag_index", sa.select(tags.c.id).where(tags.c.tag_index.matches(secret))),
    ]
    for name, query in queries:
        for _ in range(2):
            with engine.connect() as conn, pytest.raises(InvalidValueError) as info:
                conn.execute(query).all()
            _assert_clean(info.value, f"blind index {name}", secret)
            with Session(engine) as session, pytest.raises(InvalidValueError) as info:
                session.execute(query).all()
            _assert_clean(info.value, f"blind index {name}", secret)
    for _ in range(2):
        with engine.begin() as conn, pytest.raises(InvalidValueError) as info:
            conn.execute(tags.insert(), {"id": 1, "tag": secret})
        _assert_clean(info.value, "blind index tags.tag_index", secret)


def _assert_clean(error: BaseException, where: str, secret: str) -> None:
    assert str(error).startswith(f"{where}: ")
    assert secret not in "".join(traceback.format_exception(error))


class Note(Base):
    __tablename__ = "kill_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(60)))
    body_index: Mapped[str | None] = blind_index("body")


MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType, blind_index

class Base(DeclarativeBase):
    pass

class Note(Base):
    __tablename__ = "kill_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(60)))
    body_index: Mapped[str | None] = blind_index("body")
"""


def test_backfill_resumes_after_sigkill(pg_url: str, tmp_path: Path) -> None:
    root = os.urandom(32)
    engine = sa.create_engine(pg_url)
    registry = KeyRegistry(engine, StaticRootKey(root))
    registry.init()
    Note.__table__.create(engine)
    rows = 20_000
    with engine.begin() as conn:
        conn.execute(
            Note.__table__.insert(),
            [{"id": i, "body": f"note {i}", "body_index": None} for i in range(rows)],
        )
        conn.execute(sa.text("UPDATE kill_notes SET body_index = NULL"))
    (tmp_path / "kill_models.py").write_text(MODELS)
    env = {
        **os.environ,
        "ENVELOPE_ROOT_KEY": base64.b64encode(root).decode(),
        "PYTHONPATH": str(tmp_path),
    }
    command = [
        sys.executable,
        "-m",
        "sqlalchemy_envelope",
        "--url",
        pg_url,
        "backfill-index",
        "kill_models:Note.body_index",
        "--batch-size",
        "100",
    ]

    def filled() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM kill_notes WHERE body_index IS NOT NULL")
                ).scalar_one()
            )

    interrupted = 0
    for at in (4_000, 9_000, 14_000):
        if kill_when(command, env, filled, at, cwd=tmp_path) and 0 < filled() < rows:
            interrupted += 1
    assert interrupted >= 1, "the backfill was never caught half way"
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert filled() == rows
    with Session(engine) as session:
        hit = session.scalars(sa.select(Note.id).where(Note.body_index.matches("note 12345")))
        assert list(hit) == [12345]
    registry.close()
    engine.dispose()
