"""`python -m bench`: run the benchmark scenarios against the real stack, write a report.

Each run starts its own Redis, a fresh database (SQLite, or beside DATABASE_URL's PostgreSQL
database), the web and worker processes from the Procfile, and the bare Starlette baseline
under the same uvicorn command, and writes `bench/results/<time>/report.md` and
`results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench import fanout, paths, stack, wave, wrk
from server.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", default=["paths", "wave"], choices=["paths", "wave", "fanout"]
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--web-concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--holds", type=int, default=10_000, help="in the expiry wave")
    parser.add_argument(
        "--sockets", type=int, nargs="*", default=[1_000, 10_000], help="fan-out sizes"
    )
    args = parser.parse_args(argv)
    if "paths" in args.scenarios and not wrk.available():
        print("wrk is needed for the paths scenario (apt-get install wrk)", file=sys.stderr)
        return 2

    # Every socket is a file descriptor, here and in the processes started from here.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    work = out / "work"
    work.mkdir(parents=True)
    settings = Settings()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "web_concurrency": args.web_concurrency,
    }
    backend = "postgresql" if args.database_url.startswith("postgres") else "sqlite"
    report["database"] = backend
    print(f"benchmark: {backend}, WEB_CONCURRENCY={args.web_concurrency} → {out}", flush=True)
    with (
        stack.redis(work) as redis,
        stack.fresh_database(args.database_url, work) as database_url,
        stack.service(
            database_url,
            redis.url,
            work,
            web_concurrency=args.web_concurrency,
            HOLD_SECONDS="3600",
            LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        ) as service,
    ):
        if "paths" in args.scenarios:
            print(f"paths (wrk, {args.connections} connections, {args.seconds:g} s each):")
            with stack.bare(work, web_concurrency=args.web_concurrency) as bare:
                report["paths"] = paths.run(
                    service, bare, seconds=args.seconds, connections=args.connections
                )
        if "fanout" in args.scenarios:
            report["fanout"] = []
            for count in args.sockets:
                print(f"fan-out to {count} sockets:", flush=True)
                report["fanout"].append(
                    fanout.run(
                        service,
                        sockets=count,
                        client_processes=max(1, min(4, count // 1_000)),
                        throughput_seconds=args.seconds,
                    )
                )
        if "wave" in args.scenarios:
            print("expiry wave:", flush=True)
            report["wave"] = wave.run_sync(
                database_url, redis.url, holds=args.holds, bucket_ms=settings.expiry_bucket_ms
            )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark {report['started']}",
        "",
        f"`{report['command']}` — {report['database']}, WEB_CONCURRENCY="
        f"{report['web_concurrency']}, {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}",
        "",
    ]
    if "paths" in report:
        lines += [
            "| scenario | req/s | share of bare | p50 ms | p99 ms | CPU µs/req | statuses |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in report["paths"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in row["status"].items() if v)
            lines.append(
                f"| {row['scenario']} | {row['rps']:.0f} | {row['share_of_bare']:.0%} "
                f"| {row['p50_us'] / 1000:.2f} | {row['p99_us'] / 1000:.2f} "
                f"| {row['cpu_us_per_request'] or ''} | {statuses} |"
            )
        lines.append("")
    if "fanout" in report:
        lines += [
            "| sockets | KiB per socket | delivery p50 / p99 / max (ms) | missed | "
            "changes/s | final value, max ms after last change | reservations/s with / without |",
            "|---:|---:|---|---:|---:|---:|---|",
        ]
        for f in report["fanout"]:
            d, c = f["delivery_ms"], f["convergence"]
            lines.append(
                f"| {f['sockets']} | {f['memory_per_socket_kib']} | {d['p50']} / {d['p99']} / "
                f"{d['max']} | {f['delivery_missing']} | {c['changes_per_second']} | "
                f"{c['after_last_change_ms']['max']} | {f['reserve_rps_with_sockets']} / "
                f"{f['reserve_rps_without_sockets']} ({f['reserve_share_with_sockets']:.0%}) |"
            )
        lines.append("")
    if "wave" in report:
        w = report["wave"]
        r, a = w["restore_lateness_ms"], w["announce_lateness_ms"]
        lines += [
            f"Expiry wave: {w['holds']} holds due within one second "
            f"(jobs per {w['bucket_ms']} ms bucket); missed: {w['missed']}.",
            "",
            "| lateness (ms) | p50 | p90 | p99 | max |",
            "|---|---:|---:|---:|---:|",
            f"| units restored | {r.get('p50')} | {r.get('p90')} | {r.get('p99')} "
            f"| {r.get('max')} |",
            f"| EXPIRED frame received | {a.get('p50')} | {a.get('p90')} | {a.get('p99')} "
            f"| {a.get('max')} |",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
