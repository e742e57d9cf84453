"""Secrets at rest (connection API keys, webhook endpoint secrets) and the keys derived from
KILN_SECRET_KEY.

Each purpose gets its own key, derived with HKDF under a distinct `info`, so no key serves two
purposes: `b"fernet"` encrypts stored secrets (the original derivation, kept so that every stored
ciphertext stays readable), `b"kiln generation-webhook signing"` derives the per-project secrets that
sign generations' own webhook deliveries (`shared.webhooks.generation_webhook_secret`).

Rotation: set the new KILN_SECRET_KEY and the old one as KILN_SECRET_KEY_PREVIOUS. Stored secrets are
then read with either key (MultiFernet: the current key first) and written with the current one;
`kiln secrets reencrypt` rewrites every stored secret under the current key, after which the previous
key can be dropped.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_SALT = b"kiln-secrets-v1"
ENCRYPTION_INFO = b"fernet"
WEBHOOK_SIGNING_INFO = b"kiln generation-webhook signing"

# The server key(s): the current one alone, or (current, previous...) during a rotation.
SecretKeys = str | Sequence[str]


class SecretUnreadable(Exception):
    """The stored secret was encrypted with another KILN_SECRET_KEY (or is corrupt)."""


def derive_key(secret_key: str, info: bytes, length: int = 32) -> bytes:
    """A key for one purpose (`info`) from KILN_SECRET_KEY."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(secret_key.encode())


@lru_cache(maxsize=8)
def _fernet(secret_key: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(derive_key(secret_key, ENCRYPTION_INFO)))


def _keys(keys: SecretKeys) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(k for k in keys if k)


def _cipher(keys: SecretKeys) -> MultiFernet:
    """Encrypts with the first key, decrypts with any."""
    return MultiFernet([_fernet(key) for key in _keys(keys)])


def encrypt_secret(keys: SecretKeys, plain: str) -> str:
    return _cipher(keys).encrypt(plain.encode()).decode()


def decrypt_secret(keys: SecretKeys, token: str) -> str:
    try:
        return _cipher(keys).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable("stored secret cannot be decrypted with the current KILN_SECRET_KEY") from exc


def reencrypt_secret(keys: SecretKeys, token: str) -> str:
    """`token` encrypted under the current (first) key; SecretUnreadable if no key reads it."""
    try:
        return _cipher(keys).rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable("stored secret cannot be decrypted with KILN_SECRET_KEY(_PREVIOUS)") from exc


def is_current(secret_key: str, token: str) -> bool:
    """Whether the current key alone reads `token` (nothing to re-encrypt)."""
    try:
        _fernet(secret_key).decrypt(token.encode())
    except InvalidToken:
        return False
    return True
