"""Pausing and resuming provider queues (admin keys only; the CLI calls the same service functions)."""
