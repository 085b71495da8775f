"""The WAL a hold costs on PostgreSQL: holds made through the API, the WAL between them
counted per relation with pg_walinspect (PostgreSQL 15+, `CREATE EXTENSION pg_walinspect`
in the database named; a superuser).

    python -m bench.holdwal --database-url postgresql://postgres@127.0.0.1:5432/test

A fresh database (dropped afterwards), the service with one web process and no worker (no
dispatch, no expiry: only what the reservations' transactions write), a product with ample
stock, `--warm` holds, then `--holds` holds on 64 connections with the WAL's position read
before and after (`--checkpoint`: a CHECKPOINT first, so that the full-page images count
the pages the holds touch; `--history-holds`: a month of past holds loaded first, as
`bin/bench history` loads them). The WAL is the whole server's (other databases' too): the
records are counted only if they touch this database's relations, plus the commit records
of the transactions that wrote them. Printed: bytes a hold, as records and as full-page images
(which depend on when the last checkpoint was), per relation.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path

import asyncpg
import httpx

from bench import stack
from server.devtools import history as past


async def _holds(base_url: str, product_id: int, count: int, connections: int) -> int:
    body = {"productId": product_id, "quantity": 1}
    made = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal made
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                response = await client.post("/api/reservations", json=body)
            except httpx.TransportError:  # a kept-alive connection the server closed
                queue.put_nowait(0)
                continue
            if response.status_code == 201:
                made += 1
            elif response.status_code != 503:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            else:
                queue.put_nowait(0)

    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(one(client) for _ in range(connections)))
    return made


async def _measure(
    url: str, base_url: str, product_id: int, holds: int, *, checkpoint: bool
) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        dboid = await conn.fetchval(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        )
        names = {
            int(r["relfilenode"]): str(r["relname"])
            for r in await conn.fetch(
                "SELECT relfilenode, relname FROM pg_class WHERE relfilenode <> 0"
            )
        }
        # A slot of our own keeps the WAL from here until it is read (a checkpoint would
        # otherwise recycle it meanwhile: the server is shared).
        slot = f"holdwal_{dboid}"
        await conn.execute("SELECT pg_create_physical_replication_slot($1, true)", slot)
        if checkpoint:
            # Every page's first change after a checkpoint is written whole: from here, the
            # full-page images count the pages the holds touch.
            await conn.execute("CHECKPOINT")
        try:
            start = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
            made = await _holds(base_url, product_id, holds, 64)
            end = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
            records = await conn.fetch(
                "SELECT xid, resource_manager, record_type, record_length, fpi_length,"
                " block_ref FROM pg_get_wal_records_info($1, $2)",
                start,
                end,
            )
        finally:
            await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
        total = await conn.fetchval("SELECT $2::pg_lsn - $1::pg_lsn", start, end)
    finally:
        await conn.close()
    mine = f"/{dboid}/"
    xids = set()
    by_rel: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in records:
        ref = r["block_ref"] or ""
        if mine not in ref:
            continue
        xids.add(r["xid"])
        relfilenode = int(ref.split(mine, 1)[1].split()[0].split(",")[0])
        name = names.get(relfilenode, str(relfilenode))
        entry = by_rel[name]
        entry[0] += 1
        entry[1] += int(r["record_length"]) - int(r["fpi_length"])
        entry[2] += int(r["fpi_length"])
    commits = [r for r in records if r["resource_manager"] == "Transaction" and r["xid"] in xids]
    by_rel["(commits)"] = [
        len(commits),
        sum(int(r["record_length"]) for r in commits),
        0,
    ]
    return {"made": made, "server_wal": int(total), "by_rel": dict(by_rel)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--holds", type=int, default=5_000)
    parser.add_argument("--warm", type=int, default=1_000)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--history-holds", type=int, default=0, help="past holds to load first (a month's)"
    )
    parser.add_argument(
        "--checkpoint", action="store_true", help="a CHECKPOINT just before the counted holds"
    )
    args = parser.parse_args()
    settings = dict(s.split("=", 1) for s in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with (
            stack.fresh_database(args.database_url, work) as url,
            stack.redis(work) as redis,
        ):
            plain = url.replace("postgresql+asyncpg", "postgresql")
            if args.history_holds:
                loaded = past.load(url, past.History(holds=args.history_holds))
                print(f"loaded {args.history_holds:,} past holds in {loaded.seconds:.0f} s")
            asyncio.run(_extension(plain))
            with stack.service(url, redis.url, work, web_concurrency=1, **settings) as svc:
                svc.worker.stop()
                product = asyncio.run(svc.new_product(10_000_000))
                asyncio.run(_holds(svc.base_url, product["id"], args.warm, 64))
                result = asyncio.run(
                    _measure(
                        plain, svc.base_url, product["id"], args.holds, checkpoint=args.checkpoint
                    )
                )
    made = int(result["made"])  # type: ignore[call-overload]
    by_rel: dict[str, list[int]] = result["by_rel"]  # type: ignore[assignment]
    records = sum(v[1] for v in by_rel.values())
    fpis = sum(v[2] for v in by_rel.values())
    print(f"holds made: {made}; the server's WAL meanwhile: {result['server_wal']:,} bytes")
    print(
        f"this database's: {records / made:,.0f} bytes a hold in records,"
        f" {fpis / made:,.0f} in full-page images ({(records + fpis) / made:,.0f} in all)"
    )
    print(f"{'relation':40} {'records':>9} {'bytes/hold':>11} {'fpi/hold':>9}")
    for name, (count, size, fpi) in sorted(by_rel.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:40} {count:9,} {size / made:11.1f} {fpi / made:9.1f}")


async def _extension(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
