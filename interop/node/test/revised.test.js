'use strict';
// The rules FORMAT.md's revision made explicit (commit 1898840), one test each.
const test = require('node:test');
const assert = require('node:assert/strict');
const env = require('..');

const ROOT = env.rootKeyFromBytes(Buffer.alloc(32, 1));

function freshKeyring(root = ROOT) {
  const ring = new env.Keyring([], root);
  const rows = [...ring.addKey('default').rows, ...ring.addKey('acme').rows];
  return { ring, rows };
}

function reload(rows, root = ROOT, change = (r) => r) {
  return new env.Keyring(rows.map((r) => change({ ...r, id: String(r.id), wrapped_key: r.wrapped_key === null ? null : Buffer.from(r.wrapped_key).toString('hex') })), root);
}

const header = (version, id) => {
  const h = Buffer.alloc(6);
  h[0] = version;
  h.writeUIntBE(Number(id), 1, 5);
  return h;
};

test('section 3: kinds never mix, in all four value versions (DecryptionError)', () => {
  const { ring } = freshKeyring();
  const data = ring.activeDataKey('acme');
  const index = ring.indexKey('acme');
  const col = new env.EncryptedColumn({ table: 't', column: 'c' });
  const det = new env.EncryptedColumn({ table: 't', column: 'c', deterministic: true });
  const ctx = env.valueContext({ table: 't', column: 'c' });
  const legacy = env.legacyValueContext({ table: 't', column: 'c' });
  // randomized values (0x03, 0x01) whose header names an index key, sealed with that key's bytes
  const r3 = env.sealRandomized(index.key, index.record.id, Buffer.from('x'), ctx);
  assert.throws(() => col.decryptBytes(ring, r3), env.DecryptionError);
  const r1 = Buffer.from(r3);
  r1[0] = 1;
  assert.throws(() => col.decryptBytes(ring, r1), env.DecryptionError);
  // deterministic values (0x04, 0x02) whose header names a data key
  const d4 = env.sealDeterministic(data.key, data.record.id, Buffer.from('x'), ctx);
  assert.throws(() => det.decryptBytes(ring, d4), env.DecryptionError);
  const h2 = header(2, data.record.id);
  const d2 = Buffer.concat([h2, env.aesSivEncrypt(env.deterministicKey(data.key, legacy, 2), [h2, legacy], Buffer.from('x'))]);
  assert.throws(() => det.decryptBytes(ring, d2), env.DecryptionError);
  // and the right kinds read
  assert.equal(det.decryptBytes(ring, env.sealDeterministic(index.key, index.record.id, Buffer.from('x'), ctx)).toString(), 'x');
});

test('section 3: a reader decrypts a 0x04 value with whichever index key its header names', () => {
  const { ring } = freshKeyring();
  ring.addKey('acme', { kind: 'index' }); // version 2; version 1 retired
  const v2 = ring.indexKey('acme', 2);
  const det = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' }, deterministic: true });
  const stored = env.sealDeterministic(v2.key, v2.record.id, Buffer.from('under v2'), env.valueContext({ table: 't', column: 'c' }));
  assert.equal(det.decrypt(ring, stored), 'under v2');
  // writers keep version 1, retired or not
  assert.equal(env.parseHeader(det.encrypt(ring, 'x', { scope: 'acme' })).keyId, ring.indexKey('acme', 1).record.id);
  assert.equal(ring.indexKey('acme', 1).record.state, 'retired');
});

test('section 3: the algorithm column is informative; a negative count or an unknown state is tampering', () => {
  const { ring, rows } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const stored = col.encrypt(ring, 'x', { scope: 'acme' });
  const id = String(ring.activeDataKey('acme').record.id);
  for (const algorithm of ['aes-128-gcm', 'whatever', '', null]) {
    assert.equal(col.decrypt(reload(rows, ROOT, (r) => ({ ...r, algorithm })), stored), 'x');
  }
  assert.throws(() => col.decrypt(reload(rows, ROOT, (r) => (r.id === id ? { ...r, encryptions: '-1' } : r)), stored), env.KeyTamperedError);
  assert.throws(() => col.decrypt(reload(rows, ROOT, (r) => (r.id === id ? { ...r, state: 'Active' } : r)), stored), env.KeyTamperedError);
  assert.equal(col.decrypt(reload(rows, ROOT, (r) => (r.id === id ? { ...r, encryptions: '12345678901234567890' } : r)), stored), 'x');
});

