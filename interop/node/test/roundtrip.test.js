'use strict';
// Round trips through a keyring, and the errors a reader must raise.
const test = require('node:test');
const assert = require('node:assert/strict');
const env = require('..');

const ROOT = env.rootKeyFromBytes(Buffer.alloc(32, 1));

function freshKeyring(root = ROOT) {
  const ring = new env.Keyring([], root);
  const rows = [...ring.addKey('default').rows, ...ring.addKey('acme').rows];
  return { ring, rows };
}

/** A new keyring from rows as SQL would return them (hex wrapped keys, decimal ids). */
function reload(rows, root = ROOT, change = (r) => r) {
  return new env.Keyring(rows.map((r) => change({ ...r, id: String(r.id), wrapped_key: r.wrapped_key === null ? null : Buffer.from(r.wrapped_key).toString('hex') })), root);
}

const CASES = [
  [{ kind: 'string' }, 'Ada Lovelace'],
  [{ kind: 'string', pad_to: 16 }, 'café-東京 🙂'],
  [{ kind: 'bytes' }, Buffer.from([0, 255, 16])],
  [{ kind: 'integer' }, -(2n ** 63n)],
  [{ kind: 'float' }, -0.1],
  [{ kind: 'numeric' }, '-1.50E+3'],
  [{ kind: 'numeric', precision: 12, scale: 4 }, '-12.3456'],
  [{ kind: 'boolean' }, false],
  [{ kind: 'date' }, '2000-02-29'],
  [{ kind: 'datetime' }, '2024-02-29T13:45:06.000001-08:00'],
  [{ kind: 'time' }, '00:00:00'],
  [{ kind: 'interval' }, { days: -3, seconds: 1, microseconds: 999999 }],
  [{ kind: 'uuid' }, '12345678-9abc-def0-1234-56789abcdef0'],
  [{ kind: 'json' }, { z: [1, 2.5, 'x\u0000'], a: null }],
  [{ kind: 'enum', names: ['red', 'green'] }, 'red'],
];

test('every type round trips, randomized and deterministic, binary and text', () => {
  const { ring } = freshKeyring();
  for (const [type, value] of CASES) {
    for (const deterministic of [false, true]) {
      if (deterministic && type.pad_to) continue; // refused (section 7)
      for (const storage of ['binary', 'text']) {
        for (const schema of [null, 'tenant_b']) {
          const col = new env.EncryptedColumn({ schema, table: 't', column: 'c', type, deterministic, storage });
          const stored = col.encrypt(ring, value, { scope: 'acme' });
          assert.equal(typeof stored === 'string', storage === 'text');
          assert.deepEqual(col.decrypt(ring, stored), value, `${type.kind} ${deterministic} ${storage}`);
          if (deterministic) assert.deepEqual(col.encrypt(ring, value, { scope: 'acme' }), stored);
          else assert.notDeepEqual(col.encrypt(ring, value, { scope: 'acme' }), stored);
        }
      }
    }
  }
  assert.equal(ring.encryptionCounts.get(String(ring.activeDataKey('acme').record.id)), CASES.length * 2 * 2 * 2);
});

test('sizes: 34 bytes of overhead (randomized), 22 (deterministic); text length 4*ceil((n+34)/3)', () => {
  const { ring } = freshKeyring();
  for (const n of [0, 1, 2, 3, 100]) {
    const p = Buffer.alloc(n, 0x41);
    assert.equal(new env.EncryptedColumn({ table: 't', column: 'c' }).encryptBytes(ring, p).length, n + 34);
    assert.equal(new env.EncryptedColumn({ table: 't', column: 'c', deterministic: true }).encryptBytes(ring, p).length, n + 22);
    assert.equal(new env.EncryptedColumn({ table: 't', column: 'c', storage: 'text' }).encryptBytes(ring, p).length, 4 * Math.ceil((n + 34) / 3));
  }
});

