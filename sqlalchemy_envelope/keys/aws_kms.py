"""A root key held in AWS KMS: data keys are wrapped and unwrapped by KMS, so
the root key never enters this process.

KMS is called only when a data key is created, rotated, re-wrapped or first
loaded into the registry's cache, never per value; the data key's id, scope,
version and kind travel as the KMS encryption context, which KMS binds to the
wrapped bytes and records in CloudTrail. Needs the ``aws`` extra (boto3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import (
    ConfigurationError,
    DecryptionError,
    RootKeyAccessDeniedError,
    RootKeyUnavailableError,
)

__all__ = ["AWSKMSRootKey"]

_PURPOSE = {"purpose": "sqlalchemy-envelope/data-key"}
# The probe wraps as a data key is wrapped, with the same context keys and
# purpose, so that the policy that lets the registry wrap and unwrap data keys
# lets the probe through; its key_id is no data key's (theirs are numbers).
_PROBE_CONTEXT = {"key_id": "probe", "scope": "probe"}

# KMS error codes that mean "this application may not use this key".
_DENIED = frozenset(
    {
        "AccessDeniedException",
        "DisabledException",
        "KMSInvalidStateException",
        "NotFoundException",
        "InvalidKeyUsageException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
    }
)
# ... and the ones that mean "these wrapped bytes are not for this key and context".
_NOT_OURS = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


class AWSKMSRootKey:
    """A KMS symmetric key as the root key.

    ``key_id`` is a key ARN (recommended: no extra call), a key id, an alias
    name (``alias/app``) or an alias ARN; anything but a key ARN is resolved
    once with ``DescribeKey``. ``region`` and ``endpoint_url`` default to
    boto3's own configuration (``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_KMS``);
    pass ``client`` to use a boto3 KMS client of your own. ``max_attempts``
    counts every request of a call, the first included.
    """

    def __init__(
        self,
        key_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        if not isinstance(key_id, str) or not key_id.strip():
            raise ConfigurationError(
                "AWSKMSRootKey needs a KMS key ARN, key id or alias (e.g. ENVELOPE_AWS_KMS_KEY_ID)"
            )
        self.key_id = key_id.strip()
        if region is None and _is_key_arn(self.key_id):
            region = self.key_id.split(":")[3]  # arn:aws:kms:<region>:<account>:key/<id>
        if client is None:
            _check_options(connect_timeout, read_timeout, max_attempts)
            client = _new_client(region, endpoint_url, connect_timeout, read_timeout, max_attempts)
        self._client = client
        self._arn: str | None = self.key_id if _is_key_arn(self.key_id) else None

    @property
    def key_arn(self) -> str:
        """The key's ARN, asked of KMS once if it was configured otherwise."""
        if self._arn is None:
            metadata = self._call("DescribeKey", self._client.describe_key, KeyId=self.key_id)
            self._arn = str(metadata["KeyMetadata"]["Arn"])
        return self._arn

    @property
    def fingerprint(self) -> str:
        # The key's own id: not secret, findable in the console, and shared
        # by the replicas of a multi-region key, which can indeed unwrap.
        return "aws-kms:" + self.key_arn.rpartition("/")[2]

    @property
    def description(self) -> str:
        return f"aws-kms {self.key_arn}"

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        response = self._call(
            "Encrypt",
            self._client.encrypt,
            KeyId=self.key_arn,
            Plaintext=data_key,
            EncryptionContext={**context, **_PURPOSE},
        )
        return bytes(response["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        response = self._call(
            "Decrypt",
            self._client.decrypt,
            KeyId=self.key_arn,
            CiphertextBlob=wrapped,
            EncryptionContext={**context, **_PURPOSE},
        )
        return bytes(response["Plaintext"])

    def check(self) -> None:
        """Wrap one byte and unwrap it again, as a rotation and a cache miss
        would: raises the error they would meet now (kms:Encrypt and
        kms:Decrypt under the data keys' encryption context, and
        kms:DescribeKey for a key not named by its ARN).
        `KeyRegistry.status` reports the outcome."""
        self.unwrap(self.wrap(b"\x00", _PROBE_CONTEXT), _PROBE_CONTEXT)

    def _call(self, operation: str, method: Any, **arguments: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return method(**arguments)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "unknown"))
            where = f"KMS {operation} on {self.key_id} failed with {code}"
            if code in _NOT_OURS:
                raise DecryptionError(
                    f"{where}: the wrapped key was not made by this KMS key for this context"
                ) from None
            if code in _DENIED:
                raise RootKeyAccessDeniedError(
                    f"{where}: grant this application kms:Encrypt and kms:Decrypt with the "
                    f"encryption context purpose={_PURPOSE['purpose']} (and kms:DescribeKey "
                    "unless the key is given by its ARN) on an enabled key"
                ) from None
            raise RootKeyUnavailableError(f"{where}; retry later") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise RootKeyAccessDeniedError(
                f"KMS {operation} on {self.key_id}: no AWS credentials found; configure "
                "them as boto3 expects (environment, profile or instance role)"
            ) from None
        except BotoCoreError as error:
            raise RootKeyUnavailableError(
                f"KMS {operation} on {self.key_id} could not reach KMS "
                f"({type(error).__name__}); cached data keys keep working, retry later"
            ) from None

    def __repr__(self) -> str:
        return f"AWSKMSRootKey({self.key_id!r})"


def _is_key_arn(key_id: str) -> bool:
    return key_id.startswith("arn:") and ":kms:" in key_id and ":key/" in key_id


def _check_options(connect_timeout: float, read_timeout: float, max_attempts: int) -> None:
    """Refuse what botocore would take and then fail on at the first call,
    where an impossible timeout looks like KMS being unreachable."""
    for name, seconds in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            seconds = math.nan
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigurationError(
                f"AWSKMSRootKey's {name} must be a positive, finite number of seconds"
            )
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigurationError(
            "AWSKMSRootKey's max_attempts must be a whole number of at least 1 (the first "
            "call included)"
        )


def _new_client(
    region: str | None,
    endpoint_url: str | None,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
) -> Any:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import NoRegionError
    except ImportError:
        raise ConfigurationError(
            'AWSKMSRootKey needs boto3: pip install "sqlalchemy-envelope[aws]"'
        ) from None
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # botocore's "max_attempts" counts retries after the first attempt.
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
    )
    try:
        session = boto3.session.Session()  # not boto3's shared default: its settings are cached
        return session.client("kms", region_name=region, endpoint_url=endpoint_url, config=config)
    except NoRegionError:
        raise ConfigurationError(
            "no AWS region for KMS: set ENVELOPE_AWS_REGION or AWS_DEFAULT_REGION, or pass region="
        ) from None
