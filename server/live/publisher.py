"""Publishing live-update frames (docs/design.md §6) to Redis, after commit.

A frame is the exact JSON text a browser receives over `/ws` (server/wire/frames.py); it is
rendered once, here, by whichever process made the change (a web process or the worker),
and every web process forwards it as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic_core import to_json
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.domain.clock import now_ms
from server.domain.model import Event, Product, ProductChanged, ReservationChanged, StockChanged
from server.domain.waitingroom import RoomChanged
from server.infra.background import Drainer
from server.infra.keys import events_channel
from server.infra.metrics import EVENTS_PUBLISHED, FRAMES_DROPPED, PUBLISH_FAILURES
from server.infra.redis_client import database_of
from server.wire.frames import product_frame, reservation_frame, room_message, stock_frame

logger = logging.getLogger(__name__)

# Reservation frames kept while Redis is unreachable; beyond this the oldest are dropped
# (their pages learn the outcome from the hold's own expiresAt or by asking again).
MAX_PENDING_RESERVATION_FRAMES = 50_000


class Publisher(Drainer):
    """Publishes events on the events channel (`events_channel`, for the client's
    database), one frame per message, pipelined.

    Stock frames are coalesced per product to the highest version not yet sent: a page
    needs the latest stock, not every step. While Redis is unreachable the latest state is
    kept and sent once it is back.
    """

    name = "event-publisher"

    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self._redis = redis
        self._channel = events_channel(database_of(redis))
        self._products: dict[int, Product] = {}
        self._stock: dict[int, Product] = {}
        self._reservations: dict[str, ReservationChanged] = {}
        # News of waiting rooms, merged per product until sent: admission steps' news
        # (numbered) apart from the rest (joins, leaves, passes used), which a hub must not
        # drop with a step's news it has told already (server/live/hub.py).
        self._rooms: dict[tuple[int, bool], RoomChanged] = {}

    def publish(self, events: Iterable[Event | RoomChanged]) -> None:
        for event in events:
            if isinstance(event, RoomChanged):
                room = (event.product_id, event.step is not None)
                earlier = self._rooms.get(room)
                self._rooms[room] = event if earlier is None else earlier.merged(event)
            elif isinstance(event, StockChanged):
                _keep_newest(self._stock, event.product)
            elif isinstance(event, ProductChanged):
                _keep_newest(self._products, event.product)
            else:
                self._reservations[event.reservation.id] = event
        overflow = len(self._reservations) - MAX_PENDING_RESERVATION_FRAMES
        if overflow > 0:
            for key in list(self._reservations)[:overflow]:
                del self._reservations[key]
            FRAMES_DROPPED.inc(overflow)
        self.wake()

    def has_work(self) -> bool:
        return bool(self._products or self._stock or self._reservations or self._rooms)

    async def drain(self) -> float | None:
        products, stock, reservations = self._products, self._stock, self._reservations
        rooms = self._rooms
        self._products, self._stock, self._reservations, self._rooms = {}, {}, {}, {}
        now = now_ms()
        frames = [
            *(product_frame(p) for p in products.values()),
            *(stock_frame(p) for p in stock.values()),
            *(reservation_frame(r, now=now) for r in reservations.values()),
            *(room_message(news) for news in rooms.values()),
        ]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for frame in frames:
                    pipe.publish(self._channel, to_json(frame))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            PUBLISH_FAILURES.inc()
            logger.warning("could not publish %d events (%s); will retry", len(frames), exc)
            # Keep them, behind anything newer that arrived meanwhile.
            for product in products.values():
                _keep_newest(self._products, product)
            for product in stock.values():
                _keep_newest(self._stock, product)
            self._reservations = {**reservations, **self._reservations}
            for key, news in rooms.items():
                later = self._rooms.get(key)
                self._rooms[key] = news if later is None else news.merged(later)
            return 0.5
        EVENTS_PUBLISHED.inc(len(frames))
        return None


def _keep_newest(pending: dict[int, Product], product: Product) -> None:
    current = pending.get(product.id)
    if current is None or current.version <= product.version:
        pending[product.id] = product