test('SQL NULL stays NULL; a JSON null is the plaintext null unless noneAsNull', () => {
  const { ring } = freshKeyring();
  const text = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  assert.equal(text.encrypt(ring, null), null);
  assert.equal(text.decrypt(ring, null), null);
  const json = new env.EncryptedColumn({ table: 't', column: 'j', type: { kind: 'json' } });
  const stored = json.encrypt(ring, null);
  assert.equal(json.decryptBytes(ring, stored).toString(), 'null');
  assert.equal(new env.EncryptedColumn({ table: 't', column: 'j', type: { kind: 'json' }, noneAsNull: true }).encrypt(ring, null), null);
});

test('rows reload as plain SQL returns them', () => {
  const { ring, rows } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 'patients', column: 'name', type: { kind: 'string' } });
  const stored = col.encrypt(ring, 'Ada', { scope: 'acme' });
  assert.equal(col.decrypt(reload(rows), stored), 'Ada');
  assert.equal(rows.length, 4); // default + ~index:default, acme + ~index:acme
  assert.deepEqual(rows.map((r) => [r.scope, r.version, r.state, r.active_scope]), [
    ['default', 1, 'active', 'default'], ['~index:default', 1, 'active', '~index:default'],
    ['acme', 1, 'active', 'acme'], ['~index:acme', 1, 'active', '~index:acme'],
  ]);
  for (const r of rows) {
    const id = BigInt(r.id);
    assert.ok(id >= 1n && id < 2n ** 40n);
    assert.equal(r.wrapped_key.length, 61);
    assert.equal(r.wrapped_key[0], 2);
    assert.equal(r.root_key_fingerprint, ROOT.fingerprint);
  }
});

test('tampered value, wrong context, wrong schema, moved key id: DecryptionError', () => {
  const { ring } = freshKeyring();
  for (const deterministic of [false, true]) {
    const col = new env.EncryptedColumn({ schema: 's', table: 'a', column: 'b.c', type: { kind: 'string' }, deterministic });
    const stored = col.encrypt(ring, 'secret value', { scope: 'acme' });
    for (let i = 6; i < stored.length; i += 5) {
      const t = Buffer.from(stored);
      t[i] ^= 0x01;
      assert.throws(() => col.decrypt(ring, t), env.DecryptionError);
    }
    const others = [
      { schema: 's', table: 'a.b', column: 'c' },
      { schema: null, table: 'a', column: 'b.c' },
      { schema: 's', table: 'a', column: 'b' },
    ];
    for (const o of others) {
      const e = assert.throws(() => new env.EncryptedColumn({ ...o, type: { kind: 'string' }, deterministic }).decrypt(ring, stored), env.DecryptionError);
    }
    // given context "a.b.c" splits at its last dot: table "a.b", column "c"
    const given = new env.EncryptedColumn({ schema: 's', context: 'a.b.c', type: { kind: 'string' }, deterministic });
    assert.throws(() => given.decrypt(ring, stored), env.DecryptionError);
    // moved to another key id of the same kind
    const other = deterministic ? ring.indexKey('default').record : ring.activeDataKey('default').record;
    const moved = Buffer.from(stored);
    moved.writeUIntBE(Number(other.id), 1, 5);
    assert.throws(() => col.decrypt(ring, moved), env.DecryptionError);
  }
});

test('errors never carry plaintext or key bytes', () => {
  const { ring } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const stored = col.encrypt(ring, 'TOP-SECRET-PLAINTEXT', { scope: 'acme' });
  const key = ring.activeDataKey('acme').key;
  stored[stored.length - 1] ^= 1;
  try {
    col.decrypt(ring, stored);
    assert.fail('decrypted');
  } catch (e) {
    const text = `${e.name} ${e.message} ${e.stack}`;
    assert.ok(!text.includes('TOP-SECRET'));
    assert.ok(!text.includes(key.toString('hex')) && !text.includes(key.toString('base64')));
  }
  assert.ok(!require('util').inspect(ROOT).includes(ROOT.exportBytes().toString('hex')));
  assert.ok(!JSON.stringify(ROOT).includes(ROOT.exportBytes().toString('hex')));
});

