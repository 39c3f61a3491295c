"""The ``sqlalchemy-envelope`` command (also ``python -m sqlalchemy_envelope``).

The database URL comes from ``--url`` or ``DATABASE_URL``; the root key from
the ``ENVELOPE_*`` variables (``ENVELOPE_NEW_*`` for ``rewrap``). It works by
reflection; ``--models`` (``ENVELOPE_MODELS``, or the ``sqlalchemy_envelope.models``
entry points) imports the application's models, which give the columns named
TABLE.COLUMN their definitions (context, deterministic, bind_scope...). Output
is for people by default and JSON with ``--json``; nothing secret is ever
printed. The options ``--url``, ``--scope``, ``--table``, ``--cache-max-age``,
``--models`` and ``--json`` go before or after the command; after it, they win.

Exit codes: 0 done; 1 the library refused (wrong root key, a value that does
not decrypt...); 2 bad usage or configuration; 3 refused by a safety guard
(an illegal key transition, a key still in use); 4 a re-encrypt or decrypt
that finished with values left behind (the report names their rows and why);
5 the database could not be reached; 6 the database refused a statement (one
line: the command and the driver's reason, never the statement's values); 7 a
confirmation was declined (nothing was done).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

try:
    import click
except ImportError:  # pragma: no cover - exercised only without the extra
    sys.exit(
        "the sqlalchemy-envelope command needs its extra: pip install 'sqlalchemy-envelope[cli]'"
    )

import sqlalchemy as sa

from .errors import (
    ConfigurationError,
    EnvelopeError,
    KeyInUseError,
    KeyStateError,
    StatementFailedError,
    UnknownKeyError,
    database_reason,
)
from .keys.rootkey import root_key_from_env
from .keys.scopes import check_key_scope, is_index_scope, scope_of_index
from .ops.census import ColumnCensus
from .ops.migrate import MigrationReport
from .ops.shards import Shard
from .ops.status import KeyInfo, RegistryStatus
from .registry import DEFAULT_SCOPE, KeyRegistry

__all__ = ["main"]

EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_LEFT_BEHIND, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
EXIT_DATABASE, EXIT_DECLINED = 6, 7


class _Unreachable(Exception):
    """The database refused or failed the connection; the text names the
    driver's cause, without the URL's password."""


MODELS_ENTRY_POINTS = "sqlalchemy_envelope.models"


class Context:
    def __init__(
        self,
        url: str | None,
        scope: str,
        table: str,
        cache_max_age: float,
        models: tuple[str, ...],
        as_json: bool,
    ) -> None:
        self.url = url
        self.scope = scope
        self.table = table
        self.cache_max_age = cache_max_age
        self.models = models
        self.as_json = as_json

    @property
    def scope_filter(self) -> str | None:
        return None if self.scope == DEFAULT_SCOPE else self.scope

    def registry(self, *, keys: bool = False) -> KeyRegistry:
        """A registry of ``--scope``. With ``keys`` (a command that addresses
        keys: status, census, rotate, retire, enable, disable, destroy,
        maintenance), ``--scope`` may name an index scope (``~index:<scope>``):
        the registry is then of that scope, and the command passes ``--scope``
        on to address the index keys."""
        scope = self.scope
        if keys and is_index_scope(check_key_scope(scope)):
            scope = scope_of_index(scope)
        self.load_models()
        return KeyRegistry.from_env(
            self._engine(),
            scope=scope,
            table_name=self.table,
            cache_max_age=self.cache_max_age,
        )

    def _engine(self) -> sa.Engine:
        """An engine on ``url`` that has connected once, so that an unreachable
        database is reported as such before any work starts."""
        if not self.url:
            raise ConfigurationError("no database: pass --url or set DATABASE_URL")
        try:
            url = sa.make_url(self.url)
        except (sa.exc.ArgumentError, ValueError):
            raise ConfigurationError(
                "the database URL (--url or DATABASE_URL) is not a SQLAlchemy URL"
            ) from None
        try:
            # hide_parameters: no SQLAlchemy error text ever carries a value.
            engine = sa.create_engine(url, hide_parameters=True)
        except (sa.exc.ArgumentError, ImportError, TypeError, AttributeError) as error:
            raise ConfigurationError(
                f"cannot use the database URL: {_without(url.password, error)}"
            ) from None
        if engine.dialect.is_async:
            raise ConfigurationError(
                f"the database URL names an async driver ({url.drivername}): the command "
                f"needs a synchronous one, e.g. {_SYNC.get(url.get_backend_name(), 'its default')}"
            )
        try:
            engine.connect().close()
        except sa.exc.DBAPIError as error:
            raise _Unreachable(_without(url.password, error.orig)) from None
        except (TypeError, AttributeError, LookupError, ValueError) as error:
            # The driver choked on a query argument of the URL (?charset=...).
            raise ConfigurationError(
                f"cannot use the database URL's options: {_without(url.password, error)}"
            ) from None
        return engine

    def load_models(self) -> None:
        """Import the application's models (``--models``, else
        ``ENVELOPE_MODELS``, and the ``sqlalchemy_envelope.models`` entry
        points): their encrypted columns are the definitions a job by
        TABLE.COLUMN uses."""
        given = self.models or (os.environ.get("ENVELOPE_MODELS", ""),)
        for name in (n.strip() for value in given for n in value.split(",")):
            if name:
                _import(name, f"the models module {name!r} (--models, ENVELOPE_MODELS)")
        for entry in importlib.metadata.entry_points(group=MODELS_ENTRY_POINTS):
            try:
                entry.load()
            except Exception as error:
                raise ConfigurationError(
                    f"cannot load the {MODELS_ENTRY_POINTS} entry point {entry.name!r} "
                    f"({entry.value}): {_import_failure(error)}"
                ) from None

    def emit(self, data: dict[str, Any], text: str) -> None:
        click.echo(json.dumps(data, indent=2) if self.as_json else text)


_SYNC = {"postgresql": "postgresql+psycopg://", "sqlite": "sqlite://", "mysql": "mysql+pymysql://"}


def _import(name: str, what: str) -> Any:
    """Import a module of the application, from the working directory too (as
    ``python -m`` would): a failure is a configuration error naming it."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise ConfigurationError(f"cannot import {what}: {_import_failure(error)}") from None


