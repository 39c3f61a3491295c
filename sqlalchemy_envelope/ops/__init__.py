"""Operations on stored values: census, re-encryption, decryption in place,
index backfill, and their reports."""
