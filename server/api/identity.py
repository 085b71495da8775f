"""Who is asking: the shopper of a request (issue 16).

Two ways to be a shopper, checked in this order:

1. Signed in by the shop: `Authorization: Bearer <JWT>`, signed by the shop with
   SHOPPER_JWT_SECRET (HS256) or the private half of SHOPPER_JWT_PUBLIC_KEY (RS256 for an
   RSA key, ES256 for an EC key). The algorithm is pinned by the key, so a token that
   names another one (`none`, or HS256 signed with the public key) is refused; `exp` and a
   string `sub` of 1 to `MAX_SUB_LENGTH` characters are required. The shopper is
   `shop:<sub>`. Checked with PyJWT.
2. Anonymous: the `shopper` cookie, set on the first visit (`ShopperCookie`): a random id
   signed with SESSION_SECRET (itsdangerous, HMAC-SHA256), `HttpOnly`, `SameSite=Lax`,
   `Secure` when the request came over HTTPS. API clients that keep no cookies may send the
   same token as a `Shopper-Token` header. The shopper is `anon:<id>`.

A request with neither names no shopper: it may still reserve (the old clients do), but its
holds are nobody's (anyone who knows the id may act on them) and no limit per shopper
applies to it, unless REQUIRE_SHOPPER_TOKEN=true, which answers it, and anonymous shoppers,
401. A token that is there but wrong (expired, signed with another key, `alg: none`, no
`sub`, a cookie this shop did not sign) is a 401 with a sentence, never treated as no token:
falling back to anonymous would let a broken sign-in buy past the shop's limits.

A bearer token that is a shop API key (server/service/shopkeys.py) is the shop's backend,
not a shopper: it is left to `server.api.completion`, and anywhere else a shopper is asked
for it is 403 `shop_key_not_allowed` (a shop key completes holds, nothing more; it used to
be read as a shopper's token and answered a 401 about sign-in tokens). The operator's
ADMIN_TOKEN is not a shopper's either: it names no shopper.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from itsdangerous import BadSignature, Signer
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.http import RequestError
from server.api.spec import SHOP_KEY_NOT_ALLOWED
from server.domain import text
from server.infra.clients import SIGNED_IN
from server.infra.settings import Settings
from server.service.shopkeys import looks_like_a_shop_key

logger = logging.getLogger(__name__)

COOKIE = "shopper"
HEADER = "shopper-token"
# A year: the cookie names a shopper, nothing more; its holds last minutes.
COOKIE_MAX_AGE_S = 365 * 24 * 3600
MAX_SUB_LENGTH = 200
MAX_TOKEN_LENGTH = 8192
# Verified tokens and cookies a process remembers, each: only ones this shop signed, so a
# few MB for tokens of the usual size.
REMEMBERED = 10_000
T = TypeVar("T")
# Seconds of clock difference between the shop and us that `exp` tolerates.
LEEWAY_S = 30
ANONYMOUS = "anon:"
# The most `shopper` cookies of one request whose signatures are checked: a browser sends one
# for each path or domain that set it, a few at most. Each check is an HMAC: a Cookie header
# of 16 KiB holds 1,300 `shopper=x.y`, which took 30 to 150 ms of the event loop a request.
MAX_SHOPPER_COOKIES = 4
# What a shop API key may call: the one place `server.api.completion` reads it.
SHOP_KEY_ENDPOINTS = ("POST /api/reservations/{id}/complete",)
# Where ShopperCookie leaves what it found in the cookie for `Identities.shopper`.
_SCOPE_KEY = "flashsale.shopper_cookie"
_BAD = "bad"


@dataclass(frozen=True, slots=True)
class Shopper:
    """A shopper: `id` is `anon:<22 characters>` or `shop:<sub>`; `signed_in` for the
    latter."""

    id: str
    signed_in: bool


class Identities:
    """The shop's ways of knowing its shoppers, from `settings` (see the module's text)."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.session_secret
        if not secret:
            secret = secrets.token_urlsafe(32)
            logger.warning(
                "SESSION_SECRET is not set: anonymous shoppers' cookies are signed with a key "
                "of this process only, so they do not survive a restart and other web "
                "processes refuse them (bin/serve sets one)"
            )
        self._signer = Signer(
            secret, salt="flashsale.shopper", sep=".", digest_method=hashlib.sha256
        )
        self.require_token = settings.require_shopper_token
        # PyJWT's options once, not merged again on every call (half of a decode's ~50 µs).
        # `aud` and `iss` are checked when the shop names them (SHOPPER_JWT_AUDIENCE,
        # SHOPPER_JWT_ISSUER): then a token made with the same key for something else (a
        # password reset, another service) does not sign anyone in here.
        self._audience = settings.shopper_jwt_audience or None
        self._issuer = settings.shopper_jwt_issuer or None
        required = ["exp", "sub"]
        required += ["aud"] if self._audience else []
        required += ["iss"] if self._issuer else []
        self._jwt = jwt.PyJWT(options={"require": required, "verify_aud": bool(self._audience)})
        # Tokens verified lately, so that a shopper's next requests are not verified again
        # (bench/README.md: a JWT cost a reservation ~15%): a token's exact text, once its
        # signature matched, names its shopper until its `exp`. At most `REMEMBERED` each.
        self._tokens: dict[str, tuple[str, float]] = {}
        self._cookies: dict[str, str] = {}
        self._operator = settings.admin_token.encode()
        self._shop_keys = [k.encode() for k in settings.shop_api_keys]
        self._key: Any = None
        self._algorithms: list[str] = []
        if settings.shopper_jwt_secret:
            self._key = settings.shopper_jwt_secret
            self._algorithms = ["HS256"]
        elif settings.shopper_jwt_public_key:
            self._key = load_pem_public_key(settings.shopper_jwt_public_key.encode())
            if isinstance(self._key, rsa.RSAPublicKey):
                self._algorithms = ["RS256"]
            elif isinstance(self._key, ec.EllipticCurvePublicKey):
                self._algorithms = ["ES256"]
            else:
                raise ValueError("SHOPPER_JWT_PUBLIC_KEY must be an RSA or an EC (P-256) key")

    @property
    def accepts_tokens(self) -> bool:
        return bool(self._algorithms)

    def new_anonymous(self) -> tuple[str, str]:
        """A new anonymous shopper: their id (`anon:…`) and the signed token that names
        them (the cookie's value)."""
        raw = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        return ANONYMOUS + raw, self._signer.sign(raw).decode()

    def anonymous(self, token: str) -> str | None:
        """The shopper id an anonymous token names, or None if this shop did not sign it."""
        if len(token) > 200:
            return None
        known = self._cookies.get(token)
        if known is not None:
            return known
        try:
            raw = self._signer.unsign(token).decode()
        except (BadSignature, UnicodeDecodeError, ValueError):
            return None
        shopper = ANONYMOUS + raw
        _remember(self._cookies, token, shopper)
        return shopper

    def shopper(self, connection: HTTPConnection, *, shop_key: bool = False) -> Shopper | None:
        """The request's shopper, or None if it names none (and none is required).

        `shop_key`: the request's bearer token is a shop API key (the shop's backend), not
        a shopper's. Raises `RequestError` 401 for a token or cookie that is there but not
        valid, and for a request without a signed-in shopper when REQUIRE_SHOPPER_TOKEN;
        403 `shop_key_not_allowed` for a bearer token that is a shop API key (valid or not:
        no table is read), unless `shop_key`."""
        authorization, token, has_cookie = _shopper_headers(connection.scope)
        scheme, _, bearer = authorization.partition(" ")
        if scheme.lower() == "bearer" and not shop_key and not self._is_operator(bearer.strip()):
            if looks_like_a_shop_key(bearer.strip(), self._shop_keys):
                raise shop_key_not_allowed()
            return Shopper(self._signed_in(bearer.strip()), signed_in=True)
        if self.require_token:
            raise _unauthorized(
                "This shop sells only to signed-in customers: send the token the shop "
                "gave you as Authorization: Bearer <token>."
            )
        if token is not None:
            found = self.anonymous(token.strip())
            if found is None:
                raise _unauthorized(
                    "This Shopper-Token was not issued by this shop; use the value of the "
                    f"`{COOKIE}` cookie it sets, or send none."
                )
            return Shopper(found, signed_in=False)
        cookie = connection.scope.get(_SCOPE_KEY)
        if cookie is None:
            cookie = self.cookie_shopper(connection.scope) if has_cookie else ""
        if cookie == _BAD:
            raise _unauthorized(
                "Your shopper cookie was not signed by this shop (it may be from before a "
                "change of its keys); a new one has been set: please try again."
            )
        return None if not cookie else Shopper(cookie, signed_in=False)

    def shopper_id_or_none(self, connection: HTTPConnection) -> str | None:
        """The shopper's id, or None when the request names none or a bad one (for
        `WS /ws`, which has no 401 to answer: it shows such a socket only holds that have
        no shopper)."""
        try:
            shopper = self.shopper(connection)
        except RequestError:
            return None
        return None if shopper is None else shopper.id

    def signed_in_until(self, connection: HTTPConnection) -> float | None:
        """Until when (Unix seconds, `LEEWAY_S` included) the request's shop token names its
        shopper; None for a request without one. For `WS /ws`, which is told its shopper
        once, at the handshake, and may stay open for days: past this its shopper is
        nobody's. Only after `shopper_id_or_none` found the token
        valid: its signature is not checked again here."""
        scheme, _, bearer = connection.headers.get("authorization", "").partition(" ")
        token = bearer.strip()
        if scheme.lower() != "bearer" or not self._algorithms or self._is_operator(token):
            return None
        try:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            if isinstance(exp, bool) or not isinstance(exp, int | float):
                return None
            return float(exp) + LEEWAY_S
        except (jwt.InvalidTokenError, TypeError, ValueError, OverflowError):
            return None

    def _is_operator(self, token: str) -> bool:
        """The operator's token (ADMIN_TOKEN) is not a shopper's: an operator's tool that
        sends it on every call is a caller without a shopper here."""
        return bool(self._operator) and hmac.compare_digest(token.encode(), self._operator)

    def _signed_in(self, token: str) -> str:
        if not self._algorithms:
            raise _unauthorized(
                "This shop does not sign shoppers in with tokens (neither "
                "SHOPPER_JWT_SECRET nor SHOPPER_JWT_PUBLIC_KEY is set); send no "
                "Authorization header."
            )
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized(f"The token is longer than {MAX_TOKEN_LENGTH} characters.")
        known = self._tokens.get(token)
        if known is not None and known[1] + LEEWAY_S > time.time():
            return known[0]  # this very token was verified before, and has not expired
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=LEEWAY_S,
                audience=self._audience,
                issuer=self._issuer,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("Your sign-in token has expired; sign in again.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"The token has no `{exc.claim}` claim; it needs one.") from None
        except jwt.InvalidAlgorithmError:
            raise _unauthorized(
                f"The token is not signed with {self._algorithms[0]}, the only algorithm "
                "this shop accepts."
            ) from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("The token's signature does not match this shop's key.") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized(
                f"The token is not meant for this shop: its `aud` is not {self._audience!r}."
            ) from None
        except jwt.InvalidIssuerError:
            raise _unauthorized(
                f"The token was not issued by {self._issuer!r}, the issuer this shop trusts."
            ) from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"The token is not valid: {_reason(exc)}.") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_LENGTH:
            raise _unauthorized(
                f"The token's `sub` must be a string of 1 to {MAX_SUB_LENGTH} characters."
            )
        # The shopper's id is stored with their holds: the one rule for stored text (a JSON
        # `sub` may carry "\u0000" or a lone surrogate, which neither database can keep).
        if (found := text.problem(sub, MAX_SUB_LENGTH)) is not None:
            raise _unauthorized(f"The token's `sub` {found}.")
        # RFC 7519: a NumericDate is a JSON number (PyJWT also takes a string of digits).
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _unauthorized("The token's `exp` must be a number of seconds since 1970.")
        shopper = SIGNED_IN + sub
        # Remembered until `exp`, or for a day at most (an `exp` of 10**400 is valid JSON).
        _remember(self._tokens, token, (shopper, min(exp, time.time() + 86_400)))
        return shopper

    def cookie_shopper(self, scope: Scope) -> str:
        """The anonymous shopper the request's cookie names: their id, '' for no cookie,
        or `_BAD` for one this shop did not sign.

        Only our own cookie is read, from every `Cookie` header (HTTP/2 may split them),
        pair by pair, in time linear in the header: other cookies on the domain, however
        they are written (JSON values, spaces, quotes), neither hide ours nor cost more.
        (`http.cookies`, which Starlette's parser also uses, gives up on the whole header
        at one cookie it cannot read, which made a customer a new shopper on every page,
        and it is quadratic in backslashes before Python 3.11.10, CVE-2024-7592: a 15 KB
        header cost 0.68 s of the event loop.) With several `shopper` cookies (a path's
        and the root's), the first this shop signed names the shopper, among the first
        `MAX_SHOPPER_COOKIES`: past them the request's cookie is `_BAD`."""
        found = ""
        tried = 0
        for name, value in scope.get("headers", ()):
            if name != b"cookie" or COOKIE.encode() not in value:
                continue
            for pair in value.decode("latin-1").split(";"):
                key, sep, token = pair.partition("=")
                if not sep or key.strip() != COOKIE:
                    continue
                if tried == MAX_SHOPPER_COOKIES:
                    return _BAD
                tried += 1
                shopper = self.anonymous(token.strip())
                if shopper is not None:
                    return shopper
                found = _BAD
        return found