def _import_failure(error: Exception) -> str:
    """Why an import failed: an ImportError's text (a module's name); of any
    other error raised by the module's own code only its type, as its text
    may hold anything (a setting, a secret)."""
    if isinstance(error, ImportError):
        return str(error)
    return f"it raised {type(error).__name__} (import it in Python to see why)"


def _without(password: str | None, error: BaseException | None) -> str:
    """The first line of an error's text, any form of the password masked."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if password:
        for form in {password, quote(password, safe=""), quote_plus(password)}:
            text = text.replace(form, "***")
    return text


# The group's options: (flag, attribute of Context, click settings, help).
_OPTIONS: list[tuple[str, str, dict[str, Any], str]] = [
    ("--url", "url", {}, "SQLAlchemy database URL [env: DATABASE_URL]"),
    ("--scope", "scope", {}, "key scope"),
    ("--table", "table", {}, "keys table"),
    (
        "--cache-max-age",
        "cache_max_age",
        {"type": float},
        "seconds; the longest cache_max_age of your applications (destroy waits it out)",
    ),
    (
        "--models",
        "models",
        {"multiple": True, "metavar": "MODULE"},
        "a module of the application's models to import, so that TABLE.COLUMN gets its "
        "column's definition (repeatable) [env: ENVELOPE_MODELS, comma-separated]",
    ),
    ("--json", "as_json", {"is_flag": True}, "machine-readable output"),
]
_GROUP_DEFAULTS: dict[str, dict[str, Any]] = {
    "url": {"envvar": "DATABASE_URL"},
    "scope": {"default": DEFAULT_SCOPE, "show_default": True},
    "table": {"default": "data_keys", "show_default": True},
    "cache_max_age": {"default": 60.0, "show_default": True},
}


def _group_options(group: Callable[..., Any]) -> Callable[..., Any]:
    for flag, name, settings, help_text in reversed(_OPTIONS):
        extra = _GROUP_DEFAULTS.get(name, {})
        group = click.option(flag, name, help=help_text, **settings, **extra)(group)
    return group


def _override(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False and value != ():
            setattr(ctx.find_object(Context), name, value)

    return callback


def pass_context(command: Callable[..., Any]) -> Callable[..., Any]:
    """Pass the group's `Context` to a command, which also accepts the group's
    options after its name, where users type them: given there, they win."""
    command = click.make_pass_decorator(Context)(command)
    for flag, name, settings, help_text in reversed(_OPTIONS):
        option = click.option(
            flag, name, help=help_text, expose_value=False, callback=_override(name), **settings
        )
        command = option(command)
    return command


def _run(action: Callable[[], int | None]) -> None:
    """Map library errors to exit codes, printing only their (secret-free) text."""
    try:
        code = action()
    except _Unreachable as error:
        click.echo(f"error: cannot connect to the database: {error}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except StatementFailedError as error:
        click.echo(f"error: {_command()}: {error}", err=True)
        sys.exit(EXIT_DATABASE)
    except sa.exc.StatementError as error:
        click.echo(
            f"error: {_command()}: the database refused a statement: {database_reason(error)}",
            err=True,
        )
        sys.exit(EXIT_DATABASE)
    except (KeyStateError, KeyInUseError) as error:
        click.echo(f"refused: {error}", err=True)
        sys.exit(EXIT_REFUSED)
    except ConfigurationError as error:
        click.echo(f"configuration error: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except EnvelopeError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code or 0)


def _confirm(yes: bool, question: str) -> None:
    """Ask ``question`` on stderr (stdout is the report) unless ``yes``; any
    answer but yes (also none: end of input, Ctrl-C) exits with its own code,
    having done nothing."""
    if yes:
        return
    try:
        agreed = click.confirm(question, err=True)
    except click.Abort:
        agreed = False
    if not agreed:
        click.echo("declined: nothing was done", err=True)
        sys.exit(EXIT_DECLINED)


def _command() -> str:
    context = click.get_current_context(silent=True)
    return context.info_name or "sqlalchemy-envelope" if context else "sqlalchemy-envelope"


def _key_line(key: KeyInfo) -> str:
    return (
        f"version {key.version:>4}  {key.state.value:<9}  id {key.id:#012x}  "
        f"encryptions {key.encryptions:,}  created {key.created_at:%Y-%m-%d %H:%M:%S}"
    )


def _status_text(status: RegistryStatus) -> str:
    lines = [
        f"scope {status.scope!r}: active version {status.active_version}",
        f"root key {status.root_key_fingerprint} ({status.root_key_description})",
        *(
            [
                f"root key UNAVAILABLE ({status.cached_keys} cached data keys still work): "
                f"{status.root_key_problem}"
            ]
            if status.root_key_problem
            else []
        ),
        f"rotation due: {status.rotation_due or 'no'}",
        *(_key_line(k) for k in status.keys),
        *(
            f"keys under OTHER root key {name}: {count:,} (still needed until rewrap moves them)"
            for name, count in status.other_root_keys.items()
        ),
    ]
    if not status.other_root_keys:
        lines.append("every stored key is under this root key: older root keys are not needed")
    if status.rows_by_version is not None:
        for version, rows in sorted(status.rows_by_version.items()):
            lines.append(f"rows under version {version}: {rows:,}")
    return "\n".join(lines)


class _ShardType(click.ParamType[Shard]):
    """``--shard K/N``: a bad value is a usage error saying what is expected."""

    name = "K/N"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Shard:
        if isinstance(value, Shard):
            return value
        try:
            return Shard.parse(str(value))
        except ConfigurationError as error:
            self.fail(str(error), param, ctx)


def _shard_option(command: Callable[..., Any]) -> Callable[..., Any]:
    option = click.option(
        "--shard",
        type=_ShardType(),
        default=None,
        help="do only shard K of N of each table, 0 <= K < N (e.g. "
        "$JOB_COMPLETION_INDEX/N): one per machine, each resumable (docs/sharding.md)",
    )
    return option(command)


def _shard(shard: Shard | None) -> tuple[int, int] | None:
    return None if shard is None else (shard.index, shard.count)


def _reasons(report: MigrationReport) -> str:
    """The values left behind by reason, adding up to their number."""
    reasons = report.left_by_reason()
    return f" ({', '.join(f'{r}: {n:,}' for r, n in reasons.items())})" if reasons else ""


def _report_text(report: MigrationReport) -> str:
    moved = ", ".join(f"v{v}: {n:,}" for v, n in sorted(report.values_by_version.items()))
    lines = [
        f"columns: {', '.join(report.columns)}",
        *([f"shard {report.shard[0]}/{report.shard[1]} of each table"] if report.shard else []),
        f"rows scanned {report.rows_scanned:,}, updated {report.rows_updated:,}, "
        f"skipped (written meanwhile, retried) {report.skipped:,}",
        f"values moved off: {moved or 'none'}",
        f"plaintext encrypted {report.plaintext_encrypted:,}, "
        f"decrypted {report.values_decrypted:,}",
        f"left behind {report.left_behind:,}{_reasons(report)}",
        *(f"  {line}" for line in report.left_lines()),
        *(
            [f"values of other scopes left alone {report.other_scopes:,}"]
            if report.other_scopes
            else []
        ),
        f"{report.elapsed:.1f}s, {report.rows_per_second:,.0f} rows/s",
    ]
    return "\n".join(lines)


# The one reason a plaintext value can give: a value under a key of this
# registry is its ciphertext, never plaintext, whatever --plaintext-row says.
_LOOKALIKE = "UnknownKeyError"


def _plaintext_rows(named: tuple[str, ...]) -> dict[str, list[Any]]:
    """``TABLE.COLUMN=KEY`` options, as a report prints them: KEY is the value
    of a one-column primary key, or a JSON array for a composite one."""
    rows: dict[str, list[Any]] = {}
    for item in named:
        column, equals, key = item.partition("=")
        if not equals or not column or not key:
            raise ConfigurationError(f"--plaintext-row takes TABLE.COLUMN=KEY, not {item!r}")
        parsed: Any = key
        if key.startswith("["):
            try:
                parsed = tuple(json.loads(key))
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"--plaintext-row {column}: a key starting with '[' must be a JSON array"
                ) from None
        rows.setdefault(column, []).append(parsed)
    return rows


@click.group()
@_group_options
@click.pass_context
def main(
    ctx: click.Context,
    url: str | None,
    scope: str,
    table: str,
    cache_max_age: float,
    models: tuple[str, ...],
    as_json: bool,
) -> None:
    """Manage envelope-encryption keys and encrypted columns."""
    # psycopg logs its own warning beside the error the command reports (an
    # aborted pipeline): the error is reported once, in one line.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    ctx.obj = Context(url, scope, table, cache_max_age, models, as_json)


@main.command()
@pass_context
def init(c: Context) -> None:
    """Create data_keys and the first data key (idempotent)."""

    def action() -> None:
        key = c.registry().init()
        c.emit(key.to_dict(), f"active: {_key_line(key)}")

    _run(action)


@main.command()
@click.option("--census", "with_census", is_flag=True, help="also count rows per version")
@click.option("--column", "columns", multiple=True, help="TABLE.COLUMN to count (repeatable)")
@pass_context
def status(c: Context, with_census: bool, columns: tuple[str, ...]) -> None:
    """Keys, their states and use, and whether rotation is due."""

    def action() -> None:
        registry = c.registry(keys=True)
        everywhere = with_census and not columns
        result = registry.status(c.scope, census=everywhere)
        data = result.to_dict()
        text = _status_text(result)
        counts = registry.census(*columns) if columns else list(result.columns or ())
        if columns:
            data["columns"] = [col.to_dict() for col in counts]
        if everywhere:
            text += f"\nrows per version: {result.rows_by_version}"
        text += "".join(f"\n{_census_text(col)}" for col in counts)
        c.emit(data, text)

    _run(action)


@main.command()
@pass_context
def rotate(c: Context) -> None:
    """Make a new data key active; the old one keeps decrypting."""

    def action() -> None:
        key = c.registry(keys=True).rotate(c.scope)
        c.emit(key.to_dict(), f"active: {_key_line(key)}")

    _run(action)


@main.command()
@click.argument("columns", nargs=-1, required=True)
@pass_context
def census(c: Context, columns: tuple[str, ...]) -> None:
    """Rows per key version, NULLs and plaintext in TABLE.COLUMN..."""

    def action() -> None:
        counts = c.registry(keys=True).census(*columns, scope=c.scope_filter)
        text = "\n".join(_census_text(col) for col in counts)
        c.emit({"columns": [col.to_dict() for col in counts]}, text)

    _run(action)


def _census_text(col: ColumnCensus) -> str:
    """One column's census: a line per scope and version, and one for the rows
    under keys data_keys does not hold (their ids are never printed: for a
    legacy plaintext value they are five bytes of it)."""
    lines = [
        f"{col.column}: rows {col.rows:,}, NULL {col.nulls:,}, "
        f"not ciphertext {col.not_ciphertext:,}",
        *(f"  scope {k.scope!r}, version {k.version} ({k.state}): {k.rows:,}" for k in col.keys),
    ]
    if col.unknown_key_rows:
        lines.append(f"  under keys not in data_keys: {col.unknown_key_rows:,}")
    return "\n".join(lines)


@main.command()
@click.argument("columns", nargs=-1, required=True)
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="parallel processes")
@click.option("--encrypt-plaintext", is_flag=True, help="also encrypt legacy plaintext values")
@click.option(
    "--plaintext-row",
    "plaintext_rows",
    multiple=True,
    metavar="TABLE.COLUMN=KEY",
    help="a row left behind whose value is legacy plaintext that looks like ciphertext: "
    "encrypt it as plaintext (repeatable; KEY as the report prints it)",
)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@_shard_option
@pass_context
def reencrypt(
    c: Context,
    columns: tuple[str, ...],
    batch_size: int,
    workers: int,
    encrypt_plaintext: bool,
    plaintext_rows: tuple[str, ...],
    progress: bool | None,
    shard: Shard | None,
) -> None:
    """Move every value of TABLE.COLUMN... onto the active key (resumable)."""

    def action() -> int:
        report = c.registry().reencrypt(
            *columns,
            scope=c.scope,
            batch_size=batch_size,
            workers=workers,
            encrypt_plaintext=encrypt_plaintext,
            progress=progress,
            plaintext_rows=_plaintext_rows(plaintext_rows),
            shard=_shard(shard),
        )
        text = _report_text(report)
        if any(r.reason == _LOOKALIKE for r in report.left_rows):
            text += (
                "\nif a row listed holds legacy plaintext that looks like ciphertext, run "
                "again with --plaintext-row TABLE.COLUMN=KEY to encrypt it as plaintext"
            )
        c.emit(report.to_dict(), text)
        return EXIT_LEFT_BEHIND if report.left_behind else 0

    _run(action)


@main.command("decrypt-in-place")
@click.argument("columns", nargs=-1, required=True)
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_shard_option
@pass_context
def decrypt_in_place(
    c: Context,
    columns: tuple[str, ...],
    batch_size: int,
    progress: bool | None,
    yes: bool,
    shard: Shard | None,
) -> None:
    """Write TABLE.COLUMN... back as plaintext (undoes an in-place encryption)."""
    _confirm(yes, "Write these columns back as plaintext?")

    def action() -> int:
        report = c.registry().decrypt_in_place(
            *columns, batch_size=batch_size, progress=progress, shard=_shard(shard)
        )
        c.emit(report.to_dict(), _report_text(report))
        return EXIT_LEFT_BEHIND if report.left_behind else 0

    _run(action)


@contextmanager
def _known_version(version: int) -> Iterator[None]:
    """A version the scope has no key of is bad usage (exit 2), not a
    decryption failure."""
    try:
        yield
    except UnknownKeyError as error:
        raise ConfigurationError(f"{error} (no key version {version} in this scope)") from None


def _transition(name: str, help_text: str) -> None:
    @main.command(name, help=help_text)
    @click.argument("version", type=int)
    @pass_context
    def command(c: Context, version: int) -> None:
        def action() -> None:
            with _known_version(version):
                key = getattr(c.registry(keys=True), name)(version, c.scope)
            c.emit(key.to_dict(), _key_line(key))

        _run(action)


_transition("retire", "Retire VERSION (decrypt only); retiring the active key rotates.")
_transition("enable", "Bring a disabled VERSION back to retired.")


@main.command()
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="also an index key (scope ~index:...)")
@pass_context
def disable(c: Context, version: int, force: bool) -> None:
    """Refuse decryption under VERSION, reversibly; an index key only with --force."""

    def action() -> None:
        with _known_version(version):
            key = c.registry(keys=True).disable(version, c.scope, force=force)
        c.emit(key.to_dict(), _key_line(key))

    _run(action)


@main.command()
@click.argument("version", type=int)
@click.option("--column", "columns", multiple=True, help="TABLE.COLUMN to check (default: all)")
@click.option("--force", is_flag=True, help="destroy even if rows still need it (crypto-shred)")
@pass_context
def destroy(c: Context, version: int, columns: tuple[str, ...], force: bool) -> None:
    """Erase VERSION's key for good, once no row needs it."""

    def action() -> None:
        with _known_version(version):
            key = c.registry(keys=True).destroy(version, c.scope, force=force, columns=columns)
        c.emit(key.to_dict(), _key_line(key))

    _run(action)


