"""What an on-call engineer relies on: metrics that add up across processes, request ids in
responses and logs, JSON log lines, and the per-client reservation limit.

All against the real processes (two uvicorn workers where the claim is about several).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import web
from server.devtools.processes import Service, running
from tests.support import eventually

pytestmark = [
    pytest.mark.slow,
    # About the processes, not the database: SQLite suffices.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

REQUEST_ID = re.compile(r"^([0-9a-f]{6})-[0-9a-f]+$")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def reserve_on_a_new_connection(service: Service, product_id: int) -> httpx.Response:
    """One request per connection, so the kernel spreads them over the uvicorn workers."""
    async with service.client() as client:
        return await client.post("/api/reservations", json={"productId": product_id, "quantity": 1})


def process_of(response: httpx.Response) -> str:
    """Which web process answered: request ids start with a prefix of each process's own."""
    match = REQUEST_ID.match(response.headers["x-request-id"])
    assert match, response.headers["x-request-id"]
    return match.group(1)


async def test_metrics_add_up_over_the_web_processes(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(
        database_url, redis_url, tmp_path / "logs", worker=False, web_concurrency=2
    ) as service:
        product_id = (await service.new_product(1_000))["id"]
        sold_out = (await service.new_product(0))["id"]
        answered_by: Counter[str] = Counter()
        held = 0
        # Until both processes have answered some (and at least 20 in all).
        while len(answered_by) < 2 or held < 20:
            response = await reserve_on_a_new_connection(service, product_id)
            assert response.status_code == 201, response.text
            answered_by[process_of(response)] += 1
            held += 1
            assert held < 500, "the requests never reached the second process"
        refused = await reserve_on_a_new_connection(service, sold_out)
        assert refused.status_code == 409

        async def counted() -> bool:
            page = await scrape(service.metrics_url)
            return (
                value(page, "flashsale_reservations_total", outcome="held") == held
                and value(page, "flashsale_reservations_total", outcome="insufficient_stock") == 1
                and value(
                    page,
                    "flashsale_http_request_duration_seconds_count",
                    route="/api/reservations",
                    method="POST",
                    status="2xx",
                )
                == held
                # Each process's full collection at start-up, timed (server/infra/gcpauses.py).
                and value(page, "flashsale_gc_pause_seconds_count", generation="2") >= 2
            )

        # Each process writes its counts out within a second; /metrics adds them up.
        await eventually(counted, within=10, what=f"{held} held reservations in /metrics")


async def test_the_worker_serves_its_own_metrics(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(
        database_url, redis_url, tmp_path / "logs", web_concurrency=1, HOLD_SECONDS="0.5"
    ) as service:
        product_id = (await service.new_product(10))["id"]
        response = await reserve_on_a_new_connection(service, product_id)
        assert response.status_code == 201
        url = f"http://127.0.0.1:{service.worker.env['WORKER_METRICS_PORT']}/metrics"

        async def expired_by_a_job() -> bool:
            page = await scrape(url)
            return (
                value(page, "flashsale_holds_expired_total", by="job") == 1
                and value(page, "flashsale_expiry_lateness_seconds_count") == 1
            )

        await eventually(expired_by_a_job, within=15, what="the expiry in the worker's metrics")


async def test_request_ids_are_returned_and_logged_as_json_lines(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(
        database_url,
        redis_url,
        tmp_path / "logs",
        worker=False,
        web_concurrency=1,
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    ) as service:
        async with service.client() as client:
            mine = await client.get("/api/products", headers={"X-Request-ID": "lb-7f3a.2"})
            bad = await client.get("/api/products", headers={"X-Request-ID": "no spaces <b>"})
            missing = await client.get("/api/reservations/nonesuch")
        assert mine.headers["x-request-id"] == "lb-7f3a.2"  # a load balancer's id is kept
        assert REQUEST_ID.match(bad.headers["x-request-id"])  # a strange one is replaced
        assert missing.status_code == 404
        assert REQUEST_ID.match(missing.headers["x-request-id"])

        def lines() -> list[dict[str, object]]:
            text = service.web.log.read_text()
            return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

        async def logged() -> list[dict[str, object]]:
            """Both requests' lines, once both are written (the first alone is not done)."""
            wanted = {"lb-7f3a.2", missing.headers["x-request-id"]}
            found = [line for line in lines() if line.get("request_id") in wanted]
            return found if {line["request_id"] for line in found} == wanted else []

        found = await eventually(logged, within=30, what="the access log lines")
        by_id = {line["request_id"]: line for line in found}
        assert by_id["lb-7f3a.2"]["logger"] == "flashsale.access"
        assert str(by_id["lb-7f3a.2"]["message"]).startswith("GET /api/products 200 ")
        # A reservation id is logged as a prefix only: it is what lets someone act on a hold.
        assert str(by_id[missing.headers["x-request-id"]]["message"]).startswith(
            "GET /api/reservations/nonesu... 404 "
        )
        # Every line the web process wrote is JSON, uvicorn's own included.
        text = service.web.log.read_text().strip()
        for line in text.splitlines():
            record = json.loads(line)
            assert {"time", "level", "logger", "message"} <= record.keys()


async def test_the_reservation_limit_holds_across_processes(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(
        database_url,
        redis_url,
        tmp_path / "logs",
        worker=False,
        web_concurrency=2,
        RESERVE_RATE_LIMIT="5/60",
        RESERVE_RATE_LIMIT_WAIT_MS="5000",
    ) as service:
        product_id = (await service.new_product(100))["id"]
        # The limit counts per minute-long window: start well inside one.
        if time.time() % 60 > 50:
            await asyncio.sleep(60 - time.time() % 60)
        window = int(time.time() // 60)
        statuses: Counter[int] = Counter()
        refused_by: set[str] = set()
        while len(refused_by) < 2:  # until both processes have refused some
            response = await reserve_on_a_new_connection(service, product_id)
            statuses[response.status_code] += 1
            if response.status_code == 429:
                refused_by.add(process_of(response))
                body = response.json()
                assert body["code"] == "rate_limited"
                assert body["statusCode"] == 429
                assert 1 <= int(response.headers["retry-after"]) <= 60
                assert "try again in" in body["message"]
            assert sum(statuses.values()) < 300, "the requests never reached both processes"
        assert int(time.time() // 60) == window, "the run crossed a window: inconclusive"
        assert statuses[201] == 5, statuses
        assert set(statuses) == {201, 429}, statuses

        async with service.client() as client:
            product = (await client.get(f"/api/products/{product_id}")).json()
            # Reading is never limited, only reserving.
            assert product["availableStock"] == 95

        async def counted() -> bool:
            page = await scrape(service.metrics_url)
            return (
                value(page, "flashsale_reservations_total", outcome="rate_limited") == statuses[429]
            )

        await eventually(counted, within=10, what="the refusals in /metrics")


def _a_pid_that_has_exited() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_web_removes_its_metrics_directory_and_those_of_killed_runs(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The Procfile's `web` used to make a metrics directory per start and never remove it.
    Now it removes its own on the way out, and at start those whose web is gone."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    host = web._host()
    gone = _a_pid_that_has_exited()
    old = time.time() - 2 * web.UNOWNED_GRACE_SECONDS
    killed = temp / f"flashsale-metrics-{host}-{gone}-k1ll3d00"
    killed.mkdir()
    (killed / f"counter_{gone}.db").write_bytes(b"\0" * 16)
    from_the_old_procfile = temp / "flashsale-metrics.Ab12Cd"
    from_the_old_procfile.mkdir()
    (from_the_old_procfile / f"histogram_{gone}.db").write_bytes(b"\0" * 16)
    still_used = temp / "flashsale-metrics.Ef34Gh"  # a live writer: an old web still running
    still_used.mkdir()
    (still_used / f"counter_{os.getpid()}.db").write_bytes(b"\0" * 16)
    elsewhere = temp / f"flashsale-metrics-another.host-{gone}-zz99zz99"
    elsewhere.mkdir()
    for directory in (from_the_old_procfile, still_used):
        os.utime(directory, (old, old))

    with running(
        database_url,
        redis_url,
        tmp_path / "logs",
        worker=False,
        web_concurrency=2,
        TMPDIR=str(temp),
    ) as service:
        (ours,) = temp.glob(f"flashsale-metrics-{host}-{service.web.pid}-*")
        async with service.client() as client:
            assert (await client.get("/api/products")).status_code == 200
        # The workers write their values there, and /metrics reads them back.

        async def written() -> bool:
            return any(ours.glob("*.db"))

        await eventually(written, what="metric files in its directory")

        async def counted() -> bool:
            # Requests are written out within a second (metrics.Deferred).
            page = await scrape(service.metrics_url)
            count = value(
                page,
                "flashsale_http_request_duration_seconds_count",
                route="/api/products",
                method="GET",
                status="2xx",
            )
            return count >= 1

        await eventually(counted, what="the request in the metrics")
        assert not killed.exists()
        assert not from_the_old_procfile.exists()
        assert still_used.exists()
        assert elsewhere.exists()
    assert not ours.exists()


def listen_backlog(port: int) -> int:
    """The accept queue's length of the socket listening on `port` (`ss`: a listening
    socket's Send-Q is its backlog)."""
    lines = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert lines, f"nothing listens on {port}"
    return int(lines[2])


@pytest.mark.parametrize("backlog", ["", "1234"])
def test_the_web_listens_with_the_backlog_a_sale_s_first_second_needs(
    database_url: str, redis_url: str, tmp_path: Path, backlog: str
) -> None:
    """uvicorn's own default, 2,048, reset half of 10,000 shoppers connecting in one second
    (README, WEB_BACKLOG): the Procfile asks for 4,096 (the kernel caps it at somaxconn),
    or WEB_BACKLOG."""
    # Empty: unset, for the Procfile's ${WEB_BACKLOG:-4096}.
    logs = tmp_path / "logs"
    with running(
        database_url, redis_url, logs, worker=False, web_concurrency=1, WEB_BACKLOG=backlog
    ) as s:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        expected = int(backlog) if backlog else min(4096, somaxconn)
        assert listen_backlog(s.port) == min(expected, somaxconn)
