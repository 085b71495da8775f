"""The stack under test: a fresh database, a Redis of its own, web and worker processes
started with the Procfile's commands, and the bare baseline app beside them."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import httpx

from server.devtools.embedded_redis import EmbeddedRedis, free_port
from server.devtools.processes import Process, Service, procfile
from server.storage import migrate
from server.storage.database import Store

BARE_APP = "bench.bare:app"
BOUNDED_PROTOCOL = "server.api.protocol:BoundedHttpToolsProtocol"


class Target(Protocol):
    """What a scenario drives: the service at `base_url` (`http://host:port`, a web process
    or a load balancer in front of several), and the operator's credentials."""

    @property
    def base_url(self) -> str: ...

    def admin_headers(self) -> dict[str, str]: ...


@contextmanager
def fresh_database(database_url: str | None, work_dir: Path) -> Iterator[str]:
    """A new, migrated database: a SQLite file under `work_dir`, or, for a PostgreSQL URL,
    a database created beside the one named (and dropped afterwards; nothing of yours is
    touched)."""
    if not database_url or database_url.startswith("sqlite"):
        url = f"sqlite:///{work_dir / 'bench.db'}"
        asyncio.run(_migrate(url))
        yield url
        return
    base, _, _ = database_url.rpartition("/")
    name = f"flashsale_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin(database_url, f'CREATE DATABASE "{name}"'))
    url = f"{base}/{name}"
    try:
        asyncio.run(_migrate(url))
        yield url
    finally:
        try:
            asyncio.run(_admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except (OSError, asyncpg.PostgresError) as exc:
            # The run's figures matter more than its scratch database: a drop refused by a
            # server out of connections once lost a whole run's results.json.
            print(f"bench: could not drop the database {name} ({exc}); drop it by hand")


async def _migrate(url: str) -> None:
    store = Store(url)
    await store.connect()
    try:
        await migrate.migrate(store)
    finally:
        await store.close()


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def redis(work_dir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(work_dir / "redis", persist=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


ONE_ADDRESS_FOR_ALL = {"WS_MAX_PER_CLIENT": "100000", "MAX_CONNECTIONS_PER_CLIENT": "100000"}
# The shop's key for its shoppers' JWTs (issue 16), so that shoppers can be signed in
# (`bench/identities.py` signs their tokens with it).
BENCH_JWT_SECRET = "bench-shop-signs-its-shoppers-with-this-secret"
# The webhooks scenario's receiver listens on 127.0.0.1 (bench/webhooks.py): the local
# network is refused by default (WEBHOOK_ALLOW_LOCAL_NETWORK).
LOCAL_RECEIVER = {"WEBHOOK_ALLOW_LOCAL_NETWORK": "true"}


@contextmanager
def service(
    database_url: str, redis_url: str, work_dir: Path, *, web_concurrency: int, **settings: str
) -> Iterator[Service]:
    # Every simulated shopper and page comes from 127.0.0.1, while the per-client caps are
    # meant for distinct addresses: lift them (a `--set` still wins) so that the benchmark
    # measures the shop, not one client's allowance.
    settings = {
        **ONE_ADDRESS_FOR_ALL,
        **LOCAL_RECEIVER,
        "SHOPPER_JWT_SECRET": BENCH_JWT_SECRET,
        **settings,
    }
    svc = Service(
        database_url, redis_url, work_dir / "logs", web_concurrency=web_concurrency, **settings
    )
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@dataclass
class Bare:
    base_url: str
    pid: int = 0  # the uvicorn command's process (its workers are its children)


@contextmanager
def bare(work_dir: Path, *, web_concurrency: int, http: str = "httptools") -> Iterator[Bare]:
    """The baseline: a bare Starlette JSON endpoint under the very same uvicorn command, but
    with uvicorn's own `--http httptools` (or the `http` protocol given)."""
    port = free_port()
    process = Process(
        "web",
        {
            "PATH": _path(),
            "WEB_METRICS_PORT": "0",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": str(web_concurrency),
        },
        work_dir / "bare.log",
    )
    process.command = bare_command()
    process.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base_url + "/", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or not process.running:
                raise RuntimeError("the bare app did not start") from None
            time.sleep(0.05)
    try:
        yield Bare(base_url, process.pid)
    finally:
        process.stop()


def bare_command() -> str:
    """The Procfile's `web` command serving the bare endpoint (bench/bare.py) instead of the
    service, with uvicorn's own httptools protocol: the service's share of it includes what
    our bounded protocol (server/api/protocol.py) costs. It reads HOST, PORT and
    WEB_CONCURRENCY as the service does."""
    command = procfile()["web"]
    assert "--factory server.api.app:create_app" in command
    return command.replace("--factory server.api.app:create_app", BARE_APP).replace(
        f"--http {BOUNDED_PROTOCOL}", "--http httptools"
    )


def _path() -> str:
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants
    (uvicorn's workers), read from /proc."""
    total = 0.0
    for p in _descendants(pid) | {pid}:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks
    return total


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def descendants_rss(pid: int) -> int:
    """Resident memory, in bytes, of a process and its live descendants."""
    total = 0
    for p in _descendants(pid) | {pid}:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            continue
    return total