@main.command()
@pass_context
def rewrap(c: Context) -> None:
    """Re-wrap every data key under the root key in ENVELOPE_NEW_* (all or nothing)."""

    def action() -> None:
        new_root = root_key_from_env(prefix="ENVELOPE_NEW_")
        count = c.registry().rewrap(new_root)
        c.emit(
            {"rewrapped": count, "root_key_fingerprint": new_root.fingerprint},
            f"re-wrapped {count} data keys under root key {new_root.fingerprint}; "
            "switch ENVELOPE_* to the new root key now",
        )

    _run(action)


@main.command()
@click.argument("tenant", metavar="SCOPE")
@click.option(
    "--including-shared-index",
    is_flag=True,
    help="also when SCOPE is --scope's own scope while other scopes have keys: tenants' "
    "deterministic values and blind indexes written before they had index keys of their "
    "own, and not moved to them, become unusable",
)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@pass_context
def shred(c: Context, tenant: str, including_shared_index: bool, yes: bool) -> None:
    """Crypto-shred SCOPE (a tenant): destroy all its keys, its index keys included;
    other scopes' keys are untouched."""
    prompt = "Destroy every key of this scope? Its data becomes unreadable"
    if including_shared_index:
        prompt = (
            "Destroy every key of this scope, and its index key, which tenants used "
            "before they had their own? Its data becomes unreadable, and so do the "
            "deterministic values, blind-index lookups and hash_field digests of tenants "
            "not yet moved to their own index keys"
        )
    _confirm(yes, prompt)

    def action() -> None:
        count = c.registry().shred(tenant, including_shared_index=including_shared_index)
        c.emit({"scope": tenant, "destroyed": count}, f"destroyed {count} keys of scope {tenant!r}")

    _run(action)


