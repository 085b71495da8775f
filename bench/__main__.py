"""`python -m bench` (or `bin/bench`): the flash-sale benchmark, one command.

By default it runs the whole matrix: the scenarios storm, paths, wave and steady on SQLite
with one and with two web processes, and on PostgreSQL when DATABASE_URL or --database-url
names one, plus fanout (1,000 and 10,000 sockets) on the first configuration (SQLite, one
web process). Each configuration starts its own Redis, a fresh database (SQLite, or a
database created beside the PostgreSQL one named, dropped afterwards), the web and worker
processes from the Procfile, and the bare Starlette baseline under the same uvicorn command.
Results go to bench/results/<time>/: report.md, results.json and PNG charts.

`bin/bench history` (not part of the default run: it takes about 20 minutes with PostgreSQL)
measures what a month of sales costs: on each configuration (SQLite, W=1, and PostgreSQL,
W=1, when a URL is given) it runs the paths (with (d), completing holds), the expiry wave,
pages opening /ws and the operator console's requests on an empty database, then again on
databases loaded with 100,000 and 1,000,000 past holds (bench/history.py), and reports each
figure beside the empty database's of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import (
    charts,
    fanout,
    history,
    paths,
    protocol,
    stack,
    steady,
    storm,
    waitingroom,
    wave,
    webhooks,
    wrk,
)
from bench.report import evaluate, markdown
from server.devtools import history as past
from server.devtools.processes import Service
from server.infra.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SCENARIOS = ["storm", "paths", "wave", "webhooks", "steady", "fanout"]
SCENARIOS = [*DEFAULT_SCENARIOS, "shoppers", "keys", "queue", "history"]
CONFIGS = ["sqlite-w1", "sqlite-w2", "postgresql-w1", "postgresql-w2"]


@dataclass(frozen=True)
class Config:
    database: str  # "sqlite" or "postgresql"
    web_concurrency: int

    @classmethod
    def parse(cls, name: str) -> Config:
        database, _, workers = name.partition("-w")
        return cls(database, int(workers))

    @property
    def name(self) -> str:
        return f"{self.database}-w{self.web_concurrency}"

    @property
    def label(self) -> str:
        db = "SQLite" if self.database == "sqlite" else "PostgreSQL"
        return f"{db}, W={self.web_concurrency}"


@dataclass(frozen=True)
class Sizes:
    seconds: float  # per wrk run
    connections: int
    holds: int  # in the expiry wave
    sockets: list[int]  # fan-out sizes
    fanout_rounds: int
    storm_shoppers: int
    storm_sockets: int
    storm_units: int
    storm_lead: float | None
    steady_seconds: float
    steady_hold_seconds: float
    history_holds: list[int]  # past holds to load, after the empty run
    history_products: int  # 0: one per 100 holds
    history_backlog: bool  # load every key, unswept (the default: swept, as a service leaves it)
    socket_seconds: float  # pages opening /ws, in the history scenario
    queue_early: int  # shoppers joining the waiting room in the minute before the start
    queue_late: int  # and in its first second
    queue_minute: float  # that minute, in seconds
    queue_history: bool  # load a month of past sales (holds and rooms) before the scenarios
    history_rooms: int  # past sales with a waiting room in that month
    history_tickets: int  # ended tickets per past room


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bin/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default, or all: every one but history)",
    )
    parser.add_argument(
        "--configs",
        help=f"comma list of {', '.join(CONFIGS)} (default: sqlite-w1,sqlite-w2, and "
        "postgresql-w1 when a PostgreSQL URL is given)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="a PostgreSQL server to benchmark on, e.g. postgresql://postgres@127.0.0.1:5432/"
        "test (a fresh database is created beside it and dropped afterwards); default "
        "$DATABASE_URL",
    )
    parser.add_argument(
        "--web-concurrency",
        type=int,
        help="run one configuration with this many web processes (on PostgreSQL when a URL "
        "is given), instead of the matrix",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and short runs: a smoke test"
    )
    parser.add_argument("--seconds", type=float, help="per wrk run (default 10; quick 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk's (default 64)")
    parser.add_argument("--holds", type=int, help="in the expiry wave (default 10,000)")
    parser.add_argument("--sockets", type=int, nargs="*", help="fan-out sizes (1,000 10,000)")
    parser.add_argument("--storm-shoppers", type=int, help="default 5,000")
    parser.add_argument("--storm-sockets", type=int, help="default 5,000")
    parser.add_argument("--storm-units", type=int, default=100)
    parser.add_argument(
        "--storm-lead", type=float, help="seconds from creating the product to the sale's start"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service under test, e.g. --set MAX_IN_FLIGHT=20000 (repeatable)",
    )
    parser.add_argument(
        "--queue-early",
        type=int,
        help="queue: shoppers joining in the minute before the start (default 5,000)",
    )
    parser.add_argument(
        "--queue-late", type=int, help="queue: shoppers joining in its first second (10,000)"
    )
    parser.add_argument(
        "--queue-minute",
        type=float,
        help="queue: the minute before the start, in seconds (default 60; quick 10)",
    )
    parser.add_argument(
        "--queue-history",
        action="store_true",
        help="queue: load a month of past sales into each configuration's fresh database "
        "first (the largest --history-holds, default 1,000,000 holds, and --history-rooms "
        "past waiting rooms of --history-tickets ended tickets each); every scenario of the "
        "run then has it",
    )
    parser.add_argument(
        "--history-rooms",
        type=int,
        help="past sales with a waiting room in a loaded month (default 30 with "
        "--queue-history; quick 3)",
    )
    parser.add_argument(
        "--history-tickets",
        type=int,
        help="ended tickets per past waiting room (default 15,000; quick 1,500)",
    )
    parser.add_argument("--steady-seconds", type=float, help="default 60")
    parser.add_argument(
        "--steady-hold-seconds", type=float, help="HOLD_SECONDS in the steady shop (default 10)"
    )
    parser.add_argument(
        "--history-holds",
        type=int,
        nargs="*",
        help="past holds to load for the history scenario (default 100,000 1,000,000; quick "
        "2,000 20,000)",
    )
    parser.add_argument(
        "--history-products",
        type=int,
        default=0,
        help="products of every history database, the empty one's too (default: one per 100 "
        "holds of the largest history)",
    )
    parser.add_argument(
        "--history-backlog",
        action="store_true",
        help="load the month with every idempotency key, for the worker to sweep during the "
        "run (a worker down for days), instead of as a running service leaves it",
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - {*SCENARIOS, "all"}
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {SCENARIOS}")
    if not args.scenarios or "all" in args.scenarios:
        args.scenarios = sorted(
            {*DEFAULT_SCENARIOS, *(s for s in args.scenarios if s != "all")}, key=SCENARIOS.index
        )
    postgres = args.database_url.startswith("postgres")
    if args.configs:
        args.configs = [Config.parse(c.strip()) for c in args.configs.split(",") if c.strip()]
        bad = [c.name for c in args.configs if c.name not in CONFIGS]
        if bad:
            parser.error(f"unknown configuration {', '.join(bad)}; choose from {CONFIGS}")
    elif args.web_concurrency:
        args.configs = [Config("postgresql" if postgres else "sqlite", args.web_concurrency)]
    else:
        args.configs = [Config("sqlite", 1), Config("sqlite", 2)]
        if postgres:
            args.configs.append(Config("postgresql", 1))
    try:
        args.settings = dict(item.split("=", 1) for item in args.set)
    except ValueError:
        parser.error("--set takes NAME=VALUE")
    if any(c.database == "postgresql" for c in args.configs) and not postgres:
        parser.error("a postgresql configuration needs --database-url or DATABASE_URL")
    return args


def sizes(args: argparse.Namespace) -> Sizes:
    quick = args.quick

    def pick(given: Any, full: Any, small: Any) -> Any:
        return given if given is not None else (small if quick else full)

    return Sizes(
        seconds=pick(args.seconds, 10.0, 2.0),
        connections=args.connections,
        holds=pick(args.holds, 10_000, 1_000),
        sockets=pick(args.sockets, [1_000, 10_000], [200, 1_000]),
        fanout_rounds=5 if quick else fanout.ROUNDS,
        storm_shoppers=pick(args.storm_shoppers, 5_000, 500),
        storm_sockets=pick(args.storm_sockets, 5_000, 500),
        storm_units=args.storm_units,
        storm_lead=args.storm_lead,
        steady_seconds=pick(args.steady_seconds, 60.0, 8.0),
        steady_hold_seconds=pick(args.steady_hold_seconds, 10.0, 3.0),
        history_holds=pick(args.history_holds, [100_000, 1_000_000], [2_000, 20_000]),
        history_products=args.history_products,
        history_backlog=args.history_backlog,
        socket_seconds=5.0 if not quick else 2.0,
        queue_early=pick(args.queue_early, 5_000, 500),
        queue_late=pick(args.queue_late, 10_000, 1_000),
        queue_minute=pick(args.queue_minute, 60.0, 10.0),
        queue_history=args.queue_history,
        history_rooms=pick(args.history_rooms, 30, 3),
        history_tickets=pick(args.history_tickets, 15_000, 1_500),
    )


class Progress:
    """`[3/14 2m05s] SQLite, W=1 · paths` lines, so a long run shows where it is."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done, self.started = steps, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = int(time.monotonic() - self.started)
        print(
            f"\n[{self.done}/{self.steps} {elapsed // 60}m{elapsed % 60:02d}s] {what}", flush=True
        )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["protocol"]:  # the HTTP protocols' cost, on its own (bench/protocol.py)
        return protocol.main(given[1:])
    args = parse(argv)
    size = sizes(args)
    if not wrk.available():  # every configuration measures the bare endpoint with it
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2

    # Every socket is a file descriptor, here and in the processes started from here (the
    # waiting room's 15,000 pages are 30,000 of them in one web process: more than a usual
    # hard limit, which root may raise).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65_536), max(hard, 65_536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    settings = Settings()
    per_config = [s for s in args.scenarios if s not in ("fanout", "history")]
    fanout_sizes = size.sockets if "fanout" in args.scenarios else []
    history_runs = (1 + len(size.history_holds)) if "history" in args.scenarios else 0
    progress = Progress(
        # `shoppers` is two storms: one step each.
        (len(args.configs) * (1 + len(per_config) + ("shoppers" in per_config)))
        if per_config or fanout_sizes
        else 0 + len(fanout_sizes) + len(args.configs) * history_runs * HISTORY_STEPS
    )
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "bin/bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "connections": size.connections,
        "sizes": size.__dict__,
        "settings": args.settings,
        "configs": [],
    }
    print(
        f"benchmark: {', '.join(args.scenarios)} on {', '.join(c.label for c in args.configs)}"
        f"{' (quick)' if args.quick else ''} → {out}",
        flush=True,
    )
    started = time.monotonic()
    for index, config in enumerate(args.configs if per_config or fanout_sizes else []):
        result = run_config(
            config,
            per_config,
            fanout_sizes if index == 0 else [],
            args.database_url,
            size,
            settings,
            out / "work" / config.name,
            progress,
            args.settings,
        )
        report["configs"].append(result["config"])
        if "fanout" in result:
            report["fanout"] = result["fanout"]
    if history_runs:
        for config in args.configs:
            report["configs"] += run_history(
                config,
                args.database_url,
                size,
                settings,
                out / "work",
                progress,
                args.settings,
                # What is measured so far, in case a later run fails.
                lambda runs: (out / "partial.json").write_text(
                    json.dumps({**report, "configs": report["configs"] + runs}, indent=1)
                ),
            )
    report["duration_s"] = round(time.monotonic() - started)
    report["goals"] = evaluate(report)
    drawn = charts.draw_all(report, out)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report, drawn))
    met = sum(g["met"] for g in report["goals"])
    print(f"\ngoals met: {met} of {len(report['goals'])}")
    for goal in report["goals"]:
        if not goal["met"]:
            print(f"  missed: {goal['goal']} ({goal['config']}): {goal['measured']}")
    print(f"report: {out / 'report.md'}")
    return 0


