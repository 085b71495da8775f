"""The pages a batch of waiting-room joins writes on SQLite (issue 17), empty or a month old.

`python -m bench.joinpages [--history] [--size 256] [--batches 40] [--cache-kib N]`

`bin/bench queue --queue-history` found the sale slower on SQLite with a month of history,
and a profile blamed the writer's commits. This measures the cause directly, without the
web process, the sockets or the machine's load in the way: a fresh SQLite database (with
`--history`, the month `bin/bench queue --queue-history` loads: 450,000 ended tickets of 30
past rooms, a million past holds), a product with a `fifo` room whose start is ahead, and
`--batches` join batches of `--size` new shoppers each, made as the web process's writer
makes them (`waitingroom.opening`, `join_opened_many`, `add_waiting`, one transaction a
batch) on a connection set up as the writer's is. Per batch: the WAL frames (pages) its
commit appended (the WAL's growth; automatic checkpoints are off while counting, so the file
only grows), and the time of its statements and of its COMMIT (a second pass, the same
number of batches, with SQLite's automatic checkpoint on as in the service, whose
checkpoints run inside COMMIT). Prints one JSON line per pass and a summary.

What a batch writes is the figure: pages a batch ≈ the index leaves its new tickets land
in. Times are CPU-bound and move with the machine's load; run it under the bench lock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stack
from server.devtools import history as past
from server.domain import inventory, waitingroom
from server.storage.database import (
    ImmediateSQLiteExecutor,
    _run_to_completion,
    sqlite_connection_class,
    sqlite_path,
)

HOUR_MS = 3_600_000


def _shopper() -> str:
    """A new anonymous shopper's id, shaped as the service makes them (`anon:` + 22)."""
    return "anon:" + secrets.token_urlsafe(16)


