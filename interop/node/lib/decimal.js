'use strict';
// Decimal text for Numeric columns (FORMAT.md section 7): Python's str(Decimal) (the General
// Decimal Arithmetic to-scientific-string) and Numeric(p, s)'s fixed-point rounding.
const { EncodingError } = require('./errors');

const FINITE = /^([+-])?(?:(\d+)(?:\.(\d*))?|\.(\d+))(?:[eE]([+-]?\d+))?$/;
const SPECIAL = /^([+-])?(inf|infinity|nan|snan)(\d*)$/i;

/** Parses decimal text into {negative, special?, coefficient (BigInt), exponent (Number), digits (string)}. */
function parseDecimal(text) {
  if (typeof text !== 'string') throw new EncodingError('a decimal is given as text');
  const s = text.trim();
  let m = SPECIAL.exec(s);
  if (m) {
    const kind = m[2].toLowerCase();
    if (kind.startsWith('inf') && m[3]) throw new EncodingError('not a decimal number');
    return {
      negative: m[1] === '-',
      special: kind.startsWith('inf') ? 'Infinity' : kind === 'nan' ? 'NaN' : 'sNaN',
      payload: m[3].replace(/^0+/, ''),
    };
  }
  m = FINITE.exec(s);
  if (!m) throw new EncodingError('not a decimal number');
  const intPart = m[2] !== undefined ? m[2] : '';
  const fracPart = m[2] !== undefined ? (m[3] || '') : m[4];
  const exponent = (m[5] ? Number(m[5]) : 0) - fracPart.length;
  if (!Number.isSafeInteger(exponent)) throw new EncodingError('decimal exponent out of range');
  const digits = (intPart + fracPart).replace(/^0+(?=\d)/, '');
  return { negative: m[1] === '-', coefficient: BigInt(digits), digits, exponent };
}

/** Python's str(Decimal(text)). */
function decimalToString(text) {
  const d = parseDecimal(text);
  const sign = d.negative ? '-' : '';
  if (d.special) return sign + d.special + (d.special === 'Infinity' ? '' : d.payload);
  const { digits, exponent } = d;
  const adjusted = exponent + digits.length - 1;
  if (exponent <= 0 && adjusted >= -6) {
    if (exponent === 0) return sign + digits;
    const point = digits.length + exponent;
    if (point > 0) return sign + digits.slice(0, point) + '.' + digits.slice(point);
    return sign + '0.' + '0'.repeat(-point) + digits;
  }
  const mantissa = digits.length > 1 ? digits[0] + '.' + digits.slice(1) : digits;
  return `${sign}${mantissa}E${adjusted >= 0 ? '+' : '-'}${Math.abs(adjusted)}`;
}

/** Width of a padded Numeric(p, s) plaintext: 1 + max(p - s, 1) + (s + 1 if s > 0 else 0). */
function numericWidth(precision, scale) {
  return 1 + Math.max(precision - scale, 1) + (scale > 0 ? scale + 1 : 0);
}

/**
 * Numeric(p, s)'s fixed-point text: rounded to s places (ties away from zero), no negative
 * zero, refused if |value| >= 10^(p - s) after rounding, NaN or infinite.
 */
function fixedPoint(text, precision, scale = 0) {
  if (!Number.isInteger(precision) || precision < 1 || !Number.isInteger(scale) || scale < 0) {
    throw new EncodingError('Numeric precision and scale must be integers');
  }
  const d = parseDecimal(text);
  if (d.special) throw new EncodingError(`Numeric(${precision}, ${scale}) cannot hold ${d.special}`);
  let n;
  const shift = d.exponent + scale;
  if (shift >= 0) n = d.coefficient * 10n ** BigInt(shift);
  else {
    const div = 10n ** BigInt(-shift);
    n = d.coefficient / div;
    if (2n * (d.coefficient % div) >= div) n += 1n;
  }
  if (n >= 10n ** BigInt(precision)) {
    throw new EncodingError(`value out of range for Numeric(${precision}, ${scale})`);
  }
  const negative = d.negative && n !== 0n;
  let body = n.toString();
  if (scale > 0) {
    body = body.padStart(scale + 1, '0');
    body = body.slice(0, body.length - scale) + '.' + body.slice(body.length - scale);
  }
  return (negative ? '-' : '') + body;
}

module.exports = { parseDecimal, decimalToString, fixedPoint, numericWidth };
