"""The token buckets every in-memory allowance uses (server/infra/buckets.py): full at first,
spent a token at a time, earned back at their rate and never past their capacity, and at
most `max_keys` of them kept."""

from __future__ import annotations

import pytest

from server.infra.buckets import TokenBucket, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_is_spent_and_earns_back_up_to_its_capacity() -> None:
    bucket = TokenBucket.full(3, 2.0, now=0.0)  # 3 tokens, 2 a second back
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until(0.0, 1) == pytest.approx(0.5)
    assert not bucket.take(0.49)
    assert bucket.take(0.5)
    assert bucket.left(100.0) == 3  # never past its capacity
    assert bucket.take(100.0, cost=3)
    assert not bucket.take(100.0, cost=0.5)


def test_spending_what_is_not_left_goes_below_zero_and_is_earned_back() -> None:
    bucket = TokenBucket.full(1, 1.0, now=0.0)
    assert bucket.spend(0.0) == 0
    assert bucket.spend(0.0) == -1  # a failure made is counted, left or not
    assert bucket.seconds_until(0.0, 1) == pytest.approx(2.0)


@pytest.mark.parametrize(("capacity", "rate"), [(3, 0), (3, -1), (-1, 1)])
def test_a_bucket_that_would_never_refill_is_refused(capacity: float, rate: float) -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket.full(capacity, rate)
    with pytest.raises(ValueError, match="positive rate"):
        TokenBuckets(capacity, rate)


def test_buckets_by_key_are_apart_and_a_key_never_seen_is_full_and_costs_nothing() -> None:
    clock = Clock()
    buckets = TokenBuckets(2, 1.0, clock=clock)
    assert buckets.left("a") == 2
    assert len(buckets) == 0
    assert buckets.seconds_until("a") == 0
    assert buckets.seconds_to_full("a") == 0
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert buckets.take("b")  # another key's bucket is its own
    assert buckets.seconds_to_full("a") == pytest.approx(2.0)
    clock.now += 1.0
    assert buckets.take("a")
    assert not buckets.take("a")
    buckets.forget("a")
    assert buckets.left("a") == 2
    assert len(buckets) == 1


def test_at_most_max_keys_buckets_the_one_spent_from_longest_ago_forgotten() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, 0.001, max_keys=2, clock=clock)
    assert buckets.take("a")
    assert buckets.take("b")
    assert buckets.spend("a") == -1  # "a" spent from last: "b" is the oldest now
    assert buckets.take("c")
    assert len(buckets) == 2
    assert buckets.left("b") == 1  # forgotten: full again
    assert buckets.left("a") < 0
    assert buckets.left("c") < 1
    for key in range(1_000):  # made-up keys cannot grow the map
        buckets.take(str(key))
    assert len(buckets) == 2
