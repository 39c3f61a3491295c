"""The ciphertext format against the known-answer vectors published in FORMAT.md."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import string
import traceback
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import (
    EnvelopeError,
    KeyRegistry,
    NotCiphertextError,
    StaticRootKey,
    UnknownKeyError,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.keys import envelope as envelope_module
from sqlalchemy_envelope.keys import storage

FORMAT_MD = Path(__file__).resolve().parent.parent / "FORMAT.md"


def _vectors() -> list[dict[str, Any]]:
    block = re.search(r"```json\n(.*?)```", FORMAT_MD.read_text("utf-8"), re.S)
    assert block is not None, "FORMAT.md has no json block of vectors"
    vectors: list[dict[str, Any]] = json.loads(block.group(1))
    assert len(vectors) >= 3
    return vectors


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_vector(
    vector: dict[str, Any],
    engine: sa.Engine,
    root_key: StaticRootKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scope = f"vector-{vector['key_id']}"
    registry = KeyRegistry(engine, root_key, scope=scope)
    registry.init()
    data_key = bytes.fromhex(vector["data_key"])
    with engine.begin() as conn:
        storage.retire_active(conn, registry.table, scope, storage.utcnow(), expected_id=None)
        storage.insert_active(
            conn,
            registry.table,
            key_id=vector["key_id"],
            scope=scope,
            version=2,
            wrapped_key=root_key.wrap(data_key, {"key_id": str(vector["key_id"]), "scope": scope}),
            root_key_fingerprint=root_key.fingerprint,
            root_key_description=root_key.description,
            now=storage.utcnow(),
        )
    reader = KeyRegistry(engine, root_key, scope=scope, attach=False)
    ciphertext = bytes.fromhex(vector["ciphertext"])
    plaintext = bytes.fromhex(vector["plaintext"])

    assert reader.decrypt(ciphertext, vector["context"]) == plaintext
    assert fmt.key_id_of(ciphertext) == vector["key_id"]
    assert fmt.to_text(ciphertext) == vector["text"]
    assert fmt.from_text(vector["text"]) == ciphertext
    assert len(ciphertext) == len(plaintext) + fmt.OVERHEAD

    monkeypatch.setattr(envelope_module, "_urandom", lambda n: bytes.fromhex(vector["nonce"]))
    assert reader.encrypt(plaintext, vector["context"]) == ciphertext
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
    with pytest.raises(NotCiphertextError, match="does not start with format byte"):
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
