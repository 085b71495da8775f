"""Webhook endpoints, as the operator manages them: register (the signing secret shown
once), enable and disable, rotate the secret, look at recent deliveries, redeliver one,
delete one.

Delivery itself is the worker's (`server.service.delivery.Deliverer`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Sequence

from server.domain import webhooks
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.webhooks import Delivery, Endpoint
from server.storage.database import Store

# After a rotation the secret rotated out signs too, for this long: time for the shop to
# deploy the new one (receivers accept any of the signatures in the header). Each secret
# rotated out keeps its own day, up to `webhooks.MAX_LIVE_SECRETS` signing at once.
SECRET_GRACE_MS = 24 * 3_600_000
DISABLED_BY_OPERATOR = "disabled by the operator"
# Deliveries removed per write transaction when an endpoint is deleted: its history may be
# months of events, and one statement for all of it would hold SQLite's write lock.
DELETE_BATCH = 1000
# How often a deletion looks whether the workers have stopped sending to the endpoint.
DELETE_POLL_S = 0.05

logger = logging.getLogger(__name__)


def new_secret() -> str:
    """`whsec_` and 32 random bytes in base64, as the Standard Webhooks libraries take it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Webhooks:
    """The endpoints of `store`. Methods that name an endpoint return None (or False) when
    there is no such endpoint."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, *, url: str, events: Sequence[str], description: str) -> Endpoint:
        """Register an endpoint; the returned one carries its secret (shown once). Its id is
        one no endpoint had before (`webhooks.create_endpoint`). Raises TooManyEndpoints."""
        secret = new_secret()
        return await self.store.write(
            lambda conn: webhooks.create_endpoint(
                conn,
                url=url,
                events=events,
                description=description,
                secret=secret,
                now=now_ms(),
                postgres=not self.store.is_sqlite,
            )
        )

    async def all(self) -> list[Endpoint]:
        async with self.store.reader() as conn:
            return await webhooks.endpoints(conn)

    async def get(self, endpoint_id: int) -> Endpoint | None:
        async with self.store.reader() as conn:
            found = await webhooks.endpoints(conn, endpoint_id)
        return found[0] if found else None

    async def set_enabled(self, endpoint_id: int, enabled: bool) -> Endpoint | None:
        """Enable (failing queues are tried again at once) or disable an endpoint; None if
        there is no such endpoint. Raises EndpointBeingDeleted, TooManyEndpoints."""
        reason = None if enabled else DISABLED_BY_OPERATOR
        changed = await self.store.write(
            lambda conn: webhooks.set_enabled(
                conn,
                endpoint_id,
                enabled=enabled,
                reason=reason,
                now=now_ms(),
                postgres=not self.store.is_sqlite,
            )
        )
        return await self.get(endpoint_id) if changed else None

    async def rotate(self, endpoint_id: int) -> Endpoint | None:
        """A new secret (returned, shown once); the one it replaces signs too for a day, as
        does one rotated out earlier while its day lasts (at most three sign at once: a
        third rotation within a day drops the oldest). None if there is no such endpoint.
        Raises EndpointBeingDeleted."""
        secret = new_secret()

        async def rotate(conn: Executor) -> bool:
            now = now_ms()
            return await webhooks.rotate_secret(
                conn, endpoint_id, secret=secret, grace_until=now + SECRET_GRACE_MS, now=now
            )

        if not await self.store.write(rotate):
            return None
        return await self.get(endpoint_id)

    async def delete(self, endpoint_id: int, *, wait_s: float) -> bool:
        """Delete an endpoint, its queues and every delivery to it (the waiting ones are
        dropped: none is sent after this returns). False if there is no such endpoint.

        First it is disabled (`webhooks.begin_delete`): no queue of it is leased again and
        each worker stops sending to it at its run's next attempt, once its next turn reads
        the endpoints (within WEBHOOK_POLL_MS). Then this waits, at most `wait_s` (the
        caller gives WEBHOOK_TIMEOUT_SECONDS and a margin: an attempt on the wire ends
        within the timeout), until no worker holds a lease on its queues or a redelivery to
        it: a lease still held after that is a dead worker's, which sends nothing. Then the
        deliveries go, `DELETE_BATCH` a transaction, and the endpoint with its queues. If
        this process stops half-way the endpoint stays disabled, `being deleted`, and a
        new DELETE finishes it."""
        if not await self.store.write(
            lambda conn: webhooks.begin_delete(
                conn, endpoint_id, now=now_ms(), postgres=not self.store.is_sqlite
            )
        ):
            return False
        deadline = time.monotonic() + wait_s
        while True:
            async with self.store.reader() as conn:
                busy = await webhooks.sending(conn, endpoint_id, now=now_ms())
            if not busy or time.monotonic() >= deadline:
                break
            await asyncio.sleep(DELETE_POLL_S)
        dropped = 0
        while True:
            removed, waiting = await self.store.write(
                lambda conn: webhooks.remove_deliveries(conn, endpoint_id, limit=DELETE_BATCH)
            )
            dropped += waiting
            if removed < DELETE_BATCH:
                break
        deleted = await self.store.write(lambda conn: webhooks.delete_endpoint(conn, endpoint_id))
        if deleted:
            logger.info(
                "webhook endpoint %d deleted; %d deliveries still waiting were dropped",
                endpoint_id,
                dropped,
            )
        return deleted

    async def deliveries(self, endpoint_id: int, *, limit: int) -> list[Delivery] | None:
        async with self.store.reader() as conn:
            if not await webhooks.endpoints(conn, endpoint_id):
                return None
            return await webhooks.recent_deliveries(conn, endpoint_id, limit=limit)

    async def redeliver(self, endpoint_id: int, event_id: str) -> bool:
        return await self.store.write(
            lambda conn: webhooks.redeliver(conn, endpoint_id, event_id, now=now_ms())
        )
