"""Configuration, read from the environment once (docs/design.md §7)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_DATABASE_URL = "sqlite:///./var/flashsale.db"
# The name Redis' own sentinel.conf example monitors its primary under.
DEFAULT_SENTINEL_SERVICE = "mymaster"
DEFAULT_SENTINEL_PORT = 26379


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    # Empty means "none configured": the launcher starts an embedded server and sets it.
    redis_url: str = ""
    # Redis Sentinel instead of one server: the Sentinels' (host, port) pairs, and the name
    # they monitor the primary under. Set, they replace redis_url (server/infra/redis_client.py).
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_service: str = DEFAULT_SENTINEL_SERVICE
    # With Sentinel, what REDIS_URL says otherwise: the database number, and the credentials
    # of the Redis servers (their `requirepass`, or an ACL user's) and of the Sentinels
    # themselves (their own `requirepass`, or an ACL user's), when they ask for them.
    redis_db: int = 0
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_sentinel_username: str = ""
    redis_sentinel_password: str = field(default="", repr=False)
    hold_seconds: float = 120.0
    max_quantity: int = 10
    sweep_seconds: int = 2
    cors_origins: tuple[str, ...] = ()
    admin_token: str = ""
    web_concurrency: int = 1
    ws_max_clients: int = 10_000
    log_level: str = "INFO"
    # How long a writer waits for SQLite's write lock before answering 503.
    db_busy_timeout_ms: int = 5_000
    # Expiry jobs are scheduled per time bucket of this many milliseconds
    # (see server/service/expiry.py).
    expiry_bucket_ms: int = 100
    log_format: str = "text"
    access_log: bool = True
    # Requests in flight in one web process beyond which the next get 503 at once. A
    # refusal costs ~60 µs of CPU, a hold ~100 µs: 10,000 is about a second of work, which
    # a storm of 5,000 clicks on one process stays well inside.
    max_in_flight: int = 10_000
    # Reservations one client may make: (count, per seconds); None is no limit.
    reserve_rate_limit: tuple[int, int] | None = None
    # How long a reservation waits for Redis to count it before going on uncounted: a
    # healthy Redis nearby answers in well under a millisecond.
    reserve_rate_limit_wait_ms: int = 50
    worker_metrics_port: int = 9108
    # The ISO 4217 code of the currency prices are in; the pages format prices with it.
    currency: str = "EUR"
    # Where the web processes' metrics are served: a port of their own, away from shoppers.
    web_metrics_port: int = 9107
    # What one client may hold or send (server/api/protocol.py, docs in README "Limits").
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    max_connections_per_client: int = 100
    ws_max_per_client: int = 20
    # Failed operator sign-ins one client may make: (count, per seconds).
    admin_sign_in_limit: tuple[int, int] = (10, 60)
    # The shop's books (issue 12). How often the worker reconciles the ledger (seconds).
    reconcile_seconds: float = 300.0
    # Webhooks: retried with exponential backoff and jitter (the first retry after about
    # webhook_backoff_seconds, doubling up to an hour) for webhook_retry_hours; an endpoint
    # failing that long is disabled. One attempt may take webhook_timeout_seconds.
    webhook_retry_hours: float = 24.0
    webhook_backoff_seconds: float = 5.0
    webhook_timeout_seconds: float = 10.0
    # Requests in flight at once from one worker, and how often it looks for new events.
    webhook_concurrency: int = 16
    webhook_poll_ms: int = 200
    # Whether webhooks may go to addresses off the public Internet (loopback, private,
    # link-local): off, so that a webhook URL cannot reach the services beside the worker.
    webhook_allow_local_network: bool = False
    # Keys the shop's backend completes holds with (`Authorization: Bearer <key>`), besides
    # those made in the console; and who may complete a hold: the shopper (and the shop),
    # or only the shop's backend.
    shop_api_keys: tuple[str, ...] = ()
    complete_by: str = "shopper"
    # Ended holds, ledger rows and delivered events older than this are removed by the
    # worker (in bounded batches, every retention_seconds).
    retention_days: float = 90.0
    retention_seconds: float = 60.0
    # Shoppers (issue 16). The key that signs anonymous shoppers' cookies (bin/serve makes
    # one up and keeps it in var/; empty: a random one per process, which cookies do not
    # survive and other processes do not share). The shop's key for shoppers' JWTs: an
    # HS256 secret, or an RS256/ES256 public key (PEM, or a path to a PEM file). Whether
    # only shoppers the shop signed in may reserve. The default maxPerShopper of new
    # products (None: no limit).
    session_secret: str = ""
    shopper_jwt_secret: str = ""
    shopper_jwt_public_key: str = ""
    require_shopper_token: bool = False
    # The `aud` and `iss` the shop's tokens must carry, when set; when unset, tokens with
    # an `aud` are taken too (identity providers put one in every token).
    shopper_jwt_audience: str = ""
    shopper_jwt_issuer: str = ""
    max_per_shopper: int | None = None
    # The waiting room (issue 17): how long before a sale's start its room opens, how long
    # an admitted shopper's pass lasts, how often the admitter looks at the rooms even when
    # nothing woke it (ms), and how long its lease lasts without renewal (ms): the longest
    # the rooms wait when the admitting process dies.
    queue_opens_seconds: float = 1800.0
    pass_seconds: float = 60.0
    queue_tick_ms: int = 200
    queue_lease_ms: int = 2000

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def has_redis(self) -> bool:
        """Whether a Redis is configured, as one server or through Sentinel."""
        return bool(self.redis_url or self.redis_sentinels)

    @classmethod
    def for_command(cls) -> Settings:
        """`from_env()` for a command's start (`python -m server`, `python -m server.web`,
        `python -m jobs`): a setting it cannot use ends the command with exit code 2 and one
        line naming the setting on stderr, not a traceback through the settings' code."""
        try:
            return cls.from_env()
        except SettingsError as exc:
            print(f"configuration error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from the environment (`env`, default `os.environ`). Raises
        `SettingsError` naming the first variable whose value cannot be used."""
        env = os.environ if env is None else env
        sentinels = _addresses(env, "REDIS_SENTINELS", DEFAULT_SENTINEL_PORT)
        if sentinels and env.get("REDIS_URL", "").strip():
            raise SettingsError(
                "REDIS_URL and REDIS_SENTINELS are both set: set one (with Sentinel, the "
                "primary's address comes from the Sentinels)"
            )
        if (
            env.get("SHOPPER_JWT_SECRET", "").strip()
            and env.get("SHOPPER_JWT_PUBLIC_KEY", "").strip()
        ):
            raise SettingsError(
                "SHOPPER_JWT_SECRET and SHOPPER_JWT_PUBLIC_KEY are both set: set the one the "
                "shop signs its shoppers' tokens with (HS256: the secret; RS256/ES256: the key)"
            )
        if _choice(env, "REQUIRE_SHOPPER_TOKEN", ("false", "true")) == "true" and not (
            env.get("SHOPPER_JWT_SECRET", "").strip()
            or env.get("SHOPPER_JWT_PUBLIC_KEY", "").strip()
        ):
            raise SettingsError(
                "REQUIRE_SHOPPER_TOKEN=true needs SHOPPER_JWT_SECRET or SHOPPER_JWT_PUBLIC_KEY: "
                "without them no shopper could ever be signed in"
            )
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            redis_url=env.get("REDIS_URL", ""),
            redis_sentinels=sentinels,
            redis_sentinel_service=env.get("REDIS_SENTINEL_SERVICE", "").strip()
            or DEFAULT_SENTINEL_SERVICE,
            redis_db=_sentinel_redis(env, sentinels),
            # Credentials are taken as given: a space may be part of a password.
            redis_username=env.get("REDIS_USERNAME", ""),
            redis_password=env.get("REDIS_PASSWORD", ""),
            redis_sentinel_username=env.get("REDIS_SENTINEL_USERNAME", ""),
            redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", ""),
            hold_seconds=_number(env, "HOLD_SECONDS", 120.0, minimum=0.05),
            max_quantity=int(_number(env, "MAX_QUANTITY", 10, minimum=1, integer=True)),
            sweep_seconds=int(_number(env, "SWEEP_SECONDS", 2, minimum=1, integer=True)),
            cors_origins=tuple(
                o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()
            ),
            admin_token=env.get("ADMIN_TOKEN", ""),
            web_concurrency=int(_number(env, "WEB_CONCURRENCY", 1, minimum=1, integer=True)),
            ws_max_clients=int(_number(env, "WS_MAX_CLIENTS", 10_000, minimum=1, integer=True)),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            db_busy_timeout_ms=int(
                _number(env, "DB_BUSY_TIMEOUT_MS", 5_000, minimum=1, integer=True)
            ),
            expiry_bucket_ms=int(_number(env, "EXPIRY_BUCKET_MS", 100, minimum=10, integer=True)),
            log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
            access_log=_choice(env, "ACCESS_LOG", ("on", "off")) == "on",
            max_in_flight=int(_number(env, "MAX_IN_FLIGHT", 10_000, minimum=1, integer=True)),
            reserve_rate_limit=_rate(env, "RESERVE_RATE_LIMIT"),
            reserve_rate_limit_wait_ms=int(
                _number(env, "RESERVE_RATE_LIMIT_WAIT_MS", 50, minimum=1, integer=True)
            ),
            worker_metrics_port=int(
                _number(env, "WORKER_METRICS_PORT", 9108, minimum=0, integer=True)
            ),
            currency=_currency(env, "CURRENCY"),
            web_metrics_port=int(_number(env, "WEB_METRICS_PORT", 9107, minimum=0, integer=True)),
            max_header_bytes=int(
                _number(env, "HTTP_MAX_HEADER_BYTES", 16 * 1024, minimum=1024, integer=True)
            ),
            max_headers=int(_number(env, "HTTP_MAX_HEADERS", 100, minimum=10, integer=True)),
            header_timeout_seconds=_number(env, "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            body_timeout_seconds=_number(env, "HTTP_BODY_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            max_connections_per_client=int(
                _number(env, "MAX_CONNECTIONS_PER_CLIENT", 100, minimum=1, integer=True)
            ),
            ws_max_per_client=int(_number(env, "WS_MAX_PER_CLIENT", 20, minimum=1, integer=True)),
            admin_sign_in_limit=_rate(env, "ADMIN_SIGN_IN_LIMIT") or (10, 60),
            reconcile_seconds=_number(env, "RECONCILE_SECONDS", 300.0, minimum=1),
            webhook_retry_hours=_number(env, "WEBHOOK_RETRY_HOURS", 24.0, minimum=0.001),
            webhook_backoff_seconds=_number(env, "WEBHOOK_BACKOFF_SECONDS", 5.0, minimum=0.01),
            webhook_timeout_seconds=_number(env, "WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            webhook_concurrency=int(
                _number(env, "WEBHOOK_CONCURRENCY", 16, minimum=1, integer=True)
            ),
            webhook_poll_ms=int(_number(env, "WEBHOOK_POLL_MS", 200, minimum=10, integer=True)),
            webhook_allow_local_network=_choice(
                env, "WEBHOOK_ALLOW_LOCAL_NETWORK", ("false", "true")
            )
            == "true",
            shop_api_keys=_keys(env, "SHOP_API_KEYS"),
            complete_by=_choice(env, "COMPLETE_BY", ("shopper", "shop")),
            # At least two days: a hold must outlive its Idempotency-Key's day.
            retention_days=_number(env, "RETENTION_DAYS", 90.0, minimum=2),
            retention_seconds=_number(env, "RETENTION_SECONDS", 60.0, minimum=1),
            session_secret=_secret(env, "SESSION_SECRET"),
            shopper_jwt_secret=_secret(env, "SHOPPER_JWT_SECRET"),
            shopper_jwt_public_key=_public_key(env, "SHOPPER_JWT_PUBLIC_KEY"),
            shopper_jwt_audience=env.get("SHOPPER_JWT_AUDIENCE", "").strip(),
            shopper_jwt_issuer=env.get("SHOPPER_JWT_ISSUER", "").strip(),
            require_shopper_token=_choice(env, "REQUIRE_SHOPPER_TOKEN", ("false", "true"))
            == "true",
            max_per_shopper=(
                int(_number(env, "MAX_PER_SHOPPER", 0, minimum=1, integer=True)) or None
            ),
            queue_opens_seconds=_number(env, "QUEUE_OPENS_SECONDS", 1800.0, minimum=0),
            pass_seconds=_number(env, "PASS_SECONDS", 60.0, minimum=1),
            queue_tick_ms=int(_number(env, "QUEUE_TICK_MS", 200, minimum=10, integer=True)),
            queue_lease_ms=int(_number(env, "QUEUE_LEASE_MS", 2000, minimum=100, integer=True)),
        )


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, integer: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or allowed[0]
    if raw not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _rate(env: Mapping[str, str], name: str) -> tuple[int, int] | None:
    """`COUNT/SECONDS`, e.g. `10/60`; empty for none."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    count, _, seconds = raw.partition("/")
    try:
        limit = (int(count), int(seconds or "60"))
    except ValueError:
        raise SettingsError(
            f"{name} must look like 10/60 (so many per so many seconds), got {raw!r}"
        ) from None
    if limit[0] < 1 or limit[1] < 1:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return limit


def _addresses(env: Mapping[str, str], name: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port,…` (the port may be left out; IPv6 hosts in brackets)."""
    found = []
    for item in env.get(name, "").split(","):
        item = item.strip()
        if not item:
            continue
        host, port = item, str(default_port)
        if item.startswith("["):  # [::1]:26379
            host, _, rest = item[1:].partition("]")
            if rest:
                port = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        try:
            number = int(port)
        except ValueError:
            number = 0
        if not host or not 0 < number < 65536:
            raise SettingsError(f"{name} must look like host:port,host:port, got {item!r}")
        found.append((host, number))
    return tuple(found)


SENTINEL_ONLY = (
    "REDIS_DB",
    "REDIS_USERNAME",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_USERNAME",
    "REDIS_SENTINEL_PASSWORD",
)


def _sentinel_redis(env: Mapping[str, str], sentinels: tuple[tuple[str, int], ...]) -> int:
    """REDIS_DB, after checking that the settings for Redis behind Sentinel come with
    REDIS_SENTINELS. One server's database and credentials go in its URL
    (`redis://user:password@host:6379/2`), so these are refused beside REDIS_URL rather
    than left for the reader to guess which one wins."""
    given = [name for name in SENTINEL_ONLY if env.get(name, "")]
    if given and not sentinels:
        raise SettingsError(
            f"{', '.join(given)} apply with REDIS_SENTINELS only; one Redis takes its "
            "database and credentials in REDIS_URL: redis://user:password@host:6379/2"
        )
    return int(_number(env, "REDIS_DB", 0, minimum=0, integer=True))


def _keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma list of API keys, each at least 16 printable characters without spaces."""
    keys = tuple(k.strip() for k in env.get(name, "").split(",") if k.strip())
    for key in keys:
        if len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key:
            raise SettingsError(
                f"{name} must be a comma list of keys of at least 16 printable characters "
                "without spaces"
            )
    return keys


def _secret(env: Mapping[str, str], name: str) -> str:
    """A signing secret: empty, or at least 32 characters (256 bits, if random, as HS256
    and HMAC-SHA256 want)."""
    raw = env.get(name, "").strip()
    if raw and len(raw) < 32:
        raise SettingsError(f"{name} must be at least 32 characters long (a random string)")
    return raw


def _public_key(env: Mapping[str, str], name: str) -> str:
    """A PEM public key, given as the PEM itself or as the path of a file holding it."""
    raw = env.get(name, "").strip()
    if not raw or raw.startswith("-----BEGIN"):
        return raw.replace("\\n", "\n")  # one line in an env file: \n for newlines
    try:
        with open(raw, encoding="ascii") as file:
            text = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{name}: cannot read the key file {raw!r} ({exc})") from None
    if not text.startswith("-----BEGIN"):
        raise SettingsError(f"{name}: {raw!r} does not hold a PEM public key")
    return text


def _currency(env: Mapping[str, str], name: str) -> str:
    """An ISO 4217 currency code, three letters (`EUR`, `usd`); EUR when unset."""
    raw = env.get(name, "").strip().upper() or "EUR"
    if not re.fullmatch("[A-Z]{3}", raw):
        raise SettingsError(
            f"{name} must be an ISO 4217 currency code of three letters, such as EUR or USD; "
            f"got {raw!r}"
        )
    return raw
