"""The web process: routes, middleware, and the lifespan that owns every connection."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import WebSocketRoute

from server.api import admin, books, openapi, pages, queue, shopkeys, system, webhooks
from server.api import shop as storefront
from server.api.http import EXCEPTION_HANDLERS
from server.api.identity import Identities, ShopperCookie
from server.api.middleware import Observed
from server.api.ratelimit import FailureThrottle, RateLimiter, RecentKeys
from server.domain.clock import now_ms
from server.domain.waitingroom import RoomChanged
from server.infra import gcpauses
from server.infra.gcpauses import SaleQuiet, time_gc_pauses
from server.infra.logs import configure_logging
from server.infra.metrics import DEFERRED
from server.infra.redis_client import redis_client_for
from server.infra.settings import Settings
from server.live.hub import Hub, live_updates
from server.live.publisher import Publisher
from server.live.subscriber import Subscriber
from server.service.catalog import Catalog
from server.service.expiry import ExpiryScheduler
from server.service.ledger import Ledger
from server.service.shop import Shop
from server.service.shopkeys import ShopKeys
from server.service.waitingroom import Admitter, WaitingRoom
from server.service.webhooks import Webhooks
from server.storage import migrate
from server.storage.database import Store

logger = logging.getLogger(__name__)


class SchemaNotReady(RuntimeError):
    pass


@functools.cache
def tune_garbage_collector() -> None:
    """Every request allocates a few hundred short-lived objects; at the default threshold
    the collector runs every few requests and cost ~10% of the throughput and most of the
    p99 (bench/README.md). Objects made at start-up live forever: freeze them out of the
    collector's scans. Once per process. Every collection is timed from then on
    (server/infra/gcpauses.py); this first one is not logged as slow, as nobody waits on it."""
    time_gc_pauses()
    with gcpauses.unlogged():
        gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _nudge_rooms(
    catalog: Catalog,
    admitter: Admitter,
    room: WaitingRoom,
    frame: dict[str, Any],
    raw: bytes,
    news: RoomChanged | None,
) -> None:
    """A stock change of a product with a waiting room, or a join or leave while its sale is
    on, from any process: the admitter steps at once, if it is the one admitting. News
    that moved someone in line (named, admitted, closed; or a step whose count of passes
    out is not the line's as read) makes positions here be read again soon."""
    kind = frame.get("type")
    if kind not in ("stock", "room") or (kind == "room" and news is None):
        return
    product = catalog.get(news.product_id if news is not None else int(frame["productId"]))
    if product is None or product.queue == "off":
        return
    if news is not None:
        room.counts_changed(product.id)
        if news.everyone or news.shoppers or news.passed or news.closed:
            room.moved(product.id)  # someone left the line, or was admitted or closed
    if kind == "stock":
        admitter.nudge(product.id)
    elif news is not None and news.waiting is not None:
        # An admission step's news (its own, too: no nudge). One that moved nobody (it
        # counted the joins since the last: a sale's first second, a step every 20 ms)
        # leaves the line as read, unless the passes out changed (a view's estimate reads
        # them): read again for each, the line was read every 0.2 s in a storm of joins,
        # 15,000 places each time, and the joins answered meanwhile waited for it.
        line = room.cached_line(product.id)
        if line is None or line.admitted != news.admitted:
            room.moved(product.id)
    elif product.sale_state(now_ms()) == "open":
        admitter.nudge(product.id)  # a join or a leave while the sale is on


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            store = Store(settings.database_url, busy_timeout_ms=settings.db_busy_timeout_ms)
            await store.connect()
            stack.callback(DEFERRED.flush)  # last: what the closing steps counted
            stack.push_async_callback(store.close)
            waiting = await migrate.pending(store)
            if waiting:
                names = ", ".join(f"{m.version:04d}_{m.name}" for m in waiting)
                raise SchemaNotReady(
                    f"the database needs migrations ({names}): run `python -m server migrate`"
                )

            redis = redis_client_for(settings)
            stack.push_async_callback(redis.aclose)

            catalog = Catalog()
            await catalog.reload(store)
            publisher = Publisher(redis)
            publisher.start()
            stack.push_async_callback(publisher.stop)
            scheduler = ExpiryScheduler(redis, bucket_ms=settings.expiry_bucket_ms)
            scheduler.start()
            stack.push_async_callback(scheduler.stop)

            shop = Shop(
                store,
                hold_ms=round(settings.hold_seconds * 1000),
                publish=publisher.publish,
                scheduler=scheduler,
                catalog=catalog,
                deadline_ms=settings.db_busy_timeout_ms,
            )
            await shop.start()
            stack.push_async_callback(shop.stop)

            # The waiting room (issue 17): this process's admitter (it admits while it
            # holds the lease), and the shoppers' side, whose reservations it gates.
            admitter = Admitter(
                store,
                transactions=shop.transactions,
                publish=publisher.publish,
                pass_ms=round(settings.pass_seconds * 1000),
                tick_ms=settings.queue_tick_ms,
                lease_ms=settings.queue_lease_ms,
            )
            room = WaitingRoom(
                store,
                publish=publisher.publish,
                opens_ms=round(settings.queue_opens_seconds * 1000),
                catalog=catalog,
                nudge=admitter.nudge,
            )
            shop.room = room
            await room.start()
            stack.push_async_callback(room.stop)
            admitter.start()
            stack.push_async_callback(admitter.stop)

            hub = Hub(
                catalog,
                room=room,
                max_clients=settings.ws_max_clients,
                max_per_client=settings.ws_max_per_client,
                max_per_address=settings.max_connections_per_client,
            )
            admitter.local = hub.room_news  # its news to this process's pages at once
            subscriber = Subscriber(redis, store, catalog)
            subscriber.listen(hub.publish)
            subscriber.listen(functools.partial(_nudge_rooms, catalog, admitter, room))
            subscriber.start()
            stack.push_async_callback(subscriber.stop)
            stack.push_async_callback(hub.close_all)

            app.state.settings = settings
            app.state.redis = redis
            app.state.shop = shop
            app.state.ledger = Ledger(store)
            app.state.webhooks = Webhooks(store)
            app.state.shop_keys = ShopKeys(store, settings.shop_api_keys)
            app.state.publisher = publisher
            app.state.scheduler = scheduler
            app.state.subscriber = subscriber
            app.state.hub = hub
            app.state.room = room
            app.state.queue_counts = queue.RenderedCounts(room)  # GET /api/queues' answers
            app.state.admitter = admitter
            app.state.recent_keys = RecentKeys()  # holds made or replayed here (a hint)
            app.state.rate_limiter = (
                RateLimiter(
                    redis,
                    count=limit[0],
                    per_seconds=limit[1],
                    timeout_s=settings.reserve_rate_limit_wait_ms / 1000,
                )
                if (limit := settings.reserve_rate_limit)
                else None
            )
            tune_garbage_collector()
            # No collections in a sale's first seconds (server/infra/gcpauses.py).
            quiet = asyncio.create_task(
                SaleQuiet(catalog.sale_starts).run(),
                name="gc-sale-quiet",
            )
            stack.push_async_callback(_cancel, quiet)
            yield

    identities = Identities(settings)
    middleware = [
        Middleware(Observed, max_in_flight=settings.max_in_flight, access_log=settings.access_log),
        Middleware(ShopperCookie, identities=identities),
    ]
    if settings.cors_origins:
        # Only other origins need CORS; the page's own origin never does. Without origins
        # configured the middleware would only add work to every request.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Content-Type",
                    "Idempotency-Key",
                    "Authorization",
                    "If-None-Match",
                    "Shopper-Token",
                ],
                expose_headers=["ETag", "Date", "Retry-After", "Idempotent-Replayed"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=[
            *storefront.routes,
            *admin.routes,
            *queue.routes,
            *books.routes,
            *webhooks.routes,
            *shopkeys.routes,
            *system.routes,
            *openapi.routes,
            WebSocketRoute("/ws", live_updates),
            *pages.routes,
        ],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.identities = identities
    app.state.sign_in_throttle = FailureThrottle(*settings.admin_sign_in_limit)
    app.state.shop_key_throttle = FailureThrottle(
        *settings.admin_sign_in_limit, what="shop API key"
    )
    return app
