'use strict';
// Every vector of FORMAT.md, in every direction it allows.
const test = require('node:test');
const assert = require('node:assert/strict');
const { loadVectors, vectorText, hex } = require('./vectors');
const env = require('..');

const V = loadVectors();

test('FORMAT.md has every vector block', () => {
  for (const name of ['root_keys', 'wrapped_keys', 'values', 'encodings', 'blind_indexes', 'hash_field']) {
    assert.ok(Array.isArray(V[name]) && V[name].length > 0, name);
  }
});

test('root keys: bytes, fingerprint, description', async (t) => {
  for (const v of V.root_keys) {
    await t.test(`${v.kind} ${v.fingerprint}`, () => {
      const key = v.kind === 'pbkdf2' ? env.rootKeyFromPbkdf2(v.seed, v.salt, v.iterations) : env.rootKeyFromBase64(v.text);
      assert.equal(key.exportBytes().toString('hex'), v.root_key);
      assert.equal(key.fingerprint, v.fingerprint);
      assert.equal(key.description, v.description);
      assert.equal(env.rootKeyFromBytes(hex(v.root_key)).fingerprint, v.fingerprint);
      if (v.kind === 'key') {
        assert.equal(env.rootKeyFromKeyFile(Buffer.from(v.text)).fingerprint, v.fingerprint);
        assert.equal(env.rootKeyFromKeyFile(hex(v.root_key), { raw: true }).fingerprint, v.fingerprint);
        assert.equal(env.rootKeyFromSpec({ kind: 'key', base64: v.text.trim() }).fingerprint, v.fingerprint);
      } else {
        assert.equal(env.rootKeyFromSpec({ kind: 'pbkdf2', seed: v.seed, salt: v.salt, iterations: v.iterations }).fingerprint, v.fingerprint);
      }
    });
  }
});

test('wrapped keys: aad, wrap with the nonce, unwrap (v2 then v1 contexts)', async (t) => {
  for (const v of V.wrapped_keys) {
    await t.test(v.name, () => {
      const root = hex(v.root_key);
      assert.equal(env.wrapAad(v.format, v.context).toString('hex'), v.aad);
      if (v.format === 2) {
        assert.equal(env.wrapWithKey(root, hex(v.data_key), v.context, hex(v.nonce)).toString('hex'), v.wrapped_key);
      }
      // unwrap through a row, as a reader does: contexts built from id, scope and version
      const row = { id: v.context.key_id, scope: v.context.scope, version: v.context.version || '1' };
      const key = env.rootKeyFromBytes(root);
      assert.equal(key.unwrap(hex(v.wrapped_key), row).toString('hex'), v.data_key);
      // moved to another id or scope: refused
      assert.throws(() => key.unwrap(hex(v.wrapped_key), { ...row, id: '999' }), env.KeyTamperedError);
      assert.throws(() => key.unwrap(hex(v.wrapped_key), { ...row, scope: row.scope + 'x' }), env.KeyTamperedError);
      if (v.format === 2) {
        assert.throws(() => key.unwrap(hex(v.wrapped_key), { ...row, version: Number(row.version) + 1 }), env.KeyTamperedError);
      }
      // through a keyring row
      const ring = new env.Keyring([{ ...row, algorithm: 'aes-256-gcm', wrapped_key: v.wrapped_key, root_key_fingerprint: key.fingerprint, state: 'retired', encryptions: '0' }], key);
      assert.equal(ring.keyBytes(ring.record(row.id)).toString('hex'), v.data_key);
    });
  }
});

function valueColumn(v, storage = 'binary') {
  const location = v.given_context
    ? { schema: v.schema, context: v.given_context }
    : v.version === 1 || v.version === 2
      ? (() => {
        const dot = v.context.lastIndexOf('.');
        return { table: v.context.slice(0, dot), column: v.context.slice(dot + 1) };
      })()
      : { schema: v.schema, table: v.table, column: v.column };
  return new env.EncryptedColumn({ ...location, deterministic: v.version === 4 || v.version === 2, bindScope: v.scope !== undefined, storage });
}

