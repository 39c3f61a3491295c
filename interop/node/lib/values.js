'use strict';
// FORMAT.md sections 5, 6 and 10: encrypted values, their contexts and storage.
const crypto = require('crypto');
const {
  field, utf8, hkdf, aesGcmEncrypt, aesGcmDecrypt, aesSivEncrypt, aesSivDecrypt,
  encodeBase64, decodeCanonicalBase64,
} = require('./primitives');
const { NotCiphertextError, DecryptionError, ScopeMismatchError, EnvelopeError, EncodingError } = require('./errors');
const { encodePlaintext, decodePlaintext } = require('./encodings');
const { indexScope } = require('./keyring');

const RANDOMIZED = 0x03;
const DETERMINISTIC = 0x04;
const LEGACY_RANDOMIZED = 0x01;
const LEGACY_DETERMINISTIC = 0x02;
const DETERMINISTIC_INFO = { 4: 'sqlalchemy-envelope/deterministic/v2', 2: 'sqlalchemy-envelope/deterministic/v1' };

/**
 * Where a value belongs: {schema, table, column} or a given context text ("table.column",
 * split at its last dot; the schema stays the column's own). Returns {schema, table, column}.
 */
function resolveNames({ schema = null, table, column, context = null }) {
  if (context !== null && context !== undefined) {
    const dot = context.lastIndexOf('.');
    return dot < 0
      ? { schema: schema || '', table: '', column: context }
      : { schema: schema || '', table: context.slice(0, dot), column: context.slice(dot + 1) };
  }
  if (typeof table !== 'string' || typeof column !== 'string') throw new EnvelopeError('a value context needs a table and a column');
  return { schema: schema || '', table, column };
}

/** The context of versions 3 and 4: field(schema) || field(table) || field(column) [|| field(scope)]. */
function valueContext(location, scope = null) {
  const { schema, table, column } = resolveNames(location);
  const parts = [field(schema), field(table), field(column)];
  if (scope !== null && scope !== undefined) parts.push(field(scope));
  return Buffer.concat(parts);
}

/** The context of versions 1 and 2: "table.column" (or a given context as is) [|| 00 "scope=" scope]. */
function legacyValueContext({ table, column, context = null }, scope = null) {
  const text = context !== null && context !== undefined ? context : `${table}.${column}`;
  const parts = [utf8(text)];
  if (scope !== null && scope !== undefined) parts.push(Buffer.from([0]), utf8('scope=' + scope));
  return Buffer.concat(parts);
}

function header(version, keyId) {
  const out = Buffer.alloc(6);
  out[0] = version;
  out.writeUIntBE(Number(keyId), 1, 5);
  return out;
}

/** The deterministic (AES-SIV) key of a context: HKDF(index key, info, 64). */
function deterministicKey(indexKey, context, version = DETERMINISTIC) {
  return hkdf(indexKey, Buffer.concat([Buffer.from(DETERMINISTIC_INFO[version], 'ascii'), Buffer.from([0]), context]), 64);
}

/** Format 0x03: header || nonce || AES-256-GCM(data key, nonce, plaintext, header || context). */
function sealRandomized(dataKey, keyId, plaintext, context, nonce = crypto.randomBytes(12)) {
  const head = header(RANDOMIZED, keyId);
  return Buffer.concat([head, nonce, aesGcmEncrypt(dataKey, nonce, plaintext, Buffer.concat([head, context]))]);
}

/** Format 0x04: header || AES-SIV(HKDF(index key, ...), [header, context], plaintext). */
function sealDeterministic(indexKey, keyId, plaintext, context) {
  const head = header(DETERMINISTIC, keyId);
  return Buffer.concat([head, aesSivEncrypt(deterministicKey(indexKey, context), [head, context], plaintext)]);
}

/** Parses a stored value's header: {version, keyId (BigInt)}. */
function parseHeader(bytes) {
  const version = bytes[0];
  const min = { 1: 34, 3: 34, 2: 22, 4: 22 }[version];
  if (!min) throw new NotCiphertextError('unknown format version');
  if (bytes.length < min) throw new NotCiphertextError('value too short for its format');
  return { version, keyId: BigInt(bytes.readUIntBE(1, 5)) };
}

/** Opens a stored value given its key bytes and context (already chosen for its version). */
function openWithKey(bytes, key, context) {
  const { version } = parseHeader(bytes);
  const head = bytes.subarray(0, 6);
  if (version === RANDOMIZED || version === LEGACY_RANDOMIZED) {
    return aesGcmDecrypt(key, bytes.subarray(6, 18), bytes.subarray(18), Buffer.concat([head, context]));
  }
  return aesSivDecrypt(deterministicKey(key, context, version), [head, context], bytes.subarray(6));
}

/** Stored form -> bytes: binary storage takes bytes (Buffer/Uint8Array or hex), text storage canonical base64. */
function storedBytes(stored, storage) {
  if (storage === 'text') return decodeCanonicalBase64(stored);
  if (stored instanceof Uint8Array) return Buffer.from(stored);
  throw new NotCiphertextError('binary storage holds bytes');
}

