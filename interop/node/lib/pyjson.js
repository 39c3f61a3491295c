'use strict';
// JSON as Python writes it (FORMAT.md section 7): json.dumps(value, ensure_ascii=False,
// separators=(",", ":"), allow_nan=False), and a parser that keeps what JSON.parse loses
// (number spelling, integers beyond 2^53, member order of integer-like names).
const { EncodingError } = require('./errors');
const { isWellFormed } = require('./primitives');

/** A JSON number kept as its exact text (e.g. "2.0", "12345678901234567890"). */
class JsonNumber {
  constructor(text) {
    if (!/^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/.test(text) && !/^-?Infinity$|^NaN$/.test(text)) {
      throw new EncodingError('not a JSON number');
    }
    this.text = text;
  }
  isInteger() {
    return /^-?\d+$/.test(this.text);
  }
  valueOf() {
    return Number(this.text);
  }
  toString() {
    return this.text;
  }
}

/** Marks a JS number as a float, so that 2 is written "2.0" (Python float) instead of "2". */
function jsonFloat(x) {
  return new JsonNumber(pythonFloatRepr(Number(x)));
}

/** Python's repr(float): shortest round-trip digits; exponent form when exp < -4 or >= 16. */
function pythonFloatRepr(x) {
  if (Number.isNaN(x)) return 'nan';
  if (x === Infinity) return 'inf';
  if (x === -Infinity) return '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  const [mantissa, expText] = Math.abs(x).toExponential().split('e');
  const digits = mantissa.replace('.', '');
  const exp = Number(expText); // value = d.ddd × 10^exp
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? digits[0] + '.' + digits.slice(1) : digits;
    const e = Math.abs(exp) < 10 ? '0' + Math.abs(exp) : String(Math.abs(exp));
    return `${sign}${m}e${exp < 0 ? '-' : '+'}${e}`;
  }
  if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
  if (digits.length <= exp + 1) return `${sign}${digits}${'0'.repeat(exp + 1 - digits.length)}.0`;
  return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
}

function stringifyString(s) {
  if (!isWellFormed(s)) throw new EncodingError('JSON text holds a lone surrogate');
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i];
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0d) out += '\\r';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x0c) out += '\\f';
    else if (c < 0x20) out += '\\u' + c.toString(16).padStart(4, '0');
    else out += ch;
  }
  return out + '"';
}

/**
 * Serializes like Python's compact json.dumps(ensure_ascii=False). Integral JS numbers are
 * written as integers, others as Python floats; BigInt as integers; JsonNumber as its text;
 * a Map keeps its member order (a plain object has JS's order: integer-like names first).
 * With `allowNaN` (for re-emitting what earlier writers stored) NaN/Infinity are written too.
 */
function stringifyPython(value, { allowNaN = false } = {}) {
  const seen = new Set();
  const walk = (v) => {
    if (v === null || v === undefined) return 'null';
    if (v === true) return 'true';
    if (v === false) return 'false';
    if (typeof v === 'string') return stringifyString(v);
    if (typeof v === 'bigint') return v.toString();
    if (typeof v === 'number') {
      if (!Number.isFinite(v)) {
        if (!allowNaN) throw new EncodingError('JSON cannot hold NaN or Infinity');
        return Number.isNaN(v) ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity';
      }
      if (Number.isInteger(v) && !Object.is(v, -0) && Math.abs(v) < 1e16) return String(v);
      return pythonFloatRepr(v);
    }
    if (v instanceof JsonNumber) {
      if (!allowNaN && /N|I/.test(v.text)) throw new EncodingError('JSON cannot hold NaN or Infinity');
      return v.text;
    }
    if (typeof v !== 'object') throw new EncodingError(`cannot write a ${typeof v} as JSON`);
    if (seen.has(v)) throw new EncodingError('circular JSON value');
    seen.add(v);
    let out;
    if (Array.isArray(v)) out = '[' + v.map(walk).join(',') + ']';
    else {
      const entries = v instanceof Map ? [...v.entries()] : Object.entries(v);
      out = '{' + entries.map(([k, x]) => {
        if (typeof k !== 'string') throw new EncodingError('JSON object names must be strings');
        return stringifyString(k) + ':' + walk(x);
      }).join(',') + '}';
    }
    seen.delete(v);
    return out;
  };
  return walk(value);
}

/**
 * Parses JSON text (accepting NaN, Infinity, -Infinity as Python's json.loads does).
 * exact=false: numbers become Number, or BigInt for integers beyond 2^53; objects plain objects.
 * exact=true: numbers become JsonNumber (exact text), objects Maps (member order kept).
 * Duplicate names: the last wins, as in Python.
 */
function parseJson(text, { exact = false } = {}) {
  let i = 0;
  const ws = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i])) i++;
  };
  const fail = (what) => {
    throw new EncodingError(`invalid JSON at offset ${i}: ${what}`);
  };
  const number = (t) => {
    if (exact) return new JsonNumber(t);
    if (/^-?\d+$/.test(t)) {
      const n = Number(t);
      return Number.isSafeInteger(n) ? n : BigInt(t);
    }
    return Number(t);
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const obj = exact ? new Map() : {};
      ws();
      if (text[i] === '}') {
        i++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a name');
        const k = string();
        ws();
        if (text[i] !== ':') fail('expected ":"');
        i++;
        const v = value();
        if (exact) obj.set(k, v);
        else if (k === '__proto__') Object.defineProperty(obj, k, { value: v, enumerable: true, writable: true, configurable: true });
        else obj[k] = v;
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === '}') {
          i++;
          return obj;
        } else fail('expected "," or "}"');
      }
    }
    if (c === '[') {
      i++;
      const arr = [];
      ws();
      if (text[i] === ']') {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value());
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === ']') {
          i++;
          return arr;
        } else fail('expected "," or "]"');
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [['true', true], ['false', false], ['null', null], ['NaN', NaN], ['Infinity', Infinity], ['-Infinity', -Infinity]]) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return typeof v === 'number' ? (exact ? new JsonNumber(word) : v) : v;
      }
    }
    const m = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/.exec(text.slice(i, i + 4096));
    if (!m) fail('unexpected character');
    i += m[0].length;
    return number(m[0]);
  };
  const string = () => {
    i++;
    let out = '';
    for (;;) {
      const c = text[i];
      if (c === undefined) fail('unterminated string');
      if (c === '"') {
        i++;
        return out;
      }
      if (c === '\\') {
        const e = text[i + 1];
        const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
        if (e in simple) {
          out += simple[e];
          i += 2;
        } else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) {
          out += String.fromCharCode(parseInt(text.slice(i + 2, i + 6), 16));
          i += 6;
        } else fail('bad escape');
      } else if (c.charCodeAt(0) < 0x20) {
        fail('control character in string');
      } else {
        out += c;
        i++;
      }
    }
  };
  const result = value();
  ws();
  if (i !== text.length) fail('extra data');
  return result;
}

module.exports = { JsonNumber, jsonFloat, pythonFloatRepr, stringifyPython, parseJson };
