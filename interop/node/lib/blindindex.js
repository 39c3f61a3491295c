'use strict';
// FORMAT.md sections 8 (blind indexes) and 9 (hash_field).
const { hkdf, hmac, toBytes, utf8 } = require('./primitives');
const { EncodingError } = require('./errors');
const { applyNormalizers } = require('./normalize');
const { pythonFloatRepr } = require('./pyjson');

const BLIND_INDEX_LABEL = 'sqlalchemy-envelope/blind-index/v1';
const HASH_FIELD_LABEL = 'sqlalchemy-envelope/hash-field/v1';
const NULL_PART = Buffer.from('ffffffff', 'hex');

/** The name a blind index is keyed by: the given context, else "<table>.<index column>". */
function blindIndexName({ table, column, context = null }) {
  if (context !== null && context !== undefined) return context;
  if (typeof table !== 'string' || typeof column !== 'string') throw new EncodingError('a blind index needs a table and a column, or a context');
  return `${table}.${column}`;
}

function checkBits(bits) {
  if (!Number.isInteger(bits) || bits < 1 || bits > 256) throw new EncodingError('bits is 1 to 256');
  return bits;
}

/** label = "sqlalchemy-envelope/blind-index/v1" 00 UTF-8(name) 00 ASCII(bits). */
function blindIndexLabel(name, bits = 256) {
  return Buffer.concat([Buffer.from(BLIND_INDEX_LABEL, 'ascii'), Buffer.from([0]), utf8(name), Buffer.from([0]), Buffer.from(String(checkBits(bits)), 'ascii')]);
}

/** The HMAC key of a blind index: HKDF(index key, label, 32). */
function blindIndexKey(indexKey, name, bits = 256) {
  return hkdf(indexKey, blindIndexLabel(name, bits), 32);
}

/**
 * The bytes of one source value: null/undefined -> NULL; string (normalized); Buffer/Uint8Array;
 * BigInt or integral number -> decimal; boolean -> "True"/"False"; other numbers -> Python's
 * repr(float).
 */
function partBytes(value, normalize) {
  if (typeof value === 'string') return utf8(applyNormalizers(value, normalize));
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'bigint') return Buffer.from(value.toString(), 'ascii');
  if (typeof value === 'boolean') return Buffer.from(value ? 'True' : 'False', 'ascii');
  if (typeof value === 'number') {
    return Buffer.from(Number.isSafeInteger(value) ? String(value) : pythonFloatRepr(value), 'ascii');
  }
  throw new EncodingError('a blind index source is text, bytes, an integer, a boolean or null');
}

/** part(v): ffffffff for NULL, else 4-byte big-endian length || bytes. */
function part(value, normalize) {
  if (value === null || value === undefined) return NULL_PART;
  const bytes = partBytes(value, normalize);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(bytes.length);
  return Buffer.concat([len, bytes]);
}

/**
 * A blind index digest (lowercase hex), or null when every source is NULL.
 * options: {table, column} or {context}; bits (default 256); normalize (name, function or list).
 */
function blindIndex(indexKey, sources, { table, column, context = null, bits = 256, normalize = null } = {}) {
  if (!Array.isArray(sources)) sources = [sources];
  if (sources.length === 0) throw new EncodingError('a blind index has at least one source');
  if (sources.every((s) => s === null || s === undefined)) return null;
  const key = blindIndexKey(indexKey, blindIndexName({ table, column, context }), bits);
  const message = Buffer.concat(sources.map((s) => part(s, normalize)));
  const n = Math.ceil(bits / 8);
  const digest = hmac(key, message).subarray(0, n);
  const unused = 8 * n - bits;
  digest[n - 1] &= (0xff << unused) & 0xff;
  return digest.toString('hex');
}

/**
 * hash_field: HMAC(HKDF(index key, "sqlalchemy-envelope/hash-field/v1" 00 UTF-8(context), 32), value)
 * as hex. `value` is bytes (Buffer/Uint8Array): text is refused, encode it first.
 */
function hashField(indexKey, value, context) {
  if (!(value instanceof Uint8Array)) throw new EncodingError('hash_field takes bytes (encode text first)');
  if (typeof context !== 'string') throw new EncodingError('a hash_field context is text');
  const key = hkdf(indexKey, Buffer.concat([Buffer.from(HASH_FIELD_LABEL, 'ascii'), Buffer.from([0]), utf8(context)]), 32);
  return hmac(key, toBytes(value)).toString('hex');
}

module.exports = { blindIndex, blindIndexLabel, blindIndexKey, blindIndexName, part, hashField };
