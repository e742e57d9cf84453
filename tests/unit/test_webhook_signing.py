"""Standard Webhooks signatures, the receiver-side check, secrets, the retry schedule and the payload."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from shared.errors import ValidationFailed
from shared.netguard import OutboundPolicy
from shared.records import GenerationRecord, ImageUrls, generation_record
from shared.settings import Settings
from shared.webhooks import (
    WebhookVerificationError,
    generate_secret,
    generation_event_payload,
    generation_webhook_secret,
    retry_delay_seconds,
    secret_key_bytes,
    sign,
    signature_headers,
    validate_webhook_url,
    verify,
)

# The Standard Webhooks reference vector (the same one the reference libraries test against).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_HEADERS = {
    "webhook-id": VECTOR_ID,
    "webhook-timestamp": str(VECTOR_TIMESTAMP),
    "webhook-signature": VECTOR_SIGNATURE,
}


def test_sign_reproduces_the_reference_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    assert signature_headers(VECTOR_SECRET, VECTOR_ID, VECTOR_BODY, VECTOR_TIMESTAMP) == VECTOR_HEADERS


def test_verify_accepts_the_reference_vector_with_any_header_case() -> None:
    verify(VECTOR_SECRET, VECTOR_HEADERS, VECTOR_BODY, now=VECTOR_TIMESTAMP)
    verify(
        VECTOR_SECRET,
        {k.title(): v for k, v in VECTOR_HEADERS.items()},
        VECTOR_BODY,
        now=VECTOR_TIMESTAMP + 299,
    )


def test_verify_accepts_one_valid_signature_among_several() -> None:
    headers = {**VECTOR_HEADERS, "webhook-signature": f"v1,bm9wZQ== v2,xyz {VECTOR_SIGNATURE}"}
    verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize(
    ("headers", "body", "now", "secret"),
    [
        (VECTOR_HEADERS, b'{"test": 2432232315}', VECTOR_TIMESTAMP, VECTOR_SECRET),  # tampered body
        (VECTOR_HEADERS, VECTOR_BODY, VECTOR_TIMESTAMP + 301, VECTOR_SECRET),  # too old
        (VECTOR_HEADERS, VECTOR_BODY, VECTOR_TIMESTAMP - 301, VECTOR_SECRET),  # from the future
        (VECTOR_HEADERS, VECTOR_BODY, VECTOR_TIMESTAMP, generate_secret()),  # another secret
        ({**VECTOR_HEADERS, "webhook-id": "msg_other"}, VECTOR_BODY, VECTOR_TIMESTAMP, VECTOR_SECRET),
        (  # the timestamp is signed: moving it breaks the signature
            {**VECTOR_HEADERS, "webhook-timestamp": str(VECTOR_TIMESTAMP + 1)},
            VECTOR_BODY,
            VECTOR_TIMESTAMP,
            VECTOR_SECRET,
        ),
        (
            {**VECTOR_HEADERS, "webhook-signature": VECTOR_SIGNATURE.replace("v1,", "v2,")},
            VECTOR_BODY,
            VECTOR_TIMESTAMP,
            VECTOR_SECRET,
        ),  # a v2 signature is not a v1 one
        ({**VECTOR_HEADERS, "webhook-timestamp": "soon"}, VECTOR_BODY, VECTOR_TIMESTAMP, VECTOR_SECRET),
        ({"webhook-id": VECTOR_ID}, VECTOR_BODY, VECTOR_TIMESTAMP, VECTOR_SECRET),  # headers missing
    ],
)
def test_verify_refuses_what_was_not_signed_now_with_this_secret(headers, body, now, secret) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body, now=now)


def test_generated_secrets_are_32_random_bytes_in_the_whsec_format() -> None:
    secrets = {generate_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(secret_key_bytes(secret)) == 32
        assert base64.b64decode(secret.removeprefix("whsec_")) == secret_key_bytes(secret)


@pytest.mark.parametrize("bad", ["whsec_", "whsec_not base64!", "whsec_abc"])
def test_a_malformed_secret_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        secret_key_bytes(bad)


def test_the_generation_webhook_secret_is_stable_per_project_and_server_key() -> None:
    project_a, project_b = uuid.uuid4(), uuid.uuid4()
    secret = generation_webhook_secret("server-key", project_a)
    assert secret == generation_webhook_secret("server-key", project_a)
    assert secret.startswith("whsec_") and len(secret_key_bytes(secret)) == 32
    assert secret != generation_webhook_secret("server-key", project_b)
    assert secret != generation_webhook_secret("another-server-key", project_a)


def test_the_retry_schedule_repeats_its_last_wait() -> None:
    settings = Settings(webhooks={"backoff_seconds": [5, 30, 120]})
    assert [retry_delay_seconds(settings, n) for n in range(1, 6)] == [5, 30, 120, 120, 120]


def test_the_retry_schedule_reads_a_comma_list_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("KILN_WEBHOOKS_BACKOFF_SECONDS", "1, 2.5,10")
    assert Settings().webhooks.backoff_seconds == [1.0, 2.5, 10.0]
    monkeypatch.setenv("KILN_WEBHOOKS_BACKOFF_SECONDS", "[3, 4]")
    assert Settings().webhooks.backoff_seconds == [3.0, 4.0]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("ftp://example.com/hook", "http"),
        ("http:///no-host", "no host"),
        ("https://user:pass@example.com/hook", "credentials"),
        ("https://example.com/a b", "spaces"),
        ("   ", "empty"),
    ],
)
def test_webhook_urls_are_checked_when_saved(url: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        validate_webhook_url(url, OutboundPolicy())
    assert refused.value.details and refused.value.details[0]["field"] == "url"
    assert reason in refused.value.details[0]["message"]


def test_a_good_webhook_url_is_kept_trimmed() -> None:
    assert validate_webhook_url("  https://hooks.example.com/kiln?x=1 ", OutboundPolicy()) == (
        "https://hooks.example.com/kiln?x=1"
    )


def _row(**overrides: object) -> dict[str, object]:
    now = datetime(2025, 11, 28, 10, 0, tzinfo=UTC)
    row: dict[str, object] = {
        "id": uuid.UUID(int=1),
        "project_id": uuid.UUID(int=2),
        "status": "success",
        "prompt": "a lighthouse, golden hour",
        "original_prompt": "a lighthouse",
        "negative_prompt": None,
        "aspect_ratio": "16:9",
        "provider": "placeholder",
        "model": None,
        "output_image_id": uuid.UUID(int=3),
        "error_code": None,
        "error_message": None,
        "retry_count": 1,
        "attempts": 1,
        "processing_time_ms": 420,
        "meta": {"orderId": 7},
        "created_at": now,
        "updated_at": now,
        "started_at": now,
        "completed_at": now,
        "cancelled_at": None,
        "auto_enhance": True,
        "enhancement_template": "general",
        "enhancement_engine": "rules",
        "enhancement_fallback": None,
        "connection_id": None,
        "parameters": {},
        "seed": 7,
        "deadline_at": now,
        "version": 1,
        "webhook_url": None,
        "kind": "generate",
        "source_image_id": None,
        "mask_image_id": None,
        "image_id": uuid.UUID(int=3),
        "image_storage_key": "projects/p/generations/g/v1/a1/original.png",
        "image_public_token": "tok",
        "image_mime_type": "image/png",
        "image_width": 1344,
        "image_height": 768,
        "image_file_size": 1234,
    }
    row.update(overrides)
    return row


URLS = ImageUrls.from_settings(Settings())


def test_the_payload_data_is_the_api_record_field_for_field() -> None:
    """One shape: a receiver reads exactly what `GET /api/v1/generations/:id` answers."""
    row = _row()
    payload = generation_event_payload(row, "success", URLS, datetime.now(UTC))
    assert payload["data"] == msgspec.to_builtins(generation_record(row, URLS))
    assert set(payload["data"]) == {f.encode_name for f in msgspec.structs.fields(GenerationRecord)}


def test_a_storage_with_a_public_base_url_gives_direct_storage_urls_in_the_payload() -> None:
    settings = Settings(storage={"public_base_url": "https://cdn.example.com/media/"})
    payload = generation_event_payload(
        _row(), "success", ImageUrls.from_settings(settings), datetime.now(UTC)
    )
    assert payload["data"]["outputImage"]["storageUrl"] == (
        "https://cdn.example.com/media/projects/p/generations/g/v1/a1/original.png"
    )


def test_the_success_payload_carries_the_record_and_the_image_urls() -> None:
    settings = Settings(server={"public_url": "https://kiln.example.com/"})
    at = datetime(2025, 11, 28, 10, 0, 1, 500_000, tzinfo=UTC)
    payload = generation_event_payload(_row(), "success", ImageUrls.from_settings(settings), at)
    assert payload["type"] == "generation.success"
    assert payload["timestamp"] == "2025-11-28T10:00:01.500Z"
    data = payload["data"]
    assert data["id"] == str(uuid.UUID(int=1)) and data["projectId"] == str(uuid.UUID(int=2))
    assert (data["status"], data["aspectRatio"], data["retryCount"], data["processingTimeMs"]) == (
        "success",
        "16:9",
        1,
        420,
    )
    assert data["originalPrompt"] == "a lighthouse" and data["meta"] == {"orderId": 7}
    assert data["createdAt"] == "2025-11-28T10:00:00.000Z"
    image = data["outputImage"]
    assert image["publicUrl"] == "https://kiln.example.com/i/tok"
    assert image["thumbnails"] == {
        "sm": "https://kiln.example.com/i/tok?size=sm",
        "lg": "https://kiln.example.com/i/tok?size=lg",
    }
    assert image["storageUrl"] == f"https://kiln.example.com/api/v1/images/{uuid.UUID(int=3)}/content"
    assert (image["width"], image["height"], image["mimeType"]) == (1344, 768, "image/png")


def test_other_events_carry_no_image_and_announce_their_own_status() -> None:
    payload = generation_event_payload(_row(status="success"), "processing", URLS, datetime.now(UTC))
    assert payload["type"] == "generation.processing"
    assert payload["data"]["status"] == "processing" and payload["data"]["outputImage"] is None
    failed = generation_event_payload(
        _row(status="failed", error_code="DEADLINE_EXCEEDED", image_id=None, output_image_id=None),
        "failed",
        URLS,
        datetime.now(UTC),
    )
    assert failed["data"]["errorCode"] == "DEADLINE_EXCEEDED" and failed["data"]["outputImage"] is None
