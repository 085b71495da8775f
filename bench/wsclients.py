"""A process holding many /ws clients, for the fan-out benchmark.

`python -m bench.wsclients URL COUNT PRODUCT_ID` opens COUNT sockets to URL and records, for
each, when it received each version (and available stock) of PRODUCT_ID. It prints `ready N`
once every socket has its snapshot, then answers commands on stdin, one per line:

- `report VERSION`: one JSON line, `{"times": [...], "missing": n}`: for each socket, the
  epoch milliseconds at which it first held VERSION or newer (a socket that has not is
  counted in `missing`).
- `available N`: the same, for the first frame that showed N or fewer units available.
- `series`: one JSON line, `[[epoch ms, available], ...]`: every value the first socket saw.
- `quit`.

The clients are lean on purpose (a raw asyncio protocol on uvloop that finds the version
with a regular expression and answers pings), so that the measuring does not take the CPU
the server needs: a general WebSocket client spends several times more per frame.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import struct
import sys
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import uvloop

_VERSION = re.compile(
    rb'"(?:productId|id)":(\d+)[^{}]*?"availableStock":(\d+)[^{}]*?"version":(\d+)'
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Client(asyncio.Protocol):
    def __init__(self, product_id: int, host: str, path: str) -> None:
        self.product = str(product_id).encode()
        self.host, self.path = host, path
        self.seen: list[tuple[int, int, int]] = []  # (version, available, time)
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(head.decode(errors="replace")))
                return
            self.upgraded, self.buffer = True, rest
        while len(self.buffer) >= 2:
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, offset = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, offset = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if len(self.buffer) < offset + length:
                return
            payload = self.buffer[offset : offset + length]
            self.buffer = self.buffer[offset + length :]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9 and self.transport is not None:  # ping: answer, masked (key 0)
            self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            return
        if opcode != 0x1:
            return
        now = _now_ms()
        for product_id, available, version in _VERSION.findall(payload):
            if product_id == self.product:
                self.seen.append((int(version), int(available), now))
        if not self.ready.done() and payload.startswith(b'{"type":"snapshot"'):
            self.ready.set_result(None)


def _returning(client: Client) -> Callable[[], Client]:
    return lambda: client


def report(clients: list[Client], version: int) -> dict[str, object]:
    times, missing = [], 0
    for client in clients:
        at = next((t for v, _, t in client.seen if v >= version), None)
        if at is None:
            missing += 1
        else:
            times.append(at)
    return {"times": times, "missing": missing}


def report_available(clients: list[Client], available: int) -> dict[str, object]:
    times, missing = [], 0
    for client in clients:
        at = next((t for _, a, t in client.seen if a <= available), None)
        if at is None:
            missing += 1
        else:
            times.append(at)
    return {"times": times, "missing": missing}


async def main(url: str, count: int, product_id: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for start in range(0, count, 100):  # connect in batches: a handshake storm of our own
        batch = [
            Client(product_id, f"{host}:{port}", parts.path)
            for _ in range(start, min(start + 100, count))
        ]
        await asyncio.gather(*(loop.create_connection(_returning(c), host, port) for c in batch))
        await asyncio.gather(*(c.ready for c in batch))
        clients += batch
    print(f"ready {count}", flush=True)

    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "quit":
            break
        command, _, argument = line.partition(" ")
        if command == "report":
            print(json.dumps(report(clients, int(argument))), flush=True)
        elif command == "available":
            print(json.dumps(report_available(clients, int(argument))), flush=True)
        elif command == "series":
            print(json.dumps([[t, a] for _, a, t in clients[0].seen]), flush=True)
    for client in clients:
        if client.transport is not None:
            client.transport.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
