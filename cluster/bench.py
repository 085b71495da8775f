"""`bin/cluster bench`: what the edge and a second app host cost and give, measured on a
cluster of its own (`fsb`, 10.214.16.0/24), with bench/'s own scenarios and load generators.

- **The bare endpoint behind the same edge.** Each app host also runs bench/bare.py under
  the Procfile's `web` command (two processes, port 8001, as bench/stack.py runs it), and
  the edge balances it exactly as it balances the service (its own frontend on :8080; the
  same defaults, `X-Forwarded-For`, health checks, `X-Edge-Server`). wrk drives it from
  this machine, the shoppers' side of the bridge. Its mean of before and after each
  configuration is what the storm and the steady shop are shares of.
- **One app host, then two.** With one, app2 is stopped and in maintenance at the edge;
  with two, both serve. On a machine with two cores the totals cannot grow with a second
  host (the same cores run both), so the figures to compare are the shares.
- **The hop.** The bare endpoint on app1 measured directly and through the edge: latency
  on one connection (what a lone request pays for the extra hop) and throughput on 64.
- **The storm** (bench/storm.py) and **the steady shop** (bench/steady.py) through the edge,
  with their own checks (exactly the units held, no 5xx, the stock invariant, no leak).
- **A Redis failover**: the drill `redis-failover` (cluster/drills.py) a few times; from
  the primary's SIGKILL to the Sentinels' promotion, to the first live event through the
  new primary, and to every page getting changes within a second again.

The results go to `bench/results/cluster-<time>/` (`report.md`, `results.json`), the same
tables as bin/bench's for the storm and the steady shop (bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import secrets
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

from bench import report as bench_report
from bench import steady, storm, wrk
from bench.stack import ONE_ADDRESS_FOR_ALL, bare_command, cpu_seconds
from cluster import drills, network
from cluster.hosts import Cluster, wait_until
from cluster.network import Host, Topology

TOPOLOGY = Topology(prefix="fsb", subnet="10.214.16")
BARE_PORT = 8001
BARE_EDGE_PORT = 8080
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"

# The bare endpoint at the edge: what the service's `shop` frontend and `app` backend do to
# a request (cluster/hosts.py), and nothing else.
EDGE_BARE = """
frontend bare
    bind {edge}:{port}
    option forwardfor
    default_backend bare

backend bare
    balance leastconn
    option httpchk GET /
    default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 2
{servers}
    http-response set-header X-Edge-Server %[srv_name]
"""


class Edge:
    """The service through the edge, as bench/'s scenarios drive it (bench.stack.Target)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @property
    def base_url(self) -> str:
        return self.cluster.edge_url

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cluster.admin_token}"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bin/cluster bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shoppers", type=int, default=5_000, help="storm shoppers (5,000)")
    parser.add_argument("--sockets", type=int, default=1_000, help="storm sockets (1,000)")
    parser.add_argument("--units", type=int, default=100, help="storm units (100)")
    parser.add_argument(
        "--storm-lead",
        type=float,
        help="seconds from making the storm's product to its sale's start, for opening the "
        "sockets and the shoppers' connections (3 + 1.5 s per 1,000 of them); the "
        "shoppers' are opened 2 + 1 s per 1,000 before the start, since the edge closes a "
        "connection that has sent no request for 10 s",
    )
    parser.add_argument(
        "--shoppers-ahead",
        type=float,
        help="seconds before the start to open the shoppers' connections (2 + 1 per 1,000); "
        "under 10, when the edge closes a connection that has sent no request",
    )
    parser.add_argument(
        "--hosts", default="1,2", help="the configurations: app hosts behind the edge (1,2)"
    )
    parser.add_argument("--no-hop", action="store_true", help="leave the hop out")
    parser.add_argument("--seconds", type=float, default=10, help="each wrk run (10 s)")
    parser.add_argument("--steady-seconds", type=float, default=60, help="steady shop (60 s)")
    parser.add_argument("--failovers", type=int, default=3, help="Redis failovers (3)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.shoppers, args.sockets, args.seconds = 500, 200, 2
        args.steady_seconds, args.failovers = 8, 1

    out = RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    app_hosts = TOPOLOGY.app_hosts
    cluster = Cluster(
        TOPOLOGY,
        settings={**ONE_ADDRESS_FOR_ALL, "HOLD_SECONDS": "3600"},
        admin_token=secrets.token_hex(12),
        say=lambda line: print(f"  {line}", flush=True),
        edge_extra=EDGE_BARE.format(
            edge=TOPOLOGY.edge.address,
            port=BARE_EDGE_PORT,
            servers="\n".join(
                f"    server {h.name} {h.address}:{BARE_PORT} check" for h in app_hosts
            ),
        ),
    )
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "bin/cluster bench " + " ".join(argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # The cores are shared: what else ran shows here (1-minute load average).
            "load_at_start": round(os.getloadavg()[0], 1),
        },
        "quick": args.quick,
        "connections": 64,
        "configs": [],
    }
    started = time.monotonic()
    print(f"== cluster up ({TOPOLOGY.prefix}, {TOPOLOGY.subnet}.0/24) → {out}", flush=True)
    failed = False
    try:
        cluster.up()
        bench = Bench(cluster, args)
        if not args.no_hop:
            print("== the hop: the bare endpoint on app1, directly and through the edge")
            bench.serve(1, hold_seconds=3600)
            result["hop"] = bench.hop()
        for count in (int(n) for n in args.hosts.split(",")):
            result["configs"].append(bench.configuration(count))
        print(f"== Redis failover ×{args.failovers} (the drill redis-failover)", flush=True)
        bench.serve(2, hold_seconds=drills.HOLD_SECONDS, **drills.SETTINGS)
        result["failover"] = bench.failovers(args.failovers)
    except BaseException:
        failed = True
        traceback.print_exc()
        print(cluster.log_tails(), flush=True)
    finally:
        print("== cluster down", flush=True)
        cluster.down()
    result["duration_s"] = round(time.monotonic() - started)
    result["machine"]["load_at_end"] = round(os.getloadavg()[0], 1)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if failed:
        print(f"the benchmark failed; what it measured is in {out / 'results.json'}")
        return 1
    text = bench_report.cluster_markdown(result)
    (out / "report.md").write_text(text)
    print("\n" + text)
    print(f"report: {out / 'report.md'}")
    return 0


