'use strict';
// FORMAT.md section 3: the data_keys table, read as plain SQL returns its rows.
const crypto = require('crypto');
const {
  KeyTamperedError,
  KeyDisabledError,
  KeyDestroyedError,
  KeyNotFoundError,
  WrongRootKeyError,
  EnvelopeError,
} = require('./errors');
const { blindIndex, hashField } = require('./blindindex');
const { isWellFormed } = require('./primitives');

const INDEX_PREFIX = '~index:';
const MAX_KEY_ID = 2n ** 40n - 1n;
const STATES = ['active', 'retired', 'disabled', 'destroyed'];

function toId(value) {
  let id;
  try {
    id = BigInt(typeof value === 'string' ? value.trim() : value);
  } catch (_) {
    throw new KeyTamperedError('data_keys.id is not an integer');
  }
  if (id < 1n || id > MAX_KEY_ID) throw new KeyTamperedError('data_keys.id is outside 1 to 2^40 - 1');
  return id;
}

function toWrappedBytes(value) {
  if (value === null || value === undefined) return null;
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'string') {
    const hex = value.startsWith('\\x') ? value.slice(2) : value;
    if (!/^(?:[0-9a-fA-F]{2})*$/.test(hex)) throw new KeyTamperedError('wrapped_key is not hex');
    return Buffer.from(hex, 'hex');
  }
  throw new KeyTamperedError('wrapped_key must be bytes or hex');
}

/** The kind of a scope's keys: "index" for "~index:<scope>", else "data". */
function keyKind(scope) {
  return scope.startsWith(INDEX_PREFIX) ? 'index' : 'data';
}

/** The scope holding a scope's index keys. */
function indexScope(scope) {
  return INDEX_PREFIX + scope;
}

const MAX_SCOPE_CODE_POINTS = 248; // so that "~index:<scope>" fits VARCHAR(255)
// Not printable (section 3): categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs (the space is allowed
// separately), default-ignorable code points, and U+2800. Unicode tables are Node's (ICU's).
const NOT_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}\p{Default_Ignorable_Code_Point}\u2800]/u;

/**
 * Checks a scope name (section 3): 1 to 248 code points, printable (none of general categories
 * Cc, Cf, Cs, Co, Cn, Zl, Zp, nor Zs but U+0020; no default-ignorable code point; not U+2800),
 * no space at either end, NFC, not starting with "~". Throws EnvelopeError.
 */
function validateScope(scope) {
  if (typeof scope !== 'string') throw new EnvelopeError('a scope is a string');
  if (!isWellFormed(scope)) throw new EnvelopeError('a scope is printable text');
  const n = [...scope].length;
  if (n < 1 || n > MAX_SCOPE_CODE_POINTS) throw new EnvelopeError(`a scope is 1 to ${MAX_SCOPE_CODE_POINTS} code points`);
  if (scope.startsWith('~')) throw new EnvelopeError('scopes starting with "~" are reserved');
  if (scope.startsWith(' ') || scope.endsWith(' ')) throw new EnvelopeError('a scope has no space at either end');
  if (NOT_PRINTABLE.test(scope.replace(/ /g, 'x'))) throw new EnvelopeError('a scope is printable text');
  if (scope.normalize('NFC') !== scope) throw new EnvelopeError('a scope is in Unicode normal form C');
  return scope;
}

/** One data_keys row, parsed. */
class KeyRecord {
  constructor(row) {
    if (!row || typeof row.scope !== 'string') throw new KeyTamperedError('a data_keys row needs a scope');
    this.id = toId(row.id);
    this.scope = row.scope;
    this.kind = keyKind(row.scope);
    this.version = Number(row.version);
    if (!Number.isSafeInteger(this.version) || this.version < 1) throw new KeyTamperedError(`key ${this.id}: version is not a positive integer`);
    this.algorithm = row.algorithm;
    this.state = row.state;
    this.activeScope = row.active_scope ?? null;
    this.rootKeyFingerprint = row.root_key_fingerprint;
    this.rootKeyDescription = row.root_key_description;
    try {
      this.encryptions = row.encryptions === undefined || row.encryptions === null ? 0n : BigInt(row.encryptions);
    } catch (_) {
      throw new KeyTamperedError(`key ${this.id}: encryptions is not an integer`);
    }
    Object.defineProperty(this, 'wrappedKey', { value: toWrappedBytes(row.wrapped_key), enumerable: false, writable: true });
  }
}

