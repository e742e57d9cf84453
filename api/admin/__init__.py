"""Projects and API keys (admin keys only; the CLI calls the same service functions)."""
