"""Hostile clients: one cheap client must not slow, starve or lock out the others.

Each test runs one kind of attack against the real service, started with the Procfile's own
commands, while a normal shopper keeps browsing and reserving from another address. It
checks what the attack must not get (a slot, memory, a forged log line, a 5xx) and that the
shopper's requests all succeed within a bound generous enough for a loaded machine. On
loopback every address in 127.0.0.0/8 is this machine: the attacker connects from
127.0.0.2, the shopper from 127.0.0.3, and 127.0.0.1 plays a trusted proxy
(`FORWARDED_ALLOW_IPS`'s default).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.api import protocol
from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import Service, running
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.infra.logs import MAX_VALUE_CHARS
from server.infra.metrics import KNOWN_METHODS, MAX_SCRAPERS
from server.storage.database import Store
from tests.support import eventually

pytestmark = [
    pytest.mark.slow,
    # About the HTTP server, not the database: SQLite suffices.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

ATTACKER = "127.0.0.2"
SHOPPER = "127.0.0.3"
# What the shopper must see while an attack runs: every request answered as usual, half of
# them within MEDIAN_BOUND_S and none slower than MAX_BOUND_S. Unattacked they take a few
# milliseconds; the attacks below once made them take seconds, or fail.
MEDIAN_BOUND_S = 0.5
MAX_BOUND_S = 3.0
MiB = 1024 * 1024


# -- the shopper ---------------------------------------------------------------------------


class Shopper:
    """Browses and reserves in a loop from its own address, timing every request."""

    def __init__(self, service: Service, product_id: int) -> None:
        self.service = service
        self.product_id = product_id
        self.timings: list[float] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Shopper:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=SHOPPER)
        async with httpx.AsyncClient(
            base_url=self.service.base_url, transport=transport, timeout=30
        ) as client:
            while not self._stop.is_set():
                for method, path, body, ok in (
                    ("GET", "/api/products", None, {200}),
                    (
                        "POST",
                        "/api/reservations",
                        {"productId": self.product_id, "quantity": 1},
                        {201},
                    ),
                ):
                    started = time.monotonic()
                    try:
                        response = await client.request(method, path, json=body)
                        if response.status_code not in ok:
                            self.failures.append(f"{method} {path}: {response.status_code}")
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{method} {path}: {exc!r}")
                    self.timings.append(time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.05)

    async def served(self, count: int = 20, within: float = 60) -> None:
        """Until the shopper has made `count` more requests."""
        goal = len(self.timings) + count

        async def enough() -> bool:
            return len(self.timings) >= goal

        await eventually(enough, within=within, what=f"{count} shopper requests")

    def check(self) -> None:
        assert not self.failures, self.failures[:10]
        assert self.timings, "the shopper made no request"
        median = statistics.median(self.timings)
        assert median < MEDIAN_BOUND_S, f"shopper median {median:.3f} s"
        assert max(self.timings) < MAX_BOUND_S, f"shopper slowest {max(self.timings):.3f} s"


def rss(service: Service) -> int:
    """Resident memory of the web processes, in bytes."""
    total = 0
    for pid in [service.web.pid, *service.web.children()]:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


async def attacker_connection(
    service: Service, source: str = ATTACKER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.port, local_addr=(source, 0))


async def read_answer(reader: asyncio.StreamReader, within: float = 10) -> tuple[int, bytes]:
    """The status and body of the one answer the server writes before closing: (0, b"")
    if it closed (or reset) without one."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    if not data.startswith(b"HTTP/1.1 "):
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def assert_json_error(body: bytes, status: int, code: str) -> None:
    error = json.loads(body)
    assert error["statusCode"] == status, error
    assert error["code"] == code, error
    assert error["message"].endswith("."), error


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


@asynccontextmanager
async def service_with_product(
    database_url: str, redis_url: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Service, int]]:
    settings.setdefault("web_concurrency", 1)
    with running(database_url, redis_url, tmp_path / "logs", worker=False, **settings) as service:
        product = await service.new_product(1_000_000)
        yield service, product["id"]


