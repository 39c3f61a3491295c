"""The ciphertext format against the known-answer vectors published in FORMAT.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import itertools
import os
import string
import struct
import traceback
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from format_md import format_vectors

from sqlalchemy_envelope import (
    EnvelopeError,
    KeyRegistry,
    NotCiphertextError,
    StaticRootKey,
    UnknownKeyError,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.crypto.primitives import AESGCM, AESSIV, hkdf_sha256
from sqlalchemy_envelope.keys import envelope as envelope_module
from sqlalchemy_envelope.keys import storage
from sqlalchemy_envelope.keys.scopes import index_scope
from sqlalchemy_envelope.sqla.blind_index import BlindIndex
from sqlalchemy_envelope.sqla.codec import codec_for


def _expected(vector: dict[str, Any]) -> bytes:
    """The vector's ciphertext, computed with the primitives alone."""
    plaintext = bytes.fromhex(vector["plaintext"])
    header = fmt.header(vector["key_id"], vector["version"])
    if vector["version"] in fmt.DETERMINISTIC_VERSIONS:
        siv_key = bytes.fromhex(vector["siv_key"])
        purpose = "v2" if vector["version"] == fmt.DETERMINISTIC_VERSION else "v1"
        info = f"sqlalchemy-envelope/deterministic/{purpose}\x00".encode() + bytes.fromhex(
            vector["associated_data"][1]
        )
        assert hkdf_sha256(bytes.fromhex(vector["index_key"]), info, 64) == siv_key
        vector_ad = [bytes.fromhex(part) for part in vector["associated_data"]]
        return header + AESSIV(siv_key).encrypt(plaintext, vector_ad)
    nonce = bytes.fromhex(vector["nonce"])
    if vector["version"] == fmt.LEGACY_VERSION:
        scope = f"\x00scope={vector['scope']}" if "scope" in vector else ""
        associated = header + (vector["context"] + scope).encode()
    else:
        associated = bytes.fromhex(vector["associated_data"])
    return (
        header
        + nonce
        + AESGCM(bytes.fromhex(vector["data_key"])).encrypt(nonce, plaintext, associated)
    )


def _context(vector: dict[str, Any]) -> fmt.Context:
    """The context the library makes of the vector's names."""
    if vector["version"] in (fmt.LEGACY_VERSION, fmt.LEGACY_DETERMINISTIC_VERSION):
        legacy = fmt.given_context(vector["context"])
        return fmt.scoped_context(legacy, vector["scope"]) if "scope" in vector else legacy
    if "given_context" in vector:
        return fmt.given_context(vector["given_context"], vector["schema"])
    context = fmt.column_context(vector["schema"], vector["table"], vector["column"])
    return fmt.scoped_context(context, vector["scope"]) if "scope" in vector else context


