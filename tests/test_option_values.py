"""A number a setting cannot hold (NaN, infinity, beyond a timedelta, not a
number at all) is a configuration error naming the setting, wherever it is
given: to KeyRegistry, AsyncKeyRegistry, AWSKMSRootKey, or the command's
--cache-max-age (exit 2, not a crash)."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import KMSServer, async_engine_for

from sqlalchemy_envelope import AsyncKeyRegistry, ConfigurationError, KeyRegistry, StaticRootKey
from sqlalchemy_envelope.cli import main
from sqlalchemy_envelope.keys.aws_kms import AWSKMSRootKey

NOT_SECONDS: list[Any] = [
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    timedelta.max.total_seconds(),
    0,
    -1,
    "soon",
    None,
    True,
]
BAD_OPTIONS: list[tuple[str, Any]] = [
    *(("cache_max_age", value) for value in NOT_SECONDS),
    ("rotate_after", 3600),
    ("rotate_after", timedelta(0)),
    ("max_encryptions", 1e9),
    ("max_encryptions", True),
    ("max_encryptions", float("nan")),
    ("max_cached_keys", 0),
    ("max_cached_keys", -1),
    ("max_cached_keys", 2.5),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_a_registry_refuses_an_impossible_setting(
    engine: sa.Engine, root_key: StaticRootKey, name: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=name):
        KeyRegistry(engine, root_key, **{name: value})

    async def construct() -> None:
        async_engine = async_engine_for(engine.url.render_as_string(hide_password=False))
        try:
            with pytest.raises(ConfigurationError, match=name):
                AsyncKeyRegistry(async_engine, root_key, **{name: value})
        finally:
            await async_engine.dispose()

    asyncio.run(construct())


def test_the_longest_cache_max_age_is_reported(engine: sa.Engine, root_key: StaticRootKey) -> None:
    """The longest accepted value works through status, which reports it as a timedelta."""
    longest = timedelta(days=999_999_999)
    for given in (longest, longest.total_seconds()):
        registry = KeyRegistry(engine, root_key, cache_max_age=given)
        registry.init()
        assert registry.cache_max_age == longest
        assert registry.status().cache_max_age == longest
        assert registry.maintenance().destroyable == ()
        registry.close()


@pytest.mark.parametrize(
    "option",
    [
        {"connect_timeout": float("nan")},
        {"read_timeout": float("inf")},
        {"connect_timeout": -1},
        {"connect_timeout": 0},
        {"max_attempts": 0},
        {"max_attempts": 1.5},
    ],
)
def test_a_kms_root_key_refuses_an_impossible_setting(
    kms: KMSServer, option: dict[str, Any]
) -> None:
    """Not taken by botocore and failed at the first call, where an
    impossible timeout read as KMS being unreachable."""
    with pytest.raises(ConfigurationError, match=next(iter(option))):
        AWSKMSRootKey(kms.create_key(), **option)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "0", "86400000000000"])
def test_the_command_refuses_an_impossible_cache_max_age(db_url: str, value: str) -> None:
    env = {"DATABASE_URL": db_url, "ENVELOPE_ROOT_KEY": base64.b64encode(os.urandom(32)).decode()}
    runner = CliRunner()
    assert runner.invoke(main, ["init"], env=env).exit_code == 0
    for args in (
        ["--cache-max-age", value, "status"],
        ["destroy", "1", f"--cache-max-age={value}"],
    ):
        result = runner.invoke(main, args, env=env, prog_name="sqlalchemy-envelope")
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.splitlines() == [
            f"configuration error: cache_max_age must be a positive, finite number of seconds "
            f"or a timedelta, at most 999999999 days, not {float(value)!r} (the default is 60)"
        ]
    result = runner.invoke(main, ["--cache-max-age", "0.5", "status"], env=env)
    assert result.exit_code == 0, result.output
