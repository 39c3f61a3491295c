"""Python values to plaintext bytes and back, one codec per wrapped SQL type.

Each codec gives values back with their exact Python type: Decimal stays
exact, tz-aware datetimes keep their offset, enums come back as members. No
codec can execute code on decode (JSON, never pickle).

A codec refuses what it cannot store with `InvalidValueError`, whose message
gives the reason but never the value (the column type adds the column's
name). ``max_bytes`` is the longest plaintext a codec produces for any value
it accepts, so storage sized from it holds every value.

Lengths: a ciphertext is as long as its plaintext plus a constant, so codecs
of randomized columns write enum members and ``Numeric(p, s)`` values at one
length, and strings padded to a multiple of ``pad_to`` when asked. Padding is
the byte 0xFF, which UTF-8 never holds, then zeros: it is told apart from any
text, so values written before padding, or after it was dropped, read as
written. Deterministic columns keep one plaintext per value whatever their
options (an enum's width changes with its members), so they are not padded.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeEngine

from ..errors import ConfigurationError, InvalidValueError

__all__ = ["Codec", "codec_for", "unpadded"]

Encode = Callable[[Any], bytes]
Decode = Callable[[bytes], Any]

_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_INTERVAL = struct.Struct(">iiI")

# isoformat of the base classes: a subclass (pandas' Timestamp) may format
# more digits than the codec reads back or the column is sized for.
_DATETIME_ISO = dt.datetime.isoformat
_DATE_ISO = dt.date.isoformat
_TIME_ISO = dt.time.isoformat
_ISO_DATE = 10  # YYYY-MM-DD: years are 1 to 9999
_ISO_TIME = 15  # HH:MM:SS.ffffff
_ISO_OFFSET = 16  # -HH:MM:SS.ffffff: an offset may have seconds and microseconds

# The longest ISO text without a UTC offset in seconds: longer texts may end
# with an offset under one second.
_ISO_USUAL_DATETIME = _ISO_DATE + 1 + _ISO_TIME + 6
_ISO_USUAL_TIME = _ISO_TIME + 6
_ZERO_WHOLE_OFFSETS = frozenset({b"+00:00:00", b"-00:00:00"})

_PAD = b"\xff"  # never in UTF-8: where padding starts
_BAD_OFFSET = "the value's tzinfo gives no valid UTC offset"
_SURROGATE = "value is not valid Unicode: it holds a lone surrogate, which UTF-8 cannot encode"


@dataclass(frozen=True)
class Codec:
    """How one wrapped type is turned into bytes. ``max_bytes`` is the longest
    plaintext ``encode`` returns, or None if unbounded (it sizes storage).
    ``none_as_null``: Python None is stored as SQL NULL, as for most plain
    columns; if False (JSON's default), ``encode`` gives None a plaintext.
    ``str_chars``: for strings, the most characters ``encode`` takes from a
    ``str``, which it encodes as ``str.encode()`` does (UTF-8): a processor
    can do that itself, without a call per value, and call ``encode`` for
    anything else (which also gives the error for a lone surrogate).
    ``padded``: the plaintext of text that ``decode`` refuses because it is
    padded (written while the column had ``pad_to``), read without it."""

    encode: Encode
    decode: Decode
    python_type: type
    max_bytes: int | None
    none_as_null: bool = True
    str_chars: int | None = None
    padded: Decode | None = None


def _wrong(value: Any, expected: str) -> InvalidValueError:
    return InvalidValueError(f"expected {expected}, got {type(value).__name__}")


def _pad(data: bytes, width: int) -> bytes:
    """``data`` padded to ``width`` bytes: 0xFF then zeros; as it is if that long."""
    short = width - len(data)
    return data + _PAD + bytes(short - 1) if short > 0 else data


def unpadded(data: bytes) -> bytes:
    """Text's UTF-8 without the padding `_pad` added, if it ends with
    exactly that (0xFF, then only zeros); else as it is, so that bytes of
    another encoding (an integer read by name) are never cut short."""
    end = data.find(_PAD)
    if end < 0 or data[end + 1 :].count(0) != len(data) - end - 1:
        return data
    return data[:end]


def _padded_width(size: int, pad_to: int) -> int:
    """The multiple of ``pad_to`` a plaintext of ``size`` bytes is padded to."""
    return max(-(-size // pad_to), 1) * pad_to


def _string(value_type: sa.String, pad_to: int | None) -> Codec:
    length = value_type.length
    max_bytes = None if length is None else 4 * length

    def decode_padded(data: bytes) -> str:
        return unpadded(data).decode()

    def encode(value: Any) -> bytes:
        if not isinstance(value, str):
            raise _wrong(value, "str")
        if length is not None and len(value) > length:
            raise InvalidValueError(
                f"value of {len(value)} characters is too long for "
                f"{type(value_type).__name__}({length})"
            )
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidValueError(_SURROGATE) from None

    if pad_to is not None:

        def encode_padded(value: Any) -> bytes:
            data = encode(value)
            return _pad(data, _padded_width(len(data), pad_to))

        width = None if max_bytes is None else _padded_width(max_bytes, pad_to)
        return Codec(encode_padded, decode_padded, str, width, padded=decode_padded)
    # bytes.decode defaults to strict UTF-8, and as a builtin it costs no frame.
    return Codec(
        encode,
        bytes.decode,
        str,
        max_bytes,
        str_chars=sys.maxsize if length is None else length,
        padded=decode_padded,
    )


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
        try:
            return pack(float(value))
        except (ValueError, OverflowError):  # a signaling NaN; an int beyond float's range
            raise InvalidValueError("value has no float representation") from None

    def decode(data: bytes) -> Any:
        number = unpack(data)[0]
        return Decimal(repr(number)) if as_decimal else number

    return Codec(encode, decode, Decimal if as_decimal else float, _FLOAT64.size)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))  # the shortest decimal that reads back as the float
    raise _wrong(value, "Decimal")


def _numeric(value_type: sa.Numeric[Any], fixed_width: bool) -> Codec:
    """``Numeric(p, s)`` stores what the plain column holds: the value rounded
    to s places, ties away from zero, as PostgreSQL and MySQL round. A value
    with more than p - s digits before the point, NaN or an infinity is
    refused, as those databases refuse it. Without a precision every digit is
    kept, NaN and infinities too (at the length they take). ``fixed_width``:
    fixed-point text right-aligned with spaces to the longest that
    ``Numeric(p, s)`` allows, which Decimal reads as the number itself."""
    as_decimal = bool(value_type.asdecimal)

    def decode(data: bytes) -> Any:
        try:
            number = Decimal(data.decode("ascii"))
        except (InvalidOperation, UnicodeDecodeError):
            raise InvalidValueError("stored Numeric plaintext is not a number") from None
        return number if as_decimal else float(number)

    python_type = Decimal if as_decimal else float
    precision = value_type.precision
    if precision is None:

        def encode_exact(value: Any) -> bytes:
            number = _decimal(value)
            if number.is_snan():
                raise InvalidValueError("a signaling NaN cannot be stored")
            return str(number).encode("ascii")

        return Codec(encode_exact, decode, python_type, None)

    scale = value_type.scale or 0  # SQL: NUMERIC(p) is NUMERIC(p, 0)
    exponent = Decimal(1).scaleb(-scale)
    # At most p digits once quantized, or quantize signals InvalidOperation.
    context = Context(prec=precision, rounding=ROUND_HALF_UP, traps=[InvalidOperation])
    overflow = (
        f"value does not fit Numeric({precision}, {scale}): it allows at most "
        f"{max(precision - scale, 0)} digits before the decimal point, and no NaN or infinity"
    )

    # Fixed-point text of a value of at most p digits quantized to s places:
    # a sign, the integer digits (a lone 0 if none), then the point and s digits.
    longest = 1 + max(precision - scale, 1) + (scale + 1 if scale > 0 else 0)
    width = longest if fixed_width else 0

    def encode(value: Any) -> bytes:
        try:
            number = _decimal(value).quantize(exponent, context=context)
        except InvalidOperation:
            raise InvalidValueError(overflow) from None
        if number.is_nan():  # NaN quantizes to itself
            raise InvalidValueError(overflow)
        if not number:
            number = number.copy_abs()  # the databases have no negative zero
        return format(number, "f").rjust(width).encode("ascii")

    # precision + 8 is what earlier versions sized storage for: never shrink
    # a column below what they may have written.
    return Codec(encode, decode, python_type, max(precision + 8, longest))


def _boolean() -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, int) and value in (0, 1):
            return b"\x01" if value else b"\x00"
        raise _wrong(value, "bool")

    def decode(data: bytes) -> bool:
        return data == b"\x01"

    return Codec(encode, decode, bool, 1)


def _subsecond_offset(data: bytes) -> dt.timezone | None:
    """The UTC offset under one second that an ISO text ends with, if any:
    CPython's fromisoformat reads it as UTC (python/cpython#152079)."""
    if data[-16:-7] not in _ZERO_WHOLE_OFFSETS:
        return None
    offset = dt.timedelta(microseconds=int(data[-6:]))
    return dt.timezone(-offset if data[-16:-15] == b"-" else offset)


def _datetime() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.datetime):
            raise _wrong(value, "datetime")
        try:
            return _DATETIME_ISO(value).encode("ascii")
        except (TypeError, ValueError):
            raise InvalidValueError(_BAD_OFFSET) from None

    def decode(data: bytes) -> dt.datetime:
        value = dt.datetime.fromisoformat(data.decode("ascii"))
        if len(data) > _ISO_USUAL_DATETIME and (offset := _subsecond_offset(data)):
            return value.replace(tzinfo=offset)
        return value

    return Codec(encode, decode, dt.datetime, _ISO_DATE + 1 + _ISO_TIME + _ISO_OFFSET)


