"""Credentials at rest: Fernet (AES-128-CBC + HMAC) with keys from the environment.

PSA_WRITEBACK_ENCRYPTION_KEYS holds one or more comma-separated Fernet keys; the first
encrypts, all decrypt, so keys can be rotated without a migration.
"""
from __future__ import annotations

import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENV_VAR = "PSA_WRITEBACK_ENCRYPTION_KEYS"


class ConfigurationError(Exception):
    """Set-up is wrong (missing key, bad URL). Kept outside the PSA error tree so no
    retry policy ever swallows it."""


class CredentialDecryptError(ConfigurationError):
    pass


def _fernet() -> MultiFernet:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        raise ConfigurationError(
            f"{ENV_VAR} is not set: PSA credentials cannot be encrypted or read. "
            "Generate a key with `psa-writeback generate-key` and export it."
        )
    try:
        return MultiFernet([Fernet(k.strip().encode()) for k in raw.split(",") if k.strip()])
    except ValueError as err:
        raise ConfigurationError(f"{ENV_VAR} holds a value that is not a Fernet key") from err


def generate_key() -> str:
    return Fernet.generate_key().decode()


def encrypt(plaintext: str) -> bytes:
    return _fernet().encrypt(plaintext.encode("utf-8"))


def decrypt(token: bytes) -> str:
    try:
        return _fernet().decrypt(bytes(token)).decode("utf-8")
    except InvalidToken as err:
        raise CredentialDecryptError(
            f"stored PSA credentials cannot be decrypted with the keys in {ENV_VAR} (was the key rotated?)"
        ) from err
