"""The run's charts, as PNG files beside report.md (matplotlib, Agg: no display needed).

- `storm-<configuration>.png`: each reservation's latency against when it was answered, and
  the stock (available and held, from the operator's stats; available as one socket saw it)
  over the same time axis, both from the sale's start.
- `wave-lateness.png`: how late the expiry wave's holds were restored, histogram and CDF,
  one line per configuration.
- `paths-throughput.png`: requests/s per path beside the bare endpoint, one bar per
  configuration (W=1 → W=2 → PostgreSQL), and the same as shares of the bare endpoint.
- `steady.png`: the steady shop's throughput per second and latency per kind.
- `queue-<configuration>.png`: the waiting room: each join's latency over the whole run,
  then the sale's first seconds: shoppers admitted, units held and sold, tickets told
  `sold_out`, and each reservation's latency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# bin/test type-checks bench/ with the dev extra, which need not have matplotlib.
import matplotlib  # type: ignore[import-not-found,unused-ignore]

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
STATUS_COLORS = {2: "#2ca02c", 4: "#1f77b4", 5: "#d62728", 0: "#000000"}


def draw_all(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Draws every chart the report has data for; returns {name: file name}."""
    charts: dict[str, str] = {}
    for config in report["configs"]:
        if "storm" in config:
            name = f"storm-{config['name']}.png"
            storm(config["storm"], config["label"], out / name)
            charts[f"storm-{config['name']}"] = name
    if any("wave" in c for c in report["configs"]):
        wave(report["configs"], out / "wave-lateness.png")
        charts["wave"] = "wave-lateness.png"
    if any("paths" in c for c in report["configs"]):
        paths(report["configs"], out / "paths-throughput.png")
        charts["paths"] = "paths-throughput.png"
    if any("steady" in c for c in report["configs"]):
        steady(report["configs"], out / "steady.png")
        charts["steady"] = "steady.png"
    for config in report["configs"]:
        if "queue" in config:
            name = f"queue-{config['name']}.png"
            queue(config["queue"], config["label"], out / name)
            charts[f"queue-{config['name']}"] = name
    return charts


