"""Root keys: PBKDF2 parameters and validation, static keys, the environment."""

from __future__ import annotations

import base64
import functools
import gc
import hmac
import json
import logging
import os
import pwd
import secrets
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import encrypted_table
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from format_md import format_vectors
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    ConfigurationError,
    DecryptionError,
    KeyRegistry,
    PBKDF2RootKey,
    RootKeyProvider,
    StaticRootKey,
    WrongRootKeyError,
    root_key_from_env,
)
from sqlalchemy_envelope.keys import rootkey as rootkey_module
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

STRONG_SEED = "Jx3vQ0r7-Lw9sZ2bYk5tN8cA1mF4hG6dR0pE3uW7qT_"  # secrets.token_urlsafe(32)
WEAK_SEED = "correct horse battery staple"


@functools.cache
def strong_pbkdf2() -> PBKDF2RootKey:
    """A PBKDF2 root key with the default parameters, derived once per test
    process (600,000 iterations take about half a second)."""
    key = PBKDF2RootKey(STRONG_SEED, "deployment salt")
    _ = key.fingerprint
    return key


def test_pbkdf2_defaults_and_validation() -> None:
    key = PBKDF2RootKey(STRONG_SEED, "salt")
    assert key.iterations == 600_000 and key.key_length == 32
    assert isinstance(key, RootKeyProvider)
    for kwargs, message in [
        ({"seed": "", "salt": "s"}, "seed"),
        ({"seed": STRONG_SEED, "salt": b""}, "salt"),
        ({"seed": STRONG_SEED, "salt": "s", "iterations": 599_999}, "at least 600,000"),
        ({"seed": STRONG_SEED, "salt": "s", "iterations": 10_000}, "allow_weak=True"),
        # OpenSSL's count is 32 bits: more would crash in the derivation
        ({"seed": STRONG_SEED, "salt": "s", "iterations": 2**32}, "at most 100,000,000"),
        ({"seed": STRONG_SEED, "salt": "s", "iterations": 10**12}, "at most 100,000,000"),
        ({"seed": STRONG_SEED, "salt": "s", "key_length": 20}, "16, 24 or 32"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            PBKDF2RootKey(**kwargs)  # type: ignore[arg-type]


def test_a_weak_pbkdf2_seed_is_refused_unless_explicitly_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A seed a person chose (or anything short or repetitive) is not a
    secret of 128 bits: refused, with what to use instead and the override
    for data that already depends on it; what the documented generators
    make passes."""
    generated = [
        secrets.token_urlsafe(32),
        secrets.token_hex(32),
        os.urandom(32),
        base64.b64encode(os.urandom(32)).decode(),
    ]
    for seed in generated:
        PBKDF2RootKey(seed, "salt")
    for seed in (WEAK_SEED, "Tr0ub4dor&3", "a" * 200, b"\x00" * 64, secrets.token_hex(8)):
        with pytest.raises(ConfigurationError, match="seed looks weak") as info:
            PBKDF2RootKey(seed, "salt")
        message = "".join(traceback.format_exception(info.value))
        assert "token_urlsafe(32)" in message and "ENVELOPE_PBKDF2_ALLOW_WEAK=1" in message
        assert str(seed) not in message
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        legacy = PBKDF2RootKey(WEAK_SEED, "salt", iterations=10_000, allow_weak=True)
    assert legacy.iterations == 10_000
    assert "below the minimums" in caplog.text and WEAK_SEED not in caplog.text
    with pytest.raises(ConfigurationError, match="at least 10,000 even with allow_weak"):
        PBKDF2RootKey(WEAK_SEED, "salt", iterations=9_999, allow_weak=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        PBKDF2RootKey(STRONG_SEED, "salt", allow_weak=True)
    assert caplog.text == ""  # nothing weak in use: nothing to warn about


def test_the_seed_is_kept_only_until_derivation() -> None:
    seed, salt = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    key = PBKDF2RootKey(seed, salt, iterations=10_000, allow_weak=True)  # quick to derive
    assert seed not in repr(key) and salt not in repr(key)
    key.unwrap(key.wrap(b"k" * 32, {"key_id": "1"}), {"key_id": "1"})
    held = [*vars(key).values(), *gc.get_referents(key)]
    for secret in (seed, salt):
        assert not any(
            value == secret or (isinstance(value, bytes) and secret.encode() in value)
            for value in held
        )
    assert seed not in repr(key)


def test_a_deployment_on_weak_pbkdf2_parameters_reads_its_data_then_rewraps(
    db_url: str, engine: sa.Engine
) -> None:
    """Data keys wrapped under parameters earlier versions accepted (10,000
    iterations, a password as seed) stay readable with the explicit override,
    and `rewrap` moves them to a strong root key; nothing else accepts them."""
    legacy = {
        "ENVELOPE_ROOT_SEED": WEAK_SEED,
        "ENVELOPE_ROOT_SALT": "deployment salt",
        "ENVELOPE_PBKDF2_ITERATIONS": "10000",
    }
    table = encrypted_table("notes")

    def bodies(bind: sa.Engine) -> list[list[str]]:
        query = sa.select(table.c.body).order_by(table.c.id)
        seen = []
        for _ in range(2):
            with bind.connect() as conn:
                seen.append(list(conn.execute(query).scalars()))
            with Session(bind) as session:
                seen.append(list(session.execute(query).scalars()))
        return seen

    # What an earlier version wrote: it accepted these parameters.
    earlier = KeyRegistry(
        engine, PBKDF2RootKey(WEAK_SEED, "deployment salt", iterations=10_000, allow_weak=True)
    )
    earlier.init()
    table.metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(table.insert(), [{"id": 1, "body": "one"}, {"id": 2, "body": "two"}])
        session.commit()
    earlier.close()

    upgraded = sa.create_engine(db_url)
    with pytest.raises(ConfigurationError, match="ENVELOPE_PBKDF2_ALLOW_WEAK=1") as info:
        KeyRegistry.from_env(upgraded, environ=legacy)
    assert WEAK_SEED not in "".join(traceback.format_exception(info.value))
    registry = KeyRegistry.from_env(upgraded, environ={**legacy, "ENVELOPE_PBKDF2_ALLOW_WEAK": "1"})
    assert bodies(upgraded) == [["one", "two"]] * 4
    assert "iterations=10000" in registry.status().root_key_description

    assert registry.rewrap(strong_pbkdf2()) == 2  # the data key and the index key
    registry.close()
    upgraded.dispose()
    later = sa.create_engine(db_url)
    with pytest.raises(WrongRootKeyError):
        KeyRegistry.from_env(
            later, environ={**legacy, "ENVELOPE_PBKDF2_ALLOW_WEAK": "1"}, attach=False
        ).status()
    strong = KeyRegistry(later, strong_pbkdf2())
    assert bodies(later) == [["one", "two"]] * 4
    assert "iterations=600000" in strong.status().root_key_description
    strong.close()
    later.dispose()


def test_pbkdf2_derives_once_and_matches_a_static_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = rootkey_module.pbkdf2_sha256

    def counting(secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
        calls.append(iterations)
        return real(secret, salt, iterations, length)

    monkeypatch.setattr(rootkey_module, "pbkdf2_sha256", counting)
    key = PBKDF2RootKey("correct horse", "battery staple", iterations=10_000, allow_weak=True)
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
    key = PBKDF2RootKey(STRONG_SEED, "s", iterations=1_000_000, key_length=16)
    assert key.strength == "AES-128 from PBKDF2-HMAC-SHA256 with 1,000,000 iterations"
    estimate = key.estimate_generation_time()
    assert timedelta(0) < estimate < timedelta(seconds=30)
    assert "iterations=1000000" in key.description


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


@pytest.mark.parametrize("vector", format_vectors("wrapped_keys"), ids=lambda v: v["name"])
def test_wrapped_key_known_answer(vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes FORMAT.md publishes: RFC 8785 JSON of the version 2 context
    (raw UTF-8, as JSON.stringify writes it) as associated data, written;
    the escaped JSON of version 1, read."""
    raw, data_key, nonce = (bytes.fromhex(vector[n]) for n in ("root_key", "data_key", "nonce"))
    wrapped, aad = bytes.fromhex(vector["wrapped_key"]), bytes.fromhex(vector["aad"])
    context: dict[str, str] = vector["context"]
    root_key = StaticRootKey(raw)
    assert wrapped[0] == vector["format"]
    assert AESGCM(raw).decrypt(nonce, wrapped[13:], aad) == data_key
    assert root_key.unwrap(wrapped, context) == data_key
    if vector["format"] == 1:
        assert context == KeyWrapper.legacy_context(int(context["key_id"]), context["scope"])
        assert aad == b"sqlalchemy-envelope/data-key/v1\x00" + json.dumps(
            context, sort_keys=True, separators=(",", ":")
        ).encode("ascii")
        return
    assert aad == b"sqlalchemy-envelope/data-key/v2\x00" + rootkey_module.canonical_json(context)
    if not vector["name"].startswith("escaping"):  # that scope is no valid name
        expected = KeyWrapper.context(
            int(context["key_id"]), context["scope"], int(context["version"])
        )
        assert expected == context
    monkeypatch.setattr(rootkey_module, "new_nonce", lambda: nonce)
    assert root_key.wrap(data_key, context) == wrapped
    for changed in ({**context, "version": "4"}, {**context, "kind": "other"}):
        with pytest.raises(DecryptionError):
            root_key.unwrap(wrapped, changed)


def test_a_wrap_context_must_be_unicode() -> None:
    with pytest.raises(ConfigurationError, match="valid Unicode"):
        StaticRootKey(bytes(32)).wrap(bytes(32), {"key_id": "1", "scope": "\ud800"})


@pytest.mark.parametrize("vector", format_vectors("root_keys"), ids=lambda v: v["kind"])
def test_root_key_known_answer(vector: dict[str, Any], tmp_path: Path) -> None:
    """FORMAT.md's root keys: PBKDF2 of UTF-8 seed and salt, a key file's
    base64, and the fingerprint and description recorded beside each key."""
    raw = bytes.fromhex(vector["root_key"])
    if vector["kind"] == "pbkdf2":
        kdf = PBKDF2HMAC(hashes.SHA256(), 32, vector["salt"].encode("utf-8"), vector["iterations"])
        assert kdf.derive(vector["seed"].encode("utf-8")) == raw
        root_key: StaticRootKey | PBKDF2RootKey = PBKDF2RootKey(
            vector["seed"], vector["salt"], iterations=vector["iterations"]
        )
    else:
        path = tmp_path / "root.key"
        path.write_text(vector["text"], "ascii")
        path.chmod(0o600)
        root_key = StaticRootKey.from_file(path)
    fingerprint = hmac.new(raw, b"sqlalchemy-envelope/root-key-fingerprint/v1", "sha256")
    assert root_key.fingerprint == vector["fingerprint"] == fingerprint.digest()[:8].hex()
    assert root_key.description == vector["description"]
    wrapped = StaticRootKey(raw).wrap(bytes(32), {"key_id": "1", "scope": "s"})
    assert root_key.unwrap(wrapped, {"key_id": "1", "scope": "s"}) == bytes(32)


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
            "ENVELOPE_ROOT_SEED": STRONG_SEED,
            "ENVELOPE_ROOT_SALT": "t",
            "ENVELOPE_PBKDF2_ITERATIONS": "654321",
        }
    )
    assert isinstance(pbkdf2, PBKDF2RootKey) and pbkdf2.iterations == 654_321
    assert isinstance(
        root_key_from_env({"ENVELOPE_ROOT_SEED": STRONG_SEED, "ENVELOPE_ROOT_SALT": "t"}),
        PBKDF2RootKey,
    )
    legacy = {
        "ENVELOPE_ROOT_SEED": WEAK_SEED,
        "ENVELOPE_ROOT_SALT": "t",
        "ENVELOPE_PBKDF2_ITERATIONS": "12345",
    }
    for allow in ("1", "true", "yes"):
        key = root_key_from_env({**legacy, "ENVELOPE_PBKDF2_ALLOW_WEAK": allow})
        assert isinstance(key, PBKDF2RootKey) and key.iterations == 12_345

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
                "ENVELOPE_ROOT_SEED": STRONG_SEED,
                "ENVELOPE_ROOT_SALT": "t",
                "ENVELOPE_PBKDF2_ITERATIONS": "many",
            },
            "whole number",
        ),
        (
            {
                "ENVELOPE_ROOT_SEED": STRONG_SEED,
                "ENVELOPE_ROOT_SALT": "t",
                "ENVELOPE_PBKDF2_ITERATIONS": "100000",
            },
            "at least 600,000.*ENVELOPE_PBKDF2_ALLOW_WEAK=1",
        ),
        ({**legacy, "ENVELOPE_PBKDF2_ITERATIONS": "600000"}, "seed looks weak"),
        (
            {
                "ENVELOPE_ROOT_SEED": STRONG_SEED,
                "ENVELOPE_ROOT_SALT": "t",
                "ENVELOPE_PBKDF2_ITERATIONS": "4294967296",
            },
            "at most 100,000,000",
        ),
        (legacy, "at least 600,000"),
        ({**legacy, "ENVELOPE_PBKDF2_ALLOW_WEAK": "0"}, "at least 600,000"),
        ({**legacy, "ENVELOPE_PBKDF2_ALLOW_WEAK": "maybe"}, "ENVELOPE_PBKDF2_ALLOW_WEAK must be"),
        (
            {**legacy, "ENVELOPE_PBKDF2_ITERATIONS": "1000", "ENVELOPE_PBKDF2_ALLOW_WEAK": "1"},
            "at least 10,000",
        ),
    ]
    for environ, message in bad:
        with pytest.raises(ConfigurationError, match=message) as info:
            root_key_from_env(environ)
        for value in environ.values():
            if len(value) > 5:
                assert value not in str(info.value)