def _date() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise _wrong(value, "date")
        return _DATE_ISO(value).encode("ascii")

    def decode(data: bytes) -> dt.date:
        return dt.date.fromisoformat(data.decode("ascii"))

    return Codec(encode, decode, dt.date, _ISO_DATE)


def _time() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.time):
            raise _wrong(value, "time")
        try:
            return _TIME_ISO(value).encode("ascii")
        except (TypeError, ValueError):
            raise InvalidValueError(_BAD_OFFSET) from None

    def decode(data: bytes) -> dt.time:
        value = dt.time.fromisoformat(data.decode("ascii"))
        if len(data) > _ISO_USUAL_TIME and (offset := _subsecond_offset(data)):
            return value.replace(tzinfo=offset)
        return value

    return Codec(encode, decode, dt.time, _ISO_TIME + _ISO_OFFSET)


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


def _json(value_type: sa.JSON) -> Codec:
    """As the plain column: ``JSON.NULL`` is JSON ``null``, and so is None
    unless ``none_as_null=True`` makes it SQL NULL."""
    # allow_nan=False: NaN and Infinity are Python's extensions, which other
    # JSON parsers (PostgreSQL's json among them) reject.
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    loads = json.loads
    json_null = sa.JSON.NULL  # a symbol, an int subclass: dumps would write a number

    def encode(value: Any) -> bytes:
        if value is json_null:
            return b"null"
        try:
            return dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidValueError(_SURROGATE) from None
        except ValueError:
            raise InvalidValueError(
                "value is not standard JSON: it holds NaN or an infinity, a circular "
                "reference, or an integer of more than 4300 digits"
            ) from None
        except (TypeError, RecursionError):
            raise InvalidValueError(
                "value is not JSON serializable (dicts, lists, str, numbers, bool and None "
                "are, nested less deeply than Python's recursion limit)"
            ) from None

    def decode(data: bytes) -> Any:
        return loads(data)

    return Codec(encode, decode, object, None, bool(value_type.none_as_null))


