"""Scenario: what bounding hostile clients costs the HTTP server (`bin/bench protocol`).

The bare endpoint under three HTTP protocols, at the same load, in the same run:
uvicorn's httptools protocol (no bound on a request's head size or time), uvicorn's h11
protocol (bounds the head's size with `--h11-max-incomplete-event-size`, no time limits),
and ours (server/api/protocol.py: httptools with head size, header count, header and body
timeouts, connections per address). Each as a share of the first: it is why the service
bounds these itself rather than switching to h11.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import stack, wrk

PROTOCOLS = {
    "httptools (uvicorn's, no bounds)": "httptools",
    "h11 (uvicorn's, head size bounded)": "h11 --h11-max-incomplete-event-size 16384",
    "bounded httptools (ours)": stack.BOUNDED_PROTOCOL,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench protocol", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="each protocol, alternating")
    args = parser.parse_args(argv)
    load = wrk.Load("/", connections=args.connections, seconds=args.seconds)
    rates: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as work:
        for round_ in range(args.rounds):
            for name, http in PROTOCOLS.items():
                run_dir = Path(work) / f"{round_}-{len(rates[name])}-{http.split()[0][-8:]}"
                run_dir.mkdir()
                with stack.bare(run_dir, web_concurrency=1, http=http) as bare:
                    result = wrk.run(bare.base_url, load)
                rates[name].append(result.rps)
                print(f"  {name:<36} {result.rps:>9,.0f} req/s   p99 "
                      f"{result.p99_us / 1000:6.2f} ms", flush=True)  # fmt: skip
    base = sum(rates["httptools (uvicorn's, no bounds)"]) / args.rounds
    print("\nshare of uvicorn's httptools (mean of the rounds):")
    for name, measured in rates.items():
        print(f"  {name:<36} {sum(measured) / len(measured) / base:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