def _key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def _refused(path: Path, message: str, **options: bool) -> str:
    """from_file's and the environment's refusal of ``path``, as text."""
    with pytest.raises(ConfigurationError, match=message) as info:
        StaticRootKey.from_file(path, **options)
    environ = {"ENVELOPE_ROOT_KEY_FILE": str(path)}
    if options.get("raw"):
        environ["ENVELOPE_ROOT_KEY_FILE_RAW"] = "1"
    with pytest.raises(ConfigurationError, match=message):
        root_key_from_env(environ)
    return "".join(traceback.format_exception(info.value))


def test_root_key_file(tmp_path: Path) -> None:
    """The documented file: the base64 of 32 bytes on one line, readable by
    its owner only."""
    raw = os.urandom(32)
    expected = StaticRootKey(raw).fingerprint
    as_text = _key_file(tmp_path / "root-key.b64", base64.b64encode(raw) + b"\n")
    assert StaticRootKey.from_file(as_text).fingerprint == expected
    from_env = root_key_from_env({"ENVELOPE_ROOT_KEY_FILE": str(as_text)})
    assert from_env.fingerprint == expected

    for mode in (0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o606):
        as_text.chmod(mode)
        _refused(as_text, f"accessible to other users .mode 0{mode:o}.: run `chmod 600")
    as_text.chmod(0o400)
    assert StaticRootKey.from_file(as_text).fingerprint == expected

    short = _key_file(tmp_path / "short", base64.b64encode(raw[:16]))
    text = _refused(short, "not the base64 of 32 bytes")
    assert base64.b64encode(raw[:16]).decode() not in text
    _refused(tmp_path / "missing", "cannot read root key file")


