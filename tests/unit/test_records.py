"""The generation record built from a row: every field from its own column (the builder passes them
in field order, so a slip would put one column's value under another field's name)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec

from shared.records import ImageUrls, generation_record

URLS = ImageUrls("https://kiln.example/", lambda key: None)
AT = datetime(2025, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)


def _row(**overrides: object) -> dict[str, object]:
    """Every column a distinct value, so each field shows which column it came from."""
    image_id = uuid.UUID(int=3)
    row: dict[str, object] = {
        "id": uuid.UUID(int=1),
        "project_id": uuid.UUID(int=2),
        "prompt": "prompt",
        "original_prompt": "original prompt",
        "negative_prompt": "negative prompt",
        "auto_enhance": True,
        "enhancement_template": "template",
        "enhancement_engine": "engine",
        "enhancement_fallback": "fallback",
        "aspect_ratio": "16:9",
        "status": "success",
        "provider": "placeholder",
        "model": "model",
        "connection_id": uuid.UUID(int=4),
        "parameters": {"steps": 5},
        "seed": 6,
        "meta": {"m": 7},
        "output_image_id": image_id,
        "processing_time_ms": 8,
        "retry_count": 9,
        "attempts": 10,
        "error_code": "CODE",
        "error_message": "message",
        "started_at": AT + timedelta(seconds=1),
        "completed_at": AT + timedelta(seconds=2),
        "deadline_at": AT + timedelta(seconds=3),
        "cancelled_at": AT + timedelta(seconds=4),
        "created_at": AT,
        "updated_at": AT + timedelta(seconds=5),
        "version": 11,
        "webhook_url": "https://hooks.example/",
        "kind": "edit",
        "source_image_id": uuid.UUID(int=15),
        "mask_image_id": uuid.UUID(int=16),
        "image_id": image_id,
        "image_storage_key": "images/key.png",
        "image_public_token": "token",
        "image_mime_type": "image/png",
        "image_width": 12,
        "image_height": 13,
        "image_file_size": 14,
    }
    return {**row, **overrides}


def test_every_field_comes_from_its_own_column() -> None:
    image = "00000000-0000-0000-0000-000000000003"
    public = "https://kiln.example/i/token"
    assert msgspec.to_builtins(generation_record(_row(), URLS)) == {
        "id": "00000000-0000-0000-0000-000000000001",
        "projectId": "00000000-0000-0000-0000-000000000002",
        "prompt": "prompt",
        "originalPrompt": "original prompt",
        "autoEnhance": True,
        "aspectRatio": "16:9",
        "status": "success",
        "outputImageId": image,
        "outputImage": {
            "id": image,
            "storageUrl": f"https://kiln.example/api/v1/images/{image}/content",
            "publicUrl": public,
            "mimeType": "image/png",
            "width": 12,
            "height": 13,
            "fileSize": 14,
            "thumbnails": {"sm": f"{public}?size=sm", "lg": f"{public}?size=lg"},
        },
        "processingTimeMs": 8,
        "retryCount": 9,
        "errorMessage": "message",
        "meta": {"m": 7},
        "createdAt": "2025-11-28T10:00:00.123Z",
        "updatedAt": "2025-11-28T10:00:05.123Z",
        "negativePrompt": "negative prompt",
        "enhancementTemplate": "template",
        "enhancementEngine": "engine",
        "enhancementFallback": "fallback",
        "provider": "placeholder",
        "model": "model",
        "connectionId": "00000000-0000-0000-0000-000000000004",
        "parameters": {"steps": 5},
        "seed": 6,
        "errorCode": "CODE",
        "attempts": 10,
        "startedAt": "2025-11-28T10:00:01.123Z",
        "completedAt": "2025-11-28T10:00:02.123Z",
        "deadlineAt": "2025-11-28T10:00:03.123Z",
        "cancelledAt": "2025-11-28T10:00:04.123Z",
        "version": 11,
        "webhookUrl": "https://hooks.example/",
        "kind": "edit",
        "sourceImageId": "00000000-0000-0000-0000-00000000000f",
        "maskImageId": "00000000-0000-0000-0000-000000000010",
        "queuePosition": None,
    }


def test_the_output_image_is_shown_with_success_only() -> None:
    assert generation_record(_row(status="failed"), URLS).output_image is None
    assert generation_record(_row(), URLS, status="processing").output_image is None
    assert generation_record(_row(), URLS, with_image=False).output_image is None
    assert generation_record(_row(image_id=None), URLS).output_image is None
