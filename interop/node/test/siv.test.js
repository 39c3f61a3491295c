'use strict';
// AES-SIV (RFC 5297) and AES-CMAC (RFC 4493 / NIST SP 800-38B) against their published vectors.
const test = require('node:test');
const assert = require('node:assert/strict');
const { aesSivEncrypt, aesSivDecrypt, cmac, DecryptionError } = require('..');

const hex = (s) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('CMAC: NIST SP 800-38B AES-128 examples 1 and 2', () => {
  const key = hex('2b7e1516 28aed2a6 abf71588 09cf4f3c');
  assert.equal(cmac(key, Buffer.alloc(0)).toString('hex'), 'bb1d6929e95937287fa37d129b756746');
  assert.equal(cmac(key, hex('6bc1bee2 2e409f96 e93d7e11 7393172a')).toString('hex'), '070a16b46b4d4144f79bdd9dd04a287c');
});

test('AES-SIV: RFC 5297 A.1 (deterministic, AES-SIV-CMAC-256)', () => {
  const key = hex('fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0 f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff');
  const ad = [hex('10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627')];
  const plaintext = hex('11223344 55667788 99aabbcc ddee');
  const expected = '85632d07c6e8f37f950acd320a2ecc93' + '40c02b9690c4dc04daef7f6afe5c';
  assert.equal(aesSivEncrypt(key, ad, plaintext).toString('hex'), expected);
  assert.deepEqual(aesSivDecrypt(key, ad, hex(expected)), plaintext);
  const tampered = hex(expected);
  tampered[20] ^= 1;
  assert.throws(() => aesSivDecrypt(key, ad, tampered), DecryptionError);
  assert.throws(() => aesSivDecrypt(key, [hex('00')], hex(expected)), DecryptionError);
});

test('AES-SIV: RFC 5297 A.2 (nonce-based, three associated data strings)', () => {
  const key = hex('7f7e7d7c 7b7a7978 77767574 73727170 40414243 44454647 48494a4b 4c4d4e4f');
  const ad = [
    hex('00112233 44556677 8899aabb ccddeeff deaddada deaddada ffeeddcc bbaa9988 77665544 33221100'),
    hex('10203040 50607080 90a0'),
    hex('09f91102 9d74e35b d84156c5 635688c0'),
  ];
  const plaintext = hex('74686973 20697320 736f6d65 20706c61 696e7465 78742074 6f20656e 63727970 74207573 696e6720 5349562d 414553');
  const expected = '7bdb6e3b432667eb06f4d14bff2fbd0f' + 'cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d';
  assert.equal(aesSivEncrypt(key, ad, plaintext).toString('hex'), expected);
  assert.deepEqual(aesSivDecrypt(key, ad, hex(expected)), plaintext);
});

test('AES-SIV: key sizes 32, 48, 64; empty and block-sized plaintexts round trip', () => {
  for (const size of [32, 48, 64]) {
    const key = Buffer.alloc(size, 0x5a);
    for (const n of [0, 1, 15, 16, 17, 32, 100]) {
      const p = Buffer.alloc(n, 0xa5);
      const sealed = aesSivEncrypt(key, [Buffer.from('h'), Buffer.alloc(0)], p);
      assert.equal(sealed.length, n + 16);
      assert.deepEqual(aesSivDecrypt(key, [Buffer.from('h'), Buffer.alloc(0)], sealed), p);
    }
  }
  assert.throws(() => aesSivEncrypt(Buffer.alloc(40), [], Buffer.alloc(1)), TypeError);
});