test('scope-bound values: the scope is in the context; a reader can require a tenant', () => {
  const { ring } = freshKeyring();
  const bound = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' }, bindScope: true });
  const plain = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const stored = bound.encrypt(ring, 'x', { scope: 'acme' });
  assert.equal(bound.decrypt(ring, stored), 'x');
  assert.equal(bound.decrypt(ring, stored, { expectedScope: 'acme' }), 'x');
  assert.throws(() => bound.decrypt(ring, stored, { expectedScope: 'default' }), env.ScopeMismatchError);
  assert.throws(() => plain.decrypt(ring, stored), env.DecryptionError);
  assert.throws(() => bound.decrypt(ring, plain.encrypt(ring, 'x', { scope: 'acme' })), env.DecryptionError);
  assert.throws(() => new env.EncryptedColumn({ table: 't', column: 'c', deterministic: true, bindScope: true }));
});

test('text storage refuses non-canonical base64 (NotCiphertextError)', () => {
  const { ring } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' }, storage: 'text' });
  const stored = col.encrypt(ring, 'ab', { scope: 'acme' }); // 36 bytes: no padding
  const padded = col.encrypt(ring, 'abc', { scope: 'acme' }); // 37 bytes: "=="
  assert.ok(padded.endsWith('=='));
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  const last = padded[padded.length - 3];
  const nonCanonical = padded.slice(0, -3) + alphabet[alphabet.indexOf(last) | 1] + '==';
  assert.notEqual(nonCanonical, padded);
  for (const bad of [stored + '\n', ' ' + stored, stored.replace(/\+/g, '-').replace(/\//g, '_') + (/[+/]/.test(stored) ? '' : '-'), padded.slice(0, -2), nonCanonical, stored.slice(0, 4) + '\n' + stored.slice(4), '']) {
    assert.throws(() => col.decrypt(ring, bad), env.NotCiphertextError, JSON.stringify(bad));
  }
  assert.equal(col.decrypt(ring, padded), 'abc');
});

test('not a ciphertext: unknown version, too short', () => {
  const { ring } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c' });
  assert.throws(() => col.decrypt(ring, Buffer.from('05000000000100', 'hex')), env.NotCiphertextError);
  assert.throws(() => col.decrypt(ring, Buffer.alloc(33, 3)), env.NotCiphertextError);
  assert.throws(() => col.decrypt(ring, Buffer.alloc(21, 4)), env.NotCiphertextError);
  assert.throws(() => col.decrypt(ring, Buffer.alloc(0)), env.NotCiphertextError);
});

test('key states: retired reads, disabled and destroyed refuse with typed errors', () => {
  const { ring, rows } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const det = new env.EncryptedColumn({ table: 't', column: 'd', type: { kind: 'string' }, deterministic: true });
  const stored = col.encrypt(ring, 'x', { scope: 'acme' });
  const lookup = det.encrypt(ring, 'x', { scope: 'acme' });
  const acme = String(ring.activeDataKey('acme').record.id);
  const acmeIndex = String(ring.indexKey('acme').record.id);
  const withState = (state, id = acme) => reload(rows, ROOT, (r) => (r.id === id ? { ...r, state, active_scope: state === 'active' ? r.scope : null, wrapped_key: state === 'destroyed' ? null : r.wrapped_key } : r));
  assert.equal(col.decrypt(withState('retired'), stored), 'x');
  assert.throws(() => col.decrypt(withState('disabled'), stored), env.KeyDisabledError);
  assert.throws(() => col.decrypt(withState('destroyed'), stored), env.KeyDestroyedError);
  assert.throws(() => det.decrypt(withState('disabled', acmeIndex), lookup), env.KeyDisabledError);
  assert.throws(() => col.encrypt(withState('disabled'), 'x', { scope: 'acme' }), env.KeyNotFoundError);
  assert.throws(() => col.decrypt(withState('paused'), stored), env.KeyTamperedError);
  const disabled = withState('disabled');
  const e = assert.throws(() => col.decrypt(disabled, stored), (err) => err instanceof env.KeyDisabledError && /disabled/.test(err.message));
  // unknown key id
  const other = freshKeyring();
  assert.throws(() => col.decrypt(other.ring, stored), env.KeyNotFoundError);
});

test('wrong root key: WrongRootKeyError; altered or moved wrapped key: KeyTamperedError', () => {
  const { ring, rows } = freshKeyring();
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const stored = col.encrypt(ring, 'x', { scope: 'acme' });
  const otherRoot = env.rootKeyFromBytes(Buffer.alloc(32, 2));
  assert.throws(() => col.decrypt(reload(rows, otherRoot), stored), env.WrongRootKeyError);
  // the right fingerprint but another key: tampering
  const faked = reload(rows, otherRoot, (r) => ({ ...r, root_key_fingerprint: otherRoot.fingerprint }));
  assert.throws(() => col.decrypt(faked, stored), env.KeyTamperedError);
  const acme = String(ring.activeDataKey('acme').record.id);
  const altered = reload(rows, ROOT, (r) => (r.id === acme ? { ...r, wrapped_key: r.wrapped_key.slice(0, -2) + (r.wrapped_key.endsWith('00') ? '01' : '00') } : r));
  assert.throws(() => col.decrypt(altered, stored), env.KeyTamperedError);
  // a wrapped key moved to another version of its scope
  const moved = reload(rows, ROOT, (r) => (r.id === acme ? { ...r, version: 2 } : r));
  assert.throws(() => col.decrypt(moved, stored), env.KeyTamperedError);
  // swapping two rows' wrapped keys
  const def = String(ring.activeDataKey('default').record.id);
  const wk = Object.fromEntries(rows.map((r) => [r.id, r.wrapped_key]));
  const swapped = reload(rows, ROOT, (r) => (r.id === acme ? { ...r, wrapped_key: Buffer.from(wk[def]).toString('hex') } : r));
  assert.throws(() => col.decrypt(swapped, stored), env.KeyTamperedError);
});

test('keys wrapped with context version 1 (either wrapped format) still unwrap', () => {
  const dataKey = Buffer.alloc(32, 9);
  const row = { id: '77', scope: 'acme', version: 1 };
  const contexts = env.wrapContexts(row);
  const root = env.rootKeyFromBytes(Buffer.alloc(32, 1));
  const v1ctx = env.wrapWithKey(root.exportBytes(), dataKey, contexts[1]);
  assert.deepEqual(root.unwrap(v1ctx, row), dataKey);
  // wrapped format 0x01: aad "data-key/v1" with Python-style JSON, either context
  const crypto = require('crypto');
  for (const ctx of contexts) {
    const nonce = crypto.randomBytes(12);
    const c = crypto.createCipheriv('aes-256-gcm', root.exportBytes(), nonce);
    c.setAAD(env.wrapAad(1, ctx));
    const wrapped = Buffer.concat([Buffer.from([1]), nonce, c.update(dataKey), c.final(), c.getAuthTag()]);
    assert.deepEqual(root.unwrap(wrapped, row), dataKey);
  }
});

test('16- and 24-byte root keys wrap with AES-128/192-GCM', () => {
  for (const n of [16, 24]) {
    const root = env.rootKeyFromBytes(Buffer.alloc(n, 3));
    assert.equal(root.description, `static aes-${n * 8}-gcm`);
    const { ring } = freshKeyring(root);
    const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'integer' } });
    assert.equal(col.decrypt(ring, col.encrypt(ring, 5n)), 5n);
  }
  assert.throws(() => env.rootKeyFromBytes(Buffer.alloc(31)));
  assert.throws(() => env.rootKeyFromBase64('not base64!'));
});

