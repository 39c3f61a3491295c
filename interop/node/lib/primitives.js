'use strict';
// FORMAT.md section 1: the building blocks (HKDF, HMAC, field(), AES-GCM,
// AES-SIV per RFC 5297, canonical base64).
const crypto = require('crypto');
const { DecryptionError, NotCiphertextError } = require('./errors');

const EMPTY = Buffer.alloc(0);

function toBytes(value) {
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  throw new TypeError('expected a Buffer, Uint8Array or string');
}

/** True unless the string holds a lone surrogate (String.prototype.isWellFormed is Node 20+). */
function isWellFormed(text) {
  return !/\p{Cs}/u.test(text);
}

/** UTF-8 of a string, refusing lone surrogates (which UTF-8 cannot hold). */
function utf8(text) {
  if (typeof text !== 'string') throw new TypeError('expected a string');
  if (!isWellFormed(text)) throw new TypeError('text holds a lone surrogate');
  return Buffer.from(text, 'utf8');
}

/** HKDF-SHA256 without salt (RFC 5869: 32 zero bytes). */
function hkdf(ikm, info, length) {
  return Buffer.from(crypto.hkdfSync('sha256', toBytes(ikm), EMPTY, toBytes(info), length));
}

/** HMAC-SHA256, full 32 bytes. */
function hmac(key, message) {
  return crypto.createHmac('sha256', toBytes(key)).update(toBytes(message)).digest();
}

/** field(s): 4-byte big-endian length of UTF-8(s), then UTF-8(s). */
function field(text) {
  const bytes = Buffer.isBuffer(text) ? text : utf8(text);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(bytes.length);
  return Buffer.concat([len, bytes]);
}

function gcmName(key) {
  if (![16, 24, 32].includes(key.length)) throw new TypeError('AES-GCM key must be 16, 24 or 32 bytes');
  return `aes-${key.length * 8}-gcm`;
}

/** AES-GCM: returns ciphertext || 16-byte tag. */
function aesGcmEncrypt(key, nonce, plaintext, aad) {
  const cipher = crypto.createCipheriv(gcmName(key), key, nonce, { authTagLength: 16 });
  cipher.setAAD(aad);
  return Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
}

/** AES-GCM decryption of ciphertext || tag; throws DecryptionError on failure. */
function aesGcmDecrypt(key, nonce, sealed, aad) {
  if (sealed.length < 16) throw new DecryptionError('ciphertext too short');
  const decipher = crypto.createDecipheriv(gcmName(key), key, nonce, { authTagLength: 16 });
  decipher.setAAD(aad);
  decipher.setAuthTag(sealed.subarray(sealed.length - 16));
  const out = decipher.update(sealed.subarray(0, sealed.length - 16));
  try {
    return Buffer.concat([out, decipher.final()]);
  } catch (_) {
    out.fill(0);
    throw new DecryptionError('authentication failed');
  }
}

// ---- AES-SIV (RFC 5297), key-size generic: 32, 48 or 64 bytes ----

function aesBlock(key, block) {
  const c = crypto.createCipheriv(`aes-${key.length * 8}-ecb`, key, null);
  c.setAutoPadding(false);
  return Buffer.concat([c.update(block), c.final()]);
}

/** dbl(): multiply by x in GF(2^128). */
function dbl(block) {
  const out = Buffer.alloc(16);
  for (let i = 0; i < 15; i++) out[i] = ((block[i] << 1) | (block[i + 1] >>> 7)) & 0xff;
  out[15] = (block[15] << 1) & 0xff;
  if (block[0] & 0x80) out[15] ^= 0x87;
  return out;
}

function xor(a, b) {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] ^ b[i];
  return out;
}

