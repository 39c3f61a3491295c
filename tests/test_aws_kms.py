"""The AWS KMS root key, against moto's KMS in server mode on loopback: init,
rotation, moving between providers, refusals, and a KMS that goes away."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, KMSServer, encrypted_table
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    SCOPE_OPTION,
    AWSKMSRootKey,
    ConfigurationError,
    KeyRegistry,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
    StaticRootKey,
    WrongRootKeyError,
    root_key_from_env,
    session_scope,
)


def _counted(root_key: AWSKMSRootKey) -> Counter[str]:
    """Count the KMS calls a provider makes, by operation, on its real client."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    root_key._client.meta.events.register("before-call.kms", count)
    return calls


def _bodies(engine: sa.Engine, table: sa.Table) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars())


def test_kms_wraps_data_keys_and_is_called_only_for_key_events(
    kms: KMSServer, engine: sa.Engine
) -> None:
    arn = kms.create_key()
    root_key = AWSKMSRootKey(arn)
    calls = _counted(root_key)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(300)])
    assert _bodies(engine, table) == [f"note {i}" for i in range(300)]
    # An ARN needs no DescribeKey: one Encrypt per key created (the default
    # scope's data key, the blind-index key and the key events' chain
    # secret), nothing per value.
    assert calls == {"Encrypt": 3}

    registry.rotate()
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 300 + i, "body": "later"} for i in range(100)])
    # Before inserting a key the registry proves, once, that its KMS key
    # unwraps a stored one (a fingerprint only names the KMS key).
    assert calls == {"Encrypt": 4, "Decrypt": 1}
    registry.rotate()
    assert calls == {"Encrypt": 5, "Decrypt": 1}
    status = registry.status()
    assert status.root_key_fingerprint == "aws-kms:" + arn.rpartition("/")[2]
    assert status.root_key_description == f"aws-kms {arn}"
    assert status.root_key_available and status.root_key_problem is None

    # A second process loads each key once through Decrypt, then never again.
    other_key = AWSKMSRootKey(arn)
    other_calls = _counted(other_key)
    other = KeyRegistry(sa.create_engine(engine.url), other_key, attach=False)
    with other.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.body).order_by(table.c.id),
            execution_options={"envelope_registry": other},
        ).scalars()
        assert list(rows) == [f"note {i}" for i in range(300)] + ["later"] * 100
    assert other_calls == {"Decrypt": 2}

    # The wrapped keys are KMS ciphertexts bound to the key id, kind, scope
    # and version.
    with engine.connect() as conn:
        key_id, scope, wrapped = conn.execute(
            sa.text(
                "SELECT id, scope, wrapped_key FROM data_keys "
                "WHERE version = 2 AND scope = 'default'"
            )
        ).one()
    client = kms.client()
    context = {
        "key_id": str(key_id),
        "kind": "data",
        "scope": scope,
        "version": "2",
        "purpose": "sqlalchemy-envelope/data-key",
    }
    assert (
        len(client.decrypt(CiphertextBlob=bytes(wrapped), EncryptionContext=context)["Plaintext"])
        == 32
    )
    for changed in ({"scope": "other"}, {"version": "3"}, {"kind": "index"}):
        with pytest.raises(client.exceptions.InvalidCiphertextException):
            client.decrypt(CiphertextBlob=bytes(wrapped), EncryptionContext={**context, **changed})
    other.engine.dispose()


def test_kms_keys_wrapped_before_context_version_2_still_unwrap(
    kms: KMSServer, engine: sa.Engine
) -> None:
    """Earlier releases sent only the key id and scope as the encryption
    context: such keys keep working, and rewrap moves them to version 2."""
    arn = kms.create_key()
    registry = KeyRegistry(engine, AWSKMSRootKey(arn))
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(3)])
    registry.close()
    client = kms.client()
    with engine.begin() as conn:  # the database as an earlier release left it
        for key_id, scope, version, wrapped in conn.execute(
            sa.text("SELECT id, scope, version, wrapped_key FROM data_keys")
        ).all():
            purpose = {"purpose": "sqlalchemy-envelope/data-key"}
            kind = "index" if scope.startswith("~") else "data"
            current = {"key_id": str(key_id), "kind": kind, "scope": scope, "version": str(version)}
            data_key = client.decrypt(
                CiphertextBlob=bytes(wrapped), EncryptionContext={**current, **purpose}
            )["Plaintext"]
            legacy = {"key_id": str(key_id), "scope": scope, **purpose}
            blob = client.encrypt(KeyId=arn, Plaintext=data_key, EncryptionContext=legacy)
            conn.execute(
                sa.text("UPDATE data_keys SET wrapped_key = :w WHERE id = :i"),
                {"w": blob["CiphertextBlob"], "i": key_id},
            )

    root_key = AWSKMSRootKey(arn)
    calls = _counted(root_key)
    reader = KeyRegistry(engine, root_key)
    assert _bodies(engine, table) == ["note 0", "note 1", "note 2"]
    assert calls == {"Decrypt": 2}  # version 2 refused, version 1 unwraps
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 3, "body": "note 3"})
    assert reader.rewrap(StaticRootKey(os.urandom(32))) == 2
    assert _bodies(engine, table) == ["note 0", "note 1", "note 2", "note 3"]
    reader.close()


