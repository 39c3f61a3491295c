'use strict';
// INTEROP.md's language-neutral typed values <-> this package's JS values.
const { EncodingError } = require('./errors');
const { pythonFloatRepr } = require('./pyjson');

/** A typed value of INTEROP.md / FORMAT.md's vectors -> the JS value encodePlaintext takes. */
function fromInteropValue(type, value) {
  switch (type.kind) {
    case 'bytes':
      if (typeof value !== 'string' || !/^(?:[0-9a-fA-F]{2})*$/.test(value)) throw new EncodingError('bytes are given as hex');
      return Buffer.from(value, 'hex');
    case 'integer':
      if (typeof value === 'number' && Number.isSafeInteger(value)) return BigInt(value);
      if (typeof value !== 'string' || !/^-?\d+$/.test(value)) throw new EncodingError('an integer is given as decimal text');
      return BigInt(value);
    case 'float':
      if (typeof value === 'number') return value;
      if (value === 'NaN') return NaN;
      if (value === 'Infinity') return Infinity;
      if (value === '-Infinity') return -Infinity;
      if (typeof value !== 'string') throw new EncodingError('a float is given as decimal text');
      return Number(value);
    default:
      return value;
  }
}

/** A JS value decodePlaintext returned -> INTEROP.md's typed value. */
function toInteropValue(type, value) {
  switch (type.kind) {
    case 'bytes':
      return Buffer.from(value).toString('hex');
    case 'integer':
      return value.toString();
    case 'float':
      if (Number.isNaN(value)) return 'NaN';
      if (value === Infinity) return 'Infinity';
      if (value === -Infinity) return '-Infinity';
      return pythonFloatRepr(value);
    default:
      return value;
  }
}

module.exports = { fromInteropValue, toInteropValue };
