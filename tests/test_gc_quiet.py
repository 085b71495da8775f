"""The garbage collector is off in a sale's first seconds (server/infra/gcpauses.py:
`SaleQuiet`), never for longer than QUIET_MAX_S at a time, and never kept off by sales
that follow one another."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import Histogram

from server.api.app import tune_garbage_collector
from server.domain.model import Product
from server.infra import gcpauses
from server.infra.gcpauses import QUIET_AFTER_S, QUIET_BEFORE_S, QUIET_MAX_S, SaleQuiet
from server.service.catalog import Catalog


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


def _product(product_id: int, version: int, starts: int | None) -> Product:
    return Product(
        id=product_id,
        name=f"p{product_id}",
        price_cents=100,
        total_stock=10,
        available_stock=10,
        version=version,
        sale_starts_at=starts,
        created_at=0,
        updated_at=0,
    )


def test_the_catalog_gives_the_sales_starts_and_follows_a_start_that_moves() -> None:
    """What the quiet spells read 4 times a second: kept between calls, and made again when a
    product comes or its start moves (a stale set would keep the collector on through a
    sale, or off for one that was moved away)."""
    catalog = Catalog()
    catalog.apply(_product(1, 1, 5_000))
    catalog.apply(_product(2, 1, None))
    assert catalog.sale_starts() == {5_000}
    assert catalog.sale_starts() is catalog.sale_starts()
    catalog.apply_stock(1, 9, 2)  # a stock change keeps the start
    assert catalog.sale_starts() == {5_000}
    catalog.apply(_product(1, 3, 9_000))
    catalog.apply(_product(3, 1, 7_000))
    assert catalog.sale_starts() == {9_000, 7_000}
    catalog.apply(_product(3, 2, None))
    assert catalog.sale_starts() == {9_000}
    quiet = SaleQuiet(catalog.sale_starts, wall_ms=lambda: 9_000)
    try:
        assert quiet.check(9_000, clock=100.0)
    finally:
        quiet.check(10**9, clock=200.0)
    assert gc.isenabled()


class _Kept(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_start_up_collection_is_not_logged_and_later_slow_ones_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start's own full collection (before any request) was timed and logged as a slow
    collection at every start: a WARNING a newcomer saw each time, about nothing."""
    monkeypatch.setattr(gcpauses, "SLOW_SECONDS", 0.0)  # every timed collection is logged
    # A histogram of this test's own: the process's may write to a metrics directory an
    # earlier test removed, and the callback then raised before it logged.
    pauses = Histogram("gc_pause_test", "test", ["generation"], registry=None)
    monkeypatch.setattr(gcpauses, "GC_PAUSE", pauses)
    while gcpauses._on_gc in gc.callbacks:  # installed by an app made earlier in this process
        gc.callbacks.remove(gcpauses._on_gc)  # (the interpreter's own list: changed in place)
    # A handler of its own on the logger: another test's logging set-up may have stopped
    # its records from reaching the root logger (and caplog).
    handler = _Kept(logging.WARNING)
    records = handler.records
    logger = logging.getLogger(gcpauses.__name__)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(handler)
    try:
        tune_garbage_collector()
        assert not [r for r in records if "collection stopped" in r.getMessage()]
        timed = [
            sample.value
            for metric in pauses.collect()
            for sample in metric.samples
            if sample.name == "gc_pause_test_count" and sample.labels["generation"] == "2"
        ]
        assert timed == [1.0]  # timed into the metric all the same
        gc.collect()
        assert [r for r in records if "collection stopped" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
