"""Who a client is, for the limits that are per client: open connections, WebSocket sockets,
reservations per minute, failed operator sign-ins.

A client is named by a key. Today that is its network address (`addr:203.0.113.7`), as
uvicorn reports it: the connecting address, or the one a trusted proxy forwarded
(`FORWARDED_ALLOW_IPS`). An IPv6 client is keyed by its /64 network, since one subscriber
line is given a whole /64 and could otherwise take a new address for every request (the
convention of CDNs' per-client limits). A shopper the shop signed in (`shop:<sub>`, a token
only the shop's backend can issue) is a client of their own wherever they connect from
(`client_key` given their id): many shoppers share an address (an office, a mobile
carrier's NAT), and one of them must not spend the others' share. An anonymous shopper
(`anon:<id>`) is keyed by address: their cookie costs nothing to replace, so keying by it
would let one address be any number of clients.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

UNKNOWN = "addr:unknown"
# The prefix of a shopper signed in by the shop's token (server/api/identity.py).
SIGNED_IN = "shop:"


@functools.lru_cache(maxsize=4096)
def address_key(host: str | None) -> str:
    """`addr:<IPv4>` or `addr:<IPv6 /64 network>`; a host that is not an IP address (a Unix
    socket's path) is kept as it is, cut to 64 characters."""
    if not host:
        return UNKNOWN
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "addr:" + host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"addr:{ip}"


def client_key(scope: Mapping[str, Any], shopper: str | None = None) -> str:
    """The key of the client that made an ASGI request (HTTP or WebSocket): `shopper`, the
    request's shopper id, when the shop signed them in (`shop:<sub>`), else its address
    (`address_key`)."""
    if shopper is not None and shopper.startswith(SIGNED_IN):
        return shopper
    client = scope.get("client")
    return address_key(client[0] if client else None)


class Proxies:
    """The proxies named by `FORWARDED_ALLOW_IPS` (addresses, networks, or `*`), in the
    syntax uvicorn reads it in. Their connections carry many clients, so limits on what
    one *connecting address* may hold do not apply to them: the proxy bounds its clients,
    and the per-client limits of the application use the forwarded address."""

    def __init__(self, spec: str | Iterable[str]) -> None:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        names = [item.strip() for item in items if item.strip()]
        self.everyone = "*" in names
        self._addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._literals: set[str] = set()
        for name in names:
            try:
                if "/" in name:
                    self._networks.append(ipaddress.ip_network(name, strict=False))
                else:
                    self._addresses.add(ipaddress.ip_address(name))
            except ValueError:
                self._literals.add(name)
        self._cache: dict[str, bool] = {}

    def __contains__(self, host: str | None) -> bool:
        if self.everyone:
            return True
        if not host:
            return False
        known = self._cache.get(host)
        if known is None:
            known = self._compute(host)
            if len(self._cache) < 4096:
                self._cache[host] = known
        return known

    def _compute(self, host: str) -> bool:
        if host in self._literals:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return ip in self._addresses or any(ip in network for network in self._networks)
