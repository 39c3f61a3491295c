"""SQLAlchemy integration: encrypted column types, blind indexes, and how a
statement finds the keys it writes and reads with."""
