"""A shop's webhook receiver for the tests: a small Starlette app on a real uvicorn server,
that verifies every request's signature with the `standardwebhooks` library, as a shop
would, and keeps what it got.

It can be told to fail (`fail_next` answers 500 that many times) and be stopped and started
again on the same port (down for a while, then back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.devtools.embedded_redis import free_port


@dataclass(frozen=True)
class Received:
    """A verified delivery, in the order it arrived."""

    id: str
    timestamp: int
    type: str
    body: dict[str, Any]
    at: float  # time.time() on arrival

    @property
    def product_id(self) -> int:
        data = self.body["data"]
        return int(data["stock"]["productId"])

    @property
    def position(self) -> tuple[int, int]:
        stock = self.body["data"]["stock"]
        return int(stock["version"]), int(stock["sequence"])


class Receiver:
    """`secret`: the endpoint's signing secret (set once the endpoint is registered)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.secret: str | None = None
        self.received: list[Received] = []
        self.attempts = 0
        self.refused_signatures = 0
        self.fail_next = 0
        self.delay = 0.0  # seconds each request takes (a slow receiver)
        # When given: each request is answered only once it is set (an attempt held on the
        # wire for as long as a test needs, whatever the machine's load).
        self.answer_after: asyncio.Event | None = None
        self.failure_body = b"not now"  # what a refusal (`fail_next`) says
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: Request) -> Response:
        self.attempts += 1
        body = await request.body()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.answer_after is not None:
            await self.answer_after.wait()
        if self.fail_next > 0:
            self.fail_next -= 1
            return Response(self.failure_body, status_code=500)
        if self.secret is None:
            return Response("no secret yet", status_code=503)
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.refused_signatures += 1
            self._changed.set()
            return Response("bad signature", status_code=401)
        self.received.append(
            Received(
                id=request.headers["webhook-id"],
                timestamp=int(request.headers["webhook-timestamp"]),
                type=payload["type"],
                body=payload,
                at=time.time(),
            )
        )
        self._changed.set()
        return Response(status_code=204)

    async def start(self) -> None:
        app = Starlette(routes=[Route("/hooks", self._hook, methods=["POST"])])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)
        self._server, self._task = None, None

    async def wait_for(self, count: int, *, within: float = 30.0, what: str = "") -> None:
        """Until `count` distinct webhook-ids have been received, or fail after `within` s."""
        deadline = time.monotonic() + within
        while len(self.ids()) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"received {len(self.ids())} of {count} events{what} ({self.attempts} attempts)"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def ids(self) -> set[str]:
        return {r.id for r in self.received}

    def duplicates(self) -> Counter[str]:
        return Counter(r.id for r in self.received) - Counter(self.ids())

    def in_order_per_product(self) -> bool:
        """Each product's events arrived in (version, sequence) order (a resend of an
        event already received may come again, never an older one after a newer)."""
        last: dict[int, tuple[int, int]] = {}
        seen: set[str] = set()
        for r in self.received:
            if r.id in seen:
                continue
            seen.add(r.id)
            if r.position < last.get(r.product_id, (0, -1)):
                return False
            last[r.product_id] = r.position
        return True

    def types(self) -> Counter[str]:
        first = {r.id: r.type for r in self.received}
        return Counter(first.values())


def body_of(received: Received) -> str:
    return json.dumps(received.body)