/**
 * The keys of a data_keys table, unwrapped on demand under a root key.
 *
 *   const keyring = new Keyring(rows, rootKey);
 *   await keyring.unwrapAll();   // only needed when the root key's unwrap is asynchronous
 */
class Keyring {
  constructor(rows, rootKey) {
    if (!rootKey || typeof rootKey.unwrap !== 'function' || typeof rootKey.fingerprint !== 'string') {
      throw new TypeError('a keyring needs a root key');
    }
    this.rootKey = rootKey;
    this._byId = new Map();
    this._byScope = new Map();
    Object.defineProperty(this, '_unwrapped', { value: new Map(), enumerable: false });
    /** How many values each data key encrypted through this keyring (id string -> count). */
    this.encryptionCounts = new Map();
    for (const row of rows || []) this._add(new KeyRecord(row));
  }

  _add(record) {
    const key = String(record.id);
    if (this._byId.has(key)) throw new KeyTamperedError(`two data_keys rows have id ${key}`);
    const versions = this._byScope.get(record.scope) || [];
    if (versions.some((r) => r.version === record.version)) {
      throw new KeyTamperedError('two data_keys rows have the same scope and version');
    }
    versions.push(record);
    versions.sort((a, b) => a.version - b.version);
    this._byScope.set(record.scope, versions);
    this._byId.set(key, record);
  }

  /** All parsed rows. */
  records() {
    return [...this._byId.values()];
  }

  /** The row of a key id (BigInt, number or decimal text); KeyNotFoundError if none. */
  record(id) {
    const record = this._byId.get(String(BigInt(id)));
    if (!record) throw new KeyNotFoundError(`no data key has id ${id}`);
    return record;
  }

  /** The rows of a scope (data keys; pass indexScope(scope) for index keys), oldest first. */
  scopeRecords(scope) {
    return [...(this._byScope.get(scope) || [])];
  }

  /**
   * The key bytes of a row, after checking (in order) its state, its fingerprint and its wrap.
   * Throws KeyDisabledError, KeyDestroyedError, WrongRootKeyError or KeyTamperedError.
   */
  keyBytes(record) {
    const cached = this._unwrapped.get(record);
    if (cached) {
      this._checkState(record);
      if (cached.error) throw cached.error;
      return cached.key;
    }
    const result = this._unwrap(record);
    if (result && typeof result.then === 'function') {
      throw new EnvelopeError('the root key unwraps asynchronously: call `await keyring.unwrapAll()` first');
    }
    return result;
  }

  _checkState(record) {
    if (!STATES.includes(record.state)) throw new KeyTamperedError(`key ${record.id} has an unknown state`);
    if (record.encryptions < 0n) throw new KeyTamperedError(`key ${record.id} has a negative encryption count`);
    if (record.state === 'disabled') throw new KeyDisabledError(`key ${record.id} (scope ${JSON.stringify(record.scope)}) is disabled`);
    if (record.state === 'destroyed' || record.wrappedKey === null) {
      throw new KeyDestroyedError(`key ${record.id} (scope ${JSON.stringify(record.scope)}) is destroyed`);
    }
  }

  _unwrap(record) {
    this._checkState(record);
    if (record.rootKeyFingerprint !== this.rootKey.fingerprint) {
      throw new WrongRootKeyError(`key ${record.id} was wrapped by another root key (fingerprint ${record.rootKeyFingerprint}, this root key's is ${this.rootKey.fingerprint})`);
    }
    // The algorithm column is informative (section 3): every key is 32 bytes, used as its kind says.
    const done = (key) => {
      if (!key || key.length !== 32) {
        const error = new KeyTamperedError(`key ${record.id} does not unwrap to 32 bytes`);
        this._unwrapped.set(record, { error });
        throw error;
      }
      this._unwrapped.set(record, { key });
      return key;
    };
    const failed = (e) => {
      if (e instanceof KeyTamperedError) this._unwrapped.set(record, { error: e });
      throw e;
    };
    let result;
    try {
      result = this.rootKey.unwrap(record.wrappedKey, record);
    } catch (e) {
      failed(e);
    }
    if (result && typeof result.then === 'function') return result.then(done, failed);
    return done(result);
  }

