"""KILN_SECRET_KEY: its minimum length in production, one derived key per purpose, and reading stored
secrets during a rotation (issue 7 item 20)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import pytest
from pydantic import ValidationError

from shared.crypto import (
    ENCRYPTION_INFO,
    WEBHOOK_SIGNING_INFO,
    SecretUnreadable,
    decrypt_secret,
    derive_key,
    encrypt_secret,
    is_current,
    reencrypt_secret,
)
from shared.settings import Settings
from shared.webhooks import generation_webhook_secret, secret_key_bytes

OLD = "old-secret-key-" + "o" * 32
NEW = "new-secret-key-" + "n" * 32


def test_production_refuses_a_secret_key_shorter_than_32_bytes_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(mode="production", secret_key="s3cret-but-short")
    assert "at least 32 bytes" in str(info.value)
    assert "s3cret-but-short" not in str(info.value)  # the error may reach a log
    assert Settings(mode="production", secret_key="k" * 32).secret_key == "k" * 32
    assert Settings(mode="embedded", secret_key="short").secret_key == "short"  # a laptop may


def test_the_previous_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", NEW)
    monkeypatch.setenv("KILN_SECRET_KEY_PREVIOUS", OLD)
    assert Settings().secret_keys == (NEW, OLD)
    monkeypatch.delenv("KILN_SECRET_KEY_PREVIOUS")
    assert Settings().secret_keys == (NEW,)


def test_encryption_and_webhook_signing_use_different_keys_derived_from_the_secret_key() -> None:
    encryption, signing = derive_key(NEW, ENCRYPTION_INFO), derive_key(NEW, WEBHOOK_SIGNING_INFO)
    assert encryption != signing and NEW.encode() not in (encryption, signing)
    project = uuid.uuid4()
    secret = secret_key_bytes(generation_webhook_secret(NEW, project))
    assert secret == hmac.new(signing, f"{project}:0".encode(), hashlib.sha256).digest()
    # Not the old derivation, which used KILN_SECRET_KEY itself as the HMAC key.
    legacy = hmac.new(NEW.encode(), f"kiln-generation-webhooks:{project}".encode(), hashlib.sha256).digest()
    assert secret != legacy
    assert base64.urlsafe_b64encode(encryption) not in base64.b64encode(secret)


def test_the_generation_webhook_secret_changes_with_its_version() -> None:
    project = uuid.uuid4()
    secrets = {generation_webhook_secret(NEW, project, version) for version in range(3)}
    assert len(secrets) == 3
    assert generation_webhook_secret(NEW, project, 1) == generation_webhook_secret(NEW, project, 1)


def test_secrets_stored_under_the_previous_key_stay_readable_during_a_rotation() -> None:
    stored = encrypt_secret(OLD, "sk-vendor-key")
    with pytest.raises(SecretUnreadable):
        decrypt_secret(NEW, stored)
    assert decrypt_secret((NEW, OLD), stored) == "sk-vendor-key"
    assert not is_current(NEW, stored)

    rewritten = reencrypt_secret((NEW, OLD), stored)
    assert is_current(NEW, rewritten) and decrypt_secret(NEW, rewritten) == "sk-vendor-key"
    # New secrets are written with the current key only.
    assert decrypt_secret(NEW, encrypt_secret((NEW, OLD), "x")) == "x"
    with pytest.raises(SecretUnreadable):
        reencrypt_secret((NEW, OLD), encrypt_secret("a-third-key-" + "t" * 32, "x"))