def test_rewrap_from_a_static_key_to_kms_and_back(kms: KMSServer, engine: sa.Engine) -> None:
    static = StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, static)
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "body": "one"}, {"id": 2, "body": "two"}])
    registry.rotate()
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 3, "body": "three"})

    arn = kms.create_key()
    assert registry.rewrap(AWSKMSRootKey(arn)) == 3
    with engine.connect() as conn:
        fingerprints = set(
            conn.execute(sa.text("SELECT root_key_fingerprint FROM data_keys")).scalars()
        )
    assert fingerprints == {"aws-kms:" + arn.rpartition("/")[2]}
    # The static key is no longer accepted; a fresh registry on KMS reads everything.
    with pytest.raises(WrongRootKeyError):
        KeyRegistry(engine, static, attach=False).status()
    fresh = KeyRegistry(sa.create_engine(engine.url), AWSKMSRootKey(arn))
    assert _bodies(fresh.engine, table) == ["one", "two", "three"]
    fresh.engine.dispose()

    back = StaticRootKey(os.urandom(32))
    assert registry.rewrap(back) == 3
    kms.stop()  # KMS is no longer needed at all
    fresh = KeyRegistry(sa.create_engine(engine.url), back)
    assert _bodies(fresh.engine, table) == ["one", "two", "three"]
    fresh.engine.dispose()


def test_rewrap_to_an_unreachable_kms_changes_nothing(kms: KMSServer, engine: sa.Engine) -> None:
    static = StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, static)
    registry.init()
    target = AWSKMSRootKey(kms.create_key(), max_attempts=1)
    kms.stop()
    with pytest.raises(RootKeyUnavailableError, match="could not reach KMS"):
        registry.rewrap(target)
    with engine.connect() as conn:
        fingerprints = set(
            conn.execute(sa.text("SELECT root_key_fingerprint FROM data_keys")).scalars()
        )
    assert fingerprints == {static.fingerprint}
    assert KeyRegistry(engine, static, attach=False).status().active_version == 1


def test_a_wrong_kms_key_is_refused(kms: KMSServer, engine: sa.Engine) -> None:
    right, wrong = kms.create_key(), kms.create_key()
    KeyRegistry(engine, AWSKMSRootKey(right)).init()
    with pytest.raises(WrongRootKeyError, match="aws-kms:") as info:
        KeyRegistry(engine, AWSKMSRootKey(wrong), attach=False).init()
    assert "Nothing was written" in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM data_keys")).scalar() == 2

    # The same key named by alias resolves (DescribeKey, once) to the same fingerprint.
    kms.client().create_alias(AliasName="alias/app", TargetKeyId=right)
    by_alias = AWSKMSRootKey("alias/app")
    assert by_alias.fingerprint == AWSKMSRootKey(right).fingerprint
    assert KeyRegistry(engine, by_alias, attach=False).status().active_version == 1


def test_a_swapped_wrapped_key_is_detected(kms: KMSServer, engine: sa.Engine) -> None:
    registry = KeyRegistry(engine, AWSKMSRootKey(kms.create_key()))
    registry.init()
    registry.rotate()
    with engine.begin() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, wrapped_key FROM data_keys WHERE scope = 'default' ORDER BY version"
            )
        ).all()
        (a, wrapped_a), (b, wrapped_b) = rows  # the retired key and the active one
        update = sa.text("UPDATE data_keys SET wrapped_key = :w WHERE id = :id")
        conn.execute(update, [{"w": wrapped_b, "id": a}, {"w": wrapped_a, "id": b}])
    fresh = KeyRegistry(engine, AWSKMSRootKey(registry.root_key.key_arn), attach=False)  # type: ignore[attr-defined]
    with pytest.raises(WrongRootKeyError, match="was altered"):
        fresh.encrypt(b"x", "notes.body")


