"""Transparent column encryption for SQLAlchemy, with envelope encryption.

A root key wraps versioned AES-256-GCM data keys, kept wrapped in a
``data_keys`` table in the application's own database; the data keys encrypt
column values. See README.md for the quickstart, and docs/ for the rest.
"""

from .async_registry import AsyncKeyRegistry
from .errors import (
    BlindIndexError,
    ConfigurationError,
    ConnectionLostError,
    DecryptionError,
    DestroyedKeyError,
    EncryptedComparisonError,
    EncryptedExpressionError,
    EncryptionLimitError,
    EnvelopeError,
    InvalidValueError,
    KeyDisabledError,
    KeyInUseError,
    KeyStateError,
    KeyTamperedError,
    LegacyDecryptionError,
    NoActiveKeyError,
    NotCiphertextError,
    RegistryClosedError,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
    ShreddedScopeError,
    StatementFailedError,
    UnknownKeyError,
    ValuesLeftBehindError,
    WrongRootKeyError,
)
from .keys.aws_kms import AWSKMSRootKey
from .keys.policy import DEFAULT_MAX_ENCRYPTIONS, RotationPolicy
from .keys.rootkey import (
    CheckableRootKey,
    PBKDF2RootKey,
    RootKeyProvider,
    StaticRootKey,
    root_key_from_env,
)
from .keys.storage import KeyState, data_keys_table
from .ops.census import ColumnCensus, KeyRows
from .ops.migrate import LeftRow, MigrationReport
from .ops.status import KeyInfo, MaintenanceReport, RegistryStatus
from .registry import DEFAULT_SCOPE, KeyRegistry
from .sqla.binding import EXECUTION_OPTION, SCOPE_OPTION, scope, session_scope, set_session_scope
from .sqla.blind_index import NORMALIZERS, BlindDigest, BlindIndex, blind_index, blind_index_column
from .sqla.types import EncryptedType

__all__ = [
    "DEFAULT_MAX_ENCRYPTIONS",
    "DEFAULT_SCOPE",
    "EXECUTION_OPTION",
    "NORMALIZERS",
    "SCOPE_OPTION",
    "AWSKMSRootKey",
    "AsyncKeyRegistry",
    "BlindDigest",
    "BlindIndex",
    "BlindIndexError",
    "CheckableRootKey",
    "ColumnCensus",
    "ConfigurationError",
    "ConnectionLostError",
    "DecryptionError",
    "DestroyedKeyError",
    "EncryptedComparisonError",
    "EncryptedExpressionError",
    "EncryptedType",
    "EncryptionLimitError",
    "EnvelopeError",
    "InvalidValueError",
    "KeyDisabledError",
    "KeyInUseError",
    "KeyInfo",
    "KeyRegistry",
    "KeyRows",
    "KeyState",
    "KeyStateError",
    "KeyTamperedError",
    "LeftRow",
    "LegacyDecryptionError",
    "MaintenanceReport",
    "MigrationReport",
    "NoActiveKeyError",
    "NotCiphertextError",
    "PBKDF2RootKey",
    "RegistryClosedError",
    "RegistryStatus",
    "RootKeyAccessDeniedError",
    "RootKeyProvider",
    "RootKeyUnavailableError",
    "RotationPolicy",
    "ShreddedScopeError",
    "StatementFailedError",
    "StaticRootKey",
    "UnknownKeyError",
    "ValuesLeftBehindError",
    "WrongRootKeyError",
    "blind_index",
    "blind_index_column",
    "data_keys_table",
    "root_key_from_env",
    "scope",
    "session_scope",
    "set_session_scope",
]

# Named by the package, which exports them (sqlalchemy_envelope.blind_index is
# the function): how repr() and Alembic's default type rendering name them.
EncryptedType.__module__ = __name__
BlindIndex.__module__ = __name__

__version__ = "0.1.0"
