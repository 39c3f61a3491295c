'use strict';
// bin/envelope.js (INTEROP.md): a write then a read of the same rows and values.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('path');
const { spawnSync } = require('child_process');
const { loadVectors } = require('./vectors');

const BIN = path.join(__dirname, '..', 'bin', 'envelope.js');
const ROOT = { kind: 'key', base64: 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=' };

function run(command, input) {
  const r = spawnSync(process.execPath, [BIN, command], { input: typeof input === 'string' ? input : JSON.stringify(input), encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, json: r.status === 0 ? JSON.parse(r.stdout) : null };
}

test('write then read every encoding vector, both storages, randomized and deterministic', () => {
  const V = loadVectors();
  const items = [];
  for (const v of V.encodings) {
    for (const storage of ['binary', 'text']) {
      items.push({ schema: storage === 'text' ? 'tenant_b' : null, table: 't', column: 'c', context: null, type: v.type, storage, deterministic: v.deterministic, bind_scope: !v.deterministic && storage === 'text', value: v.value, scope: 'acme' });
    }
  }
  items.push({ schema: null, table: 'x', column: 'y', context: 'old.col', type: { kind: 'string' }, storage: 'binary', deterministic: false, bind_scope: false, value: null, scope: 'acme' });
  const w = run('write', {
    root_key: ROOT,
    data_keys: [],
    new_keys: [{ scope: 'acme', kind: 'data' }],
    values: items,
    blind_indexes: [{ table: 'users', column: 'email_index', context: null, bits: 12, normalize: 'casefold', scope: 'acme', key_version: 1, sources: ['Ada@Example.COM', null, { integer: '-42' }, { hex: '00ff' }, { boolean: true }] }],
    hash_fields: [{ context: 'users.token', value: '7365637265742d746f6b656e', scope: 'acme', version: 1 }],
  });
  assert.equal(w.status, 0, w.stderr);
  const out = w.json;
  assert.deepEqual(out.data_keys.map((r) => [r.scope, r.version, r.state, r.active_scope, r.encryptions]), [['acme', 1, 'active', 'acme', '0'], ['~index:acme', 1, 'active', '~index:acme', '0']]);
  for (const r of out.data_keys) {
    assert.match(r.id, /^\d+$/);
    assert.match(r.wrapped_key, /^02[0-9a-f]{120}$/);
    assert.equal(r.root_key_fingerprint, '2a3023c76bcaf32e');
    assert.equal(r.root_key_description, 'static aes-256-gcm');
    assert.match(r.created_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$/);
  }
  const dataKeyId = out.data_keys[0].id;
  assert.deepEqual(Object.keys(out.encryptions), [dataKeyId]);
  assert.equal(out.encryptions[dataKeyId], items.filter((i) => !i.deterministic && (i.value !== null || i.type.kind === 'json')).length);
  assert.equal(out.values.length, items.length);
  assert.equal(out.values[items.length - 1], null);
  assert.match(out.blind_indexes[0], /^[0-9a-f]{3}0$/);
  assert.deepEqual(out.hash_fields.length, 1);

  const rows = out.data_keys.map((r) => ({ ...r, encryptions: String(out.encryptions[r.id] || 0) }));
  const readItems = items.map(({ value, scope, ...rest }, i) => ({ ...rest, ciphertext: out.values[i] }));
  const r = run('read', { root_key: ROOT, data_keys: rows, values: readItems });
  assert.equal(r.status, 0, r.stderr);
  r.json.values.forEach((got, i) => assert.deepEqual(got, { value: items[i].value }, JSON.stringify(items[i])));

  // per-item errors: tampered value, wrong column, disabled key
  const tampered = { ...readItems[0], ciphertext: readItems[0].ciphertext.slice(0, -2) + (readItems[0].ciphertext.endsWith('00') ? '01' : '00') };
  const moved = { ...readItems[0], column: 'other' };
  const nonCanonical = { ...readItems[1], ciphertext: readItems[1].ciphertext + '\n' };
  const r2 = run('read', { root_key: ROOT, data_keys: rows, values: [tampered, moved, nonCanonical, readItems[0]] });
  assert.equal(r2.status, 0);
  assert.match(r2.json.values[0].error, /^DecryptionError: /);
  assert.match(r2.json.values[1].error, /^DecryptionError: /);
  assert.match(r2.json.values[2].error, /^NotCiphertextError: /);
  assert.ok('value' in r2.json.values[3]);
  const disabled = rows.map((row) => (row.id === dataKeyId ? { ...row, state: 'disabled', active_scope: null } : row));
  const r3 = run('read', { root_key: ROOT, data_keys: disabled, values: [readItems[0]] });
  assert.match(r3.json.values[0].error, /^KeyDisabledError: /);
  const r4 = run('read', { root_key: { kind: 'key', base64: Buffer.alloc(32, 9).toString('base64') }, data_keys: rows, values: [readItems[0]] });
  assert.match(r4.json.values[0].error, /^WrongRootKeyError: /);
});

test('JSON numbers and member order survive exactly', () => {
  const item = { schema: null, table: 't', column: 'j', context: null, type: { kind: 'json' }, storage: 'binary', deterministic: true, bind_scope: false, scope: 'acme' };
  const text = `{"root_key": ${JSON.stringify(ROOT)}, "data_keys": [], "new_keys": [{"scope": "acme", "kind": "data"}], "values": [${JSON.stringify(item).slice(0, -1)}, "value": {"2": 1.0, "1": [12345678901234567890, 1e-07, "\\u00e9"]}}]}`;
  const w = run('write', text);
  assert.equal(w.status, 0, w.stderr);
  const { value, scope, ...rest } = { ...item, value: 0 };
  const r = spawnSync(process.execPath, [BIN, 'read'], { input: JSON.stringify({ root_key: ROOT, data_keys: w.json.data_keys, values: [{ ...rest, ciphertext: w.json.values[0] }] }), encoding: 'utf8' });
  assert.equal(r.stdout.trim(), '{"values":[{"value":{"2":1.0,"1":[12345678901234567890,1e-07,"é"]}}]}');
});

test('write: new keys for an existing scope take the next version; explicit index keys', () => {
  const w = run('write', { root_key: ROOT, data_keys: [], new_keys: [{ scope: 'a', kind: 'data' }, { scope: 'a', kind: 'index' }, { scope: 'b', kind: 'index' }], values: [] });
  assert.equal(w.status, 0, w.stderr);
  assert.deepEqual(w.json.data_keys.map((r) => [r.scope, r.version]), [['a', 1], ['~index:a', 1], ['~index:b', 1]]);
  const w2 = run('write', { root_key: ROOT, data_keys: w.json.data_keys, new_keys: [{ scope: 'a', kind: 'data' }], values: [] });
  assert.deepEqual(w2.json.data_keys.map((r) => [r.scope, r.version]), [['a', 2]]);
});

test('malformed requests exit 2 with one line on stderr', () => {
  for (const [command, input] of [['read', '{'], ['read', '[]'], ['read', { values: [] }], ['write', { root_key: { kind: 'nope' } }], ['bogus', '{}']]) {
    const r = run(command, input);
    assert.equal(r.status, 2, `${command} ${JSON.stringify(input)}`);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.equal(r.stdout, '');
  }
});