function valueKeyring(v) {
  const root = env.rootKeyFromBytes(Buffer.alloc(32, 7));
  const scope = v.scope || 'default';
  const deterministic = v.version === 4 || v.version === 2;
  const key = hex(deterministic ? v.index_key : v.data_key);
  const row = { id: String(v.key_id), scope: deterministic ? env.indexScope(scope) : scope, version: 1 };
  row.wrapped_key = root.wrap(key, row);
  Object.assign(row, { algorithm: 'aes-256-gcm', root_key_fingerprint: root.fingerprint, state: 'active', active_scope: row.scope, encryptions: '0' });
  return new env.Keyring([row], root);
}

test('values: associated data, ciphertext from the nonce, decryption, text form', async (t) => {
  for (const v of V.values) {
    await t.test(v.name, () => {
      const head = Buffer.alloc(6);
      head[0] = v.version;
      head.writeUIntBE(v.key_id, 1, 5);
      const plaintext = hex(v.plaintext);
      if (v.version === 3) {
        const location = v.given_context ? { schema: v.schema, context: v.given_context } : v;
        const context = env.valueContext(location, v.scope ?? null);
        assert.equal(Buffer.concat([head, context]).toString('hex'), v.associated_data);
        // the primitives alone
        assert.equal(env.sealRandomized(hex(v.data_key), BigInt(v.key_id), plaintext, context, hex(v.nonce)).toString('hex'), v.ciphertext);
      } else if (v.version === 4) {
        const context = env.valueContext(v);
        assert.deepEqual([head.toString('hex'), context.toString('hex')], v.associated_data);
        assert.equal(env.deterministicKey(hex(v.index_key), context).toString('hex'), v.siv_key);
        assert.equal(env.sealDeterministic(hex(v.index_key), BigInt(v.key_id), plaintext, context).toString('hex'), v.ciphertext);
        assert.equal(Buffer.concat([head, env.aesSivEncrypt(hex(v.siv_key), [head, context], plaintext)]).toString('hex'), v.ciphertext);
      } else if (v.version === 2) {
        // section 10: key HKDF(index key, ".../deterministic/v1" 00 context, 64); AD [header, context]
        const context = Buffer.from(v.context, 'utf8');
        assert.deepEqual([head.toString('hex'), context.toString('hex')], v.associated_data);
        assert.equal(env.deterministicKey(hex(v.index_key), context, 2).toString('hex'), v.siv_key);
        assert.equal(Buffer.concat([head, env.aesSivEncrypt(hex(v.siv_key), [head, context], plaintext)]).toString('hex'), v.ciphertext);
        assert.equal(env.openWithKey(hex(v.ciphertext), hex(v.index_key), context).toString('hex'), v.plaintext);
      } else if (v.version === 1) {
        // section 10: a scope-bound column's context ends with 00 "scope=" scope
        const scoped = v.scope === undefined ? '' : `\0scope=${v.scope}`;
        const context = Buffer.from(v.context + scoped, 'utf8');
        if (v.associated_data) assert.equal(Buffer.concat([head, context]).toString('hex'), v.associated_data);
        assert.equal(env.openWithKey(hex(v.ciphertext), hex(v.data_key), context).toString('hex'), v.plaintext);
        // the layout of section 5 with the weaker context
        const sealed = env.sealRandomized(hex(v.data_key), BigInt(v.key_id), plaintext, context, hex(v.nonce));
        sealed[0] = 1;
        assert.notEqual(sealed.toString('hex'), v.ciphertext); // the header (version byte) is bound
      }
      // through columns and a keyring, binary and text storage
      const ring = valueKeyring(v);
      assert.equal(valueColumn(v).decryptBytes(ring, hex(v.ciphertext)).toString('hex'), v.plaintext);
      assert.equal(valueColumn(v, 'text').decryptBytes(ring, v.text).toString('hex'), v.plaintext);
      assert.equal(env.encodeBase64(hex(v.ciphertext)), v.text);
      if (v.version === 4) {
        assert.equal(valueColumn(v).encryptBytes(ring, plaintext).toString('hex'), v.ciphertext);
        assert.equal(valueColumn(v, 'text').encryptBytes(ring, plaintext), v.text);
      }
      if (v.version === 3) {
        assert.equal(valueColumn(v).encryptBytes(ring, plaintext, { scope: v.scope || 'default', nonce: hex(v.nonce) }).toString('hex'), v.ciphertext);
        assert.equal(valueColumn(v, 'text').encryptBytes(ring, plaintext, { scope: v.scope || 'default', nonce: hex(v.nonce) }), v.text);
      }
      // the header's key id is bytes 1 to 5; the text form's first 8 characters are the header
      assert.equal(env.parseHeader(hex(v.ciphertext)).keyId, BigInt(v.key_id));
      assert.equal(Buffer.from(v.text.slice(0, 8), 'base64').toString('hex'), v.ciphertext.slice(0, 12));
    });
  }
});