def test_access_denied_and_missing_credentials_are_typed(
    kms: KMSServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deny = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Deny", "Principal": "*", "Action": "kms:DescribeKey", "Resource": "*"}
            ],
        }
    )
    key_id = kms.create_key(policy=deny).rpartition("/")[2]
    with pytest.raises(RootKeyAccessDeniedError, match=r"AccessDeniedException.*kms:DescribeKey"):
        KeyRegistry(engine, AWSKMSRootKey(key_id), attach=False).init()

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RootKeyAccessDeniedError, match="no AWS credentials"):
        KeyRegistry(engine, AWSKMSRootKey(kms.create_key()), attach=False).init()
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table("data_keys") or (
            conn.execute(sa.text("SELECT count(*) FROM data_keys")).scalar() == 0
        )


def test_cached_keys_keep_working_while_kms_is_down(
    kms: KMSServer, engine: sa.Engine, clocks: Clocks
) -> None:
    arn = kms.create_key()
    registry = KeyRegistry(
        engine,
        AWSKMSRootKey(arn, max_attempts=1),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
        cache_max_age=60,
    )
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "body": "before"})

    kms.stop()
    clocks.advance(600)  # past cache_max_age: entries are re-read, not re-unwrapped
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 2, "body": "during"})
    assert _bodies(engine, table) == ["before", "during"]
    status = registry.status()
    assert not status.root_key_available
    assert status.cached_keys >= 1
    assert "could not reach KMS" in (status.root_key_problem or "")
    assert status.to_dict()["root_key_available"] is False

    # What needs KMS fails with a typed error and changes nothing.
    with pytest.raises(RootKeyUnavailableError, match="retry later"):
        registry.rotate()
    assert registry.status().active_version == 1
    cold = KeyRegistry(engine, AWSKMSRootKey(arn, max_attempts=1), attach=False)
    with pytest.raises(RootKeyUnavailableError):
        cold.decrypt(registry.encrypt(b"x", "notes.body"), "notes.body")


def test_policy_rotation_waits_for_kms(kms: KMSServer, engine: sa.Engine, clocks: Clocks) -> None:
    from datetime import timedelta

    registry = KeyRegistry(
        engine,
        AWSKMSRootKey(kms.create_key(), max_attempts=1),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
        rotate_after=timedelta(days=1),
        cache_max_age=60,
    )
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    kms.stop()
    clocks.advance(timedelta(days=2))  # due, but KMS cannot wrap a successor
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "body": "still written"})
    assert _bodies(engine, table) == ["still written"]
    assert registry.status().active_version == 1