  /** Unwraps every usable key now (awaiting an asynchronous root key); failures are kept per key. */
  async unwrapAll() {
    for (const record of this._byId.values()) {
      if (this._unwrapped.has(record)) continue;
      try {
        await this._unwrap(record);
      } catch (_) {
        // reported when the key is used
      }
    }
  }

  /**
   * The active data key of a scope, which must be its newest version (else KeyTamperedError).
   * Returns {record, key}.
   */
  activeDataKey(scope) {
    if (keyKind(scope) !== 'data') throw new EnvelopeError('index scopes have no active data key');
    const versions = this.scopeRecords(scope);
    const active = versions.filter((r) => r.state === 'active');
    if (active.length === 0) throw new KeyNotFoundError(`scope ${JSON.stringify(scope)} has no active data key`);
    const newest = versions[versions.length - 1];
    if (active.length > 1 || active[0] !== newest) {
      throw new KeyTamperedError(`scope ${JSON.stringify(scope)}: the active key is not the newest version`);
    }
    if (newest.activeScope !== null && newest.activeScope !== scope) {
      throw new KeyTamperedError(`scope ${JSON.stringify(scope)}: the active key's active_scope differs from its scope`);
    }
    return { record: newest, key: this.keyBytes(newest) };
  }

  /** Version `version` (default 1) of a scope's index key. Returns {record, key}. */
  indexKey(scope, version = 1) {
    const record = this.scopeRecords(indexScope(scope)).find((r) => r.version === Number(version));
    if (!record) throw new KeyNotFoundError(`scope ${JSON.stringify(scope)} has no index key version ${version}`);
    return { record, key: this.keyBytes(record) };
  }

  /**
   * A blind index digest under version `keyVersion` (default 1) of `scope`'s index key
   * (section 8). options: {scope, keyVersion, table, column, context, bits, normalize}.
   */
  blindIndex(sources, { scope = 'default', keyVersion = 1, ...options } = {}) {
    return blindIndex(this.indexKey(scope, keyVersion).key, sources, options);
  }

  /** hash_field (section 9) under version `version` (default 1) of `scope`'s index key. */
  hashField(value, context, { scope = 'default', version = 1 } = {}) {
    return hashField(this.indexKey(scope, version).key, value, context);
  }

  /** Adds n to the count of values encrypted under a data key (to add to data_keys.encryptions). */
  countEncryption(record, n = 1) {
    const id = String(record.id);
    this.encryptionCounts.set(id, (this.encryptionCounts.get(id) || 0) + n);
  }

  /**
   * Creates a key (section 3, "Adding a key"): 32 random bytes wrapped under the root key, a
   * random unused id, the scope's next version, state active. `kind` "data" adds a data key to
   * `scope` (and, for a scope without index keys, its first index key too, unless
   * `withIndexKey` is false); "index" adds an index key to "~index:<scope>".
   * Returns {rows: [rows to INSERT], retired: [{id, state: 'retired', active_scope: null,
   * state_changed_at}] to UPDATE in the same transaction}. The keyring learns the new keys.
   * Refuses (WrongRootKeyError) if the table's keys are under another root key.
   * If the root key wraps asynchronously, returns a Promise of the same.
   */
  addKey(scope, { kind = 'data', withIndexKey = true, now = new Date() } = {}) {
    if (kind === 'index' && scope.startsWith(INDEX_PREFIX)) scope = scope.slice(INDEX_PREFIX.length);
    validateScope(scope);
    if (kind !== 'data' && kind !== 'index') throw new EnvelopeError('a key kind is "data" or "index"');
    const check = this._checkTableRootKey();
    if (check && typeof check.then === 'function') return check.then(() => this._addKeys(scope, kind, withIndexKey, now));
    return this._addKeys(scope, kind, withIndexKey, now);
  }

