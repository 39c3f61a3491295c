'use strict';
// FORMAT.md section 7: the plaintext of each column type, both ways.
//
// JS representations: string -> string; bytes -> Buffer; integer -> BigInt; float -> number;
// numeric -> decimal text; boolean -> boolean; date, datetime, time -> ISO text; interval ->
// {days, seconds, microseconds}; uuid -> lowercase 8-4-4-4-12 text; json -> the value;
// enum -> the member's name.
const { EncodingError } = require('./errors');
const { isWellFormed } = require('./primitives');
const { decimalToString, fixedPoint, numericWidth, parseDecimal } = require('./decimal');
const { stringifyPython, parseJson } = require('./pyjson');

const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function encodeText(text) {
  if (typeof text !== 'string') throw new EncodingError('expected a string');
  if (!isWellFormed(text)) throw new EncodingError('text holds a lone surrogate');
  return Buffer.from(text, 'utf8');
}

function decodeText(bytes) {
  try {
    return utf8Decoder.decode(bytes);
  } catch (_) {
    throw new EncodingError('plaintext is not UTF-8');
  }
}

/** Pads to `length` with ff then 00 bytes; no padding when already that long. */
function pad(bytes, length) {
  if (bytes.length >= length) return bytes;
  const out = Buffer.alloc(length);
  bytes.copy(out);
  out[bytes.length] = 0xff;
  return out;
}

/** Removes padding only when exact: the first ff followed by 00 bytes to the end. */
function unpad(bytes) {
  const i = bytes.indexOf(0xff);
  if (i < 0) return bytes;
  for (let j = i + 1; j < bytes.length; j++) if (bytes[j] !== 0) return bytes;
  return bytes.subarray(0, i);
}

/** pad_to=N: the smallest multiple of N, at least N, that holds the text. */
function padTo(bytes, n) {
  if (!Number.isInteger(n) || n < 1) throw new EncodingError('pad_to must be a positive integer');
  return pad(bytes, Math.max(n, Math.ceil(bytes.length / n) * n));
}

// ---- dates and times ----

const DATE = '(\\d{4})-(\\d{2})-(\\d{2})';
const TIME = '(\\d{2}):(\\d{2}):(\\d{2})(?:\\.(\\d{1,6}))?';
const OFFSET = '(?:([+-])(\\d{2}):(\\d{2})(?::(\\d{2})(?:\\.(\\d{1,6}))?)?|(Z))?';
const DATE_RE = new RegExp(`^${DATE}$`);
const TIME_RE = new RegExp(`^${TIME}${OFFSET}$`);
const DATETIME_RE = new RegExp(`^${DATE}[T ]${TIME}${OFFSET}$`);

const two = (n) => String(n).padStart(2, '0');
const micros = (f) => (f ? Number(f.padEnd(6, '0')) : 0);

