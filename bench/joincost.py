"""The web process's CPU per waiting-room join (issue 17): a small, repeatable measure.

`python -m bench.joincost [--joins 4000] [--seconds 2] [--rounds 3] [--mode sold_out]`

The `queue` scenario's p99 is a cliff: once the web process takes more CPU per join than
the joins' rate leaves it, a backlog forms and the p99 is seconds (bench/README.md). What
moves the cliff is the web process's CPU per join, which depends much less on the machine's
load than latency does. This starts one service of its own (a fresh SQLite database, or
`--database-url`, a Redis, one web process and the worker, with the `queue` scenario's
settings), then for each round: a product with a waiting room, `--joins` pages each holding
its `/ws` socket with a shopper cookie of its own (`bench/queuers.py`, two processes), and
their joins spread evenly over `--seconds` from a moment set once every page is open. It
reads the web process's CPU seconds (user + system, /proc) every 20 ms, and reports per
round the CPU from the first join sent to the last answered over the number of joins: µs a
join; and the same less what the idle process takes with those sockets open (its rate over
the second before the first join, ±10 ms of /proc's ticks: a round that a busy machine
stretches is mostly idle time). Also the joins' latency (p50/p99), as the load goes.

`--mode sold_out` (default): a product of no units whose sale starts as the joins begin,
so each join is one insert answered `sold_out` at once: the join's own path, the floor of
`bin/bench queue --storm-units 0`. `--mode waiting`: a product whose start is far ahead, so
each join is a waiting ticket (and room news, one a batch): the minute before a start.

`--history`: the fresh database first gets a month of past sales (`bin/bench queue
--queue-history`'s: a million past holds over 10,000 products, and 30 past waiting rooms of
15,000 ended tickets each; `server/devtools/history.py`), so that a join's CPU can be read on
a month-old database beside an empty one.

`--profile DIR`: py-spy samples the web process during the joins (`DIR/<round>.txt`,
collapsed stacks); a profiling round's CPU includes py-spy's effect on the process.

Run it at `nice -n 19` beside others' work: the figure is CPU per join, not time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import identities, stack, waitingroom
from bench.rawhttp import now_ms
from bench.spawn import host_port, start_ready
from server.devtools import history as past
from server.domain.clock import iso

SAMPLE_S = 0.02
# How far ahead of the moment the pages are told the joins begin (s): they must all have
# read it by then.
LEAD_S = 1.5


def _path() -> str:
    """PATH with this Python's own folder first (py-spy is installed beside it)."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