  /**
   * Section 3, "Adding a key": the root key must be the one the table's keys are under. If the
   * table holds a key that is not destroyed, the one of them with the lowest id must have this
   * root key's fingerprint (else WrongRootKeyError) and unwrap under it (else KeyTamperedError),
   * whatever its state (a disabled key is checked too). A table without such a key accepts any
   * root key. Returns undefined, or a Promise for an asynchronous root key.
   */
  _checkTableRootKey() {
    let lowest = null;
    for (const r of this._byId.values()) {
      if (r.state === 'destroyed') continue;
      if (lowest === null || r.id < lowest.id) lowest = r;
    }
    if (lowest === null) return undefined;
    if (lowest.rootKeyFingerprint !== this.rootKey.fingerprint) {
      throw new WrongRootKeyError(`the data_keys table's keys are under another root key (key ${lowest.id}: fingerprint ${lowest.rootKeyFingerprint}, this root key's is ${this.rootKey.fingerprint})`);
    }
    if (lowest.wrappedKey === null) throw new KeyTamperedError(`key ${lowest.id} is not destroyed but has no wrapped_key`);
    const cached = this._unwrapped.get(lowest);
    if (cached && cached.key) return undefined;
    const bad = () => new KeyTamperedError(`key ${lowest.id} does not unwrap under this root key: altered or moved`);
    let result;
    try {
      result = this.rootKey.unwrap(lowest.wrappedKey, lowest);
    } catch (_) {
      throw bad();
    }
    const done = (key) => {
      if (!key || key.length !== 32) throw bad();
    };
    if (result && typeof result.then === 'function') return result.then(done, () => { throw bad(); });
    done(result);
    return undefined;
  }

  _addKeys(scope, kind, withIndexKey, now) {
    const scopes = kind === 'data' ? [scope] : [indexScope(scope)];
    if (kind === 'data' && withIndexKey && this.scopeRecords(indexScope(scope)).length === 0) scopes.push(indexScope(scope));
    const plans = scopes.map((s) => this._planKey(s, now));
    const finish = () => {
      const rows = [];
      const retired = [];
      for (const plan of plans) {
        rows.push(plan.row);
        for (const r of this.scopeRecords(plan.row.scope)) {
          if (r.state === 'active') {
            r.state = 'retired';
            r.activeScope = null;
            retired.push({ id: String(r.id), state: 'retired', active_scope: null, state_changed_at: now });
          }
        }
        const record = new KeyRecord(plan.row);
        this._add(record);
        this._unwrapped.set(record, { key: plan.key });
      }
      return { rows, retired };
    };
    const pending = plans.filter((p) => p.row.wrapped_key && typeof p.row.wrapped_key.then === 'function');
    if (pending.length === 0) return finish();
    return Promise.all(plans.map(async (p) => {
      p.row.wrapped_key = Buffer.from(await p.row.wrapped_key);
    })).then(finish);
  }

  _planKey(scope, now) {
    let id;
    do {
      id = BigInt('0x' + crypto.randomBytes(5).toString('hex'));
    } while (id === 0n || this._byId.has(String(id)));
    const versions = this.scopeRecords(scope);
    const version = versions.length ? versions[versions.length - 1].version + 1 : 1;
    const key = crypto.randomBytes(32);
    const row = {
      id: String(id),
      scope,
      version,
      algorithm: 'aes-256-gcm',
      wrapped_key: null,
      root_key_fingerprint: this.rootKey.fingerprint,
      root_key_description: this.rootKey.description,
      state: 'active',
      active_scope: scope,
      encryptions: '0',
      created_at: now,
      state_changed_at: now,
    };
    row.wrapped_key = this.rootKey.wrap(key, row);
    return { row, key };
  }
}

module.exports = { Keyring, KeyRecord, keyKind, indexScope, validateScope, INDEX_PREFIX, MAX_KEY_ID };
