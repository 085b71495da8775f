"""`SingleFlight` (server/infra/singleflight.py): the one read at a time per key that the
waiting room's lines and counts and the overdue holds' looks share."""

from __future__ import annotations

import asyncio
import gc

import pytest

from server.infra.singleflight import SingleFlight


async def test_callers_of_one_key_share_one_run_and_other_keys_run_apart() -> None:
    started: list[int] = []
    release = asyncio.Event()
    both_started = asyncio.Event()

    async def read(key: int) -> str:
        started.append(key)
        if len(set(started)) == 2:
            both_started.set()
        await release.wait()
        return f"read {key} #{started.count(key)}"

    once: SingleFlight[int, str] = SingleFlight(read, name="test")
    callers = [asyncio.create_task(once(k)) for k in (1, 1, 2, 1)]
    async with asyncio.timeout(5):
        await both_started.wait()
    release.set()
    assert await asyncio.gather(*callers) == ["read 1 #1", "read 1 #1", "read 2 #1", "read 1 #1"]
    assert sorted(started) == [1, 2]
    # Once a run has ended, the next ask reads again.
    assert await once(1) == "read 1 #2"


async def went_away(caller: asyncio.Task[int]) -> None:
    """`caller`, a task asking a SingleFlight, once it has asked (its run under way), is
    cancelled: a request whose client hung up."""
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_caller_that_goes_away_does_not_cancel_the_run_of_the_others() -> None:
    release = asyncio.Event()

    async def read(key: int) -> int:
        await release.wait()
        return key * 10

    once: SingleFlight[int, int] = SingleFlight(read, name="test")
    leaving = asyncio.create_task(once(3))  # the run's first caller
    staying = asyncio.create_task(once(3))
    await went_away(leaving)
    release.set()
    async with asyncio.timeout(5):
        assert await staying == 30


async def test_a_failed_run_fails_its_callers_and_is_forgotten() -> None:
    calls = 0

    async def read(key: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the database went away")
        return key

    once: SingleFlight[int, int] = SingleFlight(read, name="test")
    with pytest.raises(RuntimeError):
        await once(7)
    assert await once(7) == 7


async def test_a_run_that_fails_after_all_its_callers_went_away_is_not_logged_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every caller gone (the requests cancelled: clients that hung up while the database was
    down), then the read fails: nobody took its exception, and asyncio logged "Task
    exception was never retrieved" at ERROR with a traceback when the task went away, an
    error report for what is no error of ours. The run's end takes it."""
    release = asyncio.Event()
    ended = asyncio.Event()

    async def read(key: int) -> int:
        try:
            await release.wait()
            raise RuntimeError("the database went away")
        finally:
            ended.set()

    once: SingleFlight[int, int] = SingleFlight(read, name="test")
    leaving = asyncio.create_task(once(5))
    await went_away(leaving)
    release.set()
    async with asyncio.timeout(5):
        await ended.wait()
    await asyncio.sleep(0)  # the run's done callbacks
    del leaving
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
