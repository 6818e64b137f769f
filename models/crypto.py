"""Credentials at rest: Fernet (AES-128-CBC + HMAC) with keys from the environment.

PSA_WRITEBACK_ENCRYPTION_KEYS holds one or more comma-separated Fernet keys; the first
encrypts, all decrypt, so keys can be rotated without a migration (`psa-writeback
rotate-keys` re-encrypts every stored key with the first one, so an old key can go).

Each stored key is bound to its connection: the token encrypts a small JSON envelope
{"v": 2, "conn": <connection id>, "url": <base_url>, "provider": ..., "key": <the key>}.
Fernet has no associated data, but the envelope is inside the authenticated ciphertext, so
checking it after decryption is equivalent: a row whose base_url (or id, or ciphertext
copied from another row) was changed in the database decrypts to an envelope that does not
match it, and the worker refuses to send those keys anywhere. Tokens written before binding
(the plain key, "legacy") are still read; migration 0007 and rotate-keys bind them.
"""
from __future__ import annotations

import json
import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENV_VAR = "PSA_WRITEBACK_ENCRYPTION_KEYS"
ENVELOPE_VERSION = 2


class ConfigurationError(Exception):
    """Set-up is wrong (missing key, bad URL). Kept outside the PSA error tree so no
    retry policy ever swallows it."""


class CredentialDecryptError(ConfigurationError):
    pass


class CredentialBindingError(ConfigurationError):
    """The keys decrypt, but were stored for another connection id or base URL."""


def keys_configured() -> bool:
    return bool(os.environ.get(ENV_VAR, "").strip())


def require_keys() -> None:
    """Raise the ConfigurationError for a missing or malformed key now."""
    _fernets()


def _fernets() -> list[Fernet]:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        raise ConfigurationError(
            f"{ENV_VAR} is not set: PSA credentials cannot be encrypted or read. "
            "Generate a key with `psa-writeback generate-key` and export it."
        )
    try:
        return [Fernet(k.strip().encode()) for k in raw.split(",") if k.strip()]
    except ValueError as err:
        raise ConfigurationError(f"{ENV_VAR} holds a value that is not a Fernet key") from err


def _fernet() -> MultiFernet:
    return MultiFernet(_fernets())


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


# --- keys bound to their connection -------------------------------------------------------

def envelope(key: str, *, conn_id: int, base_url: str, provider: str) -> str:
    return json.dumps({"v": ENVELOPE_VERSION, "conn": int(conn_id), "url": base_url, "provider": provider,
                       "key": key}, separators=(",", ":"))


def encrypt_bound(key: str, *, conn_id: int, base_url: str, provider: str) -> bytes:
    return encrypt(envelope(key, conn_id=conn_id, base_url=base_url, provider=provider))


def parse_envelope(plaintext: str) -> dict | None:
    """The envelope, or None for a legacy token (the plain key). PSA keys are plain
    identifiers, never a JSON object carrying our version number."""
    if not plaintext.startswith("{"):
        return None
    try:
        data = json.loads(plaintext)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("v") == ENVELOPE_VERSION and isinstance(data.get("key"), str):
        return data
    return None


def binding_matches(data: dict, *, conn_id: int, base_url: str | None) -> bool:
    return data.get("conn") == int(conn_id) and data.get("url") == base_url


def binding_error(conn_id: int) -> CredentialBindingError:
    # Names the connection, never the keys, nor where they were bound (the row's history is
    # the operator's to inspect, not an alert's to repeat).
    return CredentialBindingError(
        f"PSA connection {conn_id}: its stored keys were encrypted for another connection or base URL "
        "(the row was changed in the database?); refusing to send them. Re-enter the keys with add-connection.")


def decrypt_bound(token: bytes, *, conn_id: int, base_url: str | None) -> str:
    """The key stored in `token` for connection `conn_id` at `base_url`, or a
    ConfigurationError. A legacy token (not yet bound) is accepted as is."""
    plaintext = decrypt(token)
    data = parse_envelope(plaintext)
    if data is None:
        return plaintext
    if not binding_matches(data, conn_id=conn_id, base_url=base_url):
        raise binding_error(conn_id)
    return data["key"]


def is_current(token: bytes) -> bool:
    """Whether `token` was encrypted with the first (current) key."""
    try:
        _fernets()[0].decrypt(bytes(token))
        return True
    except InvalidToken:
        return False


def rotate(token: bytes) -> bytes:
    """Re-encrypt `token` with the first key, keeping its plaintext and timestamp."""
    try:
        return _fernet().rotate(bytes(token))
    except InvalidToken as err:
        raise CredentialDecryptError(
            f"stored PSA credentials cannot be decrypted with the keys in {ENV_VAR} (was the key rotated?)"
        ) from err


def rewrap(token: bytes, *, conn_id: int, base_url: str, provider: str) -> tuple[bytes | None, str]:
    """One stored key brought to the current form: bound to its connection and encrypted
    with the first key. Returns (new token, "bound" | "rotated") or (None, "current").
    A legacy token is bound to the row as it is now (trust on first bind: run this before
    anyone could have repointed a row). A bound token whose binding does not match the row
    is never re-bound (that would launder a repointed row): CredentialBindingError."""
    plaintext = decrypt(token)
    data = parse_envelope(plaintext)
    if data is None:
        return encrypt_bound(plaintext, conn_id=conn_id, base_url=base_url, provider=provider), "bound"
    if not binding_matches(data, conn_id=conn_id, base_url=base_url):
        raise binding_error(conn_id)
    if is_current(token):
        return None, "current"
    return rotate(token), "rotated"