function checkDate(y, m, d) {
  y = Number(y);
  m = Number(m);
  d = Number(d);
  const days = [31, (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0 ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
  if (y < 1 || m < 1 || m > 12 || d < 1 || d > days[m - 1]) throw new EncodingError('invalid date');
  return `${String(y).padStart(4, '0')}-${two(m)}-${two(d)}`;
}

function timeText(h, mi, s, f) {
  if (Number(h) > 23 || Number(mi) > 59 || Number(s) > 59) throw new EncodingError('invalid time');
  const us = micros(f);
  return `${two(h)}:${two(mi)}:${two(s)}${us ? '.' + String(us).padStart(6, '0') : ''}`;
}

function offsetText(sign, h, mi, s, f, z) {
  if (z) return '+00:00';
  if (!sign) return '';
  const total = ((Number(h) * 60 + Number(mi)) * 60 + Number(s || 0)) * 1e6 + micros(f);
  if (Number(mi) > 59 || Number(s || 0) > 59 || total >= 86400e6) throw new EncodingError('invalid UTC offset');
  if (total === 0) return '+00:00';
  const us = total % 1e6;
  const secs = Math.floor(total / 1e6);
  let out = `${sign}${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}`;
  if (secs % 60 || us) out += ':' + two(secs % 60);
  if (us) out += '.' + String(us).padStart(6, '0');
  return out;
}

/** Python's date.isoformat() of ISO text (validated, canonicalized). */
function isoDate(text) {
  const m = DATE_RE.exec(text);
  if (!m) throw new EncodingError('a date is YYYY-MM-DD');
  return checkDate(m[1], m[2], m[3]);
}

/** Python's time.isoformat() of ISO text. */
function isoTime(text) {
  const m = TIME_RE.exec(text);
  if (!m) throw new EncodingError('a time is HH:MM:SS[.ffffff][±HH:MM[:SS[.ffffff]]]');
  return timeText(m[1], m[2], m[3], m[4]) + offsetText(...m.slice(5, 11));
}

/** Python's datetime.isoformat() of ISO text, or of a JS Date (an aware UTC value). */
function isoDateTime(value) {
  if (value instanceof Date) {
    if (Number.isNaN(value.getTime())) throw new EncodingError('invalid Date');
    const t = value.toISOString(); // YYYY-MM-DDTHH:MM:SS.mmmZ
    value = t.slice(0, 23) + '+00:00';
  }
  if (typeof value !== 'string') throw new EncodingError('a datetime is ISO text or a Date');
  const m = DATETIME_RE.exec(value);
  if (!m) throw new EncodingError('a datetime is YYYY-MM-DDTHH:MM:SS[.ffffff][±HH:MM[:SS[.ffffff]]]');
  return checkDate(m[1], m[2], m[3]) + 'T' + timeText(m[4], m[5], m[6], m[7]) + offsetText(...m.slice(8, 14));
}

// ---- intervals ----

const US_PER_DAY = 86400000000n;

/** Normalizes {days, seconds, microseconds} as Python's timedelta does. */
function normalizeInterval({ days = 0, seconds = 0, microseconds = 0 }) {
  const big = (x, name) => {
    if (typeof x === 'bigint') return x;
    if (!Number.isInteger(x)) throw new EncodingError(`interval ${name} must be an integer`);
    return BigInt(x);
  };
  const total = big(days, 'days') * US_PER_DAY + big(seconds, 'seconds') * 1000000n + big(microseconds, 'microseconds');
  let d = total / US_PER_DAY;
  let rest = total % US_PER_DAY;
  if (rest < 0n) {
    rest += US_PER_DAY;
    d -= 1n;
  }
  if (d > 999999999n || d < -999999999n) throw new EncodingError('interval out of range');
  return { days: Number(d), seconds: Number(rest / 1000000n), microseconds: Number(rest % 1000000n) };
}

// ---- the table of types ----

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

function toBigInt(value) {
  if (typeof value === 'bigint') return value;
  if (typeof value === 'number' && Number.isSafeInteger(value)) return BigInt(value);
  if (typeof value === 'string' && /^[+-]?\d+$/.test(value.trim())) return BigInt(value.trim());
  throw new EncodingError('an integer is a BigInt, a safe integer or decimal text');
}

function toFloat(value) {
  if (typeof value === 'number') return value;
  if (typeof value === 'string') {
    const s = value.trim().toLowerCase();
    const special = { nan: NaN, '+nan': NaN, '-nan': NaN, inf: Infinity, infinity: Infinity, '+inf': Infinity, '+infinity': Infinity, '-inf': -Infinity, '-infinity': -Infinity };
    if (s in special) return special[s];
    if (/^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$/.test(s)) return Number(s);
  }
  throw new EncodingError('a float is a number or decimal text');
}

const UUID_RE = /^\{?([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})\}?$/i;

function checkType(type) {
  if (!type || typeof type.kind !== 'string') throw new EncodingError('a column type is {kind: ...}');
  return type;
}

/**
 * The plaintext bytes of `value` for a column of `type` ({kind, pad_to?, precision?, scale?,
 * names?}). `deterministic` columns are not padded.
 */
function encodePlaintext(type, value, { deterministic = false } = {}) {
  checkType(type);
  if (type.kind !== 'string' && type.pad_to !== undefined && type.pad_to !== null) {
    throw new EncodingError('pad_to is refused on columns that are not strings');
  }
  switch (type.kind) {
    case 'string': {
      const bytes = encodeText(value);
      if (type.pad_to === undefined || type.pad_to === null) return bytes;
      if (deterministic) throw new EncodingError('pad_to is refused on deterministic columns');
      return padTo(bytes, type.pad_to);
    }
    case 'bytes':
      if (!(value instanceof Uint8Array)) throw new EncodingError('bytes are a Buffer or Uint8Array');
      return Buffer.from(value);
    case 'integer': {
      const n = toBigInt(value);
      if (n < INT64_MIN || n > INT64_MAX) throw new EncodingError('integer out of the 64-bit range');
      const out = Buffer.alloc(8);
      out.writeBigInt64BE(n);
      return out;
    }
    case 'float': {
      const x = toFloat(value);
      if (Number.isNaN(x)) return Buffer.from('7ff8000000000000', 'hex');
      const out = Buffer.alloc(8);
      out.writeDoubleBE(x);
      return out;
    }
    case 'numeric': {
      if (typeof value === 'bigint' || typeof value === 'number') value = String(value);
      // A scale given without a precision is ignored: stored as for Numeric.
      if (type.precision === undefined || type.precision === null) {
        const text = decimalToString(value);
        if (/sNaN/.test(text)) throw new EncodingError('a signaling NaN is refused');
        return Buffer.from(text, 'ascii');
      }
      const scale = type.scale ?? 0;
      const text = fixedPoint(value, type.precision, scale);
      return Buffer.from(deterministic ? text : text.padStart(numericWidth(type.precision, scale), ' '), 'ascii');
    }
    case 'boolean':
      if (typeof value !== 'boolean') throw new EncodingError('a boolean is true or false');
      return Buffer.from([value ? 1 : 0]);
    case 'date':
      return Buffer.from(isoDate(value), 'ascii');
    case 'datetime':
      return Buffer.from(isoDateTime(value), 'ascii');
    case 'time':
      return Buffer.from(isoTime(value), 'ascii');
    case 'interval': {
      const { days, seconds, microseconds } = normalizeInterval(value || {});
      const out = Buffer.alloc(12);
      out.writeInt32BE(days, 0);
      out.writeInt32BE(seconds, 4);
      out.writeUInt32BE(microseconds, 8);
      return out;
    }
    case 'uuid': {
      if (value instanceof Uint8Array && value.length === 16) return Buffer.from(value);
      const m = typeof value === 'string' && UUID_RE.exec(value.trim());
      if (!m) throw new EncodingError('a UUID is 8-4-4-4-12 hex text');
      return Buffer.from(m.slice(1).join(''), 'hex');
    }
    case 'json':
      return Buffer.from(stringifyPython(value === undefined ? null : value), 'utf8');
    case 'enum': {
      const names = type.names || [];
      if (typeof value !== 'string' || !names.includes(value)) throw new EncodingError('not one of the enum\'s names');
      const bytes = encodeText(value);
      if (deterministic) return bytes;
      return pad(bytes, Math.max(...names.map((n) => Buffer.byteLength(n, 'utf8'))));
    }
    default:
      throw new EncodingError(`unknown column kind ${JSON.stringify(type.kind)}`);
  }
}

/**
 * The value a plaintext holds, for a column of `type`. For JSON, `exactJson: true` returns
 * JsonNumber numbers and Map objects (see pyjson.js) so that it can be written back unchanged.
 */
function decodePlaintext(type, bytes, { exactJson = false } = {}) {
  checkType(type);
  bytes = Buffer.from(bytes);
  const ascii = () => {
    const text = bytes.toString('latin1');
    if (/[^\x20-\x7e]/.test(text)) throw new EncodingError('plaintext is not ASCII text');
    return text;
  };
  switch (type.kind) {
    case 'string':
      return decodeText(unpad(bytes));
    case 'bytes':
      return bytes;
    case 'integer':
      if (bytes.length !== 8) throw new EncodingError('an integer plaintext is 8 bytes');
      return bytes.readBigInt64BE();
    case 'float':
      if (bytes.length !== 8) throw new EncodingError('a float plaintext is 8 bytes');
      return bytes.readDoubleBE();
    case 'numeric': {
      const text = ascii().replace(/^ +/, '');
      parseDecimal(text);
      if (text !== text.trim()) throw new EncodingError('not a decimal number');
      return text;
    }
    case 'boolean':
      // 01 is true; every other plaintext reads as false (section 7), as the library reads it.
      return bytes.length === 1 && bytes[0] === 1;
    case 'date': {
      const text = ascii();
      isoDate(text);
      return text;
    }
    case 'datetime': {
      const text = ascii();
      isoDateTime(text);
      return text;
    }
    case 'time': {
      const text = ascii();
      isoTime(text);
      return text;
    }
    case 'interval':
      if (bytes.length !== 12) throw new EncodingError('an interval plaintext is 12 bytes');
      return normalizeInterval({
        days: bytes.readInt32BE(0),
        seconds: bytes.readInt32BE(4),
        microseconds: bytes.readUInt32BE(8),
      });
    case 'uuid': {
      if (bytes.length !== 16) throw new EncodingError('a UUID plaintext is 16 bytes');
      const h = bytes.toString('hex');
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    }
    case 'json':
      return parseJson(decodeText(bytes), { exact: exactJson });
    case 'enum': {
      const name = decodeText(unpad(bytes));
      if (type.names && !type.names.includes(name)) throw new EncodingError('not one of the enum\'s names');
      return name;
    }
    default:
      throw new EncodingError(`unknown column kind ${JSON.stringify(type.kind)}`);
  }
}

module.exports = { encodePlaintext, decodePlaintext, pad, unpad, padTo, normalizeInterval, isoDate, isoTime, isoDateTime };
