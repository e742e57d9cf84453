"""Liveness (/health) and readiness (/ready)."""