test('the active key must be the newest version; rotation retires the previous key', () => {
  const { ring, rows } = freshKeyring();
  const { rows: added, retired } = ring.addKey('acme');
  assert.equal(added.length, 1);
  assert.equal(added[0].version, 2);
  assert.equal(retired.length, 1);
  assert.equal(ring.activeDataKey('acme').record.version, 2);
  // a table where an older version is active: refused for writing
  const old = rows.find((r) => r.scope === 'acme');
  const bad = reload([...rows, { ...added[0], state: 'retired', active_scope: null }]);
  assert.throws(() => bad.activeDataKey('acme'), env.KeyTamperedError);
  assert.equal(old.state, 'active');
  // an index key of a new version retires the previous one
  const idx = ring.addKey('acme', { kind: 'index' });
  assert.equal(idx.rows[0].scope, '~index:acme');
  assert.equal(idx.rows[0].version, 2);
  assert.equal(ring.indexKey('acme', 2).record.state, 'active');
  assert.equal(ring.indexKey('acme', 1).record.state, 'retired');
  // deterministic columns keep using version 1
  const det = new env.EncryptedColumn({ table: 't', column: 'd', deterministic: true });
  const stored = det.encryptBytes(ring, Buffer.from('x'), { scope: 'acme' });
  assert.equal(env.parseHeader(stored).keyId, ring.indexKey('acme', 1).record.id);
});