/**
 * An encrypted column: where it is, its type and options.
 *
 *   const names = new EncryptedColumn({table: 'patients', column: 'name', type: {kind: 'string'}});
 *   names.decrypt(keyring, row.name)               // -> 'Ada Lovelace'
 *   names.encrypt(keyring, 'Ada', {scope: 'acme'}) // -> Buffer to store
 *
 * Options: schema (null for none), table, column, context ("old_table.old_column"), type
 * ({kind, ...} as in encodings.js), deterministic, bindScope, storage ("binary" | "text"),
 * noneAsNull (JSON columns).
 */
class EncryptedColumn {
  constructor({ schema = null, table, column, context = null, type = { kind: 'bytes' }, deterministic = false, bindScope = false, storage = 'binary', noneAsNull = false }) {
    if (deterministic && bindScope) throw new EnvelopeError('bind_scope is refused for deterministic columns');
    if (type && type.pad_to !== undefined && type.pad_to !== null) {
      // section 7: pad_to is for randomized string columns only
      if (type.kind !== 'string') throw new EncodingError('pad_to is refused on columns that are not strings');
      if (deterministic) throw new EncodingError('pad_to is refused on deterministic columns');
    }
    if (storage !== 'binary' && storage !== 'text') throw new EnvelopeError('storage is "binary" or "text"');
    this.location = { schema, table, column, context };
    this.type = type;
    this.deterministic = deterministic;
    this.bindScope = bindScope;
    this.storage = storage;
    this.noneAsNull = noneAsNull || Boolean(type && type.none_as_null);
    resolveNames(this.location);
  }

  /** Plaintext bytes -> stored value (Buffer, or base64 text for text storage). Counts data key use. */
  encryptBytes(keyring, plaintext, { scope = 'default', nonce } = {}) {
    let bytes;
    if (this.deterministic) {
      const { record, key } = keyring.indexKey(scope, 1);
      bytes = sealDeterministic(key, record.id, plaintext, valueContext(this.location));
    } else {
      const { record, key } = keyring.activeDataKey(scope);
      bytes = sealRandomized(key, record.id, plaintext, valueContext(this.location, this.bindScope ? record.scope : null), nonce);
      keyring.countEncryption(record);
    }
    return this.storage === 'text' ? encodeBase64(bytes) : bytes;
  }

  /**
   * Stored value -> plaintext bytes. `expectedScope` (scope-bound columns) refuses a key of
   * another scope (ScopeMismatchError). Returns null for SQL NULL.
   */
  decryptBytes(keyring, stored, { expectedScope = null } = {}) {
    if (stored === null || stored === undefined) return null;
    const bytes = storedBytes(stored, this.storage);
    const { version, keyId } = parseHeader(bytes);
    const deterministic = version === DETERMINISTIC || version === LEGACY_DETERMINISTIC;
    const record = keyring.record(keyId);
    // Kinds never mix (section 3): a randomized value under an index key, or a deterministic
    // one under a data key, was altered.
    if (record.kind !== (deterministic ? 'index' : 'data')) {
      throw new DecryptionError(`a ${deterministic ? 'deterministic' : 'randomized'} value names ${deterministic ? 'a data' : 'an index'} key (${keyId}): altered`);
    }
    const scope = this.bindScope ? record.scope : null;
    if (this.bindScope && expectedScope !== null && record.scope !== expectedScope) {
      throw new ScopeMismatchError(`the value's key belongs to another scope than ${JSON.stringify(expectedScope)}`);
    }
    const context = version >= 3 ? valueContext(this.location, scope) : legacyValueContext(this.location, scope);
    return openWithKey(bytes, keyring.keyBytes(record), context);
  }

  /** A value -> stored value; null (SQL NULL) stays null, except JSON null unless noneAsNull. */
  encrypt(keyring, value, options = {}) {
    if (value === null || value === undefined) {
      if (this.type.kind !== 'json' || this.noneAsNull) return null;
    }
    return this.encryptBytes(keyring, encodePlaintext(this.type, value, { deterministic: this.deterministic }), options);
  }

  /** Stored value -> value (see encodings.js for the JS types). */
  decrypt(keyring, stored, options = {}) {
    const plaintext = this.decryptBytes(keyring, stored, options);
    if (plaintext === null) return null;
    try {
      return decodePlaintext(this.type, plaintext, options);
    } finally {
      plaintext.fill(0);
    }
  }

  /** The stored value an equality lookup compares with (deterministic columns only). */
  lookupValue(keyring, value, { scope = 'default' } = {}) {
    if (!this.deterministic) throw new EnvelopeError('only deterministic columns can be looked up by value');
    return this.encrypt(keyring, value, { scope });
  }
}

module.exports = {
  EncryptedColumn,
  valueContext,
  legacyValueContext,
  resolveNames,
  deterministicKey,
  sealRandomized,
  sealDeterministic,
  openWithKey,
  parseHeader,
  header,
  indexScope,
};