class Sampler(threading.Thread):
    """`pid`'s CPU seconds (with its descendants) every SAMPLE_S: (epoch ms, seconds)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((now_ms(), stack.cpu_seconds(self.pid)))
            self.stopping.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)

    def at(self, when: float) -> float:
        """CPU seconds at epoch ms `when`, from the samples on either side (linear)."""
        before = [s for s in self.samples if s[0] <= when]
        after = [s for s in self.samples if s[0] >= when]
        if not before:
            return after[0][1]
        if not after:
            return before[-1][1]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def one_round(
    service: Any, *, joins: int, seconds: float, mode: str, profile: Path | None, n: int
) -> dict[str, Any]:
    now = now_ms()
    parked = now + waitingroom.PARKED_SECONDS * 1000
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={
            "name": f"Join cost {n}",
            "price": 1,
            "stock": 0 if mode == "sold_out" else 10,
            "saleStartsAt": iso(int(parked)),
            "queue": "random",
        },
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    product_id = response.json()["id"]
    chooser = random.Random(n)
    offsets = [seconds * 1000 * i / joins for i in range(joins)]
    chooser.shuffle(offsets)
    cookies = [h["Cookie"] for h in identities.headers("cookie", joins)]
    processes = 2
    host, port = host_port(service)
    os.environ["QUEUERS_DEADLINE_S"] = str(seconds + 40)
    procs = start_ready(
        "bench.queuers",
        [[host, str(port), str(product_id)]] * processes,
        what="shopper",
        first_lines=[
            json.dumps({"offsets": offsets[k::processes], "cookies": cookies[k::processes]})
            for k in range(processes)
        ],
    )
    web = service.web.pid
    sampler = Sampler(web)
    sampler.start()
    profiler = None
    try:
        start = now_ms() + LEAD_S * 1000
        if mode == "sold_out":
            # The sale starts as the joins begin: the room closes at once (nothing to sell),
            # and each join is a ticket made `sold_out`.
            httpx.patch(
                f"{service.base_url}/api/admin/products/{product_id}",
                json={"saleStartsAt": iso(int(start - 300))},
                headers=service.admin_headers(),
            ).raise_for_status()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"start_ms": start}) + "\n")
            proc.stdin.flush()
        if profile is not None:
            time.sleep(max(0.0, (start - now_ms()) / 1000 - 0.1))
            profile.mkdir(parents=True, exist_ok=True)
            profiler = subprocess.Popen(
                [
                    *(shutil.which("py-spy", path=_path()) or "py-spy", "record"),
                    *("-r", "200", "--nonblocking", "-f", "raw"),
                    *("-d", str(int(seconds + 2)), "-o", str(profile / f"{n}.txt")),
                    *("--pid", str(web)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        answers = []
        for proc in procs:
            assert proc.stdout is not None
            answers.append(json.loads(proc.stdout.readline()))
            proc.wait(30)
    finally:
        sampler.stop()
        if profiler is not None:
            profiler.wait(30)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    rows = [row for answer in answers for row in answer["shoppers"]]
    sent = [r[waitingroom.JOIN_SENT] for r in rows if r[waitingroom.JOIN_SENT]]
    answered = [r[waitingroom.JOIN_ANSWERED] for r in rows if r[waitingroom.JOIN_ANSWERED]]
    statuses: dict[str, int] = {}
    for r in rows:
        key = str(r[waitingroom.JOIN_STATUS])
        statuses[key] = statuses.get(key, 0) + 1
    first, last = min(sent), max(answered)
    idle_rate = (sampler.at(first) - sampler.at(first - 1000)) / 1.0
    busy = sampler.at(last) - sampler.at(first)
    latencies = sorted(
        r[waitingroom.JOIN_ANSWERED] - r[waitingroom.JOIN_SENT]
        for r in rows
        if r[waitingroom.JOIN_ANSWERED]
    )
    return {
        "joins": joins,
        "answered": len(answered),
        "statuses": statuses,
        "seconds": round((last - first) / 1000, 2),
        "web_cpu_s": round(busy, 3),
        "idle_cpu_per_s": round(idle_rate, 3),
        "us_per_join": round(busy / len(answered) * 1e6, 1),
        "us_per_join_less_idle": round(
            (busy - idle_rate * (last - first) / 1000) / len(answered) * 1e6, 1
        ),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "shoppers_cpu_s": round(
            sum(a["cpu_seconds"] - (a["cpu_at_start"] or 0) for a in answers), 2
        ),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=4000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["sold_out", "waiting"], default="sold_out")
    parser.add_argument("--database-url")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--history", action="store_true", help="load a month of past sales first")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    # Every socket is a file descriptor, here and in the processes started from here.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65_536), max(hard, 65_536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="joincost-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as opened:
            db_url = opened.enter_context(stack.fresh_database(args.database_url, work))
            if args.history:
                loaded = past.load(
                    db_url,
                    past.History(holds=1_000_000, rooms=30, tickets_per_room=15_000),
                )
                print(json.dumps({"history": loaded.summary()}), flush=True)
            _rounds(args, db_url, work, overrides)


def _rounds(
    args: argparse.Namespace,
    db_url: str,
    work: Path,
    overrides: dict[str, str],
) -> None:
    """The rounds, on a service of their own over `db_url`."""
    with (
        stack.redis(work) as redis,
        stack.service(
            db_url,
            redis.url,
            work / "service",
            web_concurrency=1,
            **{
                "HOLD_SECONDS": "3600",
                "LOG_LEVEL": "warning",
                **waitingroom.SETTINGS,
                **overrides,
            },
        ) as service,
    ):
        results = []
        for n in range(args.rounds):
            result = one_round(
                service,
                joins=args.joins,
                seconds=args.seconds,
                mode=args.mode,
                profile=args.profile,
                n=n,
            )
            print(json.dumps(result), flush=True)
            results.append(result)
        per_join = [r["us_per_join"] for r in results]
        print(
            json.dumps(
                {
                    "us_per_join_median": statistics.median(per_join),
                    "us_per_join": per_join,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
