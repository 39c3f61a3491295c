'use strict';
// sqlalchemy-envelope-format: reads and writes sqlalchemy-envelope's data (FORMAT.md) from Node.js.
const errors = require('./lib/errors');
const primitives = require('./lib/primitives');
const rootkey = require('./lib/rootkey');
const keyring = require('./lib/keyring');
const values = require('./lib/values');
const encodings = require('./lib/encodings');
const decimal = require('./lib/decimal');
const pyjson = require('./lib/pyjson');
const normalize = require('./lib/normalize');
const blindindex = require('./lib/blindindex');
const interop = require('./lib/interop');

module.exports = {
  // root keys (section 2) and wrapped keys (section 4)
  rootKeyFromBase64: rootkey.rootKeyFromBase64,
  rootKeyFromKeyFile: rootkey.rootKeyFromKeyFile,
  rootKeyFromBytes: rootkey.rootKeyFromBytes,
  rootKeyFromPbkdf2: rootkey.rootKeyFromPbkdf2,
  rootKeyFromSpec: rootkey.rootKeyFromSpec,
  externalRootKey: rootkey.externalRootKey,
  kmsEncryptionContext: rootkey.kmsEncryptionContext,
  wrapContexts: rootkey.wrapContexts,
  wrapAad: rootkey.wrapAad,
  wrapWithKey: rootkey.wrapWithKey,
  unwrapWithKey: rootkey.unwrapWithKey,
  LocalRootKey: rootkey.LocalRootKey,
  ExternalRootKey: rootkey.ExternalRootKey,

  // the data_keys table (section 3)
  Keyring: keyring.Keyring,
  KeyRecord: keyring.KeyRecord,
  keyKind: keyring.keyKind,
  indexScope: keyring.indexScope,
  validateScope: keyring.validateScope,

  // values (sections 5, 6, 10)
  EncryptedColumn: values.EncryptedColumn,
  valueContext: values.valueContext,
  legacyValueContext: values.legacyValueContext,
  deterministicKey: values.deterministicKey,
  sealRandomized: values.sealRandomized,
  sealDeterministic: values.sealDeterministic,
  openWithKey: values.openWithKey,
  parseHeader: values.parseHeader,

  // plaintext encodings (section 7)
  encodePlaintext: encodings.encodePlaintext,
  decodePlaintext: encodings.decodePlaintext,
  decimalToString: decimal.decimalToString,
  fixedPoint: decimal.fixedPoint,
  JsonNumber: pyjson.JsonNumber,
  jsonFloat: pyjson.jsonFloat,
  parseJson: pyjson.parseJson,
  stringifyPython: pyjson.stringifyPython,
  pythonFloatRepr: pyjson.pythonFloatRepr,
  fromInteropValue: interop.fromInteropValue,
  toInteropValue: interop.toInteropValue,

  // blind indexes (section 8) and hash_field (section 9)
  blindIndex: blindindex.blindIndex,
  blindIndexKey: blindindex.blindIndexKey,
  blindIndexLabel: blindindex.blindIndexLabel,
  hashField: blindindex.hashField,
  normalizers: normalize.NORMALIZERS,
  applyNormalizers: normalize.applyNormalizers,

  // primitives (section 1)
  hkdf: primitives.hkdf,
  hmac: primitives.hmac,
  field: primitives.field,
  aesSivEncrypt: primitives.aesSivEncrypt,
  aesSivDecrypt: primitives.aesSivDecrypt,
  cmac: primitives.cmac,
  encodeBase64: primitives.encodeBase64,
  decodeCanonicalBase64: primitives.decodeCanonicalBase64,

  errors,
  ...errors,
};
