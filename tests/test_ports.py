"""The ports our servers listen on in tests, benchmarks and `bin/serve`: below the kernel's
ephemeral range, where no outgoing connection takes them between the choice and the bind
(CI once met "[Errno 98] address already in use" for uvicorn), and a service whose port is
taken all the same starts again on another."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from server.devtools.embedded_redis import FIRST_PORT, ephemeral_ports, free_port
from server.devtools.processes import Service
from server.storage.database import Store


def test_ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() -> None:
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(FIRST_PORT <= port < ephemeral.start for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("20000\t30000\n")
    assert ephemeral_ports(tmp_path / "range") == range(20000, 30001)
    assert ephemeral_ports(tmp_path / "missing") == range(49152, 65536)


@pytest.mark.slow
def test_a_service_whose_port_is_taken_before_it_binds_starts_on_another(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    service = Service(database_url, redis_url, tmp_path / "logs", web_concurrency=1)
    taken = service.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            service.start(worker=False)
            assert service.port != taken
            assert httpx.get(f"{service.base_url}/readyz", timeout=5).status_code == 200
        finally:
            service.stop()
    assert b"address already in use" in (tmp_path / "logs" / "web.log").read_bytes()
