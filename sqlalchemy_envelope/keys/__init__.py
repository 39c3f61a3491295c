"""Keys: the data_keys table, root keys, the key cache, and the keyring that
loads, claims and rotates data keys."""
