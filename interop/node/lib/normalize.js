'use strict';
// FORMAT.md section 8's normalizers, which follow Python's str methods. Node has no casefold:
// it is derived per code point as toLowerCase(toUpperCase(c)), plus the exceptions where that
// differs from Unicode's full case folding (checked against Python 3.11's str.casefold over
// every code point: U+0131, U+1E9E and Cherokee, which folds to its uppercase letters).
const { EncodingError } = require('./errors');

function casefoldChar(ch) {
  const c = ch.codePointAt(0);
  if (c < 0x80) return ch.toLowerCase();
  if (c === 0x0131) return ch; // dotless i: no folding (its uppercase is I)
  if (c === 0x1e9e) return 'ss'; // capital sharp s
  if (c >= 0x13a0 && c <= 0x13f5) return ch; // Cherokee capitals fold to themselves
  if (c >= 0x13f8 && c <= 0x13fd) return String.fromCodePoint(c - 8); // Cherokee small letters
  if (c >= 0xab70 && c <= 0xabbf) return String.fromCodePoint(c - 0xab70 + 0x13a0);
  return ch.toUpperCase().toLowerCase();
}

/** Unicode full case folding (C + F of CaseFolding.txt), as Python's str.casefold. */
function casefold(text) {
  let out = '';
  for (const ch of text) out += casefoldChar(ch);
  return out;
}

/** Full lowercase mapping with Final_Sigma, as Python's str.lower (JS's toLowerCase is the same mapping). */
function lower(text) {
  return text.toLowerCase();
}

// Python's str.isspace: exactly these (FORMAT.md section 8).
const SPACE = '\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const STRIP_RE = new RegExp(`^[${SPACE}]+|[${SPACE}]+$`, 'g');
const SPLIT_RE = new RegExp(`[${SPACE}]+`);

function strip(text) {
  return text.replace(STRIP_RE, '');
}

function collapseSpaces(text) {
  return text.split(SPLIT_RE).filter((piece) => piece !== '').join(' ');
}

function digits(text) {
  return text.replace(/\P{Nd}/gu, '');
}

function alphanumeric(text) {
  return text.replace(/[^\p{L}\p{N}]/gu, '');
}

const NORMALIZERS = { casefold, lower, strip, collapse_spaces: collapseSpaces, digits, alphanumeric };

/** Applies normalizers (a name, a function, or a list of them, in order) to text. */
function applyNormalizers(text, normalize) {
  if (normalize === null || normalize === undefined) return text;
  const list = Array.isArray(normalize) ? normalize : [normalize];
  for (const n of list) {
    const fn = typeof n === 'function' ? n : NORMALIZERS[n];
    if (!fn) throw new EncodingError(`unknown normalizer ${JSON.stringify(n)}`);
    text = fn(text);
    if (typeof text !== 'string') throw new EncodingError('a normalizer must return text');
  }
  return text;
}

module.exports = { casefold, lower, strip, collapseSpaces, digits, alphanumeric, applyNormalizers, NORMALIZERS, SPACE_CHARACTERS: SPACE };