def test_a_root_key_file_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """Checking a path and then reading it follows a link twice, and the link
    can be flipped in between (to a file anyone can write): a link is refused,
    whatever it points to, and the file's checks and read use one descriptor."""
    raw = os.urandom(32)
    target = _key_file(tmp_path / "root.key", base64.b64encode(raw) + b"\n")
    world_writable = _key_file(tmp_path / "planted.key", base64.b64encode(os.urandom(32)), 0o666)
    link = tmp_path / "current.key"
    for points_to in (target, world_writable, tmp_path / "nothing"):
        link.unlink(missing_ok=True)
        link.symlink_to(points_to)
        _refused(link, "is a symbolic link, refused whatever it points to: name the file itself")
    assert StaticRootKey.from_file(target).fingerprint == StaticRootKey(raw).fingerprint
    # A link in a directory component is the directory's business, not the file's.
    (tmp_path / "secrets").symlink_to(tmp_path)
    assert StaticRootKey.from_file(tmp_path / "secrets" / "root.key").fingerprint == (
        StaticRootKey(raw).fingerprint
    )


def test_a_root_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """Mode 0600 protects a file from everyone but its owner; if the owner
    is another user, that user chose the key (the suite runs as root, which
    may chown)."""
    raw = os.urandom(32)
    path = _key_file(tmp_path / "root.key", base64.b64encode(raw) + b"\n")
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(path, nobody, -1)
    _refused(path, f"belongs to user id {nobody}, not to this process's user .0. or root")
    os.chown(path, os.geteuid(), -1)
    assert StaticRootKey.from_file(path).fingerprint == StaticRootKey(raw).fingerprint