test('adding a key refuses a table under another root key, and bad scopes', () => {
  const { rows } = freshKeyring();
  const other = reload(rows, env.rootKeyFromBytes(Buffer.alloc(32, 2)));
  assert.throws(() => other.addKey('new'), env.WrongRootKeyError);
  const ring = new env.Keyring([], ROOT);
  for (const bad of ['', '~x', ' a', 'a ', 'a\u0000b', 'a\u200bb', 'a\u2028b', 'e\u0301', 'x'.repeat(249), '🙂'.repeat(249)]) {
    assert.throws(() => ring.addKey(bad), env.EnvelopeError, JSON.stringify(bad));
  }
  for (const good of ['a b', 'café-東京', 'x'.repeat(248), '🙂'.repeat(248)]) ring.addKey(good);
});

test('an asynchronous external root key (e.g. AWS KMS) through unwrapAll()', async () => {
  const local = env.rootKeyFromBytes(Buffer.alloc(32, 4));
  const calls = [];
  const kms = env.externalRootKey({
    fingerprint: 'aws-kms:1234abcd-12ab-34cd-56ef-1234567890ab',
    description: 'aws-kms arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab',
    wrap: async (key, context) => {
      calls.push(['wrap', env.kmsEncryptionContext(context)]);
      return env.wrapWithKey(local.exportBytes(), key, context);
    },
    unwrap: async (blob, context) => {
      calls.push(['unwrap', env.kmsEncryptionContext(context)]);
      return env.unwrapWithKey(local.exportBytes(), blob, [context]);
    },
  });
  const ring = new env.Keyring([], kms);
  const { rows } = await ring.addKey('acme');
  assert.equal(calls[0][1].purpose, 'sqlalchemy-envelope/data-key');
  assert.equal(calls[0][1].kind, 'data');
  const col = new env.EncryptedColumn({ table: 't', column: 'c', type: { kind: 'string' } });
  const stored = col.encrypt(ring, 'x', { scope: 'acme' });
  const fresh = new env.Keyring(rows, kms);
  assert.throws(() => col.decrypt(fresh, stored), /unwrapAll/);
  await fresh.unwrapAll();
  assert.equal(col.decrypt(fresh, stored), 'x');
});

test('keyring blind indexes and hash_field use the scope\'s index key version', () => {
  const { ring } = freshKeyring();
  const key = ring.indexKey('acme').key;
  assert.equal(ring.blindIndex(['Ada'], { scope: 'acme', table: 'u', column: 'i', normalize: 'casefold' }), env.blindIndex(key, ['ada'], { table: 'u', column: 'i' }));
  assert.equal(ring.blindIndex([null, undefined], { scope: 'acme', table: 'u', column: 'i' }), null);
  assert.notEqual(ring.blindIndex([null, ''], { scope: 'acme', table: 'u', column: 'i' }), ring.blindIndex(['', null], { scope: 'acme', table: 'u', column: 'i' }));
  assert.equal(ring.blindIndex([true], { scope: 'acme', context: 'x', bits: 1 }).length, 2);
  assert.match(ring.blindIndex([true], { scope: 'acme', context: 'x', bits: 1 }), /^(00|80)$/);
  assert.equal(ring.blindIndex([7n], { scope: 'acme', context: 'x' }), ring.blindIndex([7], { scope: 'acme', context: 'x' }));
  assert.equal(ring.hashField(Buffer.from('v'), 'c', { scope: 'acme' }), env.hashField(key, Buffer.from('v'), 'c'));
  assert.throws(() => ring.hashField('v', 'c', { scope: 'acme', version: 2 }), env.KeyNotFoundError);
});
