"""Listening to the live-update channel in tests: wait for a frame, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic_core import from_json
from redis.asyncio import Redis

from server.infra.keys import EVENTS_CHANNEL

Frame = dict[str, Any]


class FrameLog:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._changed = asyncio.Condition()

    async def add(self, frame: Frame) -> None:
        async with self._changed:
            self.frames.append(frame)
            self._changed.notify_all()

    async def wait_for(
        self, match: Callable[[Frame], bool], *, count: int = 1, within: float = 10.0
    ) -> list[Frame]:
        """The first `count` frames that `match`, once they have all arrived."""

        def found() -> list[Frame]:
            return [f for f in self.frames if match(f)]

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(found()) >= count), within
                )
            except TimeoutError:
                raise AssertionError(
                    f"only {len(found())} of {count} expected frames within {within} s"
                ) from None
            return found()[:count]


def reservation_status(reservation_id: str, status: str) -> Callable[[Frame], bool]:
    def match(frame: Frame) -> bool:
        return (
            frame.get("type") == "reservation"
            and frame["reservation"]["id"] == reservation_id
            and frame["reservation"]["status"] == status
        )

    return match


@asynccontextmanager
async def listening(redis_url: str, channel: str = EVENTS_CHANNEL) -> AsyncIterator[FrameLog]:
    """Subscribe to the events channel (database 0's unless told); frames are collected
    until the block ends."""
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    log = FrameLog()

    async def pump() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                await log.add(from_json(message["data"]))

    task = asyncio.create_task(pump())
    try:
        yield log
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()