def test_kms_from_env_and_the_cli(kms: KMSServer, db_url: str) -> None:
    arn = kms.create_key()
    provider = root_key_from_env(
        {"ENVELOPE_AWS_KMS_KEY_ID": arn, "ENVELOPE_AWS_REGION": "us-east-1"}
    )
    assert isinstance(provider, AWSKMSRootKey) and provider.key_arn == arn
    with pytest.raises(ConfigurationError, match="set exactly one"):
        root_key_from_env({"ENVELOPE_AWS_KMS_KEY_ID": arn, "ENVELOPE_ROOT_KEY": "x"})

    static = base64.b64encode(os.urandom(32)).decode()
    env = {**kms.env, "PATH": os.environ.get("PATH", ""), "DATABASE_URL": db_url}

    def cli(*args: str, code: int = 0, **extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_envelope", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert static not in result.stdout + result.stderr
        return result.stdout + result.stderr

    cli("init", ENVELOPE_ROOT_KEY=static)
    out = cli("rewrap", ENVELOPE_ROOT_KEY=static, ENVELOPE_NEW_AWS_KMS_KEY_ID=arn)
    assert "aws-kms:" in out
    status = json.loads(cli("--json", "status", ENVELOPE_AWS_KMS_KEY_ID=arn))
    assert status["root_key_description"] == f"aws-kms {arn}"
    assert status["root_key_available"] is True
    cli("rewrap", ENVELOPE_AWS_KMS_KEY_ID=arn, ENVELOPE_NEW_ROOT_KEY=static)
    assert json.loads(cli("--json", "status", ENVELOPE_ROOT_KEY=static))["active_version"] == 1
    out = cli("status", ENVELOPE_AWS_KMS_KEY_ID=arn, code=1)
    assert "WrongRootKey" in out or "were wrapped by root key" in out


def _sent(root_key: AWSKMSRootKey) -> list[str]:
    """Every HTTP request the provider's real client sends, retries included."""
    sent: list[str] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(request.url)

    root_key._client.meta.events.register("before-send.kms", record)
    return sent


@pytest.mark.parametrize("attempts", [1, 3])
def test_max_attempts_counts_attempts(kms: KMSServer, attempts: int) -> None:
    """``max_attempts=N`` makes N requests in all to a KMS that is down, the
    first one included, then raises the documented error."""
    root_key = AWSKMSRootKey(kms.create_key(), max_attempts=attempts)
    sent = _sent(root_key)
    context = {"key_id": "1", "scope": "default"}
    wrapped = root_key.wrap(os.urandom(32), context)
    assert len(sent) == 1  # reachable: one request, no retry

    kms.stop()
    sent.clear()
    with pytest.raises(RootKeyUnavailableError, match="could not reach KMS"):
        root_key.unwrap(wrapped, context)
    assert len(sent) == attempts


def test_three_attempts_by_default(kms: KMSServer) -> None:
    """docs/root-keys.md's "3 attempts": the default client makes three requests."""
    root_key = AWSKMSRootKey(kms.create_key())
    sent = _sent(root_key)
    kms.stop()
    with pytest.raises(RootKeyUnavailableError):
        root_key.check()
    assert len(sent) == 3


def test_a_wrong_kms_key_writing_for_a_new_tenant_writes_nothing(
    kms: KMSServer, engine: sa.Engine
) -> None:
    right = KeyRegistry(engine, AWSKMSRootKey(kms.create_key()))
    right.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "body": "kept"})

    def key_rows() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT * FROM data_keys ORDER BY id")).all())

    before = key_rows()
    # Another process, configured with another KMS key, first writes for a tenant with no key.
    wrong_engine = sa.create_engine(engine.url)
    wrong = KeyRegistry(wrong_engine, AWSKMSRootKey(kms.create_key()))
    for attempt in range(2):
        with wrong_engine.connect() as conn, pytest.raises(WrongRootKeyError, match="aws-kms:"):
            conn.execute(
                table.insert(),
                {"id": 10 + attempt, "body": "lost"},
                execution_options={SCOPE_OPTION: "tenant"},
            )
        with (
            Session(wrong_engine) as session,
            session_scope(session, "tenant"),
            pytest.raises(WrongRootKeyError, match="Nothing was written"),
        ):
            session.execute(table.insert(), {"id": 20 + attempt, "body": "lost"})
            session.commit()
    assert key_rows() == before
    assert _bodies(engine, table) == ["kept"]

    # The correctly configured application carries on.
    assert right.init().version == 1
    assert right.rotate().version == 2
    assert right.status().active_version == 2
    for attempt in range(2):
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                {"id": 30 + attempt, "body": "tenant"},
                execution_options={SCOPE_OPTION: "tenant"},
            )
        with Session(engine) as session:
            session.execute(table.insert(), {"id": 40 + attempt, "body": "default"})
            session.commit()
    assert _bodies(engine, table) == ["kept", "tenant", "tenant", "default", "default"]
    assert right.status("tenant").active_version == 1
    wrong.close()
    wrong_engine.dispose()
    right.close()


ROOT_KEYS_MD = Path(__file__).resolve().parent.parent / "docs" / "root-keys.md"
DOCUMENTED_KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-..."


def _documented_policy() -> dict[str, Any]:
    """The IAM policy docs/root-keys.md's AWS KMS section gives, as written."""
    section = ROOT_KEYS_MD.read_text().split("## AWS KMS", 1)[1]
    return dict(json.loads(section.split("```json\n", 1)[1].split("```", 1)[0]))


def _allows(policy: dict[str, Any], action: str, context: dict[str, str] | None) -> bool:
    """Whether ``policy`` allows a request on the application's key, by AWS's
    documented evaluation of what the documented policy uses: a request is
    allowed when an Allow statement names its action and every condition
    holds, and no Deny applies. ``StringEquals`` on
    ``kms:EncryptionContext:<k>`` holds when the request's encryption context
    has ``k`` with that value; a request without that key (DescribeKey has no
    encryption context at all) does not match. Anything else in the policy
    fails the test rather than being guessed."""
    allowed = False
    for statement in policy["Statement"]:
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        assert statement["Resource"] == DOCUMENTED_KEY_ARN  # the application's key, no other
        actions = statement["Action"]
        if action not in ([actions] if isinstance(actions, str) else actions):
            continue
        holds = True
        for operator, conditions in statement.get("Condition", {}).items():
            assert operator == "StringEquals", f"unsupported condition operator {operator}"
            for key, expected in conditions.items():
                assert key.startswith("kms:EncryptionContext:"), f"unsupported key {key}"
                given = (context or {}).get(key.removeprefix("kms:EncryptionContext:"))
                holds &= given in ([expected] if isinstance(expected, str) else expected)
        if holds and statement["Effect"] == "Deny":
            return False
        allowed |= holds and statement["Effect"] == "Allow"
    return allowed


