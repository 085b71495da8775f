"""Scenario: fan-out. N sockets (in separate client processes) watch the stock; how long
from a reservation's 201 until every socket has the new stock, what an idle connection costs
in memory, how fast everyone converges when one product changes a thousand times a second,
and what the sockets cost the reservation path."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx

from bench import wrk
from bench.spawn import shares, start_ready
from bench.stack import descendants_rss
from bench.wave import percentiles
from server.devtools.processes import Service

ROUNDS = 20


class Clients:
    """Client processes holding `count` sockets between them."""

    def __init__(self, url: str, count: int, product_id: int, processes: int) -> None:
        per = shares(count, processes)
        self.procs = start_ready(
            "bench.wsclients",
            [[url, str(n), str(product_id)] for n in per if n],
            what="client",
            stdin=True,
        )

    def report(self, version: int) -> tuple[list[int], int]:
        times: list[int] = []
        missing = 0
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"report {version}\n")
            proc.stdin.flush()
        for proc in self.procs:
            assert proc.stdout is not None
            answer = json.loads(proc.stdout.readline())
            times += answer["times"]
            missing += answer["missing"]
        return times, missing

    def _ask(self, command: str) -> list[Any]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            answers.append(json.loads(proc.stdout.readline()))
        return answers

    def available(self, value: int) -> tuple[list[int], int]:
        """When each socket first showed `value` or fewer units left (epoch ms), and how many
        never did."""
        answers = self._ask(f"available {value}")
        return [t for a in answers for t in a["times"]], sum(a["missing"] for a in answers)

    def series(self) -> list[list[int]]:
        """`[epoch ms, available]` for every stock value one socket received."""
        series: list[list[int]] = self._ask("series")[0]
        return series

    def wait_all(self, version: int, within: float = 10.0) -> tuple[list[int], int]:
        deadline = time.monotonic() + within
        while True:
            times, missing = self.report(version)
            if not missing or time.monotonic() > deadline:
                return times, missing
            time.sleep(0.05)

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        for proc in self.procs:
            proc.wait(60)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _product(service: Service, stock: int) -> dict[str, Any]:
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={"name": f"Fan-out {stock}", "price": 1, "stock": stock},
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def _reserve(client: httpx.Client, product_id: int) -> tuple[int, int]:
    response = client.post("/api/reservations", json={"productId": product_id, "quantity": 1})
    response.raise_for_status()
    return response.json()["product"]["version"], _now_ms()


async def _burst(
    base_url: str, product_id: int, per_second: int, seconds: float
) -> tuple[int, int, int]:
    """About `per_second` reservations a second for `seconds`; returns (count, newest version,
    time of the last 201)."""
    newest, last, count = 0, 0, 0
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        tick, per_tick = 0.01, max(1, per_second // 100)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            responses = await asyncio.gather(
                *(
                    client.post("/api/reservations", json={"productId": product_id, "quantity": 1})
                    for _ in range(per_tick)
                )
            )
            for response in responses:
                if response.status_code == 201:
                    count += 1
                    newest = max(newest, response.json()["product"]["version"])
                    last = _now_ms()
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))
    return count, newest, last


def _until_no_sockets(service: Service, within: float = 30.0) -> None:
    """Until the web processes have let go of every socket (their own gauge says so)."""
    deadline = time.monotonic() + within
    gauge = re.compile(r"^flashsale_websocket_connections(\{[^}]*\})? (\S+)$", re.M)
    while time.monotonic() < deadline:
        text = httpx.get(f"{service.base_url}/metrics", timeout=10).text
        if sum(float(m.group(2)) for m in gauge.finditer(text)) == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the sockets were still open {within} s after the clients closed")


def run(
    service: Service,
    *,
    sockets: int,
    client_processes: int,
    throughput_seconds: float,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    product = _product(service, 1_000_000_000)
    ws_url = service.base_url.replace("http://", "ws://") + "/ws"
    pid = service.web.pid
    result: dict[str, Any] = {"sockets": sockets}

    def reserve_load() -> wrk.Result:
        return wrk.run(
            service.base_url,
            wrk.Load(
                "/api/reservations",
                method="POST",
                body=json.dumps({"productId": product["id"], "quantity": 1}),
                headers={"Content-Type": "application/json"},
                seconds=throughput_seconds,
            ),
        )

    # Memory first, on a process that has not yet been through a load run: after one, the
    # allocator holds freed memory that new sockets would quietly reuse.
    rss_before = descendants_rss(pid)
    started = time.monotonic()
    clients = Clients(ws_url, sockets, product["id"], client_processes)
    try:
        result["connect_seconds"] = round(time.monotonic() - started, 1)
        time.sleep(1.0)  # let the connections settle before reading memory
        result["memory_per_socket_kib"] = round(
            (descendants_rss(pid) - rss_before) / sockets / 1024, 1
        )
        print(
            f"  {sockets} sockets connected in {result['connect_seconds']} s, "
            f"{result['memory_per_socket_kib']} KiB each",
            flush=True,
        )

        latencies: list[int] = []
        slowest: list[int] = []
        missing = 0
        with httpx.Client(base_url=service.base_url, timeout=30) as http:
            for _ in range(rounds):
                version, created = _reserve(http, product["id"])
                times, lost = clients.wait_all(version)
                missing += lost
                round_latencies = [t - created for t in times]
                latencies += round_latencies
                slowest.append(max(round_latencies))
                time.sleep(1.0)  # rounds apart, so each is one change after a quiet spell
        result["delivery_ms"] = percentiles(latencies)
        result["delivery_missing"] = missing
        print(
            f"  delivery to every socket: p50 {result['delivery_ms']['p50']} "
            f"p99 {result['delivery_ms']['p99']} max {result['delivery_ms']['max']} ms",
            flush=True,
        )

        count, newest, last = asyncio.run(_burst(service.base_url, product["id"], 1000, 3.0))
        times, lost = clients.wait_all(newest)
        result["convergence"] = {
            "changes": count,
            "changes_per_second": round(count / 3.0),
            "after_last_change_ms": percentiles([t - last for t in times]),
            "missing": lost,
        }
        print(
            f"  {count} changes in 3 s; every socket on the final value "
            f"{result['convergence']['after_last_change_ms']['max']} ms after the last",
            flush=True,
        )

        loaded = reserve_load()
    finally:
        clients.close()
    _until_no_sockets(service)
    baseline = reserve_load()
    result["reserve_rps_without_sockets"] = round(baseline.rps)
    result["reserve_rps_with_sockets"] = round(loaded.rps)
    result["reserve_share_with_sockets"] = round(loaded.rps / baseline.rps, 3)
    print(
        f"  reservations/s: {baseline.rps:.0f} without sockets, {loaded.rps:.0f} with them",
        flush=True,
    )
    return result