def run_config(
    config: Config,
    scenarios: list[str],
    fanout_sizes: list[int],
    database_url: str,
    size: Sizes,
    settings: Settings,
    work: Path,
    progress: Progress,
    overrides: dict[str, str],
) -> dict[str, Any]:
    work.mkdir(parents=True)
    result: dict[str, Any] = {
        "name": config.name,
        "label": config.label,
        "database": config.database,
        "web_concurrency": config.web_concurrency,
    }
    url = database_url if config.database == "postgresql" else ""
    log_level = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    bare_load = wrk.Load("/", connections=size.connections, seconds=size.seconds)
    fanned: dict[str, Any] = {}
    with (
        stack.redis(work) as redis,
        stack.fresh_database(url, work) as db_url,
        stack.bare(work, web_concurrency=config.web_concurrency) as bare,
    ):
        progress.step(f"{config.label} · bare endpoint")
        if size.queue_history:
            result["queue_history"] = load_month(db_url, size)
            result["label"] += ", a month of history"
        before = wrk.run(bare.base_url, bare_load)
        print(f"  {before.rps:,.0f} req/s, p99 {before.p99_us / 1000:.2f} ms", flush=True)
        after = None
        with stack.service(
            db_url,
            redis.url,
            work,
            web_concurrency=config.web_concurrency,
            **{"HOLD_SECONDS": "3600", "LOG_LEVEL": log_level, **overrides},
        ) as service:
            # The storm, and again with each shopper a distinct one (the cookie the shop page
            # sets, then signed in by the shop, issue 16: run `storm shoppers` to have both
            # beside the anonymous one), and with every request carrying an Idempotency-Key
            # of its own (what the fast refusal costs when each promise may be a retry of a
            # hold already made).
            storms: list[tuple[str, str, str, dict[str, Any]]] = [
                ("storm", "storm", "storm", {}),
                *(
                    (
                        "shoppers",
                        f"storm_{kind}",
                        f"storm, shoppers identified by {kind}",
                        {"shopper_kind": kind},
                    )
                    for kind in ("cookie", "jwt")
                ),
                (
                    "keys",
                    "storm_keys",
                    "storm, every request with an Idempotency-Key",
                    {"keys": True},
                ),
            ]
            for scenario, name, label, variant in storms:
                if scenario in scenarios:
                    progress.step(f"{config.label} · {label}")
                    result[name] = storm.run(
                        service,
                        shoppers=size.storm_shoppers,
                        sockets=size.storm_sockets,
                        units=size.storm_units,
                        lead_seconds=size.storm_lead,
                        **variant,
                    )
            if "paths" in scenarios:
                progress.step(f"{config.label} · paths")
                result["paths"] = paths.run(
                    service,
                    bare,
                    seconds=size.seconds,
                    connections=size.connections,
                    bare_before=before,
                    database_url=db_url,
                )
                after = next(r for r in result["paths"] if r["scenario"].endswith("(after)"))
            if "wave" in scenarios:
                progress.step(f"{config.label} · expiry wave")
                result["wave"] = wave.run_sync(
                    db_url,
                    redis.url,
                    holds=size.holds,
                    bucket_ms=settings.expiry_bucket_ms,
                    cpu_of=wave_processes(service),
                )
            if "webhooks" in scenarios:
                progress.step(f"{config.label} · webhooks")

                def wave_again() -> Any:
                    # The expiry wave again, its 10,000 holds' events going out meanwhile:
                    # delivery must not delay expiry.
                    return wave.run_sync(
                        db_url,
                        redis.url,
                        holds=size.holds,
                        bucket_ms=settings.expiry_bucket_ms,
                        cpu_of=wave_processes(service),
                    )

                result["webhooks"] = webhooks.run(
                    service,
                    work,
                    db_url,
                    bare_rps=before.rps,
                    then=wave_again if "wave" in scenarios else None,
                )
        runs = []
        for count in fanout_sizes:
            progress.step(f"{config.label} · fan-out to {count:,} sockets")
            # A service of its own: memory per socket is read against a fresh process.
            with stack.service(
                db_url,
                redis.url,
                work / f"fanout-{count}",
                web_concurrency=config.web_concurrency,
                **{"HOLD_SECONDS": "3600", "LOG_LEVEL": log_level, **overrides},
            ) as fresh:
                runs.append(
                    fanout.run(
                        fresh,
                        sockets=count,
                        client_processes=max(1, min(4, count // 1_000)),
                        throughput_seconds=size.seconds,
                        rounds=size.fanout_rounds,
                    )
                )
        if runs:
            fanned = {"label": config.label, "config": config.name, "runs": runs}
        if "queue" in scenarios:
            progress.step(
                f"{config.label} · waiting room ({size.queue_early:,} join in the "
                f"{size.queue_minute:g} s before the start, {size.queue_late:,} in its first "
                "second)"
            )
            # A service of its own: every page is a socket (more than WS_MAX_CLIENTS'
            # default) and all come from one address.
            with stack.service(
                db_url,
                redis.url,
                work / "queue",
                web_concurrency=config.web_concurrency,
                **{
                    "HOLD_SECONDS": "3600",
                    "LOG_LEVEL": log_level,
                    **waitingroom.SETTINGS,
                    **overrides,
                },
            ) as service:
                result["queue"] = waitingroom.run(
                    service,
                    early=size.queue_early,
                    late=size.queue_late,
                    units=size.storm_units,
                    minute_seconds=size.queue_minute,
                )
        if "steady" in scenarios:
            progress.step(
                f"{config.label} · steady shop ({size.steady_seconds:g} s, "
                f"HOLD_SECONDS={size.steady_hold_seconds:g})"
            )
            with stack.service(
                db_url,
                redis.url,
                work / "steady",
                web_concurrency=config.web_concurrency,
                **{
                    "LOG_LEVEL": log_level,
                    **overrides,
                    "HOLD_SECONDS": str(size.steady_hold_seconds),
                },
            ) as service:
                result["steady"] = steady.run(
                    service,
                    seconds=size.steady_seconds,
                    hold_seconds=size.steady_hold_seconds,
                    connections=size.connections,
                    sweep_seconds=settings.sweep_seconds,
                )
        after_rps = wrk.run(bare.base_url, bare_load).rps if after is None else after["rps"]
    for leftover in work.glob("bench.db*"):  # the SQLite file: up to gigabytes, not needed
        leftover.unlink()
    bare_rps = (before.rps + after_rps) / 2
    result["bare"] = {
        "before": round(before.rps),
        "after": round(after_rps),
        "rps": round(bare_rps),
        "p99_us": before.p99_us,
    }
    if "steady" in result:
        result["steady"]["share_of_bare"] = round(result["steady"]["rps"] / bare_rps, 3)
    for name in ("storm", "storm_cookie", "storm_jwt", "storm_keys"):
        if name in result:
            result[name]["share_of_bare"] = round(result[name]["rps"] / bare_rps, 3)
    if fanned:
        fanned["bare_rps"] = round(bare_rps)
    return {"config": result, **({"fanout": fanned} if fanned else {})}


def load_month(db_url: str, size: Sizes) -> dict[str, Any]:
    """`--queue-history`: a month of past sales, loaded into the fresh database before any
    scenario (the largest history size's holds, over its catalog, with `history_rooms` past
    waiting rooms); what was loaded, for the report."""
    month = past.History(
        holds=max(size.history_holds, default=1_000_000),
        products=_history_catalog(size),
        swept=not size.history_backlog,
        rooms=size.history_rooms,
        tickets_per_room=size.history_tickets,
    )
    loaded = past.load(db_url, month)
    summary = loaded.summary()
    print(
        f"  a month of history: {summary['holds']:,} holds over {summary['products']:,} "
        f"products, {summary['rooms']} past waiting rooms with {summary['tickets']:,} ended "
        f"tickets, loaded in {loaded.seconds:.1f} s",
        flush=True,
    )
    return {"loaded": summary}


HISTORY_STEPS = 4  # progress lines per database state: load and bare, wave, paths, pages


def run_history(
    config: Config,
    database_url: str,
    size: Sizes,
    settings: Settings,
    work: Path,
    progress: Progress,
    overrides: dict[str, str],
    save: Callable[[list[dict[str, Any]]], object],
) -> list[dict[str, Any]]:
    """The history scenario on one configuration: the empty database first, then each
    history size on a database of its own; every figure also as a share of the empty one's.
    `save` is given the runs so far after each one."""
    runs: list[dict[str, Any]] = []
    for holds in [0, *size.history_holds]:
        tag = "empty" if holds == 0 else f"h{holds}"
        runs.append(
            _history_run(
                config,
                holds,
                database_url,
                size,
                settings,
                work / f"{config.name}-{tag}",
                progress,
                overrides,
            )
        )
        save(runs)
    empty = runs[0]
    for run in runs:
        run["history"]["vs_empty"] = history_ratios(run, empty)
    return runs


def _history_catalog(size: Sizes) -> int:
    """The products every history database has, the empty one's included, so that every
    run serves the same catalog: `--history-products`, or one per 100 holds of the largest
    history."""
    return size.history_products or max(1, max(size.history_holds, default=0) // 100)


def _history_run(
    config: Config,
    holds: int,
    database_url: str,
    size: Sizes,
    settings: Settings,
    work: Path,
    progress: Progress,
    overrides: dict[str, str],
) -> dict[str, Any]:
    work.mkdir(parents=True)
    state = "an empty database" if not holds else f"{holds:,} past holds"
    result: dict[str, Any] = {
        "name": f"{config.name}-{'empty' if not holds else f'h{holds}'}",
        "label": f"{config.label}, {'no history' if not holds else f'{holds:,} past holds'}",
        "database": config.database,
        "web_concurrency": config.web_concurrency,
        "history": {"holds": holds},
    }
    url = database_url if config.database == "postgresql" else ""
    log_level = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    bare_load = wrk.Load("/", connections=size.connections, seconds=size.seconds)
    backlog: list[dict[str, Any]] = []
    with (
        stack.redis(work) as redis,
        stack.fresh_database(url, work) as db_url,
        stack.bare(work, web_concurrency=config.web_concurrency) as bare,
    ):
        progress.step(f"{config.label} · history: {state}, loading and bare endpoint")
        if holds:
            month = past.History(
                holds=holds, products=_history_catalog(size), swept=not size.history_backlog
            )
            loaded = past.load(db_url, month)
        else:
            # The same catalog without its past holds: the empty database's pages and
            # snapshots then carry as many products as the history's, so the shares compare
            # what the holds cost, not the size of a page.
            loaded = past.load(
                db_url, past.History(holds=0, products=_history_catalog(size), seed=0)
            )
        if holds or loaded.products:
            result["history"]["loaded"] = loaded.summary()
            print(
                f"  loaded {holds:,} holds over {len(loaded.products):,} products in "
                f"{loaded.seconds:.1f} s; {loaded.keys_older_than_a_day:,} idempotency keys "
                "older than a day",
                flush=True,
            )
        before = wrk.run(bare.base_url, bare_load)
        print(f"  {before.rps:,.0f} req/s, p99 {before.p99_us / 1000:.2f} ms", flush=True)
        started = time.monotonic()

        def note_backlog(at: str) -> None:
            keys = past.key_backlog(db_url)
            backlog.append({"at": at, "s": round(time.monotonic() - started, 1), "keys": keys})
            print(f"  idempotency keys older than a day: {keys:,} ({at})", flush=True)

        with stack.service(
            db_url,
            redis.url,
            work,
            web_concurrency=config.web_concurrency,
            **{"HOLD_SECONDS": "3600", "LOG_LEVEL": log_level, **overrides},
        ) as service:
            started = time.monotonic()
            note_backlog("service started")
            progress.step(f"{config.label} · history: {state}, expiry wave")
            result["wave"] = wave.run_sync(
                db_url,
                redis.url,
                holds=size.holds,
                bucket_ms=settings.expiry_bucket_ms,
                lead_ms=10_000 if holds else wave.LEAD_MS,
                cpu_of=wave_processes(service),
            )
            note_backlog("after the wave")
            progress.step(f"{config.label} · history: {state}, paths")
            result["paths"] = paths.run(
                service,
                bare,
                seconds=size.seconds,
                connections=size.connections,
                bare_before=before,
                database_url=db_url,
                with_identities=False,  # bin/bench shoppers: history does not change them
            )
            note_backlog("after the paths")
            progress.step(f"{config.label} · history: {state}, pages and operator console")
            # A page's socket (the newest 100 products, as the shop page follows once a
            # shop has more), and one that takes every product.
            listed = httpx.get(service.base_url + "/api/products?limit=100").json()
            page_ids = sorted(p["id"] for p in listed)[-100:]
            ws = service.base_url + "/ws"
            # The CPU each party spent while pages opened the socket: what else (the
            # worker's sweep, PostgreSQL) took the cores from the web process.
            cpu_before = {k: stack.cpu_seconds(pid) for k, pid in wave_processes(service).items()}
            result["sockets"] = history.socket_connect_rate(
                f"{ws}?ids={','.join(map(str, page_ids))}", seconds=size.socket_seconds
            )
            result["sockets"]["cpu_s"] = {
                k: round(stack.cpu_seconds(pid) - cpu_before[k], 2)
                for k, pid in wave_processes(service).items()
            }
            print(f"  CPU seconds meanwhile: {result['sockets']['cpu_s']}", flush=True)
            result["sockets_all"] = history.socket_connect_rate(ws, seconds=size.socket_seconds)
            # The product with the most holds: the one (d) made its holds for, created last.
            product_id = max(p["id"] for p in httpx.get(service.base_url + "/api/products").json())
            result["operator"] = history.operator_latency(
                service.base_url, service.admin_headers(), product_id, page_ids[-50:]
            )
            note_backlog("at the end")
    result["history"]["key_backlog"] = backlog
    after = next(r for r in result["paths"] if r["scenario"].endswith("(after)"))
    result["bare"] = {
        "before": round(before.rps),
        "after": round(after["rps"]),
        "rps": round((before.rps + after["rps"]) / 2),
        "p99_us": before.p99_us,
    }
    for leftover in work.glob("bench.db*"):
        leftover.unlink()
    return result


def wave_processes(service: Service) -> dict[str, int]:
    """The processes whose CPU the wave reports: the worker, which expires the holds, and
    the web processes (with uvicorn's workers), which forward the frames."""
    return {"worker": service.worker.pid, "web": service.web.pid}


def history_ratios(run: dict[str, Any], empty: dict[str, Any]) -> dict[str, Any]:
    """Each figure of `run` over the empty database's: paths as shares of each run's own
    bare endpoint (so that a busier moment of the machine does not count), /ws connects
    per second, wave lateness and operator latency (ms; > 1 is slower)."""
    empty_paths = {r["scenario"]: r for r in empty["paths"]}
    ratios: dict[str, Any] = {"paths": {}, "operator_p50": {}}
    for row in run["paths"]:
        base = empty_paths.get(row["scenario"])
        if base is None or row["scenario"].startswith("bare"):
            continue
        ratios["paths"][row["scenario"]] = round(row["share_of_bare"] / base["share_of_bare"], 3)
    share = run["sockets"]["per_second"] / run["bare"]["rps"]
    empty_share = empty["sockets"]["per_second"] / empty["bare"]["rps"]
    ratios["sockets"] = round(share / empty_share, 3) if empty_share else None
    for name, latency in run["operator"].items():
        base = empty["operator"].get(name)
        if base:
            ratios["operator_p50"][name] = round(latency["p50"] / max(base["p50"], 0.01), 1)
    return ratios


if __name__ == "__main__":
    sys.exit(main())
