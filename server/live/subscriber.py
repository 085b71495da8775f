"""The one Redis subscription of a web process.

It feeds every frame published by any process (web or worker) to this process's catalog and
to whoever else listens (the WebSocket hub). Messages published while it is disconnected are
lost, so after every (re)subscribe it reloads the products from the database and passes on,
as stock frames, whatever changed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from pydantic_core import from_json, to_json
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.domain.waitingroom import RoomChanged
from server.infra.keys import events_channel
from server.infra.logs import RareLog
from server.infra.metrics import PUBSUB_RECONNECTS
from server.infra.redis_client import database_of
from server.service.catalog import Catalog
from server.storage.database import Store
from server.storage.errors import StorageError
from server.wire.frames import (
    product_frame,
    product_from_frame,
    reservation_from_message,
    room_from_message,
    stock_frame,
    stock_from_frame,
)

logger = logging.getLogger(__name__)

Frame = dict[str, Any]
# A listener gets each message as parsed, as sent (its JSON: what pages are sent), and, for
# room news, the `RoomChanged` its check made of it (None for any other kind): checked once
# here, not again by each listener.
FrameListener = Callable[[Frame, bytes, RoomChanged | None], None]

MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# How often the catalog is reloaded anyway, in case a frame was missed while connected.
RELOAD_SECONDS = 5.0
# Every how many of those reloads one reads every row whole (the others read the versions
# and whole only the rows whose version differs): a row at the catalog's version with other
# content (a database fallen back a version or two, to a replica that lost the last commit
# or a restore, then moved on) is taken within a minute, not never (the attacker's review).
RELOAD_WHOLE_EVERY = 12
MALFORMED_LOG_SECONDS = 60.0


class Subscriber:
    def __init__(self, redis: Redis, store: Store, catalog: Catalog) -> None:
        self._redis = redis
        self._channel = events_channel(database_of(redis))
        self._store = store
        self._catalog = catalog
        # Each product's version the last stock frame of `_resync` gave the listeners: a
        # periodic reload passes on only the products whose version moved since.
        self._told: dict[int, int] = {}
        self._listeners: list[FrameListener] = []
        self._task: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._stopping = False
        # Malformed messages: at most one warning a minute, however many come.
        self._malformed = RareLog(logger, MALFORMED_LOG_SECONDS)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def listen(self, listener: FrameListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-subscriber")
        self._reloader = asyncio.create_task(self._reload_forever(), name="catalog-reloader")

    async def stop(self) -> None:
        # Cancelling is not enough on its own: redis-py can swallow a cancellation that
        # lands while a read waits inside its timeout (redis/redis-py#2551). The loop also
        # checks this flag after every bounded wait.
        self._stopping = True
        for task in (self._task, self._reloader):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._reloader) if t), return_exceptions=True
        )

    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        while not self.stopping:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.connected.set()
                    backoff = MIN_BACKOFF
                    await self._resync()
                    while not self.stopping:
                        # Not listen(): a bounded wait lets redis-py send its health-check
                        # PING on an idle subscription, and keeps socket timeouts away.
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message["type"] == "message":
                            self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, StorageError) as exc:
                was_connected = self.connected.is_set()
                self.connected.clear()
                if was_connected:
                    PUBSUB_RECONNECTS.inc()
                    logger.warning("live updates: lost Redis (%s); reconnecting", exc)
            except Exception:
                self.connected.clear()
                logger.exception("live updates: subscriber failed; restarting it")
            if not self.stopping:
                # Back off with jitter, so that all processes don't hammer a recovering Redis.
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _dispatch(self, raw: bytes) -> None:
        news = None
        try:
            frame = from_json(raw)
            if frame["type"] == "stock":
                product_id, available, version, held = stock_from_frame(frame)
                self._catalog.apply_stock(product_id, available, version, held=held)
            elif frame["type"] == "product":
                if "reset" in frame:
                    # A process's resets are its own (`_resync`): a peer's would take the
                    # pages' versions back here, where the catalog took nothing back.
                    raise ValueError("reset: not a field of a published product frame")
                self._catalog.apply(product_from_frame(frame["product"]))
            elif frame["type"] == "room":
                # Checked whole before any listener sees it: the hub's steps, counts and
                # echoes, and the admitter's nudge, change only for sound news; and passed on
                # as checked, not parsed again by the hub.
                news = room_from_message(frame)
            elif frame["type"] == "reservation":
                # Checked as room news is: one without a reservation reached the hub, whose
                # KeyError was logged with its traceback for each such message.
                reservation_from_message(frame)
        # OverflowError: `int()` of an infinity (the JSON parser takes `1e400`, `Infinity`),
        # which escaped to `_run` as a failed subscriber: a new subscription, a catalog
        # reload, and every message published meanwhile lost, for each such message.
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            self._malformed.warning(
                "live updates: ignoring a malformed message (%s): %r", exc, raw[:200]
            )
            return
        self._emit(frame, raw, news)

    def _emit(self, frame: Frame, raw: bytes, news: RoomChanged | None = None) -> None:
        for listener in self._listeners:
            try:
                listener(frame, raw, news)
            except Exception:
                logger.exception("live updates: a listener failed")

    async def _resync(self, *, whole: bool = True) -> None:
        """Catch up with what was published while we were not subscribed (`whole`: after
        every subscribe, and every RELOAD_WHOLE_EVERY periodic reloads), or with a frame
        missed while subscribed (every RELOAD_SECONDS).

        After a subscribe every product's stock is passed on, not only what the catalog had
        not seen: this process's own commits reach its catalog at once but its sockets only
        through Redis, so a change committed while Redis was away is in the catalog and on
        no page. The periodic reload reads whole only the rows whose version differs from
        the catalog's (`Catalog.reload`) and passes on the stock of every product whose
        version moved since the last stock frame given here: the same frames, without
        building and sending 10,000 unchanged ones every 5 s on a month of history (~90 ms
        of the event loop in one piece, the waiting room's joins before a start waiting
        behind it). The listeners drop what they have already sent, by version. A product
        the catalog took back from the database (`Catalog.reload`'s resets: a restored
        database, or a version far ahead from a faulty peer undone) goes as a `product`
        frame marked `reset`: the hub and the pages take it, and the product's frames from
        it, whatever versions they told or hold."""
        resets: set[int] = set()
        for product in await self._catalog.reload(self._store, resets=resets, whole=whole):
            frame = product_frame(product, reset=product.id in resets)
            self._emit(frame, to_json(frame))
        told = self._told
        for product in self._catalog.all():
            if not whole and told.get(product.id) == product.version:
                continue
            told[product.id] = product.version
            frame = stock_frame(product)
            self._emit(frame, to_json(frame))

    async def _reload_forever(self) -> None:
        reloads = 0
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            reloads += 1
            try:
                await self._resync(whole=reloads % RELOAD_WHOLE_EVERY == 0)
            except StorageError as exc:
                logger.warning("catalog reload failed: %s", exc)
            except Exception:
                logger.exception("catalog reload failed")
