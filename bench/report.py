"""The run's report: the goals checked against what was measured, and `report.md`.

Every throughput is shown with its share of the bare endpoint measured in the same
configuration of the same run, so that figures compare across machines. The goals are those
of the flash-sale benchmark issue (README's performance section, docs/design.md §1); they are data
here, so that a shop can hold the service to its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Goal:
    scenario: str
    text: str
    # The measured value as text, and whether it meets the goal; None when not measured.
    check: Callable[[dict[str, Any]], tuple[str, bool] | None]


def _path(name: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    def find(config: dict[str, Any]) -> dict[str, Any] | None:
        return next((r for r in config.get("paths", []) if r["scenario"].startswith(name)), None)

    return find


def _share_goal(name: str, least: float, p99_ms: float | None = None) -> Goal:
    text = f"{name}: ≥ {least:.0%} of the bare endpoint" + (
        f", p99 ≤ {p99_ms:g} ms" if p99_ms else ""
    )
    find = _path(name)

    def check(config: dict[str, Any]) -> tuple[str, bool] | None:
        row = find(config)
        if row is None:
            return None
        p99 = row["p99_us"] / 1000
        met = row["share_of_bare"] >= least and (p99_ms is None or p99 <= p99_ms)
        return f"{row['share_of_bare']:.0%}, p99 {p99:.1f} ms", met

    return Goal("paths", text, check)


def _storm_held(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("storm")
    if s is None:
        return None
    held = s["stats_after"]["held"] + s["stats_after"]["sold"]
    return f"{s['held']} × 201, {held} held", s["held"] == s["units"] == held


def _storm_5xx(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("storm")
    if s is None:
        return None
    return f"{s['errors_5xx']} 5xx, {s['no_answer']} unanswered", not (
        s["errors_5xx"] or s["no_answer"]
    )


def _storm_latency(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("storm")
    if s is None:
        return None
    p99 = s["latency_ms"].get("p99")
    return f"p99 {p99} ms", p99 is not None and p99 < 250


def _storm_sockets(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("storm")
    if s is None:
        return None
    worst = s["sockets_at_zero_ms"].get("max")
    never = s["sockets_never_zero"]
    return f"{worst} ms, {never} never", worst is not None and worst <= 1000 and not never


def _wave(config: dict[str, Any]) -> tuple[str, bool] | None:
    w = config.get("wave")
    if w is None:
        return None
    p99 = w["restore_lateness_ms"].get("p99")
    return f"p99 {p99} ms, {w['missed']} missed", p99 is not None and p99 <= 250 and not w["missed"]


def _steady_invariant(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("steady")
    if s is None:
        return None
    broken = len(s["invariant_broken_after_run"]) + len(s["invariant_broken_settled"])
    leaked = s["held_after_expiry"]
    text = f"{broken} products off, {leaked} units still held after expiry"
    return text, not broken and not leaked


def _steady_5xx(config: dict[str, Any]) -> tuple[str, bool] | None:
    s = config.get("steady")
    if s is None:
        return None
    return f"{s['errors_5xx']} 5xx, {s['no_answer']} unanswered", not (
        s["errors_5xx"] or s["no_answer"]
    )


QUEUE_JOIN_P99_MS = 50.0  # issue 17's goals for the waiting room
QUEUE_ALL_HELD_MS = 2_000.0
QUEUE_TOLD_MS = 1_000.0


def _queue_join(config: dict[str, Any]) -> tuple[str, bool] | None:
    q = config.get("queue")
    if q is None:
        return None
    p99 = q["join_ms"].get("p99")
    failed = sum(n for status, n in q["join_statuses"].items() if status not in ("200", "201"))
    return (
        f"p99 {p99} ms ({q['join_first_second_ms'].get('p99')} in the first second), "
        f"{failed} not joined",
        p99 is not None and p99 <= QUEUE_JOIN_P99_MS and not failed,
    )


def _queue_sold(config: dict[str, Any]) -> tuple[str, bool] | None:
    q = config.get("queue")
    if q is None:
        return None
    sold = q["stats_after"]["sold"]
    return (
        f"{q['sold']} bought, {sold} sold by the stats, {q['admitted']} admitted",
        q["sold"] == sold == q["units"],
    )


def _queue_held(config: dict[str, Any]) -> tuple[str, bool] | None:
    q = config.get("queue")
    if q is None:
        return None
    at = q["all_held_ms"]
    return (
        f"{q['held']} held, the last {at} ms after the start",
        at is not None and at <= QUEUE_ALL_HELD_MS,
    )


def _queue_told(config: dict[str, Any]) -> tuple[str, bool] | None:
    q = config.get("queue")
    if q is None:
        return None
    told = q["sold_out_after_last_sale_ms"].get("max")
    final = "every ticket final" if q["every_ticket_final"] else "**not every ticket final**"
    return (
        f"the last {told} ms after the last sale; {final}",
        told is not None and told <= QUEUE_TOLD_MS and q["every_ticket_final"],
    )


HISTORY_SHARE = 0.9  # of the empty database's figure, with a month of history
OPERATOR_MS = 50.0  # the operator console's requests, p90


def _history(config: dict[str, Any]) -> dict[str, Any] | None:
    h: dict[str, Any] | None = config.get("history")
    return h if h and h["holds"] and "vs_empty" in h else None


WHOLE_LIST = "(c) GET /api/products"  # every product: 1.35 MB at 10,000, so not a page's path


def _history_paths(config: dict[str, Any]) -> tuple[str, bool] | None:
    h = _history(config)
    if h is None:
        return None
    ratios: dict[str, float] = {
        name: ratio
        for name, ratio in h["vs_empty"]["paths"].items()
        if not name.startswith(WHOLE_LIST)
    }
    worst = min(ratios, key=lambda name: ratios[name])
    return (
        f"worst {worst}: {ratios[worst]:.2f}×",
        all(r >= HISTORY_SHARE for r in ratios.values()),
    )


def _history_sockets(config: dict[str, Any]) -> tuple[str, bool] | None:
    h = _history(config)
    if h is None or h["vs_empty"].get("sockets") is None:
        return None
    ratio = h["vs_empty"]["sockets"]
    return f"{ratio:.2f}×", ratio >= HISTORY_SHARE


def _operator(config: dict[str, Any]) -> tuple[str, bool] | None:
    o = config.get("operator")
    if not o:
        return None
    worst = max(o, key=lambda name: o[name]["p90"])
    p90 = o[worst]["p90"]
    return f"worst {worst}: p90 {p90:g} ms", p90 <= OPERATOR_MS


IDENTITY_SHARE = 0.95  # issue 16: knowing the shopper may cost "a few percent"


def _identified_share(kind: str) -> Callable[[dict[str, Any]], tuple[str, bool] | None]:
    """Reservations with the shopper identified by `kind` against the anonymous ones of the
    same run (the mean of the runs before and after them, which shows the machine's drift)."""

    def check(config: dict[str, Any]) -> tuple[str, bool] | None:
        rows = {r["scenario"]: r for r in config.get("paths", [])}
        mine = rows.get(f"(a) reserve, ample stock, {kind}")
        anonymous = [
            rows[name]["rps"]
            for name in ("(a) reserve, ample stock", "(a) reserve, ample stock, anonymous again")
            if name in rows
        ]
        if mine is None or not anonymous:
            return None
        ratio = mine["rps"] / (sum(anonymous) / len(anonymous))
        return f"{ratio:.0%} of anonymous", ratio >= IDENTITY_SHARE

    return check


GOALS = [
    Goal("storm", "units held == the stock (100): never oversold", _storm_held),
    Goal("storm", "no 5xx, every shopper answered", _storm_5xx),
    Goal("storm", "reservation latency p99 under 250 ms", _storm_latency),
    Goal("storm", "every socket shows 0 left within 1 s of the start", _storm_sockets),
    _share_goal("(a) reserve, ample stock", 0.30, 25),
    _share_goal("(b) reserve, sold out", 0.50),
    Goal(
        "paths",
        f"(a) with a shopper's cookie ≥ {IDENTITY_SHARE:.0%} of anonymous",
        _identified_share("a shopper's cookie"),
    ),
    Goal(
        "paths",
        f"(a) signed in with a JWT ≥ {IDENTITY_SHARE:.0%} of anonymous",
        _identified_share("a shop's JWT"),
    ),
    _share_goal("(c) GET /api/products → 200", 0.50),
    _share_goal("(c) GET /api/products → 304", 0.50),
    Goal("wave", "units restored: p99 lateness ≤ 250 ms, none missed", _wave),
    Goal(
        "steady", "available + held + sold == total; nothing held after expiry", _steady_invariant
    ),
    Goal("steady", "no 5xx, every request answered", _steady_5xx),
    # The waiting room (issue 17): `bin/bench queue`.
    Goal(
        "queue",
        f"joining the line: p99 ≤ {QUEUE_JOIN_P99_MS:g} ms, every join answered",
        _queue_join,
    ),
    Goal("queue", "exactly the stock sold through the room, never more", _queue_sold),
    Goal(
        "queue",
        f"all units held within {QUEUE_ALL_HELD_MS / 1000:g} s of the start (every admitted "
        "shopper reserving at once)",
        _queue_held,
    ),
    Goal(
        "queue",
        f"every remaining ticket told `sold_out` within {QUEUE_TOLD_MS / 1000:g} s of the last "
        "unit's sale",
        _queue_told,
    ),
    # A month of sales (`bin/bench history`): the wave's goal above applies with history too.
    Goal(
        "history",
        f"every path ≥ {HISTORY_SHARE:g}× of the empty database's (shares of the bare "
        "endpoint; the whole product list aside, which a page no longer asks for)",
        _history_paths,
    ),
    Goal(
        "history",
        f"pages opening /ws?ids= (the newest 100) ≥ {HISTORY_SHARE:g}× of the empty "
        "database's rate",
        _history_sockets,
    ),
    Goal("history", f"operator console requests: p90 ≤ {OPERATOR_MS:g} ms", _operator),
]


def fanout_goals(run: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for one fan-out size."""
    n = run["sockets"]
    limit = 100 if n <= 1_000 else 250
    d, c = run["delivery_ms"], run["convergence"]
    goals = [
        (f"delivery p99 ≤ {limit} ms", f"{d['p99']} ms", d["p99"] <= limit),
        (
            "memory ≤ 32 KiB a socket",
            f"{run['memory_per_socket_kib']} KiB",
            run["memory_per_socket_kib"] <= 32,
        ),
        (
            "final value everywhere ≤ 250 ms after the last change",
            f"{c['after_last_change_ms']['max']} ms",
            c["after_last_change_ms"]["max"] <= 250 and not c["missing"],
        ),
    ]
    if n >= 10_000:
        share = run["reserve_share_with_sockets"]
        goals.append(
            ("reservations/s with the sockets ≥ 90% of without", f"{share:.0%}", share >= 0.9)
        )
    return goals


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for goal in GOALS:
        for config in report["configs"]:
            checked = goal.check(config)
            if checked is not None:
                rows.append(
                    {
                        "scenario": goal.scenario,
                        "goal": goal.text,
                        "config": config["label"],
                        "measured": checked[0],
                        "met": checked[1],
                    }
                )
    fanout = report.get("fanout")
    if fanout:
        for run in fanout["runs"]:
            for text, measured, met in fanout_goals(run):
                rows.append(
                    {
                        "scenario": "fanout",
                        "goal": f"{run['sockets']:,} sockets: {text}",
                        "config": fanout["label"],
                        "measured": measured,
                        "met": met,
                    }
                )
    return rows


# -- Markdown ---------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    align = ["---"] * right + ["---:"] * (len(header) - right)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _rps(rps: float, bare: float) -> str:
    return f"{rps:,.0f}/s ({rps / bare:.0%})"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    configs = report["configs"]
    labels = [c["label"] for c in configs]
    lines = [
        f"# Flash-sale benchmark, {report['started']}",
        "",
        f"`{report['command']}` — {report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}, {report['duration_s'] / 60:.1f} min"
        + (
            " — **quick mode: small sizes, the figures are a smoke test**"
            if report["quick"]
            else ""
        ),
        "",
        "Throughput is also shown as a share of the bare Starlette endpoint measured under the "
        "same uvicorn command in the same configuration of this run (wrk, "
        f"{report['connections']} connections).",
        "",
    ]
    if report.get("settings"):
        settings = ", ".join(f"`{k}={v}`" for k, v in report["settings"].items())
        lines += [f"Service settings given for this run: {settings}.", ""]
    goals = report["goals"]
    met = sum(g["met"] for g in goals)
    lines += [f"## Goals: {met} of {len(goals)} met", ""]
    lines += _table(
        ["goal", "configuration", "measured", ""],
        [
            [g["goal"], g["config"], g["measured"], "met" if g["met"] else "**missed**"]
            for g in goals
        ],
        right=4,
    )
    lines += [
        "The request-path goals are set for one web process; with two, the bare endpoint is "
        "itself two processes while SQLite still takes one writer at a time.",
        "",
        "## Bare endpoint",
        "",
    ]
    lines += _table(
        ["", *labels],
        [
            ["req/s (mean of before and after)", *(f"{c['bare']['rps']:,.0f}" for c in configs)],
            [
                "before / after",
                *(f"{c['bare']['before']:,.0f} / {c['bare']['after']:,.0f}" for c in configs),
            ],
        ],
    )
    if any("storm" in c for c in configs):
        lines += _storm(configs, charts)
    if any("storm_cookie" in c or "storm_keys" in c for c in configs):
        lines += _identified(configs)
    if any("paths" in c for c in configs):
        lines += _paths(configs, charts)
    if any("wave" in c for c in configs):
        lines += _wave_section(configs, charts)
    if any("steady" in c for c in configs):
        lines += _steady(configs, charts)
    if any("queue" in c for c in configs):
        lines += _queue(configs, charts)
    if report.get("fanout"):
        lines += _fanout(report["fanout"])
    if any("history" in c for c in configs):
        lines += _history_section(configs)
    return "\n".join(lines)


def _storm(configs: list[dict[str, Any]], charts: dict[str, str]) -> list[str]:
    runs = [c for c in configs if "storm" in c]
    first = runs[0]["storm"]
    lines = [
        "## Storm: the sale's first second",
        "",
        f"{first['units']} units go on sale; {first['sockets']:,} sockets watch; at the start "
        f"{first['shoppers']:,} shoppers (keep-alive connections opened beforehand, in separate "
        "processes) each send one reservation.",
        "",
    ]

    def row(name: str, value: Callable[[dict[str, Any], dict[str, Any]], str]) -> list[str]:
        return [name, *(value(c["storm"], c) for c in runs)]

    lines += _table(
        ["", *(c["label"] for c in runs)],
        [
            row("units held (201)", lambda s, c: f"{s['held']} of {s['units']}"),
            row(
                "statuses",
                lambda s, c: ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items())),
            ),
            row("error codes", lambda s, c: ", ".join(f"{k}: {v}" for k, v in s["codes"].items())),
            row("5xx", lambda s, c: str(s["errors_5xx"])),
            row(
                "latency p50 / p99 / max (ms)",
                lambda s, c: " / ".join(_ms(s["latency_ms"].get(k)) for k in ("p50", "p99", "max")),
            ),
            row("every answer in (ms after the start)", lambda s, c: _ms(s["answered_in_ms"])),
            row("requests/s", lambda s, c: _rps(s["rps"], c["bare"]["rps"])),
            row(
                "sockets at 0 left, p50 / p99 / max (ms after the start)",
                lambda s, c: " / ".join(
                    _ms(s["sockets_at_zero_ms"].get(k)) for k in ("p50", "p99", "max")
                ),
            ),
            row(
                "requests sent, first / last (ms after the start)",
                lambda s, c: f"{s['send_ms']['first']} / {s['send_ms']['last']}",
            ),
            row("shoppers' CPU (s)", lambda s, c: str(s["shopper_cpu_seconds"])),
        ],
    )
    for c in runs:
        chart = charts.get(f"storm-{c['name']}")
        if chart:
            lines += [f"![storm, {c['label']}]({chart})", ""]
    return lines


_KINDS = {
    "storm": "anonymous (no cookie, no token)",
    "storm_cookie": "each a shopper's cookie",
    "storm_jwt": "each signed in by the shop (JWT)",
    "storm_keys": "anonymous, each request with an Idempotency-Key",
}


def _identified(configs: list[dict[str, Any]]) -> list[str]:
    """The storm with its shoppers identified (issue 16) beside the anonymous one."""
    runs = [c for c in configs if "storm_cookie" in c or "storm_keys" in c]
    lines = [
        "## Storm with shoppers identified, or with keys",
        "",
        "The same storm, each shopper a distinct one: anonymous, with the cookie the shop page "
        "sets, or signed in by the shop with a JWT. Each hold then also counts against its "
        "shopper's allowance (the limit per customer), in the reservation's transaction. "
        "With keys (`bin/bench keys`): anonymous, each request with an Idempotency-Key of its "
        "own, so that every promise may be a retry of a hold already made.",
        "",
    ]
    rows = []
    for name, words in _KINDS.items():
        cells = [words]
        for c in runs:
            s = c.get(name)
            cells.append(
                "–"
                if s is None
                else f"{s['held']} held, {s['errors_5xx']} 5xx, p50/p99 "
                f"{_ms(s['latency_ms'].get('p50'))}/{_ms(s['latency_ms'].get('p99'))} ms, "
                + _rps(s["rps"], c["bare"]["rps"])
            )
        rows.append(cells)
    lines += _table(["shoppers", *(c["label"] for c in runs)], rows)
    return lines


def _paths(configs: list[dict[str, Any]], charts: dict[str, str]) -> list[str]:
    runs = [c for c in configs if "paths" in c]
    names = [r["scenario"] for r in runs[0]["paths"]]
    rows = []
    for name in names:
        cells = []
        for c in runs:
            r = next((r for r in c["paths"] if r["scenario"] == name), None)
            cells.append(
                "–"
                if r is None
                else f"{r['rps']:,.0f}/s ({r['share_of_bare']:.0%}), "
                f"p99 {r['p99_us'] / 1000:.1f} ms"
            )
        rows.append([name, *cells])
    lines = [
        "## Request paths",
        "",
        "wrk, one thread, each path for the same duration: (a) reservations with ample stock, (b) "
        "of a sold-out product, (c) the product list without and with `If-None-Match`.",
        "",
    ]
    lines += _table(["path", *(c["label"] for c in runs)], rows)
    cpu_rows = []
    for name in names[1:-1]:
        cells = []
        for c in runs:
            r = next((r for r in c["paths"] if r["scenario"] == name), None)
            cells.append(
                "–"
                if r is None or r["cpu_us_per_request"] is None
                else f"{r['cpu_us_per_request']}"
            )
        cpu_rows.append([name, *cells])
    lines += ["Web processes' CPU per request (µs):", ""]
    lines += _table(["path", *(c["label"] for c in runs)], cpu_rows)
    if "paths" in charts:
        lines += [f"![throughput per path]({charts['paths']})", ""]
    return lines


def _wave_section(configs: list[dict[str, Any]], charts: dict[str, str]) -> list[str]:
    runs = [c for c in configs if "wave" in c]
    w0 = runs[0]["wave"]
    lines = [
        "## Expiry wave",
        "",
        f"{w0['holds']:,} holds fall due within one second (one job per {w0['bucket_ms']} ms "
        "bucket); lateness from each hold's `expiresAt` to its units being restored, and to its "
        "EXPIRED frame reaching a subscriber.",
        "",
    ]
    rows = []
    for c in runs:
        w = c["wave"]
        r, a = w["restore_lateness_ms"], w["announce_lateness_ms"]
        rows.append(
            [
                c["label"],
                " / ".join(_ms(r.get(k)) for k in ("p50", "p90", "p99", "max")),
                " / ".join(_ms(a.get(k)) for k in ("p50", "p90", "p99", "max")),
                str(w["missed"]),
                " / ".join(str(w.get("cpu_ms", {}).get(k, "–")) for k in ("worker", "web")),
            ]
        )
    lines += _table(
        [
            "configuration",
            "restored p50 / p90 / p99 / max (ms)",
            "EXPIRED frame p50 / p90 / p99 / max (ms)",
            "missed",
            "CPU while it ran: worker / web (ms)",
        ],
        rows,
    )
    if "wave" in charts:
        lines += [f"![expiry lateness]({charts['wave']})", ""]
    return lines


def _steady(configs: list[dict[str, Any]], charts: dict[str, str]) -> list[str]:
    runs = [c for c in configs if "steady" in c]
    s0 = runs[0]["steady"]
    mix = ", ".join(f"{v:.0%} {k}" for k, v in s0["mix"].items())
    lines = [
        "## Steady shop",
        "",
        f"{s0['seconds']:g} s of mixed traffic ({mix}) on {s0['connections']} keep-alive "
        f"connections from two load-generator processes; HOLD_SECONDS={s0['hold_seconds']:g}, "
        "so most holds expire during the run.",
        "",
    ]

    def row(name: str, value: Callable[[dict[str, Any], dict[str, Any]], str]) -> list[str]:
        return [name, *(value(c["steady"], c) for c in runs)]

    rows = [row("all requests", lambda s, c: _rps(s["rps"], c["bare"]["rps"]))]
    for kind in s0["kinds"]:
        rows.append(row(f"{kind}: req/s, p50 / p99 (ms)", _kind_rate(kind)))
        rows.append(row(f"{kind}: statuses", _kind_statuses(kind)))
    rows += [
        row(
            "invariant (after the run / settled)",
            lambda s, c: (
                ("holds" if not s["invariant_broken_after_run"] else "**broken**")
                + " / "
                + ("holds" if not s["invariant_broken_settled"] else "**broken**")
            ),
        ),
        row(
            "units: sold / expired / cancelled / held after expiry",
            lambda s, c: (
                f"{s['units']['sold']:,} / {s['units']['expired']:,} / "
                f"{s['units']['cancelled']:,} / {s['held_after_expiry']}"
            ),
        ),
        row("5xx", lambda s, c: str(s["errors_5xx"])),
        row(
            "CPU: web processes (share of a core)",
            lambda s, c: (
                f"{s['cpu']['web_share_of_core']:.0%}, {s['cpu']['web_us_per_request']} µs/req"
            ),
        ),
        row("CPU: worker", lambda s, c: f"{s['cpu']['worker_share_of_core']:.0%}"),
        row(
            "CPU: each load-generator process",
            lambda s, c: (
                f"{s['cpu']['generator_share_of_core']:.0%}, "
                f"{s['cpu']['generator_us_per_request']} µs/req"
            ),
        ),
    ]
    lines += _table(["", *(c["label"] for c in runs)], rows)
    if "steady" in charts:
        lines += [f"![steady shop]({charts['steady']})", ""]
    return lines


def _queue(configs: list[dict[str, Any]], charts: dict[str, str]) -> list[str]:
    runs = [c for c in configs if "queue" in c]
    q0 = runs[0]["queue"]
    lines = [
        "## The waiting room",
        "",
        f"{q0['units']} units with a queue (`{q0['mode']}`); {q0['early']:,} shoppers join "
        f"the line at random moments of the {q0['minute_seconds']:g} s before the start, "
        f"{q0['late']:,} more in its first second. Each is a page already open (a socket with "
        "its own shopper cookie, opened beforehand; a connection opened to join before the "
        "start, as a page loaded a minute ahead must, or 3 s before the start for the first "
        "second's shoppers; separate processes); an "
        "admitted shopper reserves one unit the moment its socket says so, and buys it at once. "
        "Times in ms from the start.",
        "",
    ]
    for c in runs:
        loaded = c.get("queue_history", {}).get("loaded")
        if loaded:  # `--queue-history`
            lines += [
                f"{c['label']}: loaded first, {loaded['holds']:,} past holds over "
                f"{loaded['products']:,} products and {loaded['rooms']} past waiting rooms "
                f"with {loaded['tickets']:,} ended tickets ({loaded['load_seconds']:g} s).",
                "",
            ]

    def row(name: str, value: Callable[[dict[str, Any]], str]) -> list[str]:
        return [name, *(value(c["queue"]) for c in runs)]

    def pct(d: dict[str, float]) -> str:
        return " / ".join(_ms(d.get(k)) for k in ("p50", "p99", "max"))

    lines += _table(
        ["", *(c["label"] for c in runs)],
        [
            row("join: p50 / p99 / max (ms)", lambda q: pct(q["join_ms"])),
            row("join before the start: p50 / p99 / max", lambda q: pct(q["join_before_start_ms"])),
            row(
                "join in the first second: p50 / p99 / max",
                lambda q: pct(q["join_first_second_ms"]),
            ),
            row(
                "join statuses",
                lambda q: ", ".join(f"{k}: {v}" for k, v in sorted(q["join_statuses"].items())),
            ),
            row(
                "admitted (of them joined before the start)",
                lambda q: f"{q['admitted']} ({q['admitted_early']})",
            ),
            row("first admitted", lambda q: _ms(q["first_admitted_ms"])),
            row("all units held", lambda q: f"{_ms(q['all_held_ms'])} ({q['held']} held)"),
            row("all units sold", lambda q: f"{_ms(q['all_sold_ms'])} ({q['sold']} sold)"),
            row(
                "`sold_out` reaches a socket, after the last sale (or the ticket's join, "
                "if later): p50 / p99 / max",
                lambda q: pct(q["sold_out_after_last_sale_ms"]),
            ),
            row(
                "shoppers who joined after the last sale",
                lambda q: f"{q.get('joined_after_last_sale', 0):,}",
            ),
            row("every ticket final", lambda q: _ms(q["all_final_ms"])),
            row(
                "final states",
                lambda q: ", ".join(f"{k}: {v}" for k, v in sorted(q["final_states"].items())),
            ),
            row(
                "admitted shopper's wait, mean: from the start / from joining",
                lambda q: f"{_ms(q['wait_from_start_ms'])} / {_ms(q['wait_from_join_ms'])}",
            ),
            row("reservations with the room on: p50 / p99 / max", lambda q: pct(q["reserve_ms"])),
            row(
                "reservation statuses",
                lambda q: ", ".join(f"{k}: {v}" for k, v in sorted(q["reserve_statuses"].items())),
            ),
            row("ticket frames received", lambda q: f"{q['ticket_frames']:,}"),
            row(
                "connections the shoppers opened (one to join, again if closed idle)",
                lambda q: f"{q.get('reconnects', 0):,}",
            ),
            row("shoppers' CPU (s)", lambda q: str(q["shopper_cpu_seconds"])),
            row(
                "… of it from the start on (s)",
                lambda q: str(q.get("shopper_cpu_after_start_seconds", "–")),
            ),
            row(
                "CPU in the first seconds after the start: web / worker / shoppers (s of CPU in s)",
                lambda q: _cpu_window(q.get("cpu_first_seconds") or {}),
            ),
            row(
                "CPU in the minute before the start: web / worker / shoppers (s of CPU in s)",
                lambda q: _cpu_window(q.get("cpu_minute_before") or {}),
            ),
            row(
                "shoppers' loops late, from 1 s before the start: p50 / p99 / max",
                lambda q: pct(q.get("shopper_loop_lag_ms") or {}),
            ),
            row(
                "first-second joins sent late by their process: p50 / p99 / max",
                lambda q: pct(q.get("join_sent_late_ms") or {}),
            ),
            row(
                "first-second joins, sent to the answer made (its `serverTime`): p50 / p99 / max",
                lambda q: pct((q.get("join_to_answer_made_ms") or {}).get("first_second", {})),
            ),
            row(
                "… the answer made to read by the shopper: p50 / p99 / max",
                lambda q: pct((q.get("join_answer_made_to_read_ms") or {}).get("first_second", {})),
            ),
            row(
                "the web's own measure, read to answered (buckets), before the start / "
                "the sale: p99 within",
                lambda q: " / ".join(
                    _ms((q.get("join_server_ms") or {}).get(k, {}).get("p99_within_ms"))
                    for k in ("before_start", "sale")
                ),
            ),
        ],
    )
    for c in runs:
        chart = charts.get(f"queue-{c['name']}")
        if chart:
            lines += [f"![waiting room, {c['label']}]({chart})", ""]
    return lines


def _cpu_window(window: dict[str, float]) -> str:
    if not window:
        return "–"
    return f"{window['web']} / {window['worker']} / {window['shoppers']} in {window['seconds']} s"


def _kind_rate(kind: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    def cell(s: dict[str, Any], c: dict[str, Any]) -> str:
        k = s["kinds"][kind]
        latency = k["latency_ms"]
        return f"{k['rps']:,.0f}/s, {_ms(latency.get('p50'))} / {_ms(latency.get('p99'))}"

    return cell


def _kind_statuses(kind: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    def cell(s: dict[str, Any], c: dict[str, Any]) -> str:
        k = s["kinds"][kind]
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(k["statuses"].items()))
        return statuses + "".join(f" ({code}: {n})" for code, n in k["codes"].items())

    return cell


def _fanout(fanout: dict[str, Any]) -> list[str]:
    lines = [
        f"## Live updates: fan-out ({fanout['label']})",
        "",
        "Sockets held by lean clients in separate processes on the same machine.",
        "",
    ]
    rows = []
    bare = fanout["bare_rps"]
    for f in fanout["runs"]:
        d, c = f["delivery_ms"], f["convergence"]
        rows.append(
            [
                f"{f['sockets']:,}",
                f"{f['memory_per_socket_kib']}",
                f"{d['p50']} / {d['p99']} / {d['max']}",
                str(f["delivery_missing"]),
                f"{c['changes_per_second']}",
                f"{c['after_last_change_ms']['max']}",
                f"{_rps(f['reserve_rps_with_sockets'], bare)} / "
                f"{_rps(f['reserve_rps_without_sockets'], bare)} "
                f"({f['reserve_share_with_sockets']:.0%})",
            ]
        )
    lines += _table(
        [
            "sockets",
            "KiB per socket",
            "201 → every socket: p50 / p99 / max (ms)",
            "missed",
            "changes/s",
            "final value, ms after the last change",
            "reservations with / without the sockets",
        ],
        rows,
    )
    return lines


def _history_section(configs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## A month of history",
        "",
        "Each database state is a fresh database (loaded with past holds in bulk: COMPLETED, "
        "EXPIRED or CANCELLED over 30 days, half with an Idempotency-Key, one product per 100 "
        "holds) and a fresh service. In order: the expiry wave, right after the service starts; "
        "the paths; pages opening `/ws`; the operator console's requests. `×` is the figure "
        "over the empty database's, paths as shares of each run's own bare endpoint.",
        "",
    ]
    databases = sorted({c["database"] for c in configs if "history" in c}, reverse=True)
    for database in databases:
        runs = [c for c in configs if "history" in c and c["database"] == database]
        label = runs[0]["label"].rsplit(",", 1)[0]
        lines += [f"### {label}", ""]
        header = ["", *(c["label"].rsplit(", ", 1)[1] for c in runs)]
        rows: list[list[str]] = []

        def loaded(c: dict[str, Any]) -> str:
            info = c["history"].get("loaded")
            if not info:
                return "–"
            return (
                f"{info['holds']:,} holds, {info['products']:,} products, "
                f"{info['load_seconds']:g} s"
            )

        rows.append(["loaded", *(loaded(c) for c in runs)])
        rows.append(["bare endpoint", *(f"{c['bare']['rps']:,.0f}/s" for c in runs)])
        names = [r["scenario"] for r in runs[0]["paths"] if not r["scenario"].startswith("bare")]
        for name in names:
            cells = []
            for c in runs:
                row = next((r for r in c["paths"] if r["scenario"] == name), None)
                ratio = c["history"]["vs_empty"]["paths"].get(name)
                if row is None:
                    cells.append("–")
                    continue
                cell = (
                    f"{row['rps']:,.0f}/s ({row['share_of_bare']:.0%}), "
                    f"p99 {row['p99_us'] / 1000:.1f} ms"
                )
                if c["history"]["holds"] and ratio is not None:
                    cell += f", **{ratio:.2f}×**"
                cells.append(cell)
            rows.append([name, *cells])

        def sockets(c: dict[str, Any]) -> str:
            s = c["sockets"]
            cell = f"{s['per_second']:,.0f}/s, {s['snapshot_bytes']:,} B snapshot"
            ratio = c["history"]["vs_empty"].get("sockets")
            if c["history"]["holds"] and ratio is not None:
                cell += f", **{ratio:.2f}×**"
            return cell

        rows.append(
            ["pages opening `/ws?ids=` (the newest 100), connect + snapshot"]
            + [sockets(c) for c in runs]
        )
        if all("sockets_all" in c for c in runs):
            rows.append(
                ["pages opening `/ws` (every product), connect + snapshot"]
                + [
                    f"{c['sockets_all']['per_second']:,.0f}/s, "
                    f"{c['sockets_all']['snapshot_bytes']:,} B snapshot"
                    for c in runs
                ]
            )

        def wave(c: dict[str, Any]) -> str:
            r = c["wave"]["restore_lateness_ms"]
            return " / ".join(_ms(r.get(k)) for k in ("p50", "p99", "max")) + (
                f", {c['wave']['missed']} missed" if c["wave"]["missed"] else ""
            )

        rows.append(
            [f"expiry wave ({runs[0]['wave']['holds']:,} holds): lateness p50 / p99 / max (ms)"]
            + [wave(c) for c in runs]
        )
        for name in runs[0]["operator"]:
            rows.append(
                [
                    f"`{name}` p50 / p90 (ms)",
                    *(_latency_cell(c["operator"][name]) for c in runs),
                ]
            )
        rows.append(
            [
                "idempotency keys older than a day (start → after the wave → after the paths "
                "→ end)",
                *(" → ".join(f"{b['keys']:,}" for b in c["history"]["key_backlog"]) for c in runs),
            ]
        )
        lines += _table(header, rows)
    return lines


def _latency_cell(latency: dict[str, float]) -> str:
    cell = f"{latency['p50']:g} / {latency['p90']:g}"
    if latency.get("timed_out"):
        cell += " (a request timed out)"
    return cell


# -- bin/cluster bench ------------------------------------------------------------------


def cluster_summary(result: dict[str, Any]) -> list[str]:
    """The tables the README shows: the storm and the steady shop through the edge as
    shares of the bare endpoint behind the same edge, the hop, the Redis failover."""
    configs = result["configs"]
    lines: list[str] = []
    if configs:
        lines += _table(
            ["through the edge", *(c["label"] for c in configs)],
            [
                [
                    "bare endpoint behind the edge (mean of before and after)",
                    *(f"{c['bare']['rps']:,.0f}/s" for c in configs),
                ],
                [
                    "storm: requests/s",
                    *(_rps(c["storm"]["rps"], c["bare"]["rps"]) for c in configs),
                ],
                [
                    "storm: held, 5xx, p50 / p99 (ms)",
                    *(
                        f"{c['storm']['held']} of {c['storm']['units']}, "
                        f"{c['storm']['errors_5xx']}, "
                        f"{_ms(c['storm']['latency_ms'].get('p50'))} / "
                        f"{_ms(c['storm']['latency_ms'].get('p99'))}"
                        for c in configs
                    ),
                ],
                [
                    "steady shop: requests/s",
                    *(_rps(c["steady"]["rps"], c["bare"]["rps"]) for c in configs),
                ],
                [
                    "steady shop: 5xx, invariant, held after expiry",
                    *(
                        f"{c['steady']['errors_5xx']}, "
                        + ("holds" if not c["steady"]["invariant_broken_settled"] else "**broken**")
                        + f", {c['steady']['held_after_expiry']}"
                        for c in configs
                    ),
                ],
            ],
        )
    hop = result.get("hop")
    if hop:
        rows = []
        for connections in (1, 64):
            for name, text in (("direct", "directly"), ("edge", "through the edge")):
                run = hop[f"{name}_c{connections}"]
                rows.append(
                    [
                        f"{text}, {connections} connection{'s' if connections > 1 else ''}",
                        f"{run['rps']:,.0f}/s",
                        f"{run['p50_us'] / 1000:.2f}",
                        f"{run['p99_us'] / 1000:.2f}",
                    ]
                )
        lines += _table(["bare endpoint on app1", "requests/s", "p50 (ms)", "p99 (ms)"], rows)
    failover = result.get("failover")
    if failover:
        rows = []
        for name, text in (
            ("promoted", "the Sentinels promote the replica"),
            ("first_event", "the first live event comes through the new primary"),
            ("live_again", "every page gets changes within a second again"),
        ):
            found = failover.get(name)
            rows.append(
                [text]
                + (
                    [f"{found['median']:.1f}", f"{found['min']:.1f} – {found['max']:.1f}"]
                    if found
                    else ["–", "–"]
                )
            )
        lines += _table(
            [
                f"Redis primary SIGKILLed ({len(failover['runs'])} times): s until",
                "median",
                "range",
            ],
            rows,
        )
    return lines


def cluster_markdown(result: dict[str, Any]) -> str:
    """`report.md` of `bin/cluster bench`."""
    lines = [
        f"# The service through the edge, {result['started']}",
        "",
        f"`{result['command']}` — {result['machine']['cpus']} CPUs, Python "
        f"{result['machine']['python']}, {result['duration_s'] / 60:.1f} min"
        + (
            f", load average {result['machine']['load_at_start']} at the start and "
            f"{result['machine']['load_at_end']} at the end"
            if "load_at_start" in result["machine"]
            else ""
        )
        + (" — **quick mode: the figures are a smoke test**" if result["quick"] else ""),
        "",
        "HAProxy in front of one app host, then two (each the Procfile's `web` with two "
        "processes and a `worker`), PostgreSQL and Redis with Sentinel on a data host; every "
        "host a network namespace on one bridge, on the same cores. Throughput is also shown "
        "as a share of the bare Starlette endpoint behind the same edge (two processes on "
        "each serving host, wrk, 64 connections), measured before and after in the same "
        "configuration.",
        "",
        *cluster_summary(result),
    ]
    configs = result["configs"]
    if result.get("failover", {}).get("checks_failed"):
        lines += [
            "Failed drill checks during the failovers: "
            + "; ".join(result["failover"]["checks_failed"]),
            "",
        ]
    if configs:
        lines += _storm(configs, {})
        lines += _steady(configs, {})
    return "\n".join(lines)