def test_a_root_key_file_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    _refused(tmp_path / "dir", "is not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # opening must not wait for a writer
    _refused(fifo, "is not a regular file")
    big = _key_file(tmp_path / "big", base64.b64encode(os.urandom(32)) + b"\n" * 5000)
    _refused(big, "too large")


def test_a_password_in_a_root_key_file_is_not_a_key(tmp_path: Path) -> None:
    """32 bytes are not 32 random bytes: a 31-character password and its
    newline used to become an AES key. Only base64 is read, unless raw bytes
    are asked for explicitly."""
    for password in (b"Winter2024!Winter2024!Winter202\n", b"W" * 32 + b"\n"):
        path = _key_file(tmp_path / "root.key", password)
        text = _refused(path, "not the base64 of 32 bytes")
        assert password.decode().strip() not in text
        if len(password) == 32:  # what earlier versions read as a key: how to read on
            assert "set ENVELOPE_ROOT_KEY_FILE_RAW=1 (raw=True)" in text
            assert "if they are a password, rewrap to a generated key" in text
        else:
            assert "(a password is not a key): generate one with `(umask 077; python" in text
    # A file of 32 raw bytes (accepted by earlier versions) says how to keep it working.
    raw = os.urandom(32)
    path = _key_file(tmp_path / "root.key", raw)
    text = _refused(path, "Earlier versions took its 32 bytes as a raw key")
    assert f"(umask 077; base64 {path} > {path}.b64)" in text
    expected = StaticRootKey(raw).fingerprint
    assert StaticRootKey.from_file(path, raw=True).fingerprint == expected
    environ = {"ENVELOPE_ROOT_KEY_FILE": str(path), "ENVELOPE_ROOT_KEY_FILE_RAW": "1"}
    assert root_key_from_env(environ).fingerprint == expected
    converted = _key_file(tmp_path / "root.key.b64", base64.b64encode(raw) + b"\n")
    assert StaticRootKey.from_file(converted).fingerprint == expected
    # Raw means exactly 32 bytes: base64 text, or a raw key with a newline, is refused.
    for content in (base64.b64encode(raw), raw + b"\n"):
        _refused(_key_file(path, content), "does not hold exactly 32 bytes", raw=True)
