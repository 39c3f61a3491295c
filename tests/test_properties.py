"""Property-based tests (hypothesis): generated values round-trip through the
database, and generated attacks on ciphertexts fail with the library's own
typed errors, never another exception and never a wrong plaintext."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import fresh_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_envelope import (
    DecryptionError,
    EncryptedType,
    EnvelopeError,
    KeyRegistry,
    NotCiphertextError,
    StaticRootKey,
)
from sqlalchemy_envelope.crypto import format as fmt

T_C = fmt.given_context("t.c")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# column -> (type, strategy of values it must return equal and of the same type)
GENERATED: dict[str, tuple[Any, st.SearchStrategy[Any]]] = {
    "text": (sa.Text(), st.text()),
    "string": (sa.String(60), st.text(max_size=60)),
    "binary": (sa.LargeBinary(), st.binary(max_size=300)),
    "integer": (sa.Integer(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    "bigint": (sa.BigInteger(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    "float": (sa.Float(), st.floats(allow_nan=False)),
    "numeric": (
        sa.Numeric(38, 10),
        st.decimals(
            min_value=Decimal("-1e27"),
            max_value=Decimal("1e27"),
            places=10,
            allow_nan=False,
            allow_infinity=False,
        ),
    ),
    "boolean": (sa.Boolean(), st.booleans()),
    "date": (sa.Date(), st.dates()),
    "naive": (sa.DateTime(), st.datetimes()),
    "aware": (sa.DateTime(timezone=True), st.datetimes(timezones=_offsets)),
    "time": (sa.Time(), st.times()),
    "interval": (
        sa.Interval(),
        st.timedeltas(min_value=dt.timedelta(days=-99999), max_value=dt.timedelta(days=99999)),
    ),
    "uuid": (sa.Uuid(), st.uuids()),
    "json": (sa.JSON(), _json),
}


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def prop_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """One engine for all examples of a property."""
    with fresh_database(request, request.param, tmp_path) as url:
        engine = sa.create_engine(url)
        yield engine
        engine.dispose()


def _generated_table(storage: str) -> sa.Table:
    return sa.Table(
        f"generated_{storage}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *(
            sa.Column(name, EncryptedType(type_, storage=storage))
            for name, (type_, _) in GENERATED.items()
        ),
    )


def _same(expected: Any, actual: Any) -> None:
    assert actual == expected or (expected != expected and actual != actual)
    assert type(actual) is type(expected)
    if isinstance(expected, dt.datetime):
        assert actual.utcoffset() == expected.utcoffset()
    if isinstance(expected, Decimal):
        assert actual.as_tuple() == expected.as_tuple()


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_generated_values_round_trip(prop_engine: sa.Engine, storage: str) -> None:
    registry = KeyRegistry(prop_engine, StaticRootKey(os.urandom(32)))
    registry.init()
    table = _generated_table(storage)
    table.metadata.create_all(prop_engine)
    ids = iter(range(1, 10**6))

    @SETTINGS
    @given(st.fixed_dictionaries({name: s for name, (_, s) in GENERATED.items()}))
    def round_trip(row: dict[str, Any]) -> None:
        row_id = next(ids)
        with prop_engine.begin() as conn:
            conn.execute(table.insert(), {"id": row_id, **row})
        with prop_engine.connect() as conn:
            got = conn.execute(table.select().where(table.c.id == row_id)).one()._mapping
        for name, value in row.items():
            _same(value, got[name])

    round_trip()
    registry.close()


# -- attacks on ciphertexts ---------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Any) -> Iterator[tuple[KeyRegistry, list[int]]]:
    """A registry with three keys (two retired) and its key ids."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'attacks.db'}")
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    registry.rotate()
    registry.rotate()
    key_ids = [k.id for k in registry.status().keys]
    yield registry, key_ids
    registry.close()
    engine.dispose()


def _mutations(ciphertext: bytes, key_ids: list[int]) -> st.SearchStrategy[bytes]:
    n = len(ciphertext)
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda p: ciphertext[: p[0]] + bytes([ciphertext[p[0]] ^ p[1]]) + ciphertext[p[0] + 1 :]
    )
    truncate = st.integers(0, n - 1).map(lambda k: ciphertext[:k])
    extend = st.binary(min_size=1, max_size=40).map(lambda extra: ciphertext + extra)
    version = (
        st.integers(0, 255)
        .filter(lambda v: v != ciphertext[0])
        .map(lambda v: bytes([v]) + ciphertext[1:])
    )
    swap_key = (
        st.sampled_from([*key_ids, 0, fmt.MAX_KEY_ID, 12345])
        .filter(lambda k: fmt.header(k) != ciphertext[: fmt.HEADER_BYTES])
        .map(lambda k: fmt.header(k) + ciphertext[fmt.HEADER_BYTES :])
    )
    splice = st.binary(min_size=1, max_size=80).flatmap(
        lambda junk: st.integers(0, n).map(lambda at: ciphertext[:at] + junk + ciphertext[at:])
    )
    return st.one_of(flip, truncate, extend, version, swap_key, splice)