test('encodings: encode (input or value), decode, typed form', async (t) => {
  const exact = env.parseJson(vectorText('encodings'), { exact: true });
  for (const [i, v] of V.encodings.entries()) {
    await t.test(v.name, () => {
      const opts = { deterministic: v.deterministic };
      const exactValue = exact[i].get('value');
      const value = v.type.kind === 'json' ? exactValue : env.fromInteropValue(v.type, v.value);
      assert.equal(env.encodePlaintext(v.type, value, opts).toString('hex'), v.plaintext);
      if (v.input !== undefined) {
        assert.equal(env.encodePlaintext(v.type, env.fromInteropValue(v.type, v.input), opts).toString('hex'), v.plaintext);
      }
      if (v.type.kind === 'json') {
        // plain JS values too
        assert.equal(env.encodePlaintext(v.type, v.value, opts).toString('hex'), v.plaintext);
        assert.deepEqual(env.decodePlaintext(v.type, hex(v.plaintext)), v.value);
        assert.equal(env.stringifyPython(env.decodePlaintext(v.type, hex(v.plaintext), { exactJson: true })), env.stringifyPython(exactValue));
      } else {
        const decoded = env.decodePlaintext(v.type, hex(v.plaintext));
        assert.deepEqual(env.toInteropValue(v.type, decoded), v.value);
      }
    });
  }
});

test('blind indexes: label, HMAC key, digest', async (t) => {
  for (const v of V.blind_indexes) {
    await t.test(v.name, () => {
      const key = hex(v.index_key);
      const name = v.context ?? `${v.table}.${v.column}`;
      assert.equal(env.blindIndexLabel(name, v.bits).toString('hex'), v.info);
      assert.equal(env.blindIndexKey(key, name, v.bits).toString('hex'), v.hmac_key);
      const typed = { integer: BigInt, hex, boolean: Boolean, float: Number };
      const sources = v.sources.map((s) => {
        if (!s || typeof s !== 'object') return s;
        const [[kind, value]] = Object.entries(s);
        return typed[kind](value);
      });
      const digest = env.blindIndex(key, sources, { table: v.table, column: v.column, context: v.context, bits: v.bits, normalize: v.normalize });
      assert.equal(digest, v.digest);
      assert.equal(digest.length, 2 * Math.ceil(v.bits / 8));
    });
  }
});

test('hash_field: HMAC key and digest', async (t) => {
  for (const v of V.hash_field) {
    await t.test(v.context, () => {
      assert.equal(env.hkdf(hex(v.index_key), Buffer.concat([Buffer.from('sqlalchemy-envelope/hash-field/v1\0'), Buffer.from(v.context)]), 32).toString('hex'), v.hmac_key);
      assert.equal(env.hashField(hex(v.index_key), hex(v.value), v.context), v.digest);
    });
  }
});