def _enum(value_type: sa.Enum, fixed_width: bool) -> Codec:
    """Names are stored (``fixed_width``: padded to the longest name's UTF-8
    length), and size the column at four bytes a character, as before."""
    enum_class = value_type.enum_class
    names = list(value_type.enums if enum_class is None else enum_class.__members__)
    max_bytes = 4 * max((len(name) for name in names), default=0)
    width = max((len(name.encode("utf-8")) for name in names), default=0) if fixed_width else 0
    if enum_class is None:
        known = frozenset(names)

        def encode_name(value: Any) -> bytes:
            if not isinstance(value, str) or value not in known:
                raise InvalidValueError("value is not one of the enum's values")
            return _pad(value.encode("utf-8"), width)

        def decode_name(data: bytes) -> str:
            return unpadded(data).decode("utf-8")

        return Codec(encode_name, decode_name, str, max_bytes)

    # Member names are stored, whatever values_callable makes the plain
    # column store, so they size the column (aliases included).
    members = enum_class.__members__

    def encode(value: Any) -> bytes:
        if isinstance(value, enum_class):
            return _pad(value.name.encode("utf-8"), width)
        if isinstance(value, str) and value in members:
            return _pad(value.encode("utf-8"), width)
        raise _wrong(value, enum_class.__name__)

    def decode(data: bytes) -> Any:
        return members[unpadded(data).decode("utf-8")]

    return Codec(encode, decode, enum_class, max_bytes)


def codec_for(
    value_type: TypeEngine[Any], *, pad_to: int | None = None, fixed_width: bool = True
) -> Codec:
    """The codec of ``value_type``; ``fixed_width=False`` (deterministic
    columns) keeps enum names and numbers unpadded; ``pad_to`` pads strings."""
    if pad_to is not None:
        _check_pad_to(value_type, pad_to)
    # Order matters: Enum is a String, Float a Numeric, DateTime no Date.
    if isinstance(value_type, sa.Enum):
        return _enum(value_type, fixed_width)
    if isinstance(value_type, sa.JSON):
        return _json(value_type)
    if isinstance(value_type, sa.Boolean):
        return _boolean()
    if isinstance(value_type, sa.Uuid):
        return _uuid(value_type)
    if isinstance(value_type, sa.String):
        return _string(value_type, pad_to)
    if isinstance(value_type, sa.LargeBinary):
        return _binary(value_type)
    if isinstance(value_type, sa.Integer):
        return _integer()
    if isinstance(value_type, sa.Float):
        return _float(bool(value_type.asdecimal))
    if isinstance(value_type, sa.Numeric):
        return _numeric(value_type, fixed_width)
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


def _check_pad_to(value_type: TypeEngine[Any], pad_to: Any) -> None:
    if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1:
        raise ConfigurationError(f"pad_to must be a positive number of bytes, not {pad_to!r}")
    if isinstance(value_type, sa.String) and not isinstance(value_type, sa.Enum):
        return
    raise ConfigurationError(
        f"pad_to pads strings; {type(value_type).__name__} cannot take it: enum members, "
        "numbers, dates and UUIDs are stored at a fixed width or nearly, and bytes hold "
        "every byte value, so none could mark where padding starts in a value written "
        "before pad_to was set (store them as text to pad them)"
    )
