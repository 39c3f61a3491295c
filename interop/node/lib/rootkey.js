'use strict';
// FORMAT.md section 2 (root keys, fingerprints) and section 4 (wrapped keys).
const crypto = require('crypto');
const { hmac, aesGcmEncrypt, aesGcmDecrypt, toBytes } = require('./primitives');
const { KeyTamperedError, EnvelopeError, DecryptionError } = require('./errors');

const FINGERPRINT_LABEL = 'sqlalchemy-envelope/root-key-fingerprint/v1';
const WRAP_LABEL = { 1: 'sqlalchemy-envelope/data-key/v1', 2: 'sqlalchemy-envelope/data-key/v2' };
const KMS_PURPOSE = 'sqlalchemy-envelope/data-key';
const DEFAULT_PBKDF2_ITERATIONS = 600000;

// ---- wrap contexts and their serializations ----

/**
 * The wrap contexts to try for a key row, in order: version 2 (written), then version 1 (read).
 * `id` and `version` may be numbers, BigInts or decimal strings.
 */
function wrapContexts({ id, scope, version }) {
  const kind = scope.startsWith('~index:') ? 'index' : 'data';
  return [
    { key_id: String(id), kind, scope, version: String(version) },
    { key_id: String(id), scope },
  ];
}

function jcsString(s) {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0c) out += '\\f';
    else if (c === 0x0d) out += '\\r';
    else if (c < 0x20) out += '\\u' + c.toString(16).padStart(4, '0');
    else out += ch;
  }
  return out + '"';
}

function utf16Compare(a, b) {
  // JS string comparison is by UTF-16 code units, as RFC 8785 requires.
  return a < b ? -1 : a > b ? 1 : 0;
}

/** RFC 8785 (JCS) of an object whose values are strings. */
function canonicalJson(context) {
  const names = Object.keys(context).sort(utf16Compare);
  return '{' + names.map((n) => jcsString(n) + ':' + jcsString(context[n])).join(',') + '}';
}

function pythonAsciiString(s) {
  // Python's json.dumps with ensure_ascii=True.
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const c = s.charCodeAt(i);
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0c) out += '\\f';
    else if (c === 0x0d) out += '\\r';
    else if (c < 0x20 || c > 0x7e) out += '\\u' + c.toString(16).padStart(4, '0');
    else out += ch;
  }
  return out + '"';
}

/** The JSON of wrapped format 0x01: sorted members, no spaces, ASCII with \uXXXX escapes (Python json.dumps). */
function legacyJson(context) {
  const names = Object.keys(context).sort((a, b) => {
    // Python sorts str by code point.
    const x = [...a].map((c) => c.codePointAt(0));
    const y = [...b].map((c) => c.codePointAt(0));
    for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
    return x.length - y.length;
  });
  return '{' + names.map((n) => pythonAsciiString(n) + ':' + pythonAsciiString(context[n])).join(',') + '}';
}

/** The associated data binding a wrapped key (format 1 or 2) to its context. */
function wrapAad(format, context) {
  const json = format === 2 ? canonicalJson(context) : legacyJson(context);
  return Buffer.concat([Buffer.from(WRAP_LABEL[format], 'ascii'), Buffer.from([0]), Buffer.from(json, 'utf8')]);
}

/** Wraps a data key with AES-GCM under a local root key (format 0x02). `nonce` is for tests only. */
function wrapWithKey(rootKeyBytes, dataKey, context, nonce = crypto.randomBytes(12)) {
  const sealed = aesGcmEncrypt(rootKeyBytes, nonce, toBytes(dataKey), wrapAad(2, context));
  return Buffer.concat([Buffer.from([2]), nonce, sealed]);
}

/**
 * Unwraps a wrapped key (format 0x01 or 0x02) with a local root key, trying each context in order.
 * Throws KeyTamperedError if none authenticates.
 */