def queue(result: dict[str, Any], label: str, path: Path) -> None:
    series = result["series"]
    fig, (joins, sale, latency) = plt.subplots(3, 1, figsize=(10, 10))
    fig.suptitle(
        f"Waiting room, {label}: {result['early']:,} join in the {result['minute_seconds']:g} s "
        f"before the start, {result['late']:,} in its first second; {result['units']} units"
    )
    points = series["joins"]
    for klass, color in STATUS_COLORS.items():
        chosen = [p for p in points if p[2] // 100 == klass]
        if chosen:
            joins.scatter(
                [p[0] / 1000 for p in chosen],
                [p[1] for p in chosen],
                s=3,
                color=color,
                alpha=0.5,
                label=f"{klass}xx ({len(chosen):,})" if klass else f"no answer ({len(chosen):,})",
            )
    joins.axhline(50, color="grey", linestyle=":", label="goal: p99 ≤ 50 ms")
    joins.axvline(0, color="black", linewidth=0.8)
    joins.set_xlabel("s from the sale's start")
    joins.set_ylabel("join latency (ms)")
    joins.set_title("joining the line, each join at the time it was answered")
    joins.legend(loc="upper left", markerscale=3)
    joins.grid(alpha=0.3)

    def cumulative(ax: Any, times: list[float], name: str, **style: Any) -> None:
        if times:
            ordered = sorted(times)
            ax.step(
                [0.0, *ordered], list(range(len(ordered) + 1)), where="post", label=name, **style
            )

    end = max([*series["sold_out"], *series["sold"], *series["held"], 2_000.0]) + 200
    cumulative(sale, series["admitted"], f"admitted ({len(series['admitted'])})")
    cumulative(sale, series["held"], f"units held ({len(series['held'])})")
    cumulative(sale, series["sold"], f"units sold ({len(series['sold'])})")
    told = sale.twinx()
    cumulative(
        told,
        series["sold_out"],
        f"tickets told sold_out ({len(series['sold_out']):,}, right axis)",
        color="#d62728",
        linestyle="--",
    )
    told.set_ylabel("tickets told sold_out")
    sale.axvline(2000, color="grey", linestyle=":", label="goal: all held by 2 s")
    sale.set_xlim(-100, end)
    sale.set_xlabel("ms from the sale's start")
    sale.set_ylabel("shoppers / units")
    sale.set_title("the sale: admitted, held, sold; tickets told sold_out")
    handles, labels = sale.get_legend_handles_labels()
    more, more_labels = told.get_legend_handles_labels()
    sale.legend(handles + more, labels + more_labels, loc="center right", fontsize=8)
    sale.grid(alpha=0.3)

    reservations = series["reservations"]
    if reservations:
        latency.scatter(
            [r[0] for r in reservations], [r[1] for r in reservations], s=6, color=COLORS[0]
        )
    latency.set_xlim(-100, end)
    latency.set_xlabel("ms from the sale's start")
    latency.set_ylabel("reservation latency (ms)")
    latency.set_title("admitted shoppers' reservations, at the time each was answered")
    latency.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def storm(result: dict[str, Any], label: str, path: Path) -> None:
    series = result["series"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    fig.suptitle(
        f"Storm, {label}: {result['shoppers']:,} shoppers, {result['units']} units, "
        f"{result['sockets']:,} sockets"
    )
    for klass, color in STATUS_COLORS.items():
        points = [p for p in series["latency"] if p[2] // 100 == klass]
        if points:
            name = {2: "201 held", 4: "4xx (409 sold out)", 5: "5xx", 0: "no answer"}[klass]
            top.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                s=4,
                color=color,
                label=f"{name} ({len(points):,})",
                alpha=0.6,
            )
    top.set_ylabel("latency (ms)")
    top.set_title("each reservation: latency, at the time it was answered")
    top.legend(loc="upper left", markerscale=3)
    top.grid(alpha=0.3)

    end = max([p[0] for p in series["latency"]] + [result["sockets_at_zero_ms"].get("max") or 0])
    stats = [s for s in series["stats"] if s[0] <= end + 500]
    if stats:
        times = [s[0] for s in stats]
        bottom.step(times, [s[1] for s in stats], where="post", label="available (operator stats)")
        bottom.step(times, [s[2] for s in stats], where="post", label="held (operator stats)")
    # From the value the socket held 300 ms before the start (its snapshot, usually) on.
    earlier = [f for f in series["frames"] if f[0] < -300]
    frames = [[-300, earlier[-1][1]]] if earlier else []
    frames += [f for f in series["frames"] if f[0] >= -300]
    if frames:
        bottom.step(
            [f[0] for f in frames] + [end + 300],
            [f[1] for f in frames] + [frames[-1][1]],
            where="post",
            linestyle="--",
            label="available, as one socket saw it",
        )
    zero = result["sockets_at_zero_ms"].get("max")
    if zero is not None:
        bottom.axvline(zero, color="grey", linestyle=":", label=f"every socket at 0: {zero} ms")
    bottom.set_ylabel("units")
    bottom.set_xlabel("ms since the sale's start")
    bottom.set_title("stock")
    bottom.legend(loc="center right")
    bottom.grid(alpha=0.3)
    bottom.set_xlim(-300, end + 300)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wave(configs: list[dict[str, Any]], path: Path) -> None:
    runs = [c for c in configs if "wave" in c]
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.5))
    holds = runs[0]["wave"]["holds"]
    fig.suptitle(f"Expiry wave: {holds:,} holds due within one second, lateness to restored")
    for i, c in enumerate(runs):
        values = c["wave"]["series"]["restore_lateness_ms"]
        if not values:
            continue
        color = COLORS[i % len(COLORS)]
        hist.hist(values, bins=40, histtype="step", color=color, label=c["label"], linewidth=1.5)
        n = len(values)
        cdf.plot(values, [(k + 1) / n for k in range(n)], color=color, label=c["label"])
    hist.set_xlabel("lateness (ms)")
    hist.set_ylabel("holds")
    hist.set_title("histogram")
    cdf.axvline(250, color="grey", linestyle=":", label="goal: p99 ≤ 250 ms")
    cdf.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
    cdf.set_xlabel("lateness (ms)")
    cdf.set_ylabel("share of holds restored")
    cdf.set_title("CDF")
    for ax in (hist, cdf):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_SHORT = {
    "bare endpoint (before)": "bare\n(before)",
    "(a) reserve, ample stock": "(a) reserve,\nample stock",
    "(b) reserve, sold out": "(b) reserve,\nsold out",
    "(c) GET /api/products → 200": "(c) list\n→ 200",
    "(c) GET /api/products → 304": "(c) list\n→ 304",
    "(c) a page: GET /api/products?limit=100 → 200": "(c) a page\n→ 200",
    "(d) complete a hold": "(d) complete\na hold",
    "bare endpoint (after)": "bare\n(after)",
}


