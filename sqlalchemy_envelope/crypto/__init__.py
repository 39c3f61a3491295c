"""Ciphertext format and the primitives from pyca/cryptography: no SQLAlchemy, no database."""
