"""One error hierarchy with stable codes; the API maps every KilnError to the error envelope."""

from __future__ import annotations

from typing import Any


class KilnError(Exception):
    status_code: int = 500
    code: str = "INTERNAL_ERROR"
    default_message: str = "Internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.headers = headers or {}
        super().__init__(self.message)


class ValidationFailed(KilnError):
    status_code = 400
    code = "VALIDATION_ERROR"
    default_message = "Invalid parameters"

    @classmethod
    def field(cls, field: str, message: str) -> ValidationFailed:
        return cls(f"{field}: {message}", details=[{"field": field, "message": message}])


class Unauthorized(KilnError):
    status_code = 401
    code = "UNAUTHORIZED"
    default_message = (
        "Missing, unknown or revoked API key (send it in the X-API-Key header, or as an Authorization "
        "Bearer token)"
    )


class Forbidden(KilnError):
    status_code = 403
    code = "FORBIDDEN"
    default_message = "This API key is not allowed to do that"


class NotFound(KilnError):
    status_code = 404
    code = "NOT_FOUND"
    default_message = "Not found"


class GenerationNotFound(NotFound):
    code = "GENERATION_NOT_FOUND"
    default_message = "Generation not found"


class ImageNotFound(NotFound):
    code = "IMAGE_NOT_FOUND"
    default_message = "Image not found"


class InvalidState(KilnError):
    status_code = 409
    code = "INVALID_STATE"
    default_message = "The resource is not in a state that allows this"


class PayloadTooLarge(KilnError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "Request body too large"


class RateLimitExceeded(KilnError):
    status_code = 429
    code = "RATE_LIMIT_EXCEEDED"
    default_message = "Rate limit exceeded"


class TooManyFailedAuthentications(RateLimitExceeded):
    code = "TOO_MANY_FAILED_AUTHENTICATIONS"
    default_message = "Too many requests with unknown API keys from this address; retry later"


class TooManyStreams(RateLimitExceeded):
    code = "TOO_MANY_STREAMS"
    default_message = "This API key has too many event streams and long polls open"


class ConcurrencyLimitExceeded(KilnError):
    status_code = 429
    code = "CONCURRENCY_LIMIT_EXCEEDED"
    default_message = "Too many generations in flight for this project"


class GenerationFailed(KilnError):
    """A generation a compatible route (OpenAI, Automatic1111) waited on ended failed or cancelled: its
    client expects an image in the answer."""

    status_code = 502
    code = "GENERATION_FAILED"


class ContentPolicyViolation(GenerationFailed):
    """The provider refused the prompt or the image (safety system)."""

    status_code = 400
    code = "CONTENT_POLICY_VIOLATION"


class GenerationTimedOut(KilnError):
    """A compatible route's generations were not finished within KILN_COMPAT_WAIT_SECONDS; they go on
    and can be polled on the native API."""

    status_code = 504
    code = "GENERATION_TIMEOUT"


class ServiceUnavailable(KilnError):
    status_code = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "A backing service is unavailable; retry later"

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StorageUnavailable(ServiceUnavailable):
    """The object store cannot be reached or is overloaded (connection error, timeout, 5xx, SlowDown)."""

    code = "STORAGE_UNAVAILABLE"
    default_message = "Image storage is unavailable; retry later"


# --- provider adapters raise only these two -------------------------------------------------


class ProviderError(Exception):
    """Base of what a provider adapter may raise."""


class ProviderRetryable(ProviderError):
    """Transient failure (429, 5xx, timeout, connection error): try again, after `retry_after` if set."""

    def __init__(self, message: str = "provider temporarily unavailable", retry_after: float | None = None):
        self.message = message
        self.retry_after = retry_after
        super().__init__(message)


class ProviderPermanent(ProviderError):
    """Failure that a retry cannot fix (bad request, auth, safety block). `code` ends up in errorCode."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
