"""Python values to plaintext bytes and back, one codec per wrapped SQL type.

Each codec gives values back with their exact Python type: Decimal stays
exact, tz-aware datetimes keep their offset, enums come back as members. No
codec can execute code on decode (JSON, never pickle).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeEngine

from .errors import ConfigurationError, InvalidValueError

__all__ = ["Codec", "codec_for"]

Encode = Callable[[Any], bytes]
Decode = Callable[[bytes], Any]

_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_INTERVAL = struct.Struct(">iiI")


@dataclass(frozen=True)
class Codec:
    """How one wrapped type is turned into bytes. ``max_bytes`` bounds the
    plaintext size when it is known (used to size text storage)."""

    encode: Encode
    decode: Decode
    python_type: type
    max_bytes: int | None


def _wrong(value: Any, expected: str) -> InvalidValueError:
    return InvalidValueError(
        f"expected {expected} for this encrypted column, got {type(value).__name__}"
    )


def _string(value_type: sa.String) -> Codec:
    length = value_type.length

    def encode(value: Any) -> bytes:
        if not isinstance(value, str):
            raise _wrong(value, "str")
        if length is not None and len(value) > length:
            raise InvalidValueError(
                f"value of {len(value)} characters is too long for "
                f"{type(value_type).__name__}({length})"
            )
        return value.encode("utf-8")

    # bytes.decode defaults to strict UTF-8, and as a builtin it costs no frame.
    return Codec(encode, bytes.decode, str, None if length is None else 4 * length)


def _binary(value_type: sa.LargeBinary) -> Codec:
    length = value_type.length

    def encode(value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _wrong(value, "bytes")
        data = bytes(value)
        if length is not None and len(data) > length:
            raise InvalidValueError(
                f"value of {len(data)} bytes is too long for LargeBinary({length})"
            )
        return data

    return Codec(encode, bytes, bytes, length)


def _integer() -> Codec:
    # Fixed width, so the ciphertext length does not reveal the magnitude.
    pack = _INT64.pack
    unpack = _INT64.unpack

    def encode(value: Any) -> bytes:
        if not isinstance(value, int):
            raise _wrong(value, "int")
        try:
            return pack(value)
        except struct.error:
            raise InvalidValueError("integer out of the signed 64-bit range") from None

    def decode(data: bytes) -> int:
        return int(unpack(data)[0])

    return Codec(encode, decode, int, _INT64.size)


def _float(as_decimal: bool) -> Codec:
    pack = _FLOAT64.pack
    unpack = _FLOAT64.unpack

    def encode(value: Any) -> bytes:
        if not isinstance(value, (int, float, Decimal)) or isinstance(value, bool):
            raise _wrong(value, "float")
        return pack(float(value))

    def decode(data: bytes) -> Any:
        number = unpack(data)[0]
        return Decimal(repr(number)) if as_decimal else number

    return Codec(encode, decode, Decimal if as_decimal else float, _FLOAT64.size)


def _numeric(value_type: sa.Numeric[Any]) -> Codec:
    as_decimal = bool(value_type.asdecimal)

    def encode(value: Any) -> bytes:
        if isinstance(value, Decimal) or (isinstance(value, int) and not isinstance(value, bool)):
            text = str(value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            raise _wrong(value, "Decimal")
        return text.encode("ascii")

    def decode(data: bytes) -> Any:
        try:
            number = Decimal(data.decode("ascii"))
        except (InvalidOperation, UnicodeDecodeError):
            raise InvalidValueError("stored Numeric plaintext is not a number") from None
        return number if as_decimal else float(number)

    precision = value_type.precision
    max_bytes = None if precision is None else precision + 8
    return Codec(encode, decode, Decimal if as_decimal else float, max_bytes)


def _boolean() -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, int) and value in (0, 1):
            return b"\x01" if value else b"\x00"
        raise _wrong(value, "bool")

    def decode(data: bytes) -> bool:
        return data == b"\x01"

    return Codec(encode, decode, bool, 1)


def _datetime() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.datetime):
            raise _wrong(value, "datetime")
        return value.isoformat().encode("ascii")

    def decode(data: bytes) -> dt.datetime:
        return dt.datetime.fromisoformat(data.decode("ascii"))

    return Codec(encode, decode, dt.datetime, 32)


def _date() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise _wrong(value, "date")
        return value.isoformat().encode("ascii")

    def decode(data: bytes) -> dt.date:
        return dt.date.fromisoformat(data.decode("ascii"))

    return Codec(encode, decode, dt.date, 10)


def _time() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.time):
            raise _wrong(value, "time")
        return value.isoformat().encode("ascii")

    def decode(data: bytes) -> dt.time:
        return dt.time.fromisoformat(data.decode("ascii"))

    return Codec(encode, decode, dt.time, 21)


def _interval() -> Codec:
    pack = _INTERVAL.pack
    unpack = _INTERVAL.unpack

    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.timedelta):
            raise _wrong(value, "timedelta")
        return pack(value.days, value.seconds, value.microseconds)

    def decode(data: bytes) -> dt.timedelta:
        days, seconds, microseconds = unpack(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)

    return Codec(encode, decode, dt.timedelta, _INTERVAL.size)


def _uuid(value_type: sa.Uuid[Any]) -> Codec:
    as_uuid = bool(value_type.as_uuid)

    def encode(value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, str):
            try:
                return uuid.UUID(value).bytes
            except ValueError:
                raise InvalidValueError("string is not a valid UUID") from None
        raise _wrong(value, "uuid.UUID")

    def decode(data: bytes) -> Any:
        value = uuid.UUID(bytes=data)
        return value if as_uuid else str(value)

    return Codec(encode, decode, uuid.UUID if as_uuid else str, 16)


def _json() -> Codec:
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    loads = json.loads

    def encode(value: Any) -> bytes:
        try:
            return dumps(value).encode("utf-8")
        except (TypeError, ValueError):
            raise InvalidValueError(
                "value is not JSON serializable (dicts, lists, str, numbers, bool and None are)"
            ) from None

    def decode(data: bytes) -> Any:
        return loads(data)

    return Codec(encode, decode, object, None)


def _enum(value_type: sa.Enum) -> Codec:
    enum_class = value_type.enum_class
    names = frozenset(value_type.enums)
    max_bytes = 4 * max((len(name) for name in names), default=0)

    if enum_class is None:

        def encode_name(value: Any) -> bytes:
            if not isinstance(value, str) or value not in names:
                raise InvalidValueError("value is not one of the enum's values")
            return value.encode("utf-8")

        return Codec(encode_name, lambda data: data.decode("utf-8"), str, max_bytes)

    members = enum_class.__members__

    def encode(value: Any) -> bytes:
        if isinstance(value, enum_class):
            return value.name.encode("utf-8")
        if isinstance(value, str) and value in members:
            return value.encode("utf-8")
        raise _wrong(value, enum_class.__name__)

    def decode(data: bytes) -> Any:
        return members[data.decode("utf-8")]

    return Codec(encode, decode, enum_class, max_bytes)


def codec_for(value_type: TypeEngine[Any]) -> Codec:
    # Order matters: Enum is a String, Float a Numeric, DateTime no Date.
    if isinstance(value_type, sa.Enum):
        return _enum(value_type)
    if isinstance(value_type, sa.JSON):
        return _json()
    if isinstance(value_type, sa.Boolean):
        return _boolean()
    if isinstance(value_type, sa.Uuid):
        return _uuid(value_type)
    if isinstance(value_type, sa.String):
        return _string(value_type)
    if isinstance(value_type, sa.LargeBinary):
        return _binary(value_type)
    if isinstance(value_type, sa.Integer):
        return _integer()
    if isinstance(value_type, sa.Float):
        return _float(bool(value_type.asdecimal))
    if isinstance(value_type, sa.Numeric):
        return _numeric(value_type)
    if isinstance(value_type, sa.DateTime):
        return _datetime()
    if isinstance(value_type, sa.Date):
        return _date()
    if isinstance(value_type, sa.Time):
        return _time()
    if isinstance(value_type, sa.Interval):
        return _interval()
    raise ConfigurationError(
        f"EncryptedType cannot wrap {type(value_type).__name__}: supported are "
        "String, Text, Unicode, LargeBinary, Integer, BigInteger, SmallInteger, "
        "Float, Numeric, Boolean, Date, DateTime, Time, Interval, Uuid, JSON and Enum"
    )
