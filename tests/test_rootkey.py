"""Root keys: PBKDF2 parameters and validation, static keys, the environment."""

from __future__ import annotations

import base64
import json
import os
import re
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from sqlalchemy_envelope import (
    ConfigurationError,
    DecryptionError,
    PBKDF2RootKey,
    RootKeyProvider,
    StaticRootKey,
    root_key_from_env,
)
from sqlalchemy_envelope.keys import rootkey as rootkey_module
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

FORMAT_MD = Path(__file__).resolve().parent.parent / "FORMAT.md"


def test_pbkdf2_defaults_and_validation() -> None:
    key = PBKDF2RootKey("seed", "salt")
    assert key.iterations == 600_000 and key.key_length == 32
    assert isinstance(key, RootKeyProvider)
    for kwargs, message in [
        ({"seed": "", "salt": "s"}, "seed"),
        ({"seed": "s", "salt": b""}, "salt"),
        ({"seed": "s", "salt": "s", "iterations": 9_999}, "10,000"),
        ({"seed": "s", "salt": "s", "key_length": 20}, "16, 24 or 32"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            PBKDF2RootKey(**kwargs)  # type: ignore[arg-type]


def test_pbkdf2_derives_once_and_matches_a_static_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = rootkey_module.pbkdf2_sha256

    def counting(secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
        calls.append(iterations)
        return real(secret, salt, iterations, length)

    monkeypatch.setattr(rootkey_module, "pbkdf2_sha256", counting)
    key = PBKDF2RootKey("correct horse", "battery staple", iterations=10_000)
    assert calls == []  # lazy: nothing derived until first use
    wrapped = key.wrap(b"k" * 32, {"key_id": "1", "scope": "default"})
    assert key.unwrap(wrapped, {"key_id": "1", "scope": "default"}) == b"k" * 32
    _ = key.fingerprint
    assert calls == [10_000]

    derived = PBKDF2HMAC(
        algorithm=hashes.SHA256(), length=32, salt=b"battery staple", iterations=10_000
    ).derive(b"correct horse")
    static = StaticRootKey(derived)
    assert static.fingerprint == key.fingerprint
    assert static.unwrap(wrapped, {"key_id": "1", "scope": "default"}) == b"k" * 32


def test_strength_and_estimate() -> None:
    key = PBKDF2RootKey("s", "s", iterations=100_000, key_length=16)
    assert key.strength == "AES-128 from PBKDF2-HMAC-SHA256 with 100,000 iterations"
    estimate = key.estimate_generation_time()
    assert timedelta(0) < estimate < timedelta(seconds=30)
    assert "iterations=100000" in key.description


def test_wrapping_binds_the_context() -> None:
    key = StaticRootKey(os.urandom(32))
    wrapped = key.wrap(b"d" * 32, {"key_id": "7", "scope": "a"})
    for other in ({"key_id": "8", "scope": "a"}, {"key_id": "7", "scope": "b"}):
        with pytest.raises(DecryptionError):
            key.unwrap(wrapped, other)
    with pytest.raises(DecryptionError):
        StaticRootKey(os.urandom(32)).unwrap(wrapped, {"key_id": "7", "scope": "a"})
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        key.unwrap(bytes(tampered), {"key_id": "7", "scope": "a"})


def _wrapped_key_vector() -> dict[str, str]:
    """The known answer of FORMAT.md's "Wrapped data keys" section."""
    text = FORMAT_MD.read_text("utf-8")
    section = text[text.index("## Wrapped data keys") : text.index("## Test vectors")]
    block = re.search(r"```\n(root key .*?)```", section, re.S)
    assert block is not None, "FORMAT.md has no known answer for wrapped keys"
    pairs = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block.group(1).splitlines())
    return {name: value for name, value in pairs}


def test_wrapped_key_known_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes FORMAT.md publishes: RFC 8785 JSON of the version 2 context
    (raw UTF-8, as JSON.stringify writes it) as associated data, written;
    the escaped JSON of version 1, read."""
    vector = _wrapped_key_vector()
    raw, data_key, nonce = (bytes.fromhex(vector[n]) for n in ("root key", "data key", "nonce"))
    wrapped, aad = bytes.fromhex(vector["wrapped"]), bytes.fromhex(vector["aad"])
    root_key = StaticRootKey(raw)
    context = KeyWrapper.context(4328719365, "café-東京", 3)

    assert rootkey_module.canonical_json(context) == vector["context"].encode("utf-8")
    assert aad == b"sqlalchemy-envelope/data-key/v2\x00" + vector["context"].encode("utf-8")
    assert AESGCM(raw).decrypt(nonce, wrapped[13:], aad) == data_key
    monkeypatch.setattr(rootkey_module, "new_nonce", lambda: nonce)
    assert root_key.wrap(data_key, context) == wrapped
    assert root_key.unwrap(wrapped, context) == data_key
    for changed in ({**context, "version": "4"}, {**context, "kind": "index"}):
        with pytest.raises(DecryptionError):
            root_key.unwrap(wrapped, changed)

    legacy_wrapped = bytes.fromhex(vector["v1 wrapped"])
    legacy = json.loads(vector["v1 context"])
    assert legacy == KeyWrapper.legacy_context(4328719365, "café-東京")
    assert AESGCM(raw).decrypt(nonce, legacy_wrapped[13:], bytes.fromhex(vector["v1 aad"])) == (
        data_key
    )
    assert root_key.unwrap(legacy_wrapped, legacy) == data_key
    with pytest.raises(ConfigurationError, match="valid Unicode"):
        root_key.wrap(data_key, {**context, "scope": "\ud800"})


def test_static_key_validation() -> None:
    with pytest.raises(ConfigurationError, match="16, 24 or 32"):
        StaticRootKey(b"short")
    with pytest.raises(ConfigurationError, match="bytes"):
        StaticRootKey("a string")  # type: ignore[arg-type]


def test_a_seed_without_utf8_form_is_refused_without_quoting_it() -> None:
    secret = "hunter2-" + "\udcff"  # how os.environ holds bytes that are not UTF-8
    for environ in (
        {"ENVELOPE_ROOT_SEED": secret, "ENVELOPE_ROOT_SALT": "t"},
        {"ENVELOPE_ROOT_SEED": "s", "ENVELOPE_ROOT_SALT": secret},
    ):
        with pytest.raises(ConfigurationError, match="not valid Unicode") as info:
            root_key_from_env(environ)
        assert "hunter2" not in "".join(traceback.format_exception(info.value))
        assert "\udcff" not in "".join(traceback.format_exception(info.value))


def test_root_key_from_env() -> None:
    raw = os.urandom(32)
    encoded = base64.b64encode(raw).decode()
    assert root_key_from_env({"ENVELOPE_ROOT_KEY": encoded}).fingerprint == (
        StaticRootKey(raw).fingerprint
    )
    pbkdf2 = root_key_from_env(
        {
            "ENVELOPE_ROOT_SEED": "s",
            "ENVELOPE_ROOT_SALT": "t",
            "ENVELOPE_PBKDF2_ITERATIONS": "12345",
        }
    )
    assert isinstance(pbkdf2, PBKDF2RootKey) and pbkdf2.iterations == 12_345
    assert isinstance(
        root_key_from_env({"ENVELOPE_ROOT_SEED": "s", "ENVELOPE_ROOT_SALT": "t"}), PBKDF2RootKey
    )

    bad = [
        ({}, "no root key configured"),
        ({"ENVELOPE_ROOT_KEY": "not base64!"}, "not the base64 of 32 bytes"),
        ({"ENVELOPE_ROOT_KEY": base64.b64encode(b"x" * 16).decode()}, "not the base64 of 32"),
        ({"ENVELOPE_ROOT_KEY": encoded, "ENVELOPE_ROOT_SEED": "s"}, "set exactly one"),
        ({"ENVELOPE_ROOT_KEY": encoded, "ENVELOPE_ROOT_KEY_FILE": "/x"}, "set exactly one"),
        ({"ENVELOPE_ROOT_SEED": "s"}, "ENVELOPE_ROOT_SALT is missing"),
        ({"ENVELOPE_ROOT_SALT": "s"}, "ENVELOPE_ROOT_SEED is missing"),
        (
            {
                "ENVELOPE_ROOT_SEED": "s",
                "ENVELOPE_ROOT_SALT": "t",
                "ENVELOPE_PBKDF2_ITERATIONS": "many",
            },
            "whole number",
        ),
        (
            {
                "ENVELOPE_ROOT_SEED": "s",
                "ENVELOPE_ROOT_SALT": "t",
                "ENVELOPE_PBKDF2_ITERATIONS": "1000",
            },
            "at least 10,000",
        ),
    ]
    for environ, message in bad:
        with pytest.raises(ConfigurationError, match=message) as info:
            root_key_from_env(environ)
        for value in environ.values():
            if len(value) > 4:
                assert value not in str(info.value)


def test_root_key_file(tmp_path: Path) -> None:
    raw = os.urandom(32)
    expected = StaticRootKey(raw).fingerprint
    as_text = tmp_path / "root-key.b64"
    as_text.write_text(base64.b64encode(raw).decode() + "\n")
    as_bytes = tmp_path / "root-key.bin"
    as_bytes.write_bytes(raw)
    for path in (as_text, as_bytes):
        path.chmod(0o600)
        assert StaticRootKey.from_file(path).fingerprint == expected
        from_env = root_key_from_env({"ENVELOPE_ROOT_KEY_FILE": str(path)})
        assert from_env.fingerprint == expected

    for mode in (0o644, 0o640, 0o604, 0o620, 0o602):
        as_text.chmod(mode)
        with pytest.raises(ConfigurationError, match=f"accessible to other users .mode 0{mode:o}"):
            StaticRootKey.from_file(as_text)
    as_text.chmod(0o400)
    assert StaticRootKey.from_file(as_text).fingerprint == expected

    short = tmp_path / "short"
    short.write_text(base64.b64encode(raw[:16]).decode())
    short.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not the base64 of 32 bytes") as info:
        StaticRootKey.from_file(short)
    assert base64.b64encode(raw[:16]).decode() not in str(info.value)
    with pytest.raises(ConfigurationError, match="cannot read root key file"):
        root_key_from_env({"ENVELOPE_ROOT_KEY_FILE": str(tmp_path / "missing")})
