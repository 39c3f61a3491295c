"""The character set of text storage on MySQL and MariaDB.

Ciphertext is base64, so encrypted text columns are ASCII with a binary
collation: base64 is case-sensitive, and ASCII costs a byte a character where
utf8mb4 counts four against the row size limit. Such a column cannot hold
legacy plaintext in other scripts: the server refuses it, or without strict
mode stores "Zoë" as "Zo?". A column that holds plaintext (``migrating=True``,
or during an in-place conversion) is therefore utf8mb4 with a binary
collation, and the conversion jobs switch it themselves: to utf8mb4 before
writing plaintext back, to ASCII once every value is ciphertext. A switch runs
in strict mode, so a value the new character set cannot hold fails the ALTER
instead of being garbled.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError
from ..keys import transactions
from ..keys.storage import MYSQL_DIALECTS

__all__ = ["ANY_TEXT", "ASCII", "give_charset"]

ASCII: Mapping[str, str] = {"charset": "ascii", "collation": "ascii_bin"}
"""Ciphertext: base64, compared case-sensitively."""

ANY_TEXT: Mapping[str, str] = {"charset": "utf8mb4", "collation": "utf8mb4_bin"}
"""Plaintext in any script, and ciphertext beside it."""

_WHY = {
    "ascii": (
        "a value in it is not ASCII, so not ciphertext (plaintext written meanwhile?): "
        "run the job again to encrypt it"
    ),
    "utf8mb4": (
        "at 4 bytes a character the column exceeds MySQL's limits (a VARCHAR holds at "
        "most 16,383, a row 65,535 bytes): convert it through a new column instead"
    ),
}


def give_charset(
    conn: Connection, schema: str | None, table: str, column: str, charset: Mapping[str, str]
) -> bool:
    """Give a text column of a MySQL/MariaDB table ``charset`` (`ASCII` or
    `ANY_TEXT`) unless it has that character set already, keeping its type,
    length, nullability, default and comment. True if it was altered; nothing
    to do on other databases or for columns that hold no text."""
    if conn.dialect.name not in MYSQL_DIALECTS:
        return False
    found = conn.execute(
        sa.text(
            "SELECT COLUMN_TYPE, CHARACTER_SET_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table "
            "AND COLUMN_NAME = :column"
        ),
        {"schema": schema, "table": table, "column": column},
    ).one_or_none()
    if found is None or found[1] is None or found[1] == charset["charset"]:
        return False
    (reflected,) = [
        c for c in sa.inspect(conn).get_columns(table, schema=schema) if c["name"] == column
    ]
    quote = conn.dialect.identifier_preparer
    target = quote.quote(table) if schema is None else f"{quote.quote(schema)}.{quote.quote(table)}"
    definition = [
        f"ALTER TABLE {target} MODIFY {quote.quote(column)} {found[0]}",
        f"CHARACTER SET {charset['charset']} COLLATE {charset['collation']}",
        "NULL" if reflected["nullable"] else "NOT NULL",
    ]
    if reflected.get("default") is not None:
        definition.append(f"DEFAULT {reflected['default']}")
    if reflected.get("comment"):
        comment = sa.literal(reflected["comment"], sa.String()).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True}
        )
        definition.append(f"COMMENT {comment}")
    mode = conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar_one()
    conn.exec_driver_sql("SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES')")
    try:
        conn.exec_driver_sql(" ".join(definition))
    except sa.exc.DBAPIError as error:
        if transactions.is_lock_conflict(error):
            raise  # another job's statement held the table: the caller tries again
        # The server's message may quote the value: name only the error's number.
        code = error.orig.args[0] if error.orig is not None and error.orig.args else "?"
        raise ConfigurationError(
            f"{table}.{column}: cannot give the column the {charset['charset']} character "
            f"set (MySQL error {code}): {_WHY[charset['charset']]}"
        ) from None
    finally:
        conn.execute(sa.text("SET SESSION sql_mode = :mode"), {"mode": mode})
    return True
