"""Generation status events inside the API: one Redis pub/sub connection per process, fanned out."""