def _wal_frames(db: Path, page_size: int) -> int:
    """Frames in the WAL file now (its size; 0 when there is none)."""
    try:
        size = (db.parent / (db.name + "-wal")).stat().st_size
    except FileNotFoundError:
        return 0
    return max(0, (size - 32) // (page_size + 24))


def _connect(db: Path, cache_kib: int | None) -> sqlite3.Connection:
    conn = sqlite3.connect(db, factory=sqlite_connection_class(0), isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    if cache_kib is not None:
        conn.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
    return conn


def _product(conn: sqlite3.Connection, now: int) -> int:
    """A product with a `fifo` room whose sale starts in an hour."""

    async def make(ex: Any) -> int:
        made = await inventory.create_product(
            ex,
            name="joinpages",
            price_cents=100,
            stock=100,
            sale_starts_at=now + HOUR_MS,
            now=now,
            queue="fifo",
        )
        assert made.value is not None
        return made.value.id

    conn.execute("BEGIN IMMEDIATE")
    product_id = _run_to_completion(make(ImmediateSQLiteExecutor(conn)))
    conn.execute("COMMIT")
    return product_id


def _batch(conn: sqlite3.Connection, product_id: int, key: bytes, size: int) -> tuple[float, float]:
    """One batch of `size` new shoppers' joins in one transaction, as `_join_batch` makes
    it: (ms of its statements, ms of its COMMIT)."""
    shoppers = [_shopper() for _ in range(size)]

    async def work(ex: Any) -> None:
        now = int(time.time() * 1000)
        room = await waitingroom.opening(ex, product_id, now=now)
        assert room is not None
        made = await waitingroom.join_opened_many(ex, room, shoppers, now=now, key=key)
        waiting = sum(1 for one in made if isinstance(one, tuple) and one[1])
        await waitingroom.add_waiting(ex, product_id, waiting)

    began = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    _run_to_completion(work(ImmediateSQLiteExecutor(conn)))
    done = time.perf_counter()
    conn.execute("COMMIT")
    committed = time.perf_counter()
    return (done - began) * 1000, (committed - done) * 1000


def _pass(
    db: Path, *, size: int, batches: int, checkpoints: bool, cache_kib: int | None
) -> dict[str, Any]:
    conn = _connect(db, cache_kib)
    try:
        conn.execute(f"PRAGMA wal_autocheckpoint = {1000 if checkpoints else 0}")
        if not checkpoints:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        now = int(time.time() * 1000)
        product_id = _product(conn, now)

        async def key_of(ex: Any) -> bytes:
            return await waitingroom.room_key(ex, product_id)

        conn.execute("BEGIN IMMEDIATE")
        key = _run_to_completion(key_of(ImmediateSQLiteExecutor(conn)))
        conn.execute("COMMIT")
        frames: list[int] = []
        statements: list[float] = []
        commits: list[float] = []
        for _ in range(batches):
            before = _wal_frames(db, page_size)
            work_ms, commit_ms = _batch(conn, product_id, key, size)
            frames.append(_wal_frames(db, page_size) - before)
            statements.append(work_ms)
            commits.append(commit_ms)
        result: dict[str, Any] = {
            "checkpoints": checkpoints,
            "size": size,
            "batches": batches,
            "statements_ms_median": round(statistics.median(statements), 2),
            "commit_ms_median": round(statistics.median(commits), 2),
            "commit_ms_max": round(max(commits), 2),
            "batch_ms_total": round(sum(statements) + sum(commits), 1),
        }
        if not checkpoints:
            result["wal_frames_per_batch_median"] = statistics.median(frames)
            result["wal_frames_per_join"] = round(sum(frames) / (batches * size), 2)
            result["wal_mb_total"] = round(sum(frames) * (page_size + 24) / 1e6, 1)
        return result
    finally:
        conn.execute("PRAGMA wal_autocheckpoint = 1000")
        conn.close()


def _filing(db: Path, *, limit: int, cache_kib: int | None) -> dict[str, Any] | None:
    """The worker's side (migration 0021; None on a schema without it): the passes' tickets
    ended long enough ago, then filed `limit` a transaction as the retention run files
    them (`retention.file_tickets`): per transaction, the WAL frames and ms (automatic
    checkpoints off while counting)."""
    from server.domain import retention

    conn = _connect(db, cache_kib)
    try:
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(queue_tickets)")}
        if "filed_at" not in columns:
            return None
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        now = int(time.time() * 1000)
        ended = now - retention.FILE_AFTER_MS - 1
        conn.execute(
            "UPDATE queue_tickets SET state = 'sold_out', ended_at = ? WHERE state = 'waiting'",
            (ended,),
        )
        frames: list[int] = []
        times: list[float] = []
        while True:
            before = _wal_frames(db, page_size)
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            filed = _run_to_completion(
                retention.file_tickets(
                    ImmediateSQLiteExecutor(conn), before=now, now=now, limit=limit
                )
            )
            conn.execute("COMMIT")
            times.append((time.perf_counter() - began) * 1000)
            frames.append(_wal_frames(db, page_size) - before)
            if filed < limit:
                break
        return {
            "filing": True,
            "limit": limit,
            "transactions": len(times),
            "ms_median": round(statistics.median(times), 2),
            "ms_max": round(max(times), 2),
            "wal_frames_median": statistics.median(frames),
        }
    finally:
        conn.execute("PRAGMA wal_autocheckpoint = 1000")
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", action="store_true", help="load a month of past sales first")
    parser.add_argument("--size", type=int, default=256, help="joins a batch")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--cache-kib", type=int, help="the connection's page cache (KiB)")
    parser.add_argument("--keep", type=Path, help="copy the loaded database here (or reuse it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="joinpages-") as tmp, contextlib.ExitStack() as opened:
        if args.keep is not None and args.keep.exists():
            db = Path(tmp) / "bench.db"
            db.write_bytes(args.keep.read_bytes())
        else:
            url = opened.enter_context(stack.fresh_database(None, Path(tmp)))
            if args.history:
                loaded = past.load(
                    url, past.History(holds=1_000_000, rooms=30, tickets_per_room=15_000)
                )
                print(json.dumps({"history": loaded.summary()}), flush=True)
            db = sqlite_path(url)
            if args.keep is not None:
                with contextlib.closing(sqlite3.connect(db)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                args.keep.write_bytes(db.read_bytes())
        print(json.dumps({"db_mb": round(os.path.getsize(db) / 1e6, 1)}), flush=True)
        for checkpoints in (False, True):
            result = _pass(
                db,
                size=args.size,
                batches=args.batches,
                checkpoints=checkpoints,
                cache_kib=args.cache_kib,
            )
            print(
                json.dumps({"history": args.history, "db": str(args.keep or ""), **result}),
                flush=True,
            )
        filing = _filing(db, limit=1000, cache_kib=args.cache_kib)
        if filing is not None:
            print(json.dumps(filing), flush=True)


if __name__ == "__main__":
    main()
