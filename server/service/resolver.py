"""Name lookups for webhook deliveries, each bounded in time and all of them in number.

The system's resolver (`socket.getaddrinfo`) blocks a thread, and a lookup cannot be called
off: a receiver's name whose DNS servers never answer held a thread of the worker's event
loop executor for the resolver's own timeouts (tens of seconds, retries included), past
`WEBHOOK_TIMEOUT_SECONDS`, while the attempt's coroutine had long given up; enough of them
and the executor had no thread left for anything else. Here lookups run on threads of
their own, at most `MAX_LOOKUPS` at once: a slot is given back when the thread is done,
not when the attempt gives up, so a hung resolver holds at most that many threads, and an
attempt that finds no slot free waits for one within its own timeout (the whole attempt,
lookup included, is bounded by the caller's `asyncio.timeout`).

`ResolvingTransport` is httpx's transport with its connections made through this: a name is
looked up here, then each of its addresses is tried in turn (IPv6 first, as the system
orders them); TLS is still checked against the name, not the address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
from collections.abc import Iterable

import httpcore
import httpx

# Lookups in flight at once, per worker. A healthy resolver answers in milliseconds, so a
# few threads serve WEBHOOK_CONCURRENCY's deliveries; a hung one holds at most these.
MAX_LOOKUPS = 4


def _lookup(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
    v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
    return list(dict.fromkeys(v6 + v4))


class Resolver:
    """Looks names up on `most` threads of its own, at most `most` lookups at once."""

    def __init__(self, most: int = MAX_LOOKUPS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=most, thread_name_prefix="webhook-dns"
        )
        self._free = asyncio.Semaphore(most)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of `host` (an IP address is its own), IPv6 first. Waits for a free
        slot as long as the caller lets it; raises `OSError` (`socket.gaierror`) when the
        name has none."""
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(host))]
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        try:
            lookup = self._pool.submit(_lookup, host, port)
        except BaseException:
            self._free.release()
            raise

        def done(_: concurrent.futures.Future[list[str]]) -> None:
            # The slot is free when the thread is, however long after the caller gave up.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._free.release)

        lookup.add_done_callback(done)
        return await asyncio.wrap_future(lookup)

    def close(self) -> None:
        """Stop taking lookups; a thread still in the system's resolver ends on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _ResolvingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._resolver.addresses(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = httpcore.ConnectError(f"{address}: {exc}")
        raise failure or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class ResolvingTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (pool, TLS, HTTP/1.1), its names looked up by `resolver`."""

    def __init__(self, resolver: Resolver, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        # httpx (pinned below 0.29 in pyproject.toml) takes no network backend of its own;
        # its pool (httpcore's) does. tests/test_webhooks.py checks that lookups go here.
        self._pool._network_backend = _ResolvingBackend(resolver)