function unwrapWithKey(rootKeyBytes, wrapped, contexts) {
  wrapped = toBytes(wrapped);
  const format = wrapped[0];
  if ((format !== 1 && format !== 2) || wrapped.length < 1 + 12 + 16) {
    throw new KeyTamperedError('wrapped key has an unknown format or length');
  }
  const nonce = wrapped.subarray(1, 13);
  const sealed = wrapped.subarray(13);
  for (const context of contexts) {
    try {
      return aesGcmDecrypt(rootKeyBytes, nonce, sealed, wrapAad(format, context));
    } catch (e) {
      if (!(e instanceof DecryptionError)) throw e;
    }
  }
  throw new KeyTamperedError('wrapped key does not unwrap under its context: altered or moved');
}

// ---- root keys ----

/**
 * A root key held in memory (a key or a PBKDF2 root key). The key bytes are not enumerable
 * and are never printed.
 */
class LocalRootKey {
  constructor(keyBytes, description) {
    keyBytes = Buffer.from(toBytes(keyBytes));
    if (![16, 24, 32].includes(keyBytes.length)) {
      throw new EnvelopeError('a root key is 16, 24 or 32 bytes');
    }
    Object.defineProperty(this, '_key', { value: keyBytes, enumerable: false });
    this.description = description || `static aes-${keyBytes.length * 8}-gcm`;
    this.fingerprint = hmac(keyBytes, FINGERPRINT_LABEL).subarray(0, 8).toString('hex');
  }

  /** Wraps a key for the data_keys row of that id, scope and version (format 0x02, context version 2). */
  wrap(dataKey, row) {
    return wrapWithKey(this._key, dataKey, wrapContexts(row)[0]);
  }

  /** Unwraps a row's wrapped_key, trying context version 2 then version 1. */
  unwrap(wrappedKey, row) {
    return unwrapWithKey(this._key, wrappedKey, wrapContexts(row));
  }

  /** The raw root key bytes (a copy). */
  exportBytes() {
    return Buffer.from(this._key);
  }

  toJSON() {
    return { fingerprint: this.fingerprint, description: this.description };
  }

  [Symbol.for('nodejs.util.inspect.custom')]() {
    return `RootKey(${this.description}, fingerprint ${this.fingerprint})`;
  }
}

/** A root key from its raw bytes (16, 24 or 32). */
function rootKeyFromBytes(bytes) {
  return new LocalRootKey(bytes);
}

// ASCII whitespace (section 2): space, \t, \n, \r, \v, \f.
const ASCII_SPACE = /^[ \t\n\r\v\f]+|[ \t\n\r\v\f]+$/g;
const BASE64_PADDED = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * The bytes of root key text: ASCII whitespace around it ignored; inside, only the standard
 * alphabet with its "=" padding; unused low bits of the last character ignored. `lengths`: the
 * byte lengths accepted.
 */
function rootKeyTextBytes(text, lengths = [32]) {
  if (Buffer.isBuffer(text) || text instanceof Uint8Array) text = Buffer.from(text).toString('latin1');
  if (typeof text !== 'string') throw new EnvelopeError('the root key text is not base64');
  const trimmed = text.replace(ASCII_SPACE, '');
  if (!BASE64_PADDED.test(trimmed)) throw new EnvelopeError('the root key text is not base64');
  const bytes = Buffer.from(trimmed, 'base64');
  if (!lengths.includes(bytes.length)) throw new EnvelopeError(`the root key text must decode to ${lengths.join(', ')} bytes`);
  return bytes;
}

/**
 * A root key from base64 text (ENVELOPE_ROOT_KEY or a key file's content): exactly 32 bytes;
 * ASCII whitespace around it is ignored.
 */
function rootKeyFromBase64(text) {
  return new LocalRootKey(rootKeyTextBytes(text, [32]));
}

/** A root key from a key file's content; `raw: true` (ENVELOPE_ROOT_KEY_FILE_RAW=1) means it holds exactly the 32 bytes. */
function rootKeyFromKeyFile(content, { raw = false } = {}) {
  if (!raw) return rootKeyFromBase64(content);
  const bytes = toBytes(content);
  if (bytes.length !== 32) throw new EnvelopeError('a raw key file holds exactly 32 bytes');
  return new LocalRootKey(bytes);
}