# -- 1. metrics ----------------------------------------------------------------------------


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    return response.text


async def test_metrics_have_their_own_port_and_bounded_labels(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(database_url, redis_url, tmp_path) as (service, product_id):
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            assert (await client.get("/metrics")).status_code == 404  # not on the shop's port
        before = await scrape(service.metrics_url)
        # Invented paths and every method the HTTP parser knows, many times over.
        methods = ["PROPFIND", "MKCOL", "LOCK", "PURGE", "REPORT", "SEARCH", "PATCH", "TRACE"]
        for n in range(300):
            reader, writer = await attacker_connection(service)
            writer.write(
                f"{methods[n % len(methods)]} /junk/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            await writer.drain()
            status, _ = await read_first_status(reader)
            assert status in (404, 405), status
            close(writer)

        async def junk_counted() -> str:
            page = await scrape(service.metrics_url)
            return page if 'route="unmatched"' in page else ""

        after = await eventually(junk_counted, within=10, what="the junk in the metrics")
        labels = {
            (sample.labels["route"], sample.labels["method"])
            for family in text_string_to_metric_families(after)
            if family.name == "flashsale_http_request_duration_seconds"
            for sample in family.samples
        }
        assert {method for _, method in labels} <= KNOWN_METHODS | {"other"}
        assert not any(route.startswith("/junk") for route, _ in labels)
        assert len(after) - len(before) < 40_000, "300 junk requests grew the page"

        # Four clients polling the metrics as fast as they can do not slow the shopper.
        stop = asyncio.Event()

        async def poll() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                while not stop.is_set():
                    await client.get(service.metrics_url)

        pollers = [asyncio.create_task(poll()) for _ in range(4)]
        try:
            async with Shopper(service, product_id) as shopper:
                await shopper.served(40)
        finally:
            stop.set()
            await asyncio.gather(*pollers)
        shopper.check()


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


async def test_silent_connections_to_the_worker_metrics_port_cost_no_thread_each(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(database_url, redis_url, tmp_path / "logs", web_concurrency=1) as service:
        url = f"http://127.0.0.1:{service.worker.env['WORKER_METRICS_PORT']}/metrics"
        assert "flashsale_" in await scrape(url)
        before = threads(service.worker.pid)
        port = int(service.worker.env["WORKER_METRICS_PORT"])
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
        try:
            # A server with a thread per connection has started most of them within this
            # window (it did 200 in well under a second); the bounded one stops at its cap.
            deadline = time.monotonic() + 3
            most = before
            while time.monotonic() < deadline:
                most = max(most, threads(service.worker.pid))
                await asyncio.sleep(0.05)  # sampling the thread count, not waiting for it
            grown = most - before
            # The count is the whole process's: the worker may start threads of its own in
            # the window (the default executor's, up to 6 on 2 cores, a database connection's;
            # CI once saw 10). A thread per connection would be near 200.
            others = 16
            assert grown <= MAX_SCRAPERS + others, f"{grown} threads for 200 silent connections"
        finally:
            for _, writer in silent:
                close(writer)
        # Cut off, they are gone, and a scrape is answered again.
        assert "flashsale_" in await scrape(url)


async def read_first_status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head[9:12]), head


# -- 2. headers: size and count ------------------------------------------------------------


async def test_oversized_heads_are_refused_and_memory_stays_flat(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(database_url, redis_url, tmp_path) as (service, product_id):
        base = rss(service)
        async with Shopper(service, product_id) as shopper:
            # A 64 MiB header value, sent as fast as the server takes it, by 4 connections.
            async def huge_header() -> None:
                reader, writer = await attacker_connection(service)
                writer.write(b"GET /api/products HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * MiB

                async def send() -> None:
                    with contextlib.suppress(ConnectionError):
                        for _ in range(64):
                            writer.write(chunk)
                            await writer.drain()

                sending = asyncio.create_task(send())
                status, body = await read_answer(reader)
                close(writer)
                await sending
                assert status == 431
                assert_json_error(body, 431, "header_too_large")

            await asyncio.gather(*(huge_header() for _ in range(4)))
            grown = rss(service) - base
            assert grown < 32 * MiB, f"the web process grew by {grown / MiB:.0f} MiB"

            many = "".join(f"X-H{n}: v\r\n" for n in range(101))
            for request, status, code in (
                (f"GET /api/products HTTP/1.1\r\nHost: x\r\n{many}\r\n", 431, "too_many_headers"),
                (f"GET /{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url_too_long"),
            ):
                reader, writer = await attacker_connection(service)
                writer.write(request.encode())
                answer = await read_answer(reader)
                close(writer)
                assert answer[0] == status
                assert_json_error(answer[1], status, code)
            await shopper.served()
        shopper.check()


# -- 3. read timeouts, and connections per address -----------------------------------------


async def test_slow_and_idle_connections_are_timed_out_and_capped_per_address(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(
        database_url,
        redis_url,
        tmp_path,
        HTTP_HEADER_TIMEOUT_SECONDS="6",
        HTTP_BODY_TIMEOUT_SECONDS="6",
        MAX_CONNECTIONS_PER_CLIENT="50",
    ) as (service, product_id):
        # A low descriptor limit, as a process manager may set: 300 sockets held by one
        # client would take every descriptor, and every other client's connections fail.
        service.stop()
        service.web.max_open_files = 200
        service.start(worker=False)
        key = base64.b64encode(os.urandom(16)).decode()
        kinds = {
            "idle": b"",
            "half a head": b"GET /api/products HTTP/1.1\r\nHost: x\r\n",
            "short body": (
                b"POST /api/reservations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n" + b'{"productId": 1,'
            ),
            "slow handshake": (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + f"Sec-WebSocket-Key: {key}\r\n".encode()
            ),
        }
        async with Shopper(service, product_id) as shopper:
            opened: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []
            started = time.monotonic()
            # Connections made in the first 3 s: none can time out before 6 s after the first
            # was accepted, so all are open at once even if the server accepts them late.
            together = 0
            for n in range(300):
                kind = list(kinds)[n % len(kinds)]
                try:
                    reader, writer = await attacker_connection(service)
                except OSError:
                    continue
                if time.monotonic() - started < 3:
                    together = len(opened) + 1
                writer.write(kinds[kind])
                opened.append((kind, reader, writer))
            # read_answer raises TimeoutError if the server keeps one open past 15 s.
            answers = await asyncio.gather(*(read_answer(r, within=15) for _, r, _ in opened))
            for _, _, writer in opened:
                close(writer)
            await shopper.served()
        shopper.check()
        # Every one was closed by the server: at once past the cap of 50, the others within
        # the timeouts (408 for a request begun; nothing for one that sent nothing).
        by_kind: dict[str, set[int]] = {}
        for (kind, _, _), (status, body) in zip(opened, answers, strict=True):
            by_kind.setdefault(kind, set()).add(status)
            if status == 408:
                assert_json_error(
                    body, 408, "header_timeout" if kind != "short body" else "body_timeout"
                )
        assert by_kind["idle"] == {0}
        for kind in ("half a head", "short body", "slow handshake"):
            assert 408 in by_kind[kind], by_kind
        # Of the connections made in the first 3 s, all open at once, at most 50 were let in.
        # On a busy machine opening all 300 can take longer than the timeout; those made
        # later may take the places of connections timed out (53 were let in, load 20).
        timed_out = sum(1 for status, _ in answers[:together] if status == 408)
        assert together > 50, f"only {together} connections made within 3 s: nothing to check"
        assert timed_out <= 50, "more than 50 connections of one address were let in at once"


# -- 4. stalled bodies are not work in flight ----------------------------------------------


async def test_stalled_bodies_do_not_count_as_requests_in_flight(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(
        database_url,
        redis_url,
        tmp_path,
        MAX_IN_FLIGHT="200",
        MAX_CONNECTIONS_PER_CLIENT="1000",  # this attack is about in-flight, not connections
        HTTP_BODY_TIMEOUT_SECONDS="30",
    ) as (service, product_id):
        stalled = []
        for _ in range(200):
            _reader, writer = await attacker_connection(service)
            writer.write(
                b"POST /api/reservations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"productId": 1,'
            )
            stalled.append(writer)
        try:
            async with Shopper(service, product_id) as shopper:
                await shopper.served(40)
        finally:
            for writer in stalled:
                close(writer)
        shopper.check()  # no 503 `overloaded` among them


# -- 5. a disconnect mid-body --------------------------------------------------------------


async def test_a_disconnect_mid_body_is_one_short_line_and_no_5xx(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(database_url, redis_url, tmp_path, LOG_LEVEL="INFO") as (
        service,
        _product_id,
    ):
        lines_before = len(service.web.log.read_text().splitlines())
        for _ in range(200):
            _reader, writer = await attacker_connection(service)
            writer.write(
                b"POST /api/reservations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"productId": 1,'
            )
            await writer.drain()
            # A FIN after the bytes: the server reads the head, then learns the client left.
            writer.close()
            await writer.wait_closed()

        def aborted() -> list[str]:
            return [line for line in service.web.log.read_text().splitlines() if " 499 " in line]

        async def all_logged() -> bool:
            return len(aborted()) == 200

        await eventually(all_logged, within=20, what="200 lines with 499")
        text = service.web.log.read_text()
        new_lines = text.splitlines()[lines_before:]
        assert len(new_lines) <= 200 + 5, "\n".join(new_lines[:20])
        assert "Traceback" not in text
        assert " 500 " not in text

        async def counted() -> bool:
            page = await scrape(service.metrics_url)
            return requests_counted(page, "4xx") == 200

        await eventually(counted, within=10, what="the aborts in the metrics")
        page = await scrape(service.metrics_url)
        assert requests_counted(page, "5xx") == 0


def requests_counted(page: str, status: str) -> float:
    """POST requests answered with `status` (a class), on any route (one the client left
    before it was routed counts as `unmatched`)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "flashsale_http_request_duration_seconds_count"
        and sample.labels["method"] == "POST"
        and sample.labels["status"] == status
    )


# -- 6. WebSocket slots per client ---------------------------------------------------------


async def open_sockets(url: str, count: int, **kwargs: Any) -> tuple[list[Any], int]:
    """Open `count` sockets; those still open after their first frame, and how many were
    refused (closed with 1013 or not let in)."""
    kept, refused = [], 0
    for _ in range(count):
        try:
            connection = await connect(url, open_timeout=10, **kwargs)
        except (OSError, InvalidStatus):
            refused += 1
            continue
        try:
            await asyncio.wait_for(connection.recv(), 10)
            kept.append(connection)
        except ConnectionClosed:
            assert connection.close_code == 1013
            refused += 1
    return kept, refused


async def test_one_client_cannot_take_every_websocket_slot(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(
        database_url, redis_url, tmp_path, WS_MAX_CLIENTS="300", WS_MAX_PER_CLIENT="20"
    ) as (service, _):
        url = service.base_url.replace("http://", "ws://") + "/ws"
        # Directly from one address...
        direct, refused = await open_sockets(url, 300, local_addr=(ATTACKER, 0))
        # ...and through a trusted proxy, in the name of one forwarded address.
        proxied, refused_proxied = await open_sockets(
            url, 40, additional_headers={"X-Forwarded-For": "203.0.113.9"}
        )
        try:
            assert len(direct) == 20
            assert refused == 280
            assert len(proxied) == 20
            assert refused_proxied == 20
            # A page from elsewhere still gets its socket and its snapshot.
            async with connect(url, open_timeout=10, local_addr=(SHOPPER, 0)) as page:
                snapshot = json.loads(await asyncio.wait_for(page.recv(), 10))
                assert snapshot["type"] == "snapshot"
        finally:
            await asyncio.gather(*(c.close() for c in [*direct, *proxied]))


# -- 7. a WebSocket client that stops reading ----------------------------------------------


async def big_catalog(database_url: str, products: int) -> None:
    store = Store(database_url)
    await store.connect()

    async def create(conn: Executor) -> None:
        for n in range(products):
            await inventory.create_product(
                conn, name=f"{n:04d} " + "x" * 190, price_cents=100, stock=5,
                sale_starts_at=None, now=now_ms(),
            )  # fmt: skip

    try:
        await store.write(create)
    finally:
        await store.close()


def server_side_send_queue(port: int, client_port: int) -> int | None:
    """The server's send queue (bytes) on its connection to `client_port`, from
    /proc/net/tcp; None if there is no such established connection."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (
            int(local.split(":")[1], 16) == port
            and int(remote.split(":")[1], 16) == client_port
            and state == "01"
        ):
            return int(fields[4].split(":")[0], 16)
    return None


def websocket_that_reads_little(service: Service, target: str) -> socket.socket:
    """A socket from the attacker's address with a 4 KiB receive buffer that has sent a
    WebSocket handshake for `target` (a path and query) and read nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((ATTACKER, 0))
    sock.connect(("127.0.0.1", service.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def test_a_websocket_client_that_stops_reading_is_cut_off(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    await big_catalog(database_url, 1_500)  # a snapshot of about 400 KB
    async with service_with_product(database_url, redis_url, tmp_path) as (service, product_id):
        sock = websocket_that_reads_little(service, "/ws")
        client_port = sock.getsockname()[1]
        try:
            # It never reads. Changes keep coming; the hub gives up after 5 s without room.
            queued: list[int] = []

            async def cut_off() -> bool:
                async with service.client() as client:
                    await client.post(
                        "/api/reservations", json={"productId": product_id, "quantity": 1}
                    )
                size = server_side_send_queue(service.port, client_port)
                if size is not None:
                    queued.append(size)
                return size is None

            started = time.monotonic()
            await eventually(cut_off, within=15, what="the stuck socket to be gone")
            assert time.monotonic() - started < 5 + 4
            assert queued, "the socket was never seen established"
            assert max(queued) <= 256 * 1024, f"{max(queued)} bytes queued in the kernel"
        finally:
            sock.close()


@pytest.mark.parametrize("opcode", [0x89, 0x8A], ids=["pings", "pongs"])
async def test_a_websocket_client_flooding_pings_is_dropped_and_kept_no_pongs(
    database_url: str, redis_url: str, tmp_path: Path, opcode: int
) -> None:
    # Every ping's pong was written to the transport, which kept in memory what the
    # kernel could not take: 100 MiB of pings from a client that reads nothing, 98 MiB kept;
    # and each ping cost the event loop ~30 us: a shopper's request waited 14 s.
    async with service_with_product(database_url, redis_url, tmp_path) as (service, product_id):
        async with Shopper(service, product_id) as shopper:
            before = rss(service)
            sock = websocket_that_reads_little(service, f"/ws?ids={product_id}")
            ping = bytes([opcode, 0x80 | 125]) + b"\0\0\0\0" + os.urandom(125)  # masked
            chunk = ping * (MiB // len(ping))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                with contextlib.suppress(ConnectionError):
                    for _ in range(64):
                        await asyncio.wait_for(loop.sock_sendall(sock, chunk), 30)
                    pytest.fail("64 MiB of pings were all taken")
                await shopper.served()
                grown = rss(service) - before
                assert grown < 24 * MiB, f"the web process grew {grown / MiB:.0f} MiB"
            finally:
                sock.close()
        shopper.check()


# -- 8. a frozen Redis and the rate limit --------------------------------------------------


async def test_a_frozen_redis_does_not_hold_up_reservations(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    async with service_with_product(
        database_url, own_redis.url, tmp_path, RESERVE_RATE_LIMIT="1000/60"
    ) as (service, product_id):
        own_redis.freeze()
        try:
            async with Shopper(service, product_id) as shopper:
                await shopper.served(40)
        finally:
            own_redis.thaw()
        shopper.check()
        log = service.web.log.read_text()
        assert log.count("rate limit counted only per process") == 1, log[-2000:]


# -- 10, 11. what reaches the log ----------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_client_values_are_escaped_and_reservation_ids_cut_in_the_log(
    database_url: str, redis_url: str, tmp_path: Path, log_format: str
) -> None:
    async with service_with_product(
        database_url, redis_url, tmp_path, LOG_LEVEL="INFO", LOG_FORMAT=log_format
    ) as (service, product_id):
        async with service.client() as client:
            forged = "/x%0a2026-01-01 00:00:00,000 INFO flashsale.access: GET /forged 200%1b[31m"
            await client.get(forged)
            hold = await client.post(
                "/api/reservations", json={"productId": product_id, "quantity": 1}
            )
            reservation_id = hold.json()["id"]
            # Paths no route matches: a trailing slash (a redirect) and a typo.
            for wrong in ("/", "/cancel/", "/cancle"):
                await client.post(f"/api/reservations/{reservation_id}{wrong}")
            await client.post(f"/api/reservations/{reservation_id}/cancel")
            await client.get(f"/api/reservations/{reservation_id}")
        # WebSocket handshakes are logged by uvicorn, path and query as sent: a
        # hold id in a path no socket route has (refused 403), and in a query, with a query
        # of 4,000 characters.
        ws = service.base_url.replace("http://", "ws://")
        with contextlib.suppress(InvalidStatus):
            async with connect(f"{ws}/api/reservations/{reservation_id}", open_timeout=10):
                pass
        padding = "q" * 4000
        async with connect(f"{ws}/ws?ids={product_id}&hold={reservation_id}&{padding}") as page:
            await asyncio.wait_for(page.recv(), 10)

        async def logged() -> bool:
            text = service.web.log.read_text()
            return "/cancel" in text and text.count("WebSocket") >= 2

        await eventually(logged, within=10, what="the cancel's access line")
        raw = service.web.log.read_bytes()
        assert b"\x1b" not in raw
        text = raw.decode()
        assert reservation_id not in text
        assert f"/api/reservations/{reservation_id[:14]}.../cancel" in text  # time + 6
        assert f"/api/reservations/{reservation_id[:14]}.../cancel/" in text
        assert f"/api/reservations/{reservation_id[:14]}..." in text  # the handshake's line
        assert "q" * (MAX_VALUE_CHARS + 1) not in text
        if log_format == "json":
            for line in text.splitlines():
                json.loads(line)
        assert not any(line.startswith("2026-01-01") for line in text.splitlines())


# -- 12. operator sign-ins -----------------------------------------------------------------


async def test_wrong_operator_tokens_are_throttled_per_address(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(database_url, redis_url, tmp_path) as (service, _):
        transport = httpx.AsyncHTTPTransport(local_address=ATTACKER)
        async with httpx.AsyncClient(base_url=service.base_url, transport=transport) as guesser:
            statuses = []
            for n in range(30):
                response = await guesser.get(
                    "/api/admin/stats", headers={"Authorization": f"Bearer guess-{n}"}
                )
                statuses.append(response.status_code)
            assert statuses[:10] == [401] * 10
            assert set(statuses[10:]) == {429}
            assert int(response.headers["retry-after"]) >= 1
        # The operator, from another address, is not locked out.
        async with service.client() as operator:
            response = await operator.get("/api/admin/stats", headers=service.admin_headers())
            assert response.status_code == 200


# -- 13. protocol errors -------------------------------------------------------------------


async def test_protocol_errors_answer_the_json_error_shape(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with service_with_product(database_url, redis_url, tmp_path) as (service, _):
        for request in (
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"NOT-HTTP\r\n\r\n",
            b"POST /api/reservations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        ):
            reader, writer = await attacker_connection(service)
            writer.write(request)
            status, body = await read_answer(reader)
            close(writer)
            assert status == 400, request
            assert_json_error(body, 400, "malformed")


# -- 14. pipelined requests ----------------------------------------------------------------


async def read_answers(reader: asyncio.StreamReader, within: float = 15) -> list[tuple[int, bytes]]:
    """Every answer the server writes on a connection until it closes: (status, body)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    answers = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answers.append((int(head[9:12]), rest[:length]))
        data = rest[length:]
    assert not data, data[:200]
    return answers


async def test_a_refusal_behind_pipelined_requests_comes_after_their_answers(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    # The refusal was written at once, ahead of the answer to the request before
    # it, and half-closed the connection under it: that answer was lost, and raised two
    # ERROR tracebacks (98 log lines) for a request of 49 bytes.
    async with service_with_product(database_url, redis_url, tmp_path) as (service, _):
        for bad, status, code in (
            (b"NOT-HTTP\r\n\r\n", 400, "malformed"),
            (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"x" * 20_000 + b"\r\n\r\n",
                431,
                "header_too_large",
            ),
        ):
            reader, writer = await attacker_connection(service)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + bad)
            answers = await read_answers(reader)
            close(writer)
            assert [s for s, _ in answers] == [200, 200, status], answers
            assert json.loads(answers[0][1]) == {"status": "ok"}
            assert_json_error(answers[2][1], status, code)
        log = service.web.log.read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "ERROR" not in log, log[-3000:]


async def test_requests_pipelined_ahead_of_their_answers_are_bounded(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Uvicorn parses every request of a read and queues each (about 1 KB): one read
    # of 256 KiB of small requests queued 7,700, and each answer let it read 256 KiB more.
    async with service_with_product(database_url, redis_url, tmp_path) as (service, _):
        async with Shopper(service, (await service.new_product(1_000_000))["id"]) as shopper:
            before = rss(service)
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            connections = []
            for _ in range(20):
                reader, writer = await attacker_connection(service)
                writer.write(request * (256 * 1024 // len(request)))
                connections.append((reader, writer))
            for reader, writer in connections:
                answers = await read_answers(reader)
                close(writer)
                statuses = [s for s, _ in answers]
                assert statuses[-1] == 429, statuses
                assert_json_error(answers[-1][1], 429, "too_many_pipelined")
                assert len(statuses) <= 1 + protocol.MAX_PIPELINED + 1, len(statuses)
            grown = rss(service) - before
            assert grown < 40 * MiB, f"the web process grew {grown / MiB:.0f} MiB"
            await shopper.served()
        shopper.check()


async def test_a_pipelined_head_split_across_reads_is_measured_from_its_own_start(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Ten pipelined requests of 2 KB each (20 KB in all, more than HTTP_MAX_HEADER_BYTES'
    # 16 KiB) and the start of an eleventh's head in one read, the rest of that head in the
    # next: the eleventh's head is 2 KB, and was refused 431 as if it were the whole read.
    async with service_with_product(database_url, redis_url, tmp_path) as (service, _):
        pad = b"X-Pad: " + b"p" * 2_000 + b"\r\n"
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"
        last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + pad + b"\r\n"
        split = len(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: pp")
        assert len(request * 10 + last[:split]) > 16 * 1024
        reader, writer = await attacker_connection(service)
        writer.write(request * 10 + last[:split])
        await writer.drain()
        # The first answer says the server read the first write (one read, on loopback).
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 "), first
        length = next(
            int(line.split(b":", 1)[1])
            for line in first.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(last[split:])
        await writer.drain()
        answers = await read_answers(reader)
        close(writer)
        statuses = [200] + [s for s, _ in answers]
        assert statuses == [200] * 11, [(s, b[:200]) for s, b in answers]
