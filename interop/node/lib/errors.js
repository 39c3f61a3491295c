'use strict';
// Typed errors. Messages never contain plaintext or key bytes.

class EnvelopeError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

/** The row's root_key_fingerprint is not the root key's: another root key wrapped it. */
class WrongRootKeyError extends EnvelopeError {}
/** A wrapped key failed to unwrap under the right root key, or a row is inconsistent (tampering). */
class KeyTamperedError extends EnvelopeError {}
/** The key's state is `disabled`: it must not decrypt until enabled again. */
class KeyDisabledError extends EnvelopeError {}
/** The key's state is `destroyed` (or its wrapped_key is gone). */
class KeyDestroyedError extends EnvelopeError {}
/** No data_keys row has that id, or a scope has no usable key. */
class KeyNotFoundError extends EnvelopeError {}
/** The stored value is not a ciphertext of this format (bad version, too short, non-canonical base64). */
class NotCiphertextError extends EnvelopeError {}
/** The value failed authentication: altered, or read with the wrong context or key. */
class DecryptionError extends EnvelopeError {}
/** A scope-bound value's key belongs to another scope than the one expected. */
class ScopeMismatchError extends EnvelopeError {}
/** A value cannot be encoded for (or decoded from) its column type. */
class EncodingError extends EnvelopeError {}

module.exports = {
  EnvelopeError,
  WrongRootKeyError,
  KeyTamperedError,
  KeyDisabledError,
  KeyDestroyedError,
  KeyNotFoundError,
  NotCiphertextError,
  DecryptionError,
  ScopeMismatchError,
  EncodingError,
};