/** AES-CMAC (NIST SP 800-38B / RFC 4493). */
function cmac(key, message) {
  const ecb = crypto.createCipheriv(`aes-${key.length * 8}-ecb`, key, null);
  ecb.setAutoPadding(false);
  const k1 = dbl(aesBlock(key, Buffer.alloc(16)));
  const k2 = dbl(k1);
  const n = Math.max(1, Math.ceil(message.length / 16));
  const complete = message.length > 0 && message.length % 16 === 0;
  let last;
  if (complete) {
    last = xor(message.subarray((n - 1) * 16), k1);
  } else {
    const padded = Buffer.alloc(16);
    message.copy(padded, 0, (n - 1) * 16);
    padded[message.length - (n - 1) * 16] = 0x80;
    last = xor(padded, k2);
  }
  let x = Buffer.alloc(16);
  for (let i = 0; i < n - 1; i++) {
    x = ecb.update(xor(x, message.subarray(i * 16, i * 16 + 16)));
  }
  return ecb.update(xor(x, last));
}

/** S2V(K, S1, ..., Sn) of RFC 5297 section 2.4; `strings` is [AD1, ..., plaintext]. */
function s2v(key, strings) {
  if (strings.length === 0) {
    const one = Buffer.alloc(16);
    one[15] = 1;
    return cmac(key, one);
  }
  let d = cmac(key, Buffer.alloc(16));
  for (let i = 0; i < strings.length - 1; i++) d = xor(dbl(d), cmac(key, strings[i]));
  const sn = strings[strings.length - 1];
  let t;
  if (sn.length >= 16) {
    t = Buffer.from(sn);
    const off = sn.length - 16;
    for (let i = 0; i < 16; i++) t[off + i] ^= d[i];
  } else {
    const padded = Buffer.alloc(16);
    sn.copy(padded);
    padded[sn.length] = 0x80;
    t = xor(dbl(d), padded);
  }
  return cmac(key, t);
}

function sivCtr(key, iv, data) {
  const q = Buffer.from(iv);
  q[8] &= 0x7f;
  q[12] &= 0x7f;
  const c = crypto.createCipheriv(`aes-${key.length * 8}-ctr`, key, q);
  return Buffer.concat([c.update(data), c.final()]);
}

function sivKeys(key) {
  if (![32, 48, 64].includes(key.length)) throw new TypeError('AES-SIV key must be 32, 48 or 64 bytes');
  const half = key.length / 2;
  return [key.subarray(0, half), key.subarray(half)];
}

/** AES-SIV encryption: returns the 16-byte synthetic IV || ciphertext. */
function aesSivEncrypt(key, associatedData, plaintext) {
  const [macKey, ctrKey] = sivKeys(key);
  const iv = s2v(macKey, [...associatedData, plaintext]);
  return Buffer.concat([iv, sivCtr(ctrKey, iv, plaintext)]);
}

/** AES-SIV decryption of IV || ciphertext; throws DecryptionError on failure. */
function aesSivDecrypt(key, associatedData, sealed) {
  if (sealed.length < 16) throw new DecryptionError('ciphertext too short');
  const [macKey, ctrKey] = sivKeys(key);
  const iv = sealed.subarray(0, 16);
  const plaintext = sivCtr(ctrKey, iv, sealed.subarray(16));
  const expected = s2v(macKey, [...associatedData, plaintext]);
  if (!crypto.timingSafeEqual(expected, iv)) {
    plaintext.fill(0);
    throw new DecryptionError('authentication failed');
  }
  return plaintext;
}

// ---- base64 (RFC 4648 section 4), canonical ----

const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function encodeBase64(bytes) {
  return Buffer.from(bytes).toString('base64');
}

/** Decodes canonical base64 only (standard alphabet, padding, zero unused bits); else NotCiphertextError. */
function decodeCanonicalBase64(text, ErrorClass = NotCiphertextError) {
  if (typeof text !== 'string' || !BASE64_RE.test(text)) throw new ErrorClass('not canonical base64');
  const bytes = Buffer.from(text, 'base64');
  if (bytes.toString('base64') !== text) throw new ErrorClass('not canonical base64');
  return bytes;
}

module.exports = {
  isWellFormed,
  toBytes,
  utf8,
  hkdf,
  hmac,
  field,
  aesGcmEncrypt,
  aesGcmDecrypt,
  cmac,
  s2v,
  aesSivEncrypt,
  aesSivDecrypt,
  encodeBase64,
  decodeCanonicalBase64,
};