_HEADER = HEADER.encode()


def _shopper_headers(scope: Scope) -> tuple[str, str | None, bool]:
    """What names the request's shopper, in one pass over its raw headers (the server gives
    their names in lower case; values read as Latin-1, as Starlette's `Headers` reads them):
    the first `Authorization` ('' when none), the first `Shopper-Token` (None when none),
    and whether any `Cookie` header came. Three lookups through `Headers` walked them three
    times, on every shopper request (bench/README.md, "Reserving cheaper")."""
    authorization: str | None = None
    token: str | None = None
    cookie = False
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == _HEADER:
            if token is None:
                token = value.decode("latin-1")
        elif name == b"cookie":
            cookie = True
    return authorization or "", token, cookie


def _remember(cache: dict[str, T], key: str, value: T) -> None:
    """Keep `value` under `key`, forgetting the oldest entry beyond `REMEMBERED`."""
    cache[key] = value
    if len(cache) > REMEMBERED:
        del cache[next(iter(cache))]


def _reason(exc: Exception) -> str:
    text = str(exc).rstrip(".") or type(exc).__name__
    return text[:1].lower() + text[1:200]


def shop_key_not_allowed() -> RequestError:
    """403 `shop_key_not_allowed`: a shop API key sent where a shopper is asked for."""
    allowed = ", ".join(SHOP_KEY_ENDPOINTS)
    return RequestError(
        403,
        SHOP_KEY_NOT_ALLOWED,
        "This is a shop API key: the shop's backend uses it only to complete holds "
        f"({allowed}). This endpoint is the shopper's: send the shopper's token or cookie, "
        "or no Authorization header.",
    )


