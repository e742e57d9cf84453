"""Authentication (X-API-Key) and rate limiting."""
