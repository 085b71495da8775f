"""Scenario: what bounding hostile clients costs the HTTP server (`bin/bench protocol`).

Three HTTP protocols: uvicorn's httptools protocol (no bound on a request's head size or
time), uvicorn's h11 protocol (bounds the head's size with
`--h11-max-incomplete-event-size`, no time limits), and ours (server/api/protocol.py:
httptools with head size, header count, header and body timeouts, connections per
address). It is why the service bounds these itself rather than switching to h11.

Measured two ways, each protocol in turn, several rounds:

- **in process**: CPU time (`time.process_time`) per request of the protocol and uvicorn's
  ASGI cycle answering the bare endpoint, bytes fed straight into the protocol on a uvloop
  loop, no sockets. What the protocol itself costs, and little disturbed by other work on
  the machine;
- **end to end**: the bare endpoint under the Procfile's uvicorn command with each protocol,
  driven by wrk, as a share of the first (this needs a quiet machine to mean anything).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from bench import stack, wrk

PROTOCOLS = {
    "httptools (uvicorn's, no bounds)": "httptools",
    "h11 (uvicorn's, head size bounded)": "h11 --h11-max-incomplete-event-size 16384",
    "bounded httptools (ours)": stack.BOUNDED_PROTOCOL,
}


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


class _Transport:
    """Just enough of a transport for a protocol to answer into."""

    def __init__(self) -> None:
        self.answered = asyncio.Event()
        self.closing = False

    def write(self, data: bytes) -> None:
        if data.endswith(b"}"):  # the bare endpoint's body
            self.answered.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.2", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


async def _in_process(http: str, requests: int) -> float:
    """CPU µs a request for `requests` keep-alive requests through protocol `http`."""
    from bench.bare import app

    config = Config(app=app, http=http.split()[0], lifespan="off", log_level="warning")
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    started = time.process_time()
    for _ in range(requests):
        transport.answered.clear()
        protocol.data_received(REQUEST)
        await transport.answered.wait()
    used = time.process_time() - started
    protocol.connection_lost(None)
    return used * 1e6 / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench protocol", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="each protocol, alternating")
    parser.add_argument("--requests", type=int, default=20_000, help="per in-process round")
    parser.add_argument("--in-process-only", action="store_true")
    args = parser.parse_args(argv)
    print("in process: CPU a request (protocol and ASGI cycle, bare endpoint)", flush=True)
    inside: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    for _ in range(args.rounds):
        for name, http in PROTOCOLS.items():
            inside[name].append(uvloop.run(_in_process(http, args.requests)))
    base_cpu = min(inside["httptools (uvicorn's, no bounds)"])
    for name, measured in inside.items():
        best = min(measured)
        print(f"  {name:<36} {best:6.1f} µs (best of {args.rounds})   {best / base_cpu:5.2f}×")
    if args.in_process_only:
        return 0
    print("\nend to end, with wrk:", flush=True)
    load = wrk.Load("/", connections=args.connections, seconds=args.seconds)
    rates: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    cpu: dict[str, list[float]] = {name: [] for name in PROTOCOLS}  # µs a request
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as work:
        for round_ in range(args.rounds):
            for name, http in PROTOCOLS.items():
                run_dir = Path(work) / f"{round_}-{len(rates[name])}-{http.split()[0][-8:]}"
                run_dir.mkdir()
                with stack.bare(run_dir, web_concurrency=1, http=http) as bare:
                    before = stack.cpu_seconds(bare.pid)
                    result = wrk.run(bare.base_url, load)
                    used = stack.cpu_seconds(bare.pid) - before
                rates[name].append(result.rps)
                cpu[name].append(used * 1e6 / max(result.requests, 1))
                print(f"  {name:<36} {result.rps:>9,.0f} req/s   p99 "
                      f"{result.p99_us / 1000:6.2f} ms   {cpu[name][-1]:5.1f} µs CPU a request",
                      flush=True)  # fmt: skip
    base = sum(rates["httptools (uvicorn's, no bounds)"]) / args.rounds
    print("\nshare of uvicorn's httptools, and CPU a request (means of the rounds):")
    for name, measured in rates.items():
        cost = sum(cpu[name]) / len(cpu[name])
        print(f"  {name:<36} {sum(measured) / len(measured) / base:6.1%}   {cost:5.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