def _unauthorized(message: str) -> RequestError:
    return RequestError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def shopper_of(connection: HTTPConnection, *, shop_key: bool = False) -> Shopper | None:
    """The request's shopper (`Identities.shopper` of the app's)."""
    identities: Identities = connection.app.state.identities
    return identities.shopper(connection, shop_key=shop_key)


# Where a new visitor gets their cookie: the shop's page, and `GET /api/me`, which API
# clients call to be given a shopper (and its token, to send as Shopper-Token). Not every
# API answer: a client that made a request without a cookie, got one with the answer and
# retried with it would be another shopper, and its retry not a replay of its request.
COOKIE_PATHS = frozenset({"/", "/api/me", "/me"})
# Where ShopperCookie leaves a shopper it has just made: (id, token).
MINTED = "flashsale.minted_shopper"


class ShopperCookie:
    """Pure ASGI middleware: a request for the shop page or `GET /api/me` without a valid
    `shopper` cookie gets one (`Set-Cookie` on its answer), for its next requests. What
    the cookie said is left in the scope for `Identities.shopper`, and a shopper made
    here under `MINTED`."""

    def __init__(self, app: ASGIApp, *, identities: Identities) -> None:
        self.app = app
        self.identities = identities

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Every other request is handed on as it came: the app's own awaitable, with no
        # coroutine of this layer around it, which each of them would otherwise enter,
        # suspend and resume through (issue 12: the reservation's cost).
        if scope["type"] != "http" or scope["path"] not in COOKIE_PATHS:
            return self.app(scope, receive, send)
        return self._cookie_path(scope, receive, send)

    async def _cookie_path(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.identities.cookie_shopper(scope)
        scope[_SCOPE_KEY] = found
        if found and found != _BAD:
            await self.app(scope, receive, send)
            return
        shopper_id, token = self.identities.new_anonymous()
        scope[MINTED] = (shopper_id, token)
        cookie = f"{COOKIE}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
        if scope.get("scheme") == "https":
            cookie += "; Secure"
        header = (b"set-cookie", cookie.encode())

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_cookie)
