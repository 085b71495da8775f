"""Token buckets: what a client may still do now, earned back at a steady rate.

One implementation for every per-client allowance the service keeps in a process's memory:
a WebSocket's messages (`server.live.hub.Client`), a client's messages over all its sockets
(`server.live.hub.Hub.allowances`), and wrong operator tokens and shop keys
(`server.api.ratelimit.FailureThrottle`). The reservation limit, shared across processes
through Redis, is a fixed window instead (`server.api.ratelimit.RateLimiter`).

A bucket holds at most `capacity` tokens and earns `rate` tokens a second back; an action
that costs a token is allowed while one is left (`take`). A bucket is kept as what it held
and when, and worked out when asked: nothing runs between requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """One bucket: `tokens` at monotonic time `at` (s), at most `capacity`, earning `rate`
    tokens a second back. Starts full (`TokenBucket.full`)."""

    capacity: float
    rate: float  # tokens earned back a second
    tokens: float
    at: float  # monotonic seconds

    @classmethod
    def full(cls, capacity: float, rate: float, now: float | None = None) -> TokenBucket:
        """A bucket of `capacity` tokens earning `rate` a second (`rate` > 0)."""
        if rate <= 0 or capacity < 0:
            raise ValueError(f"a bucket needs a positive rate, got {capacity=} {rate=}")
        return cls(capacity, rate, capacity, time.monotonic() if now is None else now)

    def left(self, now: float) -> float:
        """The tokens left at monotonic time `now` (s)."""
        return min(self.capacity, self.tokens + (now - self.at) * self.rate)

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if that many are left; False (nothing spent) if not."""
        left = self.left(now)
        if left < cost:
            return False
        self.tokens, self.at = left - cost, now
        return True

    def spend(self, now: float, cost: float = 1.0) -> float:
        """Spend `cost` tokens whether or not they are left (a failure already made);
        returns what is left, possibly below zero."""
        self.tokens, self.at = self.left(now) - cost, now
        return self.tokens

    def seconds_until(self, now: float, tokens: float) -> float:
        """Seconds until `tokens` are left (0: they are now); `tokens` <= capacity."""
        return max(0.0, (tokens - self.left(now)) / self.rate)


class TokenBuckets:
    """A `TokenBucket` per key (a client's address, a shopper), all of `capacity` tokens
    earning `rate` a second. A key never seen has a full bucket, and costs no memory until
    it spends. At most `max_keys` buckets are kept (None: no bound, the caller forgets
    keys itself): past that, the one spent from longest ago is forgotten (it starts full
    again), so a client that makes up keys cannot grow the map without end.

    `clock` gives monotonic seconds (tests give their own)."""

    def __init__(
        self,
        capacity: float,
        rate: float,
        *,
        max_keys: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        TokenBucket.full(capacity, rate, 0.0)  # checks the arguments
        self.capacity = capacity
        self.rate = rate
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}  # spent from longest ago first

    def left(self, key: str) -> float:
        """The tokens `key` has left now."""
        bucket = self._buckets.get(key)
        return self.capacity if bucket is None else bucket.left(self._clock())

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Spend `cost` of `key`'s tokens if that many are left; False (nothing spent) if
        not."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if self.capacity < cost:
                return False
            bucket = self._add(key, now)
        elif bucket.left(now) < cost:
            return False
        self._touch(key, bucket)
        return bucket.take(now, cost)

    def spend(self, key: str, cost: float = 1.0) -> float:
        """Spend `cost` of `key`'s tokens whether or not they are left; what is left."""
        now = self._clock()
        bucket = self._buckets.get(key) or self._add(key, now)
        self._touch(key, bucket)
        return bucket.spend(now, cost)

    def seconds_until(self, key: str, tokens: float = 1.0) -> float:
        """Seconds until `key` has `tokens` left (0: it has now)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.seconds_until(self._clock(), tokens)

    def seconds_to_full(self, key: str) -> float:
        """Seconds until `key`'s bucket is full again (0: it is, or there is none)."""
        return self.seconds_until(key, self.capacity)

    def forget(self, key: str) -> None:
        """Drop `key`'s bucket: it starts full again."""
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def _add(self, key: str, now: float) -> TokenBucket:
        bucket = TokenBucket(self.capacity, self.rate, self.capacity, now)
        self._buckets[key] = bucket
        if self._max_keys is not None and len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return bucket

    def _touch(self, key: str, bucket: TokenBucket) -> None:
        if self._max_keys is not None:  # keep the map in the order buckets were spent from
            del self._buckets[key]
            self._buckets[key] = bucket
