"""Transparent column encryption for SQLAlchemy, with envelope encryption.

A root key wraps versioned AES-256-GCM data keys, kept wrapped in a
``data_keys`` table in the application's own database; the data keys encrypt
column values. See README.md for the quickstart, and docs/ for the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        KeyEventsTamperedError,
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
    from .keys.events import ChainProblem, ChainReport, KeyEvent
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
    from .sqla.binding import (
        EXECUTION_OPTION,
        SCOPE_OPTION,
        scope,
        session_scope,
        set_session_scope,
    )
    from .sqla.blind_index import (
        NORMALIZERS,
        BlindDigest,
        BlindIndex,
        blind_index,
        blind_index_column,
    )
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
    "ChainProblem",
    "ChainReport",
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
    "KeyEvent",
    "KeyEventsTamperedError",
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

# Each name, imported from its module when first used: importing the package
# itself costs nothing, so that the command can load everything inside its
# Ctrl-C guard (__main__.py), and an application pays only for what it uses.
_MODULES: dict[str, str] = {
    "DEFAULT_MAX_ENCRYPTIONS": ".keys.policy",
    "DEFAULT_SCOPE": ".registry",
    "EXECUTION_OPTION": ".sqla.binding",
    "NORMALIZERS": ".sqla.blind_index",
    "SCOPE_OPTION": ".sqla.binding",
    "AWSKMSRootKey": ".keys.aws_kms",
    "AsyncKeyRegistry": ".async_registry",
    "BlindDigest": ".sqla.blind_index",
    "BlindIndex": ".sqla.blind_index",
    "BlindIndexError": ".errors",
    "ChainProblem": ".keys.events",
    "ChainReport": ".keys.events",
    "CheckableRootKey": ".keys.rootkey",
    "ColumnCensus": ".ops.census",
    "ConfigurationError": ".errors",
    "ConnectionLostError": ".errors",
    "DecryptionError": ".errors",
    "DestroyedKeyError": ".errors",
    "EncryptedComparisonError": ".errors",
    "EncryptedExpressionError": ".errors",
    "EncryptedType": ".sqla.types",
    "EncryptionLimitError": ".errors",
    "EnvelopeError": ".errors",
    "InvalidValueError": ".errors",
    "KeyDisabledError": ".errors",
    "KeyEvent": ".keys.events",
    "KeyEventsTamperedError": ".errors",
    "KeyInUseError": ".errors",
    "KeyInfo": ".ops.status",
    "KeyRegistry": ".registry",
    "KeyRows": ".ops.census",
    "KeyState": ".keys.storage",
    "KeyStateError": ".errors",
    "KeyTamperedError": ".errors",
    "LeftRow": ".ops.migrate",
    "LegacyDecryptionError": ".errors",
    "MaintenanceReport": ".ops.status",
    "MigrationReport": ".ops.migrate",
    "NoActiveKeyError": ".errors",
    "NotCiphertextError": ".errors",
    "PBKDF2RootKey": ".keys.rootkey",
    "RegistryClosedError": ".errors",
    "RegistryStatus": ".ops.status",
    "RootKeyAccessDeniedError": ".errors",
    "RootKeyProvider": ".keys.rootkey",
    "RootKeyUnavailableError": ".errors",
    "RotationPolicy": ".keys.policy",
    "ShreddedScopeError": ".errors",
    "StatementFailedError": ".errors",
    "StaticRootKey": ".keys.rootkey",
    "UnknownKeyError": ".errors",
    "ValuesLeftBehindError": ".errors",
    "WrongRootKeyError": ".errors",
    "blind_index": ".sqla.blind_index",
    "blind_index_column": ".sqla.blind_index",
    "data_keys_table": ".keys.storage",
    "root_key_from_env": ".keys.rootkey",
    "scope": ".sqla.binding",
    "session_scope": ".sqla.binding",
    "set_session_scope": ".sqla.binding",
}

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """An exported name, or a submodule (``sqlalchemy_envelope.keys``), on first use."""
    module = _MODULES.get(name)
    if module is None:
        if name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