@pytest.mark.parametrize("vector", format_vectors("values"), ids=lambda v: v["name"])
def test_vector(
    vector: dict[str, Any],
    engine: sa.Engine,
    root_key: StaticRootKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ciphertext = bytes.fromhex(vector["ciphertext"])
    plaintext = bytes.fromhex(vector["plaintext"])
    assert _expected(vector) == ciphertext
    assert fmt.key_id_of(ciphertext) == vector["key_id"]
    assert fmt.to_text(ciphertext) == vector["text"]
    assert fmt.from_text(vector["text"]) == ciphertext
    context = _context(vector)
    deterministic = vector["version"] in fmt.DETERMINISTIC_VERSIONS
    header = ciphertext[: fmt.HEADER_BYTES]
    if vector["version"] == fmt.DETERMINISTIC_VERSION:
        assert [header.hex(), context.current.hex()] == vector["associated_data"]
    elif deterministic:
        assert [header.hex(), context.legacy.hex()] == vector["associated_data"]
    elif vector["version"] == fmt.FORMAT_VERSION:
        assert (header + context.current).hex() == vector["associated_data"]

    scope = f"vector-{vector['key_id']}"
    registry = KeyRegistry(engine, root_key, scope="setup")
    registry.init()  # the data_keys table
    key_scope = index_scope(scope) if deterministic else scope
    secret = bytes.fromhex(vector["index_key" if deterministic else "data_key"])
    with engine.begin() as conn:
        storage.insert_active(
            conn,
            registry.table,
            key_id=vector["key_id"],
            scope=key_scope,
            version=1,
            wrapped_key=root_key.wrap(
                secret, {"key_id": str(vector["key_id"]), "scope": key_scope}
            ),
            root_key_fingerprint=root_key.fingerprint,
            root_key_description=root_key.description,
            now=storage.utcnow(),
        )
    reader = KeyRegistry(engine, root_key, scope=scope, attach=False)
    envelope = reader.envelope
    if deterministic:
        assert envelope.decrypt_deterministic(ciphertext, context) == plaintext
        if vector["version"] == fmt.DETERMINISTIC_VERSION:
            assert envelope.encrypt_deterministic(plaintext, context.current) == ciphertext
        assert len(ciphertext) == len(plaintext) + fmt.DETERMINISTIC_OVERHEAD
    else:
        assert envelope.decrypt_bytes(ciphertext, context) == plaintext
        assert len(ciphertext) == len(plaintext) + fmt.OVERHEAD
        monkeypatch.setattr(envelope_module, "_urandom", lambda n: bytes.fromhex(vector["nonce"]))
        if vector["version"] == fmt.FORMAT_VERSION:
            assert envelope.encrypt_bytes(plaintext, context.current) == ciphertext
        if vector.get("schema") is None and "scope" not in vector:  # a given "table.column"
            name = vector.get("context") or f"{vector['table']}.{vector['column']}"
            assert reader.decrypt(ciphertext, name) == plaintext
            assert reader.encrypt(plaintext, name)[0] == fmt.FORMAT_VERSION
    registry.close()
    reader.close()


def test_header_is_the_first_eight_base64_characters() -> None:
    for key_id in (1, 255, 2**40 - 1, 0x0102030405):
        header = fmt.header(key_id)
        assert len(header) == fmt.HEADER_BYTES == 6
        text = fmt.to_text(header + b"\x00" * 40)
        assert text[: fmt.TEXT_HEADER_CHARS] == fmt.to_text(header)
        assert fmt.TEXT_HEADER_CHARS == 8


def test_non_ciphertext_is_recognised() -> None:
    with pytest.raises(NotCiphertextError, match="shorter"):
        fmt.check(b"\x01short")
    with pytest.raises(NotCiphertextError, match="does not start with a format byte"):
        fmt.check(b"plaintext that is long enough to look like one..")
    with pytest.raises(NotCiphertextError, match="not base64"):
        fmt.from_text("plain text, not base64!")


def test_text_form_is_canonical_base64() -> None:
    """A ciphertext has one text form: any single-character change of it is
    refused or reads as other bytes, never as the same ciphertext."""
    alphabet = string.ascii_letters + string.digits + "+/=-_ \n"
    for size in range(fmt.OVERHEAD, fmt.OVERHEAD + 3):  # every padding
        ciphertext = os.urandom(size)
        text = fmt.to_text(ciphertext)
        assert fmt.from_text(text) == ciphertext
        for position, replacement in itertools.product(range(len(text)), alphabet):
            if replacement == text[position]:
                continue
            changed = text[:position] + replacement + text[position + 1 :]
            with contextlib.suppress(NotCiphertextError):
                assert fmt.from_text(changed) != ciphertext
    for unused_bits_set in ("QR==", "QUJ="):  # b"A" and b"AB" with non-zero unused bits
        with pytest.raises(NotCiphertextError, match="canonical"):
            fmt.from_text(unused_bits_set)
    assert fmt.from_text("QQ==") == b"A" and fmt.from_text("QUI=") == b"AB"


def test_errors_about_non_ciphertext_quote_none_of_its_bytes(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """Legacy plaintext that looks like ciphertext: neither its first byte nor
    the five bytes where a key id would be appear in an error."""
    legacy = b"\x01PIN=4711;card=4111111111111111;cvv=123"
    leaks = (b"PIN=4".hex(), "PIN=4", "0x50494e3d34", "0xb2")
    errors: list[BaseException] = []
    for value in (legacy, b"\xb2" + legacy[1:]):
        try:
            registry.decrypt(value, "t.c")
        except EnvelopeError as error:
            errors.append(error)
    assert [type(e) for e in errors] == [UnknownKeyError, NotCiphertextError]
    for error in errors:
        text = "".join(traceback.format_exception(error))
        assert not [leak for leak in leaks if leak in text], text


def _column_type(spec: dict[str, Any]) -> sa.types.TypeEngine[Any]:
    """The SQLAlchemy type a vector's ``type`` names."""
    kind = spec["kind"]
    if kind == "numeric":
        return sa.Numeric(spec.get("precision"), spec.get("scale"), asdecimal=True)
    if kind == "enum":
        return sa.Enum(*spec["names"], name="vector_enum")
    simple: dict[str, sa.types.TypeEngine[Any]] = {
        "string": sa.String(),
        "bytes": sa.LargeBinary(),
        "integer": sa.BigInteger(),
        "float": sa.Float(),
        "boolean": sa.Boolean(),
        "date": sa.Date(),
        "datetime": sa.DateTime(timezone=True),
        "time": sa.Time(timezone=True),
        "interval": sa.Interval(),
        "uuid": sa.Uuid(),
        "json": sa.JSON(),
    }
    return simple[kind]


def _python_value(kind: str, value: Any) -> Any:
    """The Python value of a vector's language-neutral ``value``."""
    parse: dict[str, Any] = {
        "bytes": bytes.fromhex,
        "integer": int,
        "float": float,
        "numeric": Decimal,
        "date": dt.date.fromisoformat,
        # the codec's reading: CPython's fromisoformat drops an offset under
        # one second (python/cpython#152079), which a vector has
        "datetime": lambda v: codec_for(sa.DateTime()).decode(v.encode("ascii")),
        "time": lambda v: codec_for(sa.Time()).decode(v.encode("ascii")),
        "interval": lambda v: dt.timedelta(**v),
        "uuid": uuid.UUID,
    }
    return parse[kind](value) if kind in parse else value


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN to NaN and -0.0 apart from 0.0 included."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (a != a and b != b)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return str(a) == str(b) or (a.is_nan() and b.is_nan())
    return bool(a == b) and type(a) is type(b)


@pytest.mark.parametrize("vector", format_vectors("encodings"), ids=lambda v: v["name"])
def test_plaintext_encoding(vector: dict[str, Any]) -> None:
    """Each type's plaintext as FORMAT.md section 7 gives it: encoded from
    the value (or the application's input) and decoded back to the value."""
    spec = vector["type"]
    codec = codec_for(
        _column_type(spec), pad_to=spec.get("pad_to"), fixed_width=not vector["deterministic"]
    )
    value = _python_value(spec["kind"], vector["value"])
    given = _python_value(spec["kind"], vector["input"]) if "input" in vector else value
    plaintext = bytes.fromhex(vector["plaintext"])
    assert codec.encode(given) == plaintext
    assert _same(codec.decode(plaintext), value)
    if codec.max_bytes is not None:
        assert len(plaintext) <= codec.max_bytes


def _blind_index_value(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    ((kind, value),) = part.items()
    parse: dict[str, Any] = {"integer": int, "hex": bytes.fromhex, "float": float, "boolean": bool}
    return parse[kind](value)


@pytest.mark.parametrize("vector", format_vectors("blind_indexes"), ids=lambda v: v["name"])
def test_blind_index(vector: dict[str, Any]) -> None:
    """FORMAT.md section 8, recomputed with HKDF and HMAC alone, and the
    library's digest of the same sources."""
    sources = [_blind_index_value(part) for part in vector["sources"]]
    label = bytes.fromhex(vector["info"])
    name = vector.get("context") or f"{vector['table']}.{vector['column']}"
    assert label == (
        b"sqlalchemy-envelope/blind-index/v1\x00"
        + name.encode("utf-8")
        + b"\x00"
        + str(vector["bits"]).encode("ascii")
    )
    key = hkdf_sha256(bytes.fromhex(vector["index_key"]), label)
    assert key.hex() == vector["hmac_key"]

    table = sa.Table(
        f"vector_{vector.get('table', 'given')}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *(sa.Column(f"source_{i}", sa.String) for i in range(len(sources))),
    )
    index = BlindIndex(
        *(f"source_{i}" for i in range(len(sources))),
        normalize=vector["normalize"],
        bits=vector["bits"],
        context=name,
    )
    table.append_column(sa.Column(vector.get("column", "index"), index))
    assert index.label() == label
    assert index.digest(key, tuple(sources) if len(sources) > 1 else sources[0]) == vector["digest"]


@pytest.mark.parametrize("vector", format_vectors("hash_field"), ids=lambda v: v["context"])
def test_hash_field(vector: dict[str, Any], engine: sa.Engine, root_key: StaticRootKey) -> None:
    """FORMAT.md section 9, with HKDF and HMAC alone and through a registry
    whose index key is the vector's."""
    index_key = bytes.fromhex(vector["index_key"])
    info = b"sqlalchemy-envelope/hash-field/v1\x00" + vector["context"].encode("utf-8")
    key = hkdf_sha256(index_key, info)
    assert key.hex() == vector["hmac_key"]
    value = bytes.fromhex(vector["value"])
    assert hmac.new(key, value, "sha256").hexdigest() == vector["digest"]

    scope = f"hash-field-{vector['digest'][:8]}"
    setup = KeyRegistry(engine, root_key, scope="setup")
    setup.init()
    with engine.begin() as conn:
        key_id = 1 + int(vector["digest"][:8], 16)
        storage.insert_active(
            conn,
            setup.table,
            key_id=key_id,
            scope=index_scope(scope),
            version=1,
            wrapped_key=root_key.wrap(
                index_key,
                {
                    "key_id": str(key_id),
                    "kind": "index",
                    "scope": index_scope(scope),
                    "version": "1",
                },
            ),
            root_key_fingerprint=root_key.fingerprint,
            root_key_description=root_key.description,
            now=storage.utcnow(),
        )
    reader = KeyRegistry(engine, root_key, scope=scope, attach=False)
    assert reader.hash_field(value, vector["context"]) == vector["digest"]
    reader.close()
    setup.close()