test('section 3: scope names: 1 to 248 code points, printable as specified, NFC, no "~"', () => {
  const ring = new env.Keyring([], ROOT);
  const bad = [
    '', 'x'.repeat(249), '🙂'.repeat(249), '~a', ' a', 'a ',
    'a\u0000b', 'a\u007fb', 'a\u00adb', // Cc, Cc, Cf
    'a\u200bb', 'a\u2060b', 'a\ufeffb', // Cf (default-ignorable)
    'a\u034fb', 'a\ufe0fb', 'a\u3164b', 'a\u115fb', 'a\uffa0b', // default-ignorable but not Cf
    'a\u2800b', // Braille blank
    'a\ue000b', 'a\ud800b', 'a\u0378b', // Co, Cs (lone surrogate), Cn
    'a\u2028b', 'a\u2029b', 'a\u00a0b', 'a\u3000b', 'a\u2009b', // Zl, Zp, Zs
    'e\u0301', // not NFC
  ];
  for (const scope of bad) assert.throws(() => env.validateScope(scope), env.EnvelopeError, JSON.stringify(scope));
  for (const scope of ['a', 'a b', 'x'.repeat(248), '🙂'.repeat(248), 'café-東京', 'a~b', 'é', 'ü\u0308'.normalize('NFC')]) {
    assert.equal(env.validateScope(scope), scope);
    ring.addKey(scope);
  }
  // "~index:<scope>" of the longest scope fits the 255 of the column
  assert.equal([...env.indexScope('x'.repeat(248))].length, 255);
});

test('section 3: adding a key checks the lowest-id key that is not destroyed', async () => {
  const other = env.rootKeyFromBytes(Buffer.alloc(32, 2));
  const { rows } = freshKeyring(); // four keys under ROOT
  const sorted = [...rows].sort((a, b) => (BigInt(a.id) < BigInt(b.id) ? -1 : 1));
  const lowest = String(sorted[0].id);
  // another root key: refused
  assert.throws(() => reload(rows, other).addKey('new'), env.WrongRootKeyError);
  // the right fingerprint, but the lowest key does not unwrap: refused as tampering
  const altered = (r) => (r.id === lowest ? { ...r, wrapped_key: r.wrapped_key.slice(0, -2) + (r.wrapped_key.endsWith('00') ? '01' : '00') } : r);
  assert.throws(() => reload(rows, ROOT, altered).addKey('new'), env.KeyTamperedError);
  // a disabled lowest key is still checked, and passes
  reload(rows, ROOT, (r) => (r.id === lowest ? { ...r, state: 'disabled', active_scope: null } : r)).addKey('new');
  // destroyed keys are skipped: the next lowest decides
  const destroyLowest = (r) => (r.id === lowest ? { ...r, state: 'destroyed', active_scope: null, wrapped_key: null, root_key_fingerprint: 'ffffffffffffffff' } : r);
  reload(rows, ROOT, destroyLowest).addKey('new');
  assert.throws(() => reload(rows, other, destroyLowest).addKey('new'), env.WrongRootKeyError);
  // only the lowest is checked: a higher key under another fingerprint does not block
  const highest = String(sorted[sorted.length - 1].id);
  reload(rows, ROOT, (r) => (r.id === highest ? { ...r, root_key_fingerprint: other.fingerprint } : r)).addKey('new');
  // a table of destroyed keys only (or an empty one) accepts any root key
  reload(rows, other, (r) => ({ ...r, state: 'destroyed', active_scope: null, wrapped_key: null })).addKey('new');
  new env.Keyring([], other).addKey('new');
  // a lowest key that is not destroyed but has no wrapped_key: tampering
  assert.throws(() => reload(rows, ROOT, (r) => (r.id === lowest ? { ...r, wrapped_key: null } : r)).addKey('new'), env.KeyTamperedError);
  // an asynchronous root key: the check is awaited
  const local = env.rootKeyFromBytes(Buffer.alloc(32, 4));
  const kms = env.externalRootKey({
    fingerprint: 'aws-kms:k',
    wrap: async (key, context) => env.wrapWithKey(local.exportBytes(), key, context),
    unwrap: async (blob, context) => env.unwrapWithKey(local.exportBytes(), blob, [context]),
  });
  const first = await new env.Keyring([], kms).addKey('acme');
  const again = await new env.Keyring(first.rows, kms).addKey('acme');
  assert.equal(again.rows[0].version, 2);
  const broken = first.rows.map((r) => ({ ...r, wrapped_key: Buffer.alloc(61, 2) }));
  await assert.rejects(new env.Keyring(broken, kms).addKey('acme'), env.KeyTamperedError);
});

