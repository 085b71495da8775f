"""Who the simulated shoppers are (issue 16): nobody (`none`, the old clients), an
anonymous shopper with the cookie the shop page sets (`cookie`), or a customer the shop signed
in (`jwt`, `Authorization: Bearer`). Each shopper a distinct one, as in a real sale.

The tokens are made as the service makes and checks them: the cookie with the service's own
signer and the bench's SESSION_SECRET (the process harness gives every web process the same
one), the JWT with PyJWT and the key `bench/stack.py` gives the service.
"""

from __future__ import annotations

import time

KINDS = ("none", "cookie", "jwt")


def headers(kind: str, count: int) -> list[dict[str, str]]:
    """The request headers of `count` distinct shoppers of `kind`.

    The service's modules are imported only for the kinds that need them: a shopper process
    of kind `none` that imported them spent ~1.3 s of CPU on it (5.5 s for a storm's four),
    on the cores the service was opening its sockets on."""
    if kind == "none":
        return [{} for _ in range(count)]
    if kind == "cookie":
        from server.api.identity import COOKIE, Identities
        from server.devtools.processes import SESSION_SECRET
        from server.infra.settings import Settings

        identities = Identities(Settings(session_secret=SESSION_SECRET))
        return [{"Cookie": f"{COOKIE}={identities.new_anonymous()[1]}"} for _ in range(count)]
    if kind == "jwt":
        import jwt

        from bench.stack import BENCH_JWT_SECRET

        exp = int(time.time()) + 3600
        return [
            {
                "Authorization": "Bearer "
                + jwt.encode(
                    {"sub": f"customer-{n}", "exp": exp}, BENCH_JWT_SECRET, algorithm="HS256"
                )
            }
            for n in range(count)
        ]
    raise ValueError(f"unknown kind of shopper {kind!r}; one of {', '.join(KINDS)}")
