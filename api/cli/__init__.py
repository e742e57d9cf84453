"""The `kiln` command (`commands`): server processes, admin, and the HTTP client commands (`client`:
generate; `batch`: batch files; `generations`: list, get, cancel, watch)."""

from api.cli.commands import app, main

__all__ = ["app", "main"]