test('section 2: root key text is base64 of exactly 32 bytes with its padding, ASCII whitespace around', () => {
  const key = Buffer.from([...Array(32).keys()]);
  const b64 = key.toString('base64'); // ends with one "="
  const fp = env.rootKeyFromBytes(key).fingerprint;
  for (const text of [b64, ` \t\n\r\v\f${b64}\n\v\f \t\r`, Buffer.from(b64 + '\n')]) {
    assert.equal(env.rootKeyFromBase64(text).fingerprint, fp);
    assert.equal(env.rootKeyFromKeyFile(text).fingerprint, fp);
  }
  // unused low bits of the last character are ignored ("Hh8=" and "Hh9=" decode alike)
  assert.equal(b64.slice(-4), 'Hh8=');
  assert.equal(env.rootKeyFromBase64(b64.slice(0, -2) + '9=').fingerprint, fp);
  const bad = [
    b64.slice(0, -1), // no padding
    b64.slice(0, 20) + ' ' + b64.slice(20), // whitespace inside
    b64.slice(0, 20) + '\n' + b64.slice(20),
    b64.replace(/\+/g, '-').replace(/\//g, '_').replace(/=$/, '-'), // url-safe alphabet
    '\u00a0' + b64, // not ASCII whitespace
    b64 + '\u0085',
    Buffer.alloc(16, 1).toString('base64'), // 16 bytes: text must be 32
    Buffer.alloc(24, 1).toString('base64'),
    Buffer.alloc(33, 1).toString('base64'),
    '',
  ];
  for (const text of bad) assert.throws(() => env.rootKeyFromBase64(text), env.EnvelopeError, JSON.stringify(text));
  // a raw key file holds exactly the 32 bytes
  assert.equal(env.rootKeyFromKeyFile(key, { raw: true }).fingerprint, fp);
  assert.throws(() => env.rootKeyFromKeyFile(Buffer.concat([key, Buffer.from('\n')]), { raw: true }), env.EnvelopeError);
  assert.throws(() => env.rootKeyFromKeyFile(key.subarray(0, 16), { raw: true }), env.EnvelopeError);
  // bytes given directly (Python's StaticRootKey(key)) and INTEROP.md's spec may be 16 or 24 bytes
  for (const n of [16, 24, 32]) {
    assert.equal(env.rootKeyFromSpec({ kind: 'key', base64: Buffer.alloc(n, 5).toString('base64') }).description, `static aes-${n * 8}-gcm`);
  }
});

test('section 4: version 1 JSON escapes every character outside U+0020 to U+007E', () => {
  const context = { key_id: '1', scope: 'a"b\\c\n\r\t\b\f\u0001\u001f\u007f é\u2028🙂~' };
  const json = env.wrapAad(1, context).subarray('sqlalchemy-envelope/data-key/v1'.length + 1).toString('latin1');
  assert.equal(json, '{"key_id":"1","scope":"a\\"b\\\\c\\n\\r\\t\\b\\f\\u0001\\u001f\\u007f \\u00e9\\u2028\\ud83d\\ude42~"}');
  // version 2 (JCS) keeps U+007F and non-ASCII as they are
  const jcs = env.wrapAad(2, { key_id: '1', kind: 'data', scope: '\u007fé🙂\u0001', version: '1' }).toString('utf8');
  assert.ok(jcs.endsWith('"scope":"\u007fé🙂\\u0001","version":"1"}'));
});

test('section 7: Numeric(p, s) refuses |value| >= 10^(p - s) after rounding', () => {
  const N = (p, s, v, deterministic = true) => env.encodePlaintext({ kind: 'numeric', precision: p, scale: s }, v, { deterministic }).toString('ascii');
  assert.equal(N(5, 2, '999.99'), '999.99');
  assert.equal(N(5, 2, '-999.994'), '-999.99');
  assert.throws(() => N(5, 2, '999.995'), env.EncodingError); // rounds to 1000.00
  assert.throws(() => N(5, 2, '1000'), env.EncodingError);
  assert.throws(() => N(5, 2, '-1E+3'), env.EncodingError);
  // scale above precision: |value| < 10^(p - s) = 0.01
  assert.equal(N(3, 5, '0.00999'), '0.00999');
  assert.equal(N(3, 5, '-0.009994'), '-0.00999');
  assert.throws(() => N(3, 5, '0.01'), env.EncodingError);
  assert.throws(() => N(3, 5, '0.009995'), env.EncodingError); // rounds to 0.01000
  assert.equal(N(3, 5, '0.00123', false), ' 0.00123'); // padded to 1 + max(-2, 1) + 6 = 8
  // p = s: below 1
  assert.equal(N(2, 2, '0.99'), '0.99');
  assert.throws(() => N(2, 2, '1'), env.EncodingError);
  // Numeric(p) is s = 0
  assert.equal(env.encodePlaintext({ kind: 'numeric', precision: 2 }, '99.4', { deterministic: true }).toString(), '99');
  assert.throws(() => env.encodePlaintext({ kind: 'numeric', precision: 2 }, '99.5', { deterministic: true }), env.EncodingError);
  for (const special of ['NaN', 'Infinity', '-Infinity', 'sNaN']) assert.throws(() => N(10, 2, special), env.EncodingError);
});

test('section 7: a scale without a precision is ignored; a signaling NaN is refused', () => {
  for (const deterministic of [false, true]) {
    const enc = (v) => env.encodePlaintext({ kind: 'numeric', scale: 2 }, v, { deterministic }).toString('ascii');
    assert.equal(enc('1.23456'), '1.23456');
    assert.equal(enc('1E+2'), '1E+2');
    assert.equal(enc('NaN'), 'NaN');
    for (const s of ['sNaN', '-sNaN', 'sNaN12']) {
      assert.throws(() => env.encodePlaintext({ kind: 'numeric' }, s, { deterministic }), env.EncodingError);
      assert.throws(() => enc(s), env.EncodingError);
    }
  }
});

test('section 7: UTC offsets with seconds and microseconds, written as isoformat()', () => {
  const dt = (v) => env.encodePlaintext({ kind: 'datetime' }, v).toString('ascii');
  const t = (v) => env.encodePlaintext({ kind: 'time' }, v).toString('ascii');
  assert.equal(dt('2024-02-29T13:45:06+05:30:15'), '2024-02-29T13:45:06+05:30:15');
  assert.equal(dt('2024-02-29T13:45:06+05:30:00'), '2024-02-29T13:45:06+05:30');
  assert.equal(dt('2024-02-29T13:45:06+05:30:00.000000'), '2024-02-29T13:45:06+05:30');
  assert.equal(dt('2024-02-29T13:45:06+01:00:00.5'), '2024-02-29T13:45:06+01:00:00.500000');
  assert.equal(dt('2024-02-29T13:45:06-00:00:00.000001'), '2024-02-29T13:45:06-00:00:00.000001');
  assert.equal(dt('2024-02-29T13:45:06-00:00'), '2024-02-29T13:45:06+00:00'); // any zero offset
  assert.equal(dt('2024-02-29T13:45:06Z'), '2024-02-29T13:45:06+00:00');
  assert.equal(dt('2024-02-29T13:45:06.000000'), '2024-02-29T13:45:06'); // no zero fraction
  assert.equal(t('23:59:59.000001-23:59:59.999999'), '23:59:59.000001-23:59:59.999999');
  assert.equal(t('23:59:59.000001-23:59:59.999999').length, 31);
  assert.equal(dt('9999-12-31T23:59:59.999999+23:59:59.999999').length, 42);
  for (const bad of ['2024-02-29T13:45:06+24:00', '2024-02-29T13:45:06+05:60', '2024-02-29T13:45:06+05:30:60']) {
    assert.throws(() => dt(bad), env.EncodingError, bad);
  }
  // read back as written
  assert.equal(env.decodePlaintext({ kind: 'datetime' }, Buffer.from('2024-02-29T13:45:06+05:30:15')), '2024-02-29T13:45:06+05:30:15');
});

test('section 7: Boolean reads 01 as true and every other plaintext as false', () => {
  const read = (h) => env.decodePlaintext({ kind: 'boolean' }, Buffer.from(h, 'hex'));
  assert.equal(read('01'), true);
  for (const h of ['00', '02', 'ff', '', '0100', '0001', '31']) assert.equal(read(h), false, h);
});

test('section 7: an Interval reads un-normalized fields as days × 86400 s + seconds + microseconds', () => {
  const read = (d, s, us) => {
    const b = Buffer.alloc(12);
    b.writeInt32BE(d, 0);
    b.writeInt32BE(s, 4);
    b.writeUInt32BE(us, 8);
    return env.decodePlaintext({ kind: 'interval' }, b);
  };
  assert.deepEqual(read(0, 2 * 86400 + 5, 0), { days: 2, seconds: 5, microseconds: 0 });
  assert.deepEqual(read(0, -1, 0), { days: -1, seconds: 86399, microseconds: 0 });
  assert.deepEqual(read(1, 0, 3000000), { days: 1, seconds: 3, microseconds: 0 });
  // writers normalize, the sign in the days
  assert.equal(env.encodePlaintext({ kind: 'interval' }, { days: 0, seconds: -1, microseconds: 0 }).toString('hex'), 'ffffffff0001517f00000000');
});

test('section 7: pad_to is refused on deterministic columns and on other types', () => {
  assert.throws(() => new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string', pad_to: 8 }, deterministic: true }), env.EncodingError);
  assert.throws(() => env.encodePlaintext({ kind: 'string', pad_to: 8 }, 'x', { deterministic: true }), env.EncodingError);
  for (const type of [{ kind: 'bytes', pad_to: 8 }, { kind: 'enum', names: ['a'], pad_to: 8 }, { kind: 'json', pad_to: 8 }]) {
    assert.throws(() => new env.EncryptedColumn({ table: 't', column: 'c', type }), env.EncodingError, type.kind);
    assert.throws(() => env.encodePlaintext(type, type.kind === 'bytes' ? Buffer.from('x') : type.kind === 'enum' ? 'a' : 1), env.EncodingError, type.kind);
  }
  assert.equal(env.encodePlaintext({ kind: 'string', pad_to: 4 }, 'x').toString('hex'), '78ff0000');
  // enums: randomized padded to the longest name, deterministic not padded
  assert.equal(env.encodePlaintext({ kind: 'enum', names: ['a', 'bbb'] }, 'a').toString('hex'), '61ff00');
  assert.equal(env.encodePlaintext({ kind: 'enum', names: ['a', 'bbb'] }, 'a', { deterministic: true }).toString('hex'), '61');
});

test('section 7: JSON integers however large, floats always with "." or an exponent', () => {
  assert.equal(env.stringifyPython([10n ** 30n, -(10n ** 30n), 2, env.jsonFloat(2), 0.1, 1e-7, 1e100, 1e16, -0]), '[1000000000000000000000000000000,-1000000000000000000000000000000,2,2.0,0.1,1e-07,1e+100,1e+16,-0.0]');
  assert.throws(() => env.stringifyPython(NaN), env.EncodingError);
  assert.throws(() => env.stringifyPython([Infinity]), env.EncodingError);
  // readers accept NaN and Infinity from earlier writers
  const back = env.decodePlaintext({ kind: 'json' }, Buffer.from('[NaN,Infinity,-Infinity,123456789012345678901234567890]'));
  assert.ok(Number.isNaN(back[0]));
  assert.deepEqual(back.slice(1), [Infinity, -Infinity, 123456789012345678901234567890n]);
});

test('section 8: floats in blind indexes are Python repr text', () => {
  const key = Buffer.alloc(32, 3);
  const same = (x, text) => assert.equal(env.blindIndex(key, [x], { context: 'c' }), env.blindIndex(key, [text], { context: 'c' }), text);
  same(0.1, '0.1');
  same(1.5, '1.5');
  same(1e16, '1e+16');
  same(1.5e16, '1.5e+16');
  same(123456789012345.6, '123456789012345.6');
  same(0.0001, '0.0001');
  same(0.00001, '1e-05');
  same(1e-100, '1e-100');
  same(-0.5, '-0.5');
  same(Infinity, 'inf');
  same(-Infinity, '-inf');
  same(NaN, 'nan');
  assert.equal(env.pythonFloatRepr(2), '2.0');
  assert.equal(env.pythonFloatRepr(1e15), '1000000000000000.0');
  assert.equal(env.pythonFloatRepr(-0), '-0.0');
});

test('section 9: hash_field takes bytes and refuses text', () => {
  const key = Buffer.alloc(32, 3);
  assert.throws(() => env.hashField(key, 'secret-token', 'users.token'), env.EncodingError);
  assert.equal(env.hashField(key, new Uint8Array(Buffer.from('secret-token')), 'users.token'), env.hashField(key, Buffer.from('secret-token'), 'users.token'));
  const { ring } = freshKeyring();
  assert.throws(() => ring.hashField('v', 'c', { scope: 'acme' }), env.EncodingError);
  assert.match(ring.hashField(Buffer.alloc(0), 'c', { scope: 'acme' }), /^[0-9a-f]{64}$/);
});

test('section 10: a 0x02 value is bound to its legacy context and header through the vector [header, context]', () => {
  const { ring } = freshKeyring();
  const index = ring.indexKey('default');
  const context = Buffer.from('citizens.ssn');
  const head = header(2, index.record.id);
  const sivKey = env.deterministicKey(index.key, context, 2);
  const stored = Buffer.concat([head, env.aesSivEncrypt(sivKey, [head, context], Buffer.from('123-45-6789'))]);
  const col = (o) => new env.EncryptedColumn({ type: { kind: 'string' }, deterministic: true, ...o });
  // read through the column's names, or its given context, with or without a schema (not bound)
  assert.equal(col({ table: 'citizens', column: 'ssn' }).decrypt(ring, stored), '123-45-6789');
  assert.equal(col({ schema: 'tenant_b', table: 'citizens', column: 'ssn' }).decrypt(ring, stored), '123-45-6789');
  assert.equal(col({ context: 'citizens.ssn' }).decrypt(ring, stored), '123-45-6789');
  assert.equal(col({ table: 'citizens', column: 'ssn', storage: 'text' }).decrypt(ring, stored.toString('base64')), '123-45-6789');
  // another column fails
  assert.throws(() => col({ table: 'citizens', column: 'ssn2' }).decrypt(ring, stored), env.DecryptionError);
  // the associated data is a vector: header || context as one string does not authenticate
  const flat = Buffer.concat([head, env.aesSivEncrypt(sivKey, [Buffer.concat([head, context])], Buffer.from('x'))]);
  assert.throws(() => col({ table: 'citizens', column: 'ssn' }).decrypt(ring, flat), env.DecryptionError);
  // nor does the version 2 HKDF label ("deterministic/v2")
  const v2label = Buffer.concat([head, env.aesSivEncrypt(env.deterministicKey(index.key, context, 4), [head, context], Buffer.from('x'))]);
  assert.throws(() => col({ table: 'citizens', column: 'ssn' }).decrypt(ring, v2label), env.DecryptionError);
});
