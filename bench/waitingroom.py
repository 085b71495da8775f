"""Scenario `queue`: the waiting room (issue 17). A product of 100 units with a queue (`random`:
a fair random order of those who join before the start) goes on sale a minute ahead; 5,000
shoppers join the line during that minute, 10,000 more in the sale's first second. Every
shopper is a page already open (a `/ws` socket with its own `shopper` cookie, opened when
the page loaded, before the start), in separate processes (`bench/queuers.py`); it joins
over that socket (`{"type": "join"}`, answered by its `ticket` frame), so a join is timed
from the message to its answer and opens no connection; an admitted shopper reserves one
unit the moment its socket says so (on a connection it opens then, as a page's `fetch`
would), and buys it at once.

Reported: the joins' latency (p50/p99/max; those before the start and those in the first
second apart), the time from the start until the 100 units are held and until they are
sold, until every ticket has its final state and how long after the last sale the last
`sold_out` reached its socket, how long the average admitted shopper waited (from the
start, and from joining), and the reservations' latency with the room on. The operator's
stats are polled for the stock over time, as in the storm.

The minute before the start may be compressed (`--queue-minute`; the room opens
`QUEUE_OPENS_SECONDS` before the start, half an hour by default, so the whole minute is
inside it whatever its length).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import httpx

from bench import identities
from bench.rawhttp import now_ms
from bench.spawn import host_port, start_ready
from bench.stack import Target, cpu_seconds
from bench.storm import StatsPoller, _percentiles
from server.domain.clock import iso, parse_iso

# Where the sale's start is parked while the pages open: inside the room's opening
# (QUEUE_OPENS_SECONDS, 1,800 s by default) so that nobody is turned away, far enough.
PARKED_SECONDS = 1_500
# The service's settings for this scenario (a `--set` still wins): every page is a socket,
# 15,000 of them, more than a process takes by default.
SETTINGS = {"WS_MAX_CLIENTS": "40000"}
# How often the CPU of each party is sampled (s), and the window after the start that the
# report sums it over (ms): the first second's joins and the sale.
CPU_SAMPLE_S = 0.25
CPU_WINDOW_MS = 5_000

# The row each shopper process reports (bench/queuers.py).
(
    OFFSET,
    JOIN_SENT,
    JOIN_ANSWERED,
    JOIN_STATUS,
    ADMITTED,
    RESERVE_SENT,
    RESERVE_ANSWERED,
    RESERVE_STATUS,
    COMPLETE_ANSWERED,
    COMPLETE_STATUS,
    FINAL_STATE,
    FINAL_AT,
    POSITION,
    FRAMES,
    RECONNECTS,
    JOIN_MADE,
) = range(16)

# The web processes' own measure of a join over a socket (server/infra/metrics.py): from
# its message read off the socket to its answer handed to it, as cumulative buckets.
JOIN_HISTOGRAM = re.compile(
    r'^flashsale_queue_join_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M
)


def join_histogram(service: Target) -> dict[float, float]:
    """The web processes' join histogram now: upper bound (s) → joins at most that long so
    far, added up over the processes; {} if the service serves no metrics."""
    env = getattr(getattr(service, "web", None), "env", {})
    port = env.get("WEB_METRICS_PORT")
    if not port or port == "0":
        return {}
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    counts: dict[float, float] = {}
    for bound, count in JOIN_HISTOGRAM.findall(text):
        counts[float(bound)] = counts.get(float(bound), 0.0) + float(count)
    return counts


def histogram_between(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """The joins observed between two of `join_histogram`'s readings: how many, the bucket
    bound (ms) within which the median and the 99th percentile fall, and the share within
    50 ms (the goal)."""
    if not after:
        return {}
    rows = sorted((b, after[b] - before.get(b, 0.0)) for b in after)
    total = rows[-1][1] if rows else 0.0
    if total <= 0:
        return {"joins": 0}

    def bound(q: float) -> float | None:
        for upper, count in rows:
            if count >= q * total:
                return None if upper == float("inf") else round(upper * 1000, 1)
        return None

    within = next((count for upper, count in rows if upper >= 0.05), 0.0)
    return {
        "joins": int(total),
        "p50_within_ms": bound(0.5),
        "p99_within_ms": bound(0.99),
        "share_within_50ms": round(within / total, 4),
    }


class CpuSampler(threading.Thread):
    """CPU seconds used so far by the service's web processes, its worker and the shoppers'
    processes, every CPU_SAMPLE_S until stopped: who had the two cores when (the shoppers
    share them with the service)."""

    def __init__(self, web: int | None, worker: int | None, shoppers: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = {"web": web, "worker": worker}
        self.shoppers = shoppers
        self.samples: list[tuple[float, float, float, float]] = []  # (ms, web, worker, shoppers)
        self.stopping = threading.Event()
        # Each shopper process's CPU as last read: one that has exited reads 0 from then on
        # (no /proc entry), and its seconds must still count (the first second's CPU came
        # out negative, -5 to -9 s, when the shoppers finished within the window).
        self._shopper_cpu: dict[int, float] = {}

    def sample(self) -> None:
        web, worker = (cpu_seconds(pid) if pid else 0.0 for pid in self.pids.values())
        for pid in self.shoppers:
            self._shopper_cpu[pid] = max(self._shopper_cpu.get(pid, 0.0), cpu_seconds(pid))
        self.samples.append((now_ms(), web, worker, sum(self._shopper_cpu.values())))

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(CPU_SAMPLE_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def _profile(*pids: int | None) -> list[subprocess.Popen[bytes]]:
    """With `BENCH_PYSPY=<folder>` (py-spy installed): each of `pids` (the web processes'
    command, the worker, and the shoppers' processes: the load generator shares the two
    cores, and its profile says how much of them it takes) sampled by py-spy from 2 s
    before the start for `BENCH_PYSPY_SECONDS` (15), 100 a second, not stopping it, into
    `<folder>/<pid>.txt` (`-f raw`: collapsed stacks). Its own CPU is on the same cores: a
    profiling run's figures are not the bench's."""
    folder = os.environ.get("BENCH_PYSPY")
    if not folder:
        return []
    os.makedirs(folder, exist_ok=True)
    seconds = os.environ.get("BENCH_PYSPY_SECONDS", "15")
    return [
        subprocess.Popen(
            [
                *("py-spy", "record", "-r", "100", "--nonblocking", "--subprocesses", "-f", "raw"),
                *("-d", seconds, "-o", f"{folder}/{pid}.txt", "--pid", str(pid)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
        if pid
    ]


def _spawn(
    service: Target,
    product_id: int,
    offsets: list[float],
    cookies: list[str],
    processes: int,
) -> list[subprocess.Popen[str]]:
    host, port = host_port(service)
    return start_ready(
        "bench.queuers",
        [[host, str(port), str(product_id)]] * processes,
        what="shopper",
        first_lines=[
            json.dumps({"offsets": offsets[n::processes], "cookies": cookies[n::processes]})
            for n in range(processes)
        ],
    )


def run(
    service: Target,
    *,
    early: int = 5_000,
    late: int = 10_000,
    units: int = 100,
    minute_seconds: float = 60.0,
    mode: str = "random",
    seed: int | None = None,
) -> dict[str, Any]:
    """The waiting room's sale. `early` shoppers join at random moments of the
    `minute_seconds` before the start, `late` ones in its first second."""
    total = early + late
    chooser = random.Random(seed)
    offsets = [chooser.uniform(-minute_seconds * 1000, 0) for _ in range(early)]
    offsets += [chooser.uniform(0, 1000) for _ in range(late)]
    chooser.shuffle(offsets)
    cookies = [h["Cookie"] for h in identities.headers("cookie", total)]
    processes = max(1, min(4, total // 2_000))
    # The start is set once every page is open (15,000 sockets took a minute on a busy
    # 2-core machine): meanwhile it is a while ahead, within the room's opening.
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={
            "name": "Waiting room",
            "price": 1,
            "stock": units,
            "saleStartsAt": iso(int(now_ms() + PARKED_SECONDS * 1000)),
            "queue": mode,
        },
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    product = response.json()
    poller = StatsPoller(service, product["id"])
    procs: list[subprocess.Popen[str]] = []
    answers: list[dict[str, Any]] = []
    sampler: CpuSampler | None = None
    before: CpuSampler | None = None  # two samples: the start set, and 2 s before it
    profiling: list[subprocess.Popen[bytes]] = []
    # The web processes' join histogram (`join_histogram`): as the start is set (no join
    # yet), 2 s before the start (the minute's joins), and after the run (the sale's).
    # Not read in between: with one web process the metrics are served from a thread of
    # that process, whose reading would take the event loop's turn.
    histograms: list[dict[float, float]] = []
    try:
        opening = time.monotonic()
        procs = _spawn(service, product["id"], offsets, cookies, processes)
        opened = time.monotonic() - opening
        response = httpx.patch(
            f"{service.base_url}/api/admin/products/{product['id']}",
            json={"saleStartsAt": iso(int(now_ms() + (minute_seconds + 2) * 1000))},
            headers=service.admin_headers(),
        )
        response.raise_for_status()
        start = float(parse_iso(response.json()["saleStartsAt"]))
        web = getattr(getattr(service, "web", None), "pid", None)
        worker = getattr(getattr(service, "worker", None), "pid", None)
        before = CpuSampler(web, worker, [proc.pid for proc in procs])
        before.sample()
        histograms.append(join_histogram(service))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"start_ms": start}) + "\n")
            proc.stdin.flush()
        print(
            f"  {total:,} pages open in {opened:.1f} s; the first joins in 2 s, the sale "
            f"starts in {(start - now_ms()) / 1000:.1f} s",
            flush=True,
        )
        time.sleep(max(0.0, (start - now_ms()) / 1000 - 2.0))
        before.sample()
        histograms.append(join_histogram(service))
        sampler = CpuSampler(web, worker, [proc.pid for proc in procs])
        sampler.start()
        profiling = _profile(web, worker, *(proc.pid for proc in procs))
        time.sleep(max(0.0, (start - now_ms()) / 1000 - 0.5))
        poller.start()
        for proc in procs:
            assert proc.stdout is not None
            answers.append(json.loads(proc.stdout.readline()))
            proc.wait(30)
        time.sleep(1.2)  # the web processes write their metrics out within a second
        histograms.append(join_histogram(service))
    finally:
        if poller.is_alive():
            poller.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for profiler in profiling:
            profiler.wait(30)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    stats = httpx.get(poller.url, headers=poller.headers).json()
    minute: dict[str, float] = {}
    if before is not None and len(before.samples) == 2:
        (t0, web0, worker0, shoppers0), (t1, web1, worker1, shoppers1) = before.samples
        minute = {
            "seconds": round((t1 - t0) / 1000, 2),
            "web": round(web1 - web0, 2),
            "worker": round(worker1 - worker0, 2),
            "shoppers": round(shoppers1 - shoppers0, 2),
        }
    rows = [row for answer in answers for row in answer["shoppers"]]
    return summarize(
        rows,
        start=start,
        units=units,
        early=early,
        late=late,
        minute_seconds=minute_seconds,
        mode=mode,
        stats=stats,
        samples=poller.samples,
        shopper_cpu=sum(a["cpu_seconds"] for a in answers),
        shopper_cpu_after_start=sum(
            a["cpu_seconds"] - a["cpu_at_start"]
            for a in answers
            if a.get("cpu_at_start") is not None
        ),
        lags=[lag for a in answers for lag in a.get("lags_ms", [])],
        cpu=sampler.samples if sampler is not None else [],
        cpu_before=minute,
        server_joins=(
            {
                "before_start": histogram_between(histograms[0], histograms[1]),
                "sale": histogram_between(histograms[1], histograms[2]),
            }
            if len(histograms) == 3
            else {}
        ),
    )


def summarize(
    rows: list[list[Any]],
    *,
    start: float,
    units: int,
    early: int,
    late: int,
    minute_seconds: float,
    mode: str,
    stats: dict[str, Any],
    samples: list[tuple[float, int, int, int]],
    shopper_cpu: float,
    shopper_cpu_after_start: float = 0.0,
    lags: list[float] | None = None,
    cpu: list[tuple[float, float, float, float]] | None = None,
    cpu_before: dict[str, float] | None = None,
    server_joins: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The figures of one run from every shopper's row (times in ms from the start).
    `lags`: how late the shoppers' processes ran their loops' ticks (ms; see
    bench/queuers.py); `cpu`: (epoch ms, web, worker, shoppers' CPU seconds so far)
    samples (`CpuSampler`); `cpu_before`: each party's CPU seconds in the minute before
    the start (from when the start was set until 2 s before it: the line filling up, and
    every page told its counts); `server_joins`: the web processes' own measure of the
    joins (`histogram_between`), `before_start` and `sale` (from 2 s before the start)."""

    def since(t: float) -> float:
        return round(t - start, 1)

    joined = [r for r in rows if r[JOIN_ANSWERED]]
    join_latency = [r[JOIN_ANSWERED] - r[JOIN_SENT] for r in joined]
    join_before = [r[JOIN_ANSWERED] - r[JOIN_SENT] for r in joined if r[OFFSET] < 0]
    join_after = [r[JOIN_ANSWERED] - r[JOIN_SENT] for r in joined if r[OFFSET] >= 0]
    join_statuses = Counter(str(r[JOIN_STATUS]) for r in rows)
    admitted = [r for r in rows if r[ADMITTED]]
    reserved = [r for r in rows if r[RESERVE_STATUS]]
    held = sorted(r[RESERVE_ANSWERED] for r in reserved if r[RESERVE_STATUS] == 201)
    sold = sorted(r[COMPLETE_ANSWERED] for r in reserved if r[COMPLETE_STATUS] == 200)
    reserve_latency = [r[RESERVE_ANSWERED] - r[RESERVE_SENT] for r in reserved]
    finals = Counter(str(r[FINAL_STATE]) for r in rows)
    sold_out_at = sorted(r[FINAL_AT] for r in rows if r[FINAL_STATE] == "sold_out")
    every_final = all(r[FINAL_STATE] in ("sold_out", "reserved") for r in rows)
    last_sale = sold[-1] if sold else None
    # How long each ticket waited to be told `sold_out` once there was nothing to wait for:
    # from the last sale, or from its joining if it joined after it (the first second's
    # shoppers may still be arriving when the last unit goes).
    told_after_sale = (
        [r[FINAL_AT] - max(last_sale, r[JOIN_SENT]) for r in rows if r[FINAL_STATE] == "sold_out"]
        if last_sale is not None
        else []
    )
    joined_after_sale = (
        sum(1 for r in rows if r[JOIN_SENT] > last_sale) if last_sale is not None else 0
    )
    # An early joiner's wait starts at the start (nobody is admitted before it); a late
    # one's when it joined.
    waits_from_start = [r[ADMITTED] - max(start, r[JOIN_SENT]) for r in admitted]
    waits_from_join = [r[ADMITTED] - r[JOIN_SENT] for r in admitted]
    # A join's time split at the moment the server made its answer (its `serverTime`, ms):
    # its way there and through the server (the socket's read, waiting for a busy loop,
    # the batch and its commit), and the answer's way back (the write, the shopper's read,
    # waiting for its own busy loop).
    made = [r for r in joined if len(r) > JOIN_MADE and r[JOIN_MADE] and r[JOIN_STATUS] == 200]
    there = {
        "before_start": [r[JOIN_MADE] - r[JOIN_SENT] for r in made if r[OFFSET] < 0],
        "first_second": [r[JOIN_MADE] - r[JOIN_SENT] for r in made if r[OFFSET] >= 0],
    }
    back = {
        "before_start": [r[JOIN_ANSWERED] - r[JOIN_MADE] for r in made if r[OFFSET] < 0],
        "first_second": [r[JOIN_ANSWERED] - r[JOIN_MADE] for r in made if r[OFFSET] >= 0],
    }
    # Joins of the first second sent late by their own process (ms after they were due).
    sent_late = [
        r[JOIN_SENT] - (start + r[OFFSET]) for r in rows if r[JOIN_SENT] and r[OFFSET] >= 0
    ]
    # Who used the cores in the sale's first seconds: CPU seconds of each party from the
    # start to CPU_WINDOW_MS after it (or the last sample before), from `cpu`'s samples.
    window: dict[str, float] = {}
    cpu_samples = cpu or []
    first = next((c for c in cpu_samples if c[0] >= start), None)
    last = next((c for c in reversed(cpu_samples) if c[0] <= start + CPU_WINDOW_MS), None)
    if first is not None and last is not None and last[0] > first[0]:
        window = {
            "seconds": round((last[0] - first[0]) / 1000, 2),
            "web": round(last[1] - first[1], 2),
            "worker": round(last[2] - first[2], 2),
            "shoppers": round(last[3] - first[3], 2),
        }
    result: dict[str, Any] = {
        "mode": mode,
        "shoppers": len(rows),
        "early": early,
        "late": late,
        "minute_seconds": minute_seconds,
        "units": units,
        "join_statuses": dict(join_statuses),
        "join_ms": _rounded(_percentiles(join_latency)),
        "join_before_start_ms": _rounded(_percentiles(join_before)),
        "join_first_second_ms": _rounded(_percentiles(join_after)),
        "admitted": len(admitted),
        "admitted_early": sum(1 for r in admitted if r[OFFSET] < 0),
        "reservations": len(reserved),
        "reserve_statuses": dict(Counter(str(r[RESERVE_STATUS]) for r in reserved)),
        "reserve_ms": _rounded(_percentiles(reserve_latency)),
        "held": len(held),
        "sold": len(sold),
        "all_held_ms": since(held[units - 1]) if units and len(held) >= units else None,
        "all_sold_ms": since(sold[units - 1]) if units and len(sold) >= units else None,
        "first_admitted_ms": since(min(r[ADMITTED] for r in admitted)) if admitted else None,
        "final_states": dict(finals),
        "every_ticket_final": every_final,
        "all_final_ms": (
            since(max(max(sold_out_at, default=start), max(sold, default=start)))
            if every_final
            else None
        ),
        "sold_out_after_last_sale_ms": _rounded(_percentiles(told_after_sale)),
        "joined_after_last_sale": joined_after_sale,
        "wait_from_start_ms": _mean(waits_from_start),
        "wait_from_join_ms": _mean(waits_from_join),
        "ticket_frames": sum(r[FRAMES] for r in rows),
        # Request connections the shoppers opened (joins need none: they go over the
        # socket): one per shopper who reserves, and again if one was closed idle between
        # its reservation and its purchase; within the request's time.
        "reconnects": sum(r[RECONNECTS] for r in rows),
        "stats_after": stats,
        "shopper_cpu_seconds": round(shopper_cpu, 2),
        "shopper_cpu_after_start_seconds": round(shopper_cpu_after_start, 2),
        "cpu_first_seconds": window,
        "cpu_minute_before": cpu_before or {},
        "shopper_loop_lag_ms": _rounded(_percentiles(lags or [])),
        "join_sent_late_ms": _rounded(_percentiles(sent_late)),
        "join_to_answer_made_ms": {k: _rounded(_percentiles(v)) for k, v in there.items()},
        "join_answer_made_to_read_ms": {k: _rounded(_percentiles(v)) for k, v in back.items()},
        "join_server_ms": server_joins or {},
        "series": {
            # [ms from the start, latency ms, status] per join, as it was answered
            "joins": [
                [since(r[JOIN_ANSWERED]), round(r[JOIN_ANSWERED] - r[JOIN_SENT], 2), r[JOIN_STATUS]]
                for r in joined
            ],
            "admitted": sorted(since(r[ADMITTED]) for r in admitted),
            "held": [since(t) for t in held],
            "sold": [since(t) for t in sold],
            "sold_out": [since(t) for t in sold_out_at],
            "reservations": [
                [since(r[RESERVE_ANSWERED]), round(r[RESERVE_ANSWERED] - r[RESERVE_SENT], 2)]
                for r in reserved
            ],
            "stats": [[since(t), a, h, s] for t, a, h, s in samples],
            "cpu": [[since(t), w, k, c] for t, w, k, c in cpu_samples],
        },
    }
    j, r = result["join_ms"], result["reserve_ms"]
    for when, total, server in (
        ("before the start", "join_before_start_ms", "before_start"),
        ("in the first second", "join_first_second_ms", "first_second"),
    ):
        there_p99 = result["join_to_answer_made_ms"][server].get("p99")
        back_p99 = result["join_answer_made_to_read_ms"][server].get("p99")
        own = result["join_server_ms"].get("sale" if server == "first_second" else server, {})
        print(
            f"  joins {when}: p99 {result[total].get('p99')} ms; sent to the answer made "
            f"p99 {there_p99} ms, made to read p99 {back_p99} ms; the web's own (read to "
            f"answered) p99 within {own.get('p99_within_ms')} ms",
            flush=True,
        )
    print(
        f"  the shoppers' loops late p99 {result['shopper_loop_lag_ms'].get('p99')} ms, "
        f"first-second joins sent late p99 {result['join_sent_late_ms'].get('p99')} ms",
        flush=True,
    )
    told = result["sold_out_after_last_sale_ms"]
    print(
        f"  joins p50 {j.get('p50')} p99 {j.get('p99')} max {j.get('max')} ms "
        f"({dict(join_statuses)}); admitted {len(admitted)}, held {len(held)} by "
        f"{result['all_held_ms']} ms, sold {len(sold)} by {result['all_sold_ms']} ms; "
        f"reservations p99 {r.get('p99')} ms; final {dict(finals)}; sold_out told "
        f"{told.get('max')} ms after the last sale; wait from the start "
        f"{result['wait_from_start_ms']} ms",
        flush=True,
    )
    return result


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None