def paths(configs: list[dict[str, Any]], path: Path) -> None:
    runs = [c for c in configs if "paths" in c]
    names = [r["scenario"] for r in runs[0]["paths"]]
    fig, (absolute, share) = plt.subplots(2, 1, figsize=(11, 8))
    fig.suptitle("Throughput per path against the bare endpoint (wrk, same run)")
    width = 0.8 / len(runs)
    for i, c in enumerate(runs):
        rows = {r["scenario"]: r for r in c["paths"]}
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(names))]
        rps = [rows[n]["rps"] if n in rows else 0 for n in names]
        shares = [rows[n]["share_of_bare"] * 100 if n in rows else 0 for n in names]
        color = COLORS[i % len(COLORS)]
        bars = absolute.bar(xs, rps, width, label=c["label"], color=color)
        absolute.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in rps], fontsize=7)
        bars = share.bar(xs, shares, width, label=c["label"], color=color)
        share.bar_label(bars, labels=[f"{v:.0f}%" for v in shares], fontsize=7)
    for ax in (absolute, share):
        ax.set_xticks(range(len(names)), [_SHORT.get(n, n) for n in names])
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
        ax.legend(loc="upper center", ncols=len(runs))
    absolute.set_ylabel("requests/s")
    share.set_ylabel("% of the bare endpoint")
    share.axhline(50, color="grey", linestyle=":", linewidth=1)
    share.axhline(30, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steady(configs: list[dict[str, Any]], path: Path) -> None:
    runs = [c for c in configs if "steady" in c]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    fig.suptitle("Steady shop: mixed traffic")
    kinds = list(runs[0]["steady"]["kinds"])
    width = 0.8 / len(runs)
    for i, c in enumerate(runs):
        s = c["steady"]
        color = COLORS[i % len(COLORS)]
        per_second = s["series"]["per_second"]
        rate.plot(range(1, len(per_second) + 1), per_second, color=color, label=c["label"])
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(kinds))]
        p99 = [s["kinds"][k]["latency_ms"].get("p99", 0) for k in kinds]
        p50 = [s["kinds"][k]["latency_ms"].get("p50", 0) for k in kinds]
        latency.bar(xs, p99, width, color=color, alpha=0.45, label=f"{c['label']} p99")
        latency.bar(xs, p50, width, color=color, label=f"{c['label']} p50")
    rate.set_xlabel("second of the run")
    rate.set_ylabel("requests/s (all kinds)")
    rate.set_ylim(bottom=0)
    rate.set_title("throughput")
    latency.set_xticks(range(len(kinds)), kinds)
    latency.set_ylabel("ms")
    latency.set_title("latency per kind (p50 solid, p99 light)")
    for ax in (rate, latency):
        ax.grid(alpha=0.3)
    rate.legend()
    latency.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
