"""The garbage collector is off in a sale's first seconds (server/infra/gcpauses.py:
`SaleQuiet`), never for longer than QUIET_MAX_S at a time, and never kept off by sales
that follow one another."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from server.infra import gcpauses
from server.infra.gcpauses import QUIET_AFTER_S, QUIET_BEFORE_S, QUIET_MAX_S, SaleQuiet


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    """Each test starts with the collector on, and leaves it so whatever happens."""
    gc.enable()
    yield
    gc.enable()


def test_off_around_a_start_and_on_again_after_it() -> None:
    start = 100_000
    quiet = SaleQuiet(lambda: [None, start])
    assert not quiet.check(start - int(QUIET_BEFORE_S * 1000) - 1, clock=0.0)
    assert gc.isenabled()
    assert quiet.check(start - int(QUIET_BEFORE_S * 1000), clock=1.0)
    assert not gc.isenabled()
    assert quiet.check(start + int(QUIET_AFTER_S * 1000), clock=1.0 + QUIET_AFTER_S)
    assert not gc.isenabled()
    assert not quiet.check(start + int(QUIET_AFTER_S * 1000) + 1, clock=2.0 + QUIET_AFTER_S)
    assert gc.isenabled()
    assert quiet.spells == 1


def test_sales_one_after_another_cannot_keep_it_off() -> None:
    """Starts every few seconds: a spell ends after QUIET_MAX_S, and the next waits as long."""
    quiet = SaleQuiet(lambda: range(0, 10**7, 3_000))
    assert quiet.check(50_000, clock=0.0)
    assert quiet.check(50_000, clock=QUIET_MAX_S - 0.1)
    assert not quiet.check(50_000, clock=QUIET_MAX_S)
    assert gc.isenabled()
    assert not quiet.check(50_000, clock=2 * QUIET_MAX_S - 0.1)
    assert gc.isenabled()
    assert quiet.check(50_000, clock=2 * QUIET_MAX_S)
    assert quiet.spells == 2


def test_a_collector_that_was_off_already_is_left_alone() -> None:
    gc.disable()
    quiet = SaleQuiet(lambda: [0])
    assert not quiet.check(0, clock=0.0)
    assert not gc.isenabled()
    assert quiet.spells == 0


async def test_the_task_turns_it_on_again_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpauses, "QUIET_CHECK_S", 0.01)
    quiet = SaleQuiet(lambda: [5_000], wall_ms=lambda: 5_000)
    task = asyncio.create_task(quiet.run())
    for _ in range(500):
        await asyncio.sleep(0.01)
        if quiet.quiet:
            break
    assert quiet.quiet
    assert not gc.isenabled()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert gc.isenabled()


async def test_a_check_that_raises_is_logged_and_the_next_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gcpauses, "QUIET_CHECK_S", 0.01)
    calls = 0

    def starts() -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the catalog was being rebuilt")
        return [5_000]

    quiet = SaleQuiet(starts, wall_ms=lambda: 5_000)
    task = asyncio.create_task(quiet.run())
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if quiet.quiet:
                break
        assert quiet.quiet, "no check ran after the one that raised"
        assert "could not be checked" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
