"""The embedded servers' ports: outside the ephemeral range by default, and a taken one named clearly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from shared.settings import EmbeddedSettings


def test_default_ports_lie_outside_the_ephemeral_range() -> None:
    """A port inside it may be any outbound connection's local port, and then `make run` cannot start."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    defaults = EmbeddedSettings()
    for port in (defaults.postgres_port, defaults.redis_port):
        assert not low <= port <= high, f"{port} is in the ephemeral range {low}-{high}"


@pytest.mark.parametrize(
    ("server", "setting"),
    [(EmbeddedRedis, "KILN_EMBEDDED_REDIS_PORT"), (EmbeddedPostgres, "KILN_EMBEDDED_POSTGRES_PORT")],
)
def test_a_port_held_by_a_non_listening_socket_is_refused_naming_the_setting(
    tmp_path: Path, server: type[EmbeddedRedis] | type[EmbeddedPostgres], setting: str
) -> None:
    with socket.socket() as holder:  # like an outbound connection's local port: bound, not listening
        holder.bind(("127.0.0.1", free_port()))
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError) as refused:
            server(tmp_path / "data", port).start()
    assert f"port {port} is taken" in str(refused.value) and setting in str(refused.value)
