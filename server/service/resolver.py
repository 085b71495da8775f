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
orders them); TLS is still checked against the name, not the address. Unless the operator
allows it (`WEBHOOK_ALLOW_LOCAL_NETWORK=true`), an address that is not on the public Internet
(loopback, private, link-local such as a cloud's metadata service at 169.254.169.254,
carrier-grade NAT, multicast, reserved) is never connected to: a webhook URL must not turn the
worker into a way to reach the services beside it (server-side request forgery). The check is
made on the addresses actually connected to, after the lookup, so a name that resolves to a
local address, or comes to (DNS rebinding), is refused as well as a literal one.
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


def local_network(address: str) -> str | None:
    """What kind of non-public address `address` (an IP address, IPv4 or IPv6) is, as a
    phrase for an error ("a loopback address"), or None when it is a public Internet address
    a webhook may go to. An IPv4 address written as IPv6 (::ffff:127.0.0.1) is judged as
    itself. Raises ValueError when `address` is not an IP address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (
        ("an unspecified", ip.is_unspecified),
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
        ("a non-public", not ip.is_global),
    ):
        if test:
            return f"{kind} address"
    return None


def local_host(host: str) -> str | None:
    """Why the host part of a webhook URL is on the local network without looking it up:
    an IP address that `local_network` names, or `localhost` (and names under it, RFC 6761);
    None for any other name (its addresses are judged when the worker connects).

    An IPv4 address is also read as the system's resolver reads it (`inet_aton`): in
    decimal, octal or hex, with fewer than four parts (2130706433, 0x7f.1, 127.1 and 0 are
    127.0.0.1 and 0.0.0.0 to the worker's lookup), which `ipaddress` does not take."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "a loopback name"
    try:
        return local_network(name)
    except ValueError:
        pass
    try:
        return local_network(socket.inet_ntoa(socket.inet_aton(name)))
    except (OSError, ValueError):
        return None


class LocalNetworkRefused(httpcore.ConnectError):
    """A webhook's receiver resolved to an address off the public Internet while
    `WEBHOOK_ALLOW_LOCAL_NETWORK` is off: the attempt fails as a connection would."""


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
    def __init__(self, resolver: Resolver, *, allow_local_network: bool) -> None:
        self._resolver = resolver
        self._allow_local_network = allow_local_network
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
            kind = None if self._allow_local_network else local_network(address)
            if kind is not None:
                failure = LocalNetworkRefused(
                    f"{address} is {kind}: webhooks go to the local network only with "
                    "WEBHOOK_ALLOW_LOCAL_NETWORK=true"
                )
                continue
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
    """httpx's own transport (pool, TLS, HTTP/1.1), its names looked up by `resolver`, and
    addresses off the public Internet refused unless `allow_local_network`."""

    def __init__(
        self, resolver: Resolver, *, limits: httpx.Limits, allow_local_network: bool = False
    ) -> None:
        super().__init__(limits=limits)
        # httpx (pinned below 0.29 in pyproject.toml) takes no network backend of its own;
        # its pool (httpcore's) does. tests/test_webhooks.py checks that lookups go here.
        self._pool._network_backend = _ResolvingBackend(
            resolver, allow_local_network=allow_local_network
        )