class Bench:
    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.edge = Edge(cluster)
        self.bare_edge_url = f"http://{TOPOLOGY.edge.address}:{BARE_EDGE_PORT}"

    # -- what runs where ---------------------------------------------------------------

    def serve(self, count: int, *, hold_seconds: int, **settings: str) -> None:
        """The first `count` app hosts serving (the service, its worker and the bare
        endpoint), started afresh with these settings; the others stopped and in
        maintenance at the edge. Returns once the edge has the serving ones in service."""
        self.cluster.settings.update({"HOLD_SECONDS": str(hold_seconds), **settings})
        serving = TOPOLOGY.app_hosts[:count]
        for host in TOPOLOGY.app_hosts:
            for server in self._servers(host):
                self.cluster.edge_command(f"set server {server} state maint")
            network.stop_all(host)
        for host in serving:
            self.cluster.start_app(host)
            self.cluster.spawn(host, "bare", ["bash", "-c", bare_command()], env=self._bare_env())
        for host in serving:
            self.cluster.wait_app_ready(host)
            wait_until(
                functools.partial(_answers, f"http://{host.address}:{BARE_PORT}/"),
                f"the bare endpoint on {host.name}",
                30,
            )
            for server in self._servers(host):
                self.cluster.edge_command(f"set server {server} state ready")
        for backend in ("app", "bare"):
            self.cluster.wait_in_service(serving, backend=backend)
        names = ", ".join(h.name for h in serving)
        print(f"  serving: {names} (HOLD_SECONDS={hold_seconds})", flush=True)

    @staticmethod
    def _servers(host: Host) -> list[str]:
        """The host's entries at the edge: in the service's backends (`live` follows `app`
        by tracking, but not its panic entries, which have no checks: a stopped host's
        would take requests in panic mode and refuse them), and the bare endpoint's."""
        name = host.name
        return [f"app/{name}", f"app/{name}-panic", f"live/{name}-panic", f"bare/{name}"]

    def _bare_env(self) -> dict[str, str]:
        env = self.cluster.app_env()
        env.update({"PORT": str(BARE_PORT), "WEB_METRICS_PORT": "0"})
        return env

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the app hosts' web processes (uvicorn's and its workers),
        and of their workers; the bare endpoint's left out."""
        web = worker = 0.0
        for host in TOPOLOGY.app_hosts:
            for pid in network.pids(host):
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except FileNotFoundError:
                    continue
                if b"server.api.app:create_app" in command:
                    web += cpu_seconds(pid)  # with its children, uvicorn's workers
                elif command[1:3] == [b"-m", b"jobs"]:
                    worker += cpu_seconds(pid)
        return web, worker

    # -- measurements ------------------------------------------------------------------

    def bare(self, label: str) -> wrk.Result:
        found = wrk.run(self.bare_edge_url, wrk.Load("/", seconds=self.args.seconds))
        print(
            f"  bare endpoint behind the edge ({label}): {found.rps:,.0f} req/s, "
            f"p99 {found.p99_us / 1000:.2f} ms",
            flush=True,
        )
        return found

    def hop(self, rounds: int = 3) -> dict[str, Any]:
        """The bare endpoint on app1, directly and through the edge: one connection
        (latency of a lone request) and 64 (throughput). The two alternate, `rounds` times
        each, a third of `--seconds` a run, and each figure is the median of its runs: on
        shared cores a single run measures whatever else ran then as much as the hop."""
        direct = f"http://{TOPOLOGY.app_hosts[0].address}:{BARE_PORT}"
        seconds = max(1.0, self.args.seconds / rounds)
        found: dict[str, Any] = {}
        for connections in (1, 64):
            runs: dict[str, list[wrk.Result]] = {"direct": [], "edge": []}
            for _ in range(rounds):
                for name, url in (("direct", direct), ("edge", self.bare_edge_url)):
                    load = wrk.Load("/", connections=connections, seconds=seconds)
                    runs[name].append(wrk.run(url, load))
            for name, results in runs.items():
                median = {
                    key: statistics.median(getattr(r, key) for r in results)
                    for key in ("p50_us", "p90_us", "p99_us", "max_us")
                }
                rps = statistics.median(r.rps for r in results)
                found[f"{name}_c{connections}"] = {
                    **median,
                    "rps": round(rps, 1),
                    "runs": [r.as_dict() for r in results],
                }
                print(
                    f"  {name}, {connections} connection(s), median of {rounds}: {rps:,.0f} "
                    f"req/s, p50 {median['p50_us'] / 1000:.2f} ms, "
                    f"p99 {median['p99_us'] / 1000:.2f} ms",
                    flush=True,
                )
        return found

    def configuration(self, count: int) -> dict[str, Any]:
        label = f"{count} app host{'s' if count > 1 else ''}"
        print(f"== {label} behind the edge", flush=True)
        config: dict[str, Any] = {
            "name": f"edge-{count}",
            "label": label,
            "app_hosts": count,
        }
        self.serve(count, hold_seconds=3600)
        before = self.bare(label)
        print(
            f"  storm: {self.args.shoppers:,} shoppers, {self.args.sockets:,} sockets", flush=True
        )
        config["storm"] = storm.run(
            self.edge,
            shoppers=self.args.shoppers,
            sockets=self.args.sockets,
            units=self.args.units,
            lead_seconds=self.args.storm_lead
            or 3 + 1.5 * (self.args.shoppers + self.args.sockets) / 1_000,
            # Well inside the edge's 10 s for a connection's first request.
            shoppers_ahead=self.args.shoppers_ahead or 2 + self.args.shoppers / 1_000,
        )
        hold = 3 if self.args.quick else 10
        self.serve(count, hold_seconds=hold)
        print(f"  steady shop: {self.args.steady_seconds:g} s", flush=True)
        config["steady"] = steady.run(
            self.edge,
            seconds=self.args.steady_seconds,
            hold_seconds=hold,
            sweep_seconds=2,
            cpu=self.cpu,
        )
        after = self.bare(label)
        mean = (before.rps + after.rps) / 2
        config["bare"] = {
            "before": round(before.rps),
            "after": round(after.rps),
            "rps": round(mean),
            "p99_us": before.p99_us,
        }
        for scenario in ("storm", "steady"):
            config[scenario]["share_of_bare"] = round(config[scenario]["rps"] / mean, 3)
        return config

    def failovers(self, times: int) -> dict[str, Any]:
        report = drills.Report()
        runner = drills.Drills(self.cluster, report)
        asyncio.run(runner.run(["redis-failover"] * times))
        failed = [c for c in report.checks if not c.passed]
        runs = runner.failovers
        summary: dict[str, Any] = {"runs": runs, "checks_failed": [c.what for c in failed]}
        for name in ("promoted", "first_event", "live_again"):
            values = [v for r in runs if (v := r[name]) is not None]
            summary[name] = (
                {
                    "median": round(statistics.median(values), 2),
                    "min": round(min(values), 2),
                    "max": round(max(values), 2),
                }
                if values
                else None
            )
        return summary


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(argv: list[str]) -> int:
    """Under the cluster's lock, from cluster/__main__.py."""
    if network.exists(TOPOLOGY):
        print(f"a cluster {TOPOLOGY.prefix!r} is there already: removing it", flush=True)
        Cluster(TOPOLOGY).down()
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