@main.command()
@pass_context
def maintenance(c: Context) -> None:
    """Rotate if the policy says so; report which old keys can go."""

    def action() -> None:
        report = c.registry(keys=True).maintenance(c.scope)
        c.emit(
            report.to_dict(),
            f"rotated: {report.rotated.version if report.rotated else 'no'}\n"
            f"destroyable versions: {list(report.destroyable)}\n"
            f"versions still holding rows: {report.still_referenced}",
        )

    _run(action)


@main.command("backfill-index")
@click.argument("target")
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@click.option(
    "--recompute",
    is_flag=True,
    help="also rewrite digests already set that differ (under each row's scope's index key)",
)
@_shard_option
@pass_context
def backfill_index(
    c: Context,
    target: str,
    batch_size: int,
    progress: bool | None,
    recompute: bool,
    shard: Shard | None,
) -> None:
    """Fill a blind index for existing rows, each under its scope's index key;
    TARGET is module:Class.attribute (the models define the index's sources and
    normalizers)."""

    def action() -> None:
        module_name, _, path = target.partition(":")
        if not module_name or not path:
            raise ConfigurationError("name the index as module:Class.attribute")
        found: Any = _import(module_name, f"the index {target!r}")
        try:
            for part in path.split("."):
                found = getattr(found, part)
        except AttributeError as error:
            raise ConfigurationError(f"cannot find the index {target!r}: {error}") from None
        report = c.registry().backfill_index(
            found,
            batch_size=batch_size,
            progress=progress,
            shard=_shard(shard),
            recompute=recompute,
        )
        c.emit(report.to_dict(), _report_text(report))

    _run(action)


def _templates() -> Path:
    """The shipped Alembic templates: beside the package in a source checkout
    or an editable install, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "alembic_templates", here.parent / "alembic_templates"):
        if (candidate / "envelope" / "env.py").is_file():
            return candidate
    raise ConfigurationError("the alembic_templates folder is missing from this installation")


@main.command("alembic-init")
@click.argument("directory")
@click.option("--config", "config_file", default="alembic.ini", show_default=True)
def alembic_init(directory: str, config_file: str) -> None:
    """Start an Alembic migrations DIRECTORY wired for sqlalchemy-envelope,
    whose first migration creates data_keys."""

    def action() -> None:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        templates = _templates()
        try:
            command.init(Config(config_file), directory, template=str(templates / "envelope"))
        except CommandError as error:
            raise ConfigurationError(str(error)) from None
        first = Path(directory) / "versions" / "0001_data_keys.py"
        shutil.copyfile(templates / "data_keys_migration.py", first)
        click.echo(f"wrote {first}; set target_metadata in {Path(directory) / 'env.py'}")

    _run(action)