def _requests(root_key: AWSKMSRootKey) -> list[tuple[str, dict[str, str] | None]]:
    """Every KMS operation a provider's real client asks for, with the
    encryption context it sends."""
    sent: list[tuple[str, dict[str, str] | None]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        sent.append((model.name, params.get("EncryptionContext")))

    root_key._client.meta.events.register("provide-client-params.kms", record)
    return sent


def test_the_documented_policy_allows_exactly_what_each_operation_asks_of_kms(
    kms: KMSServer, db_url: str
) -> None:
    """Each operation, in a process of its own (nothing cached), against
    moto's KMS: the KMS actions it asks for are docs/root-keys.md's table, and
    its IAM policy allows every request, the availability probe and
    DescribeKey (a key named by alias) included. moto evaluates neither IAM
    conditions nor KMS resource ARNs (its IAM check ignores the encryption
    context and gives KMS requests the resource "*"; its key policies honour
    only a Deny of DescribeKey), so the policy is evaluated here, by AWS's
    documented rules, against the requests the registry really made; moto
    does enforce that Decrypt gets the context Encrypt was given."""
    arn = kms.create_key()
    kms.client().create_alias(AliasName="alias/app", TargetKeyId=arn)
    table = encrypted_table("notes")
    policy = _documented_policy()
    asked: dict[str, set[str]] = {}
    static = StaticRootKey(os.urandom(32))

    def operation(name: str, run: Any, key_id: str = arn) -> None:
        engine = sa.create_engine(db_url)
        root_key = AWSKMSRootKey(key_id)
        sent = _requests(root_key)
        run(root_key, engine)
        engine.dispose()
        asked[name] = {action for action, _ in sent}
        for action, context in sent:
            assert _allows(policy, f"kms:{action}", context), (name, action, context)

    def registry_op(method: str, *args: Any) -> Any:
        def run(root_key: AWSKMSRootKey, engine: sa.Engine) -> None:
            registry = KeyRegistry(engine, root_key)
            getattr(registry, method)(*args)
            registry.close()

        return run

    def write(scope: str | None) -> Any:
        def run(root_key: AWSKMSRootKey, engine: sa.Engine) -> None:
            registry = KeyRegistry(engine, root_key)
            options = {} if scope is None else {SCOPE_OPTION: scope}
            for attempt in range(2):
                with engine.begin() as conn:
                    conn.execute(
                        table.insert(),
                        {"id": len(asked) * 10 + attempt, "body": "x"},
                        execution_options=options,
                    )
            registry.close()

        return run

    def read(root_key: AWSKMSRootKey, engine: sa.Engine) -> None:
        registry = KeyRegistry(engine, root_key)
        for _ in range(2):
            with Session(engine) as session:
                assert session.execute(sa.select(table.c.body)).scalars().all()
        registry.close()

    def status(root_key: AWSKMSRootKey, engine: sa.Engine) -> None:
        registry = KeyRegistry(engine, root_key)
        report = registry.status()
        assert report.root_key_available and report.root_key_problem is None
        registry.close()

    def rewrap_to_kms(root_key: AWSKMSRootKey, engine: sa.Engine) -> None:
        registry = KeyRegistry(engine, static)
        registry.rewrap(root_key)
        registry.close()

    operation("init", registry_op("init"))
    setup = sa.create_engine(db_url)
    table.metadata.create_all(setup)
    setup.dispose()
    operation("init again", registry_op("init"))
    operation("write", write(None))
    operation("read", read)
    operation("rotate", registry_op("rotate"))
    operation("create_scope", registry_op("create_scope", "tenant-a"))
    operation("new tenant's first write", write("tenant-b"))
    operation("status", status)
    operation("status, key named by alias", status, key_id="alias/app")
    operation("rewrap away from KMS", registry_op("rewrap", static))
    operation("rewrap to KMS", rewrap_to_kms)
    operation("read after the rewraps", read)
    # docs/root-keys.md's table.
    assert asked == {
        "init": {"Encrypt"},
        "init again": {"Decrypt"},
        "write": {"Decrypt"},
        "read": {"Decrypt"},
        "rotate": {"Encrypt", "Decrypt"},
        "create_scope": {"Encrypt", "Decrypt"},
        "new tenant's first write": {"Encrypt", "Decrypt"},
        "status": {"Encrypt", "Decrypt"},
        "status, key named by alias": {"DescribeKey", "Encrypt", "Decrypt"},
        "rewrap away from KMS": {"Decrypt"},
        "rewrap to KMS": {"Encrypt", "Decrypt"},
        "read after the rewraps": {"Decrypt"},
    }
