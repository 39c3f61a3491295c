'use strict';
// The normalizers of FORMAT.md section 8, and (when python3 is on the PATH) a comparison with
// Python's str.casefold, str.lower, str.isspace, category Nd and str.isalnum over every code
// point Python's Unicode database assigns.
const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('child_process');
const { normalizers, applyNormalizers } = require('..');

test('the examples of the specification', () => {
  assert.equal(normalizers.casefold('Straße ẞ ΣΑΣ ﬀ İ'), 'strasse ss σασ ff i\u0307');
  assert.equal(normalizers.lower('ΣΑΣ Straße İ'), 'σας straße i\u0307');
  assert.equal(normalizers.strip('\u001c\u0085\u00a0 x \u3000\t'), 'x');
  assert.equal(normalizers.strip('\ufeffx\ufeff'), '\ufeffx\ufeff');
  assert.equal(normalizers.collapse_spaces('  a \u2028\u2029 b\n\nc  '), 'a b c');
  assert.equal(normalizers.digits(' +44 (20) 7946-0018 ٣'), '442079460018٣');
  assert.equal(normalizers.alphanumeric('a_b-ç²½Ⅻ e\u0301!'), 'abç²½Ⅻe');
  assert.equal(applyNormalizers('  Ada  LOVELACE ', ['collapse_spaces', 'casefold']), 'ada lovelace');
  assert.throws(() => applyNormalizers('x', 'nope'));
});

function python(script) {
  try {
    return execFileSync('python3', ['-c', script], { encoding: 'utf8', maxBuffer: 64 << 20 });
  } catch (_) {
    return null;
  }
}

const PY = `
import json, sys, unicodedata
out = {"version": unicodedata.unidata_version, "casefold": {}, "lower": {}, "space": [], "nd": [], "alnum": [], "assigned": []}
for c in range(0x110000):
    if 0xD800 <= c <= 0xDFFF: continue
    ch = chr(c)
    if unicodedata.category(ch) == "Cn": continue
    out["assigned"].append(c)
    if ch.casefold() != ch: out["casefold"][c] = ch.casefold()
    if ch.lower() != ch: out["lower"][c] = ch.lower()
    if ch.isspace(): out["space"].append(c)
    if unicodedata.category(ch) == "Nd": out["nd"].append(c)
    if ch.isalnum(): out["alnum"].append(c)
s = "x\\u03a3 \\u03a3 A\\u03a3\\u0301 \\u03a3a A\\u03a3. A.\\u03a3"
out["sigma"] = [s, s.lower()]
json.dump(out, sys.stdout)
`;

test('agrees with Python over every code point it assigns', (t) => {
  const text = python(PY);
  if (text === null) {
    t.skip('python3 is not available');
    return;
  }
  const py = JSON.parse(text);
  const space = new Set(py.space);
  const nd = new Set(py.nd);
  const alnum = new Set(py.alnum);
  const bad = { casefold: [], lower: [], space: [], digits: [], alphanumeric: [] };
  for (const c of py.assigned) {
    const ch = String.fromCodePoint(c);
    if (normalizers.casefold(ch) !== (py.casefold[c] ?? ch)) bad.casefold.push(c);
    if (normalizers.lower(ch) !== (py.lower[c] ?? ch)) bad.lower.push(c);
    if ((normalizers.strip(ch) === '') !== space.has(c)) bad.space.push(c);
    if ((normalizers.digits(ch) === ch) !== nd.has(c)) bad.digits.push(c);
    if ((normalizers.alphanumeric(ch) === ch) !== alnum.has(c)) bad.alphanumeric.push(c);
  }
  for (const [name, list] of Object.entries(bad)) {
    assert.deepEqual(list.map((c) => c.toString(16)), [], `${name} differs from Python (Unicode ${py.version})`);
  }
  assert.equal(normalizers.lower(py.sigma[0]), py.sigma[1], 'Final_Sigma');
});