/** PBKDF2-HMAC-SHA256(UTF-8(seed), UTF-8(salt), iterations, 32). Seeds and salts may be Buffers. */
function rootKeyFromPbkdf2(seed, salt, iterations = DEFAULT_PBKDF2_ITERATIONS) {
  if (!Number.isSafeInteger(iterations) || iterations < 1) throw new EnvelopeError('iterations must be a positive integer');
  const key = crypto.pbkdf2Sync(toBytes(seed), toBytes(salt), iterations, 32, 'sha256');
  return new LocalRootKey(key, `pbkdf2-hmac-sha256 iterations=${iterations} aes-256-gcm`);
}

/**
 * A root key whose wrapping happens elsewhere (AWS KMS, an HSM...): you supply `unwrap` (and
 * `wrap` to create keys). Each receives the key bytes and a wrap context (a plain object of
 * strings); unwrap is called with context version 2, then version 1, and must throw when the
 * context does not match. They may return Promises: then call `await keyring.unwrapAll()` first.
 * For AWS KMS, pass `kmsEncryptionContext(context)` as Decrypt's EncryptionContext, and
 * `fingerprint: 'aws-kms:' + keyId`.
 */
class ExternalRootKey {
  constructor({ fingerprint, description = '', unwrap, wrap }) {
    if (typeof fingerprint !== 'string' || typeof unwrap !== 'function') {
      throw new TypeError('an external root key needs a fingerprint and an unwrap function');
    }
    this.fingerprint = fingerprint;
    this.description = description;
    this._unwrap = unwrap;
    this._wrap = wrap;
  }

  wrap(dataKey, row) {
    if (!this._wrap) throw new EnvelopeError('this root key cannot wrap (no wrap function given)');
    return this._wrap(dataKey, wrapContexts(row)[0]);
  }

  unwrap(wrappedKey, row) {
    const contexts = wrapContexts(row);
    const attempt = (i) => {
      let result;
      try {
        result = this._unwrap(wrappedKey, contexts[i]);
      } catch (e) {
        if (i + 1 < contexts.length) return attempt(i + 1);
        throw new KeyTamperedError('wrapped key does not unwrap under its context: altered or moved');
      }
      if (result && typeof result.then === 'function') {
        return result.then(toBytes, () => {
          if (i + 1 < contexts.length) return attempt(i + 1);
          throw new KeyTamperedError('wrapped key does not unwrap under its context: altered or moved');
        });
      }
      return toBytes(result);
    };
    return attempt(0);
  }
}

function externalRootKey(options) {
  return new ExternalRootKey(options);
}

/** AWS KMS's EncryptionContext for a wrap context. */
function kmsEncryptionContext(context) {
  return { ...context, purpose: KMS_PURPOSE };
}

/** A root key from INTEROP.md's JSON form: {kind: "key", base64} or {kind: "pbkdf2", seed, salt, iterations}. */
function rootKeyFromSpec(spec) {
  // INTEROP.md's key is base64 of 16, 24 or 32 bytes (Python's StaticRootKey(key) takes all three).
  if (spec && spec.kind === 'key') return new LocalRootKey(rootKeyTextBytes(spec.base64, [16, 24, 32]));
  if (spec && spec.kind === 'pbkdf2') return rootKeyFromPbkdf2(spec.seed, spec.salt, spec.iterations ?? DEFAULT_PBKDF2_ITERATIONS);
  throw new EnvelopeError('root key spec must be {kind: "key"} or {kind: "pbkdf2"}');
}

module.exports = {
  LocalRootKey,
  ExternalRootKey,
  rootKeyFromBytes,
  rootKeyFromBase64,
  rootKeyTextBytes,
  rootKeyFromKeyFile,
  rootKeyFromPbkdf2,
  rootKeyFromSpec,
  externalRootKey,
  kmsEncryptionContext,
  wrapContexts,
  wrapAad,
  wrapWithKey,
  unwrapWithKey,
  canonicalJson,
  legacyJson,
  DEFAULT_PBKDF2_ITERATIONS,
};
