"""The one clock of the service.

Every process (web and worker) reads "now" from its own wall clock, in integer milliseconds
since the Unix epoch, and the database stores times in the same unit. Integers compare the
same way in SQLite and PostgreSQL, so the SQL stays identical on both. Machines that share a
database are expected to keep their clocks in sync (NTP); a hold's fate is still decided
exactly once, because every transition is gated on the row's status.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ms(moment: datetime) -> int:
    """Milliseconds since the epoch for an aware `moment`, cut to the millisecond (never
    rounded up). Exact: through float seconds, 9999-12-31T23:59:59.999999Z became year
    10000, which no ISO-8601 time can show."""
    return (moment - EPOCH) // _MS


def iso(ms: int) -> str:
    """`2026-11-24T22:30:00.123Z`: ISO-8601, UTC, milliseconds."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    # A response names a handful of seconds (now, created, expires): format each once.
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


def parse_iso(text: str) -> int:
    """Milliseconds since the epoch for an ISO-8601 time that states its offset."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("the time must state its offset, for example 2026-12-01T09:00:00Z")
    return ms(parsed)