@SETTINGS
@given(data=st.data(), plaintext=st.binary(max_size=200))
def test_mutated_ciphertexts_raise_only_typed_errors(
    sealed: tuple[KeyRegistry, list[int]], data: st.DataObject, plaintext: bytes
) -> None:
    registry, key_ids = sealed
    ciphertext = registry.envelope.encrypt_bytes(plaintext, T_C.current)
    mutated = data.draw(_mutations(ciphertext, key_ids))
    assert mutated != ciphertext
    with pytest.raises(EnvelopeError) as info:
        registry.envelope.decrypt_bytes(mutated, T_C)
    assert isinstance(info.value, DecryptionError)  # NotCiphertextError and UnknownKeyError too
    if len(plaintext) >= 8:  # shorter ones occur in any English message
        assert plaintext not in str(info.value).encode()


@SETTINGS
@given(junk=st.binary(max_size=120), context=st.binary(max_size=20))
def test_arbitrary_bytes_are_never_plaintext(
    sealed: tuple[KeyRegistry, list[int]], junk: bytes, context: bytes
) -> None:
    registry, key_ids = sealed
    # Also junk behind a real header, which reaches the cipher itself.
    for candidate in (junk, fmt.header(key_ids[0]) + junk):
        with pytest.raises(DecryptionError):
            registry.envelope.decrypt_bytes(candidate, fmt.Context(context, context))


@SETTINGS
@given(plaintext=st.binary(max_size=100), other=st.text(min_size=1, max_size=20))
def test_values_from_other_contexts_are_refused(
    sealed: tuple[KeyRegistry, list[int]], plaintext: bytes, other: str
) -> None:
    registry, _ = sealed
    patients = fmt.given_context("patients.name")
    ciphertext = registry.envelope.encrypt_bytes(plaintext, patients.current)
    if other == "patients.name":
        return
    wrong = fmt.given_context(other)
    with pytest.raises(DecryptionError, match="failed authentication"):
        registry.envelope.decrypt_bytes(ciphertext, wrong)
    deterministic = registry.envelope.encrypt_deterministic(plaintext, patients.current)
    with pytest.raises(DecryptionError):
        registry.envelope.decrypt_deterministic(deterministic, wrong)


@SETTINGS
@given(text=st.text(max_size=80))
def test_text_storage_rejects_what_is_not_its_ciphertext(
    sealed: tuple[KeyRegistry, list[int]], text: str
) -> None:
    registry, _ = sealed
    column_type = EncryptedType(sa.String(100), storage="text", context="t.c")
    engine = registry.engine
    process = column_type.result_processor(engine.dialect, None)
    assert process is not None
    with pytest.raises(DecryptionError):  # NotCiphertextError is one
        process(text)


def test_every_single_byte_change_of_stored_values_is_detected(
    prop_engine: sa.Engine,
) -> None:
    registry = KeyRegistry(prop_engine, StaticRootKey(os.urandom(32)))
    registry.init()
    table = sa.Table(
        "samples",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", EncryptedType(sa.String(30))),
        sa.Column("d", EncryptedType(sa.String(30), deterministic=True)),
    )
    table.metadata.create_all(prop_engine)
    with prop_engine.begin() as conn:
        conn.execute(
            table.insert(), [{"id": i, "v": f"value {i}", "d": f"det {i}"} for i in range(3)]
        )
        stored_rows = conn.execute(sa.text("SELECT v, d FROM samples")).all()
    checked = 0
    for random_value, deterministic_value in stored_rows:
        for stored, decrypt in (
            (
                bytes(random_value),
                lambda c: registry.envelope.decrypt_bytes(c, fmt.given_context("samples.v")),
            ),
            (
                bytes(deterministic_value),
                lambda c: registry.envelope.decrypt_deterministic(
                    c, fmt.given_context("samples.d")
                ),
            ),
        ):
            decrypt(stored)  # the original decrypts
            for position in range(len(stored)):
                for replacement in range(256):
                    if replacement == stored[position]:
                        continue
                    changed = stored[:position] + bytes([replacement]) + stored[position + 1 :]
                    with pytest.raises(DecryptionError):
                        decrypt(changed)
                    checked += 1
    assert checked == 255 * sum(len(bytes(v)) + len(bytes(d)) for v, d in stored_rows)
    registry.close()


def test_not_ciphertext_is_its_own_error(sealed: tuple[KeyRegistry, list[int]]) -> None:
    registry, _ = sealed
    for plaintext in (b"", b"hello", b"x" * 33, uuid.uuid4().bytes):
        with pytest.raises(NotCiphertextError):
            registry.envelope.decrypt_bytes(plaintext, T_C)
