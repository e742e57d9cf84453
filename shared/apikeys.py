"""API keys: `kiln_` + 40 base62 characters; only the SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass

KEY_PREFIX = "kiln_"
_ALPHABET = string.ascii_letters + string.digits
SHOWN_PREFIX_LENGTH = 12


@dataclass(frozen=True)
class NewApiKey:
    plain: str  # shown once, never stored
    prefix: str
    digest: str


def digest_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def generate_api_key() -> NewApiKey:
    plain = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(40))
    return NewApiKey(plain=plain, prefix=plain[:SHOWN_PREFIX_LENGTH], digest=digest_key(plain))


def looks_like_key(value: str) -> bool:
    return len(value) == len(KEY_PREFIX) + 40 and value.startswith(KEY_PREFIX) and value[5:].isalnum()
