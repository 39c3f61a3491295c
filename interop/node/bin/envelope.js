#!/usr/bin/env node
'use strict';
// The command of INTEROP.md: `envelope.js read` and `envelope.js write`, one JSON request on
// stdin, one JSON response on stdout. A malformed request exits 2 with one line on stderr.
const fs = require('fs');
const env = require('..');

class MalformedRequest extends Error {}

function fail(code, message) {
  process.stderr.write(String(message).replace(/\s+/g, ' ').trim() + '\n');
  process.exit(code);
}

function errorText(e) {
  return `${e.name || 'Error'}: ${e.message}`;
}

function need(condition, what) {
  if (!condition) throw new MalformedRequest(what);
}

function isoUtc(date) {
  return date.toISOString().replace(/\.(\d{3})Z$/, '.$1000+00:00');
}

function keyring(request) {
  need(request.root_key && typeof request.root_key === 'object', 'root_key is required');
  need(request.data_keys === undefined || Array.isArray(request.data_keys), 'data_keys must be a list');
  let rootKey;
  try {
    rootKey = env.rootKeyFromSpec(request.root_key);
  } catch (e) {
    throw new MalformedRequest(`root_key: ${e.message}`);
  }
  return new env.Keyring(request.data_keys || [], rootKey);
}

function column(item) {
  need(item && typeof item === 'object', 'each value is an object');
  need(item.type && typeof item.type.kind === 'string', 'each value needs a type');
  return new env.EncryptedColumn({
    schema: item.schema ?? null,
    table: item.table,
    column: item.column,
    context: item.context ?? null,
    type: item.type,
    deterministic: Boolean(item.deterministic),
    bindScope: Boolean(item.bind_scope),
    storage: item.storage || 'binary',
    noneAsNull: Boolean(item.type.none_as_null),
  });
}

function read(request, exact) {
  const ring = keyring(request);
  need(Array.isArray(request.values), 'values must be a list');
  return {
    values: request.values.map((item, i) => {
      try {
        const col = column(item);
        if (item.ciphertext === null || item.ciphertext === undefined) return { value: null };
        let stored = item.ciphertext;
        if (col.storage === 'binary') {
          if (typeof stored !== 'string' || !/^(?:[0-9a-fA-F]{2})*$/.test(stored)) throw new env.NotCiphertextError('binary ciphertext is not hex');
          stored = Buffer.from(stored, 'hex');
        }
        const value = col.decrypt(ring, stored, { exactJson: true });
        return { value: item.type.kind === 'json' ? value : env.toInteropValue(item.type, value) };
      } catch (e) {
        if (e instanceof MalformedRequest) throw e;
        return { error: errorText(e) };
      }
    }),
  };
}

function sourcePart(part) {
  if (part === null || typeof part === 'string') return part;
  need(typeof part === 'object', 'a blind-index part is a string, null or an object');
  if ('integer' in part) {
    need(typeof part.integer === 'string' && /^-?\d+$/.test(part.integer), 'an integer part is decimal text');
    return BigInt(part.integer);
  }
  if ('hex' in part) {
    need(typeof part.hex === 'string' && /^(?:[0-9a-fA-F]{2})*$/.test(part.hex), 'a hex part is hex');
    return Buffer.from(part.hex, 'hex');
  }
  if ('boolean' in part) {
    need(typeof part.boolean === 'boolean', 'a boolean part is true or false');
    return part.boolean;
  }
  throw new MalformedRequest('unknown blind-index part');
}

function write(request, exact) {
  const ring = keyring(request);
  const newKeys = request.new_keys || [];
  need(Array.isArray(newKeys), 'new_keys must be a list');
  const now = new Date();
  const rows = [];
  const explicitIndex = new Set(newKeys.filter((k) => k && k.kind === 'index').map((k) => k.scope.replace(/^~index:/, '')));
  for (const k of newKeys) {
    need(k && typeof k.scope === 'string' && (k.kind === 'data' || k.kind === 'index'), 'a new key is {scope, kind: "data" | "index"}');
    const created = ring.addKey(k.scope, { kind: k.kind, withIndexKey: !explicitIndex.has(k.scope), now });
    rows.push(...created.rows);
  }
  const values = (request.values || []).map((item, i) => {
    const col = column(item);
    need(typeof item.scope === 'string', 'each value to write needs a scope');
    let value = item.value;
    if (value !== null && value !== undefined) {
      value = item.type.kind === 'json' ? exact.get('values')[i].get('value') : env.fromInteropValue(item.type, value);
    }
    const stored = col.encrypt(ring, value, { scope: item.scope });
    if (stored === null) return null;
    return typeof stored === 'string' ? stored : stored.toString('hex');
  });
  const blindIndexes = (request.blind_indexes || []).map((b) => {
    need(b && Array.isArray(b.sources), 'a blind index needs sources');
    return ring.blindIndex(b.sources.map(sourcePart), {
      scope: b.scope ?? 'default',
      keyVersion: b.key_version ?? 1,
      table: b.table,
      column: b.column,
      context: b.context ?? null,
      bits: b.bits ?? 256,
      normalize: b.normalize ?? null,
    });
  });
  const hashFields = (request.hash_fields || []).map((h) => {
    need(h && typeof h.context === 'string' && typeof h.value === 'string' && /^(?:[0-9a-fA-F]{2})*$/.test(h.value), 'a hash field is {context, value: hex}');
    return ring.hashField(Buffer.from(h.value, 'hex'), h.context, { scope: h.scope ?? 'default', version: h.version ?? 1 });
  });
  return {
    data_keys: rows.map((r) => ({
      id: r.id,
      scope: r.scope,
      version: r.version,
      algorithm: r.algorithm,
      wrapped_key: Buffer.from(r.wrapped_key).toString('hex'),
      root_key_fingerprint: r.root_key_fingerprint,
      root_key_description: r.root_key_description,
      state: r.state,
      active_scope: r.active_scope,
      encryptions: r.encryptions,
      created_at: isoUtc(r.created_at),
    })),
    encryptions: Object.fromEntries(ring.encryptionCounts),
    values,
    blind_indexes: blindIndexes,
    hash_fields: hashFields,
  };
}

function main() {
  const command = process.argv[2];
  if (command !== 'read' && command !== 'write') fail(2, 'usage: envelope.js read|write < request.json');
  let text;
  let request;
  let exact;
  try {
    text = fs.readFileSync(0, 'utf8');
    request = JSON.parse(text);
    exact = env.parseJson(text, { exact: true });
  } catch (e) {
    fail(2, `malformed request: not JSON (${e.message})`);
  }
  if (!request || typeof request !== 'object' || Array.isArray(request)) fail(2, 'malformed request: not a JSON object');
  let response;
  try {
    response = command === 'read' ? read(request, exact) : write(request, exact);
  } catch (e) {
    if (e instanceof MalformedRequest || e instanceof TypeError) fail(2, `malformed request: ${e.message}`);
    fail(1, errorText(e));
  }
  process.stdout.write(env.stringifyPython(response, { allowNaN: true }) + '\n');
}

main();
