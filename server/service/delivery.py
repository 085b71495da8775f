"""Delivering the outbox as webhooks, signed to the Standard Webhooks specification.

The worker runs one `Deliverer` beside its expiry jobs. Its loop, on a timer of its own
(`WEBHOOK_POLL_MS`), needs only the database: Redis can be flushed or down and nothing is
lost, since every event is a row written with the change that caused it.

- New events are handed to the endpoints (`webhooks.dispatch`), product by product in order.
- Up to `WEBHOOK_CONCURRENCY` (endpoint, product) queues are leased at once; each leased
  queue's next deliveries are sent one after another, in (version, seq) order, and the run
  stops at the first failure, so a product's events reach an endpoint in order. Queues of
  different products go in parallel. A lease lasts `3 × WEBHOOK_TIMEOUT_SECONDS + 5 s` and a
  run stops sending well before it runs out, so only a worker that died loses a queue to
  another (which then sends its events again, with the same webhook-ids).
- A failure (no answer within the timeout, or a status that is not 2xx) holds the queue
  back for an exponential backoff with full jitter: about `WEBHOOK_BACKOFF_SECONDS`, then
  twice that each time, at most an hour, each delay drawn between half and all of it.
  A queue failing for `WEBHOOK_RETRY_HOURS` disables its endpoint (logged at ERROR, counted
  in `flashsale_webhook_endpoints_disabled_total`, shown in the console); its deliveries
  are kept and go once the operator enables it again.

Each database step is its own short transaction; every HTTP call is made outside any.
Signing uses the `standardwebhooks` package (`Webhook(secret).sign`): headers `webhook-id`
(the event's id, the same on every attempt), `webhook-timestamp` (the attempt's, in
seconds) and `webhook-signature` (`v1,<base64>`; one per live secret, space-separated:
up to three while secrets rotated out are still in their day, `Endpoint.secrets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from server.domain import text, webhooks
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.webhooks import Attempt, Endpoint, Outgoing, Run
from server.infra.metrics import (
    WEBHOOK_DELIVERIES,
    WEBHOOK_ENDPOINTS_DISABLED,
    WEBHOOK_LATENESS,
    WEBHOOK_PENDING,
)
from server.service.resolver import Resolver, ResolvingTransport
from server.storage.database import Store
from server.storage.errors import Busy, Unavailable

logger = logging.getLogger(__name__)

DISPATCH_BATCH = 500
PER_QUEUE = 50  # deliveries sent in one run of one queue
MAX_BACKOFF_MS = 3_600_000
ERROR_BODY_BYTES = 300
MAX_ERROR_CHARS = 500  # as much of an attempt's error as is kept (server.domain.webhooks.settle)
USER_AGENT = "flashsale-webhooks/1"
DELIVERED = WEBHOOK_DELIVERIES.labels("delivered")
FAILED = WEBHOOK_DELIVERIES.labels("failed")


def backoff_ms(failures: int, base_ms: float) -> int:
    """The wait after the `failures`-th failure in a row (1, 2, …): exponential, capped at
    an hour, with full jitter between half and all of it."""
    ceiling = min(base_ms * 2 ** max(failures - 1, 0), MAX_BACKOFF_MS)
    return int(ceiling * random.uniform(0.5, 1.0))


class Deliverer:
    """Delivers the outbox of `store` until stopped.

    `timeout_s`: one attempt's limit (seconds); `backoff_s`: the first retry's delay;
    `retry_hours`: how long a failing queue is retried before its endpoint is disabled;
    `concurrency`: queues sent from at once; `poll_ms`: how often to look for new events;
    `allow_local_network`: whether receivers off the public Internet (loopback, private,
    link-local addresses) may be sent to (`WEBHOOK_ALLOW_LOCAL_NETWORK`; see
    server/service/resolver.py).
    """

    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float = 10.0,
        backoff_s: float = 5.0,
        retry_hours: float = 24.0,
        concurrency: int = 16,
        poll_ms: int = 200,
        allow_local_network: bool = False,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.lease_ms = round(timeout_s * 3000) + 5000
        self.backoff_ms = backoff_s * 1000
        self.give_up_ms = round(retry_hours * 3_600_000)
        self.concurrency = concurrency
        self.poll_s = poll_ms / 1000
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Names are looked up on threads of the deliverer's own, at most MAX_LOOKUPS at
        # once (server/service/resolver.py): a receiver whose DNS never answers cannot hold
        # the event loop's executor, and each attempt's timeout covers its lookup.
        self._resolver = Resolver()
        self._client = httpx.AsyncClient(
            transport=ResolvingTransport(
                self._resolver,
                limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=64),
                allow_local_network=allow_local_network,
            ),
            timeout=timeout_s,
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        )
        self._signers: dict[str, Webhook] = {}
        self._endpoints: dict[int, Endpoint] = {}
        # Whether the last dispatch found an endpoint enabled (webhooks.dispatch: a shop
        # with none has its events passed over in one statement each turn). Until the first
        # dispatch, none is expected: if there is one, that dispatch is rolled back and run
        # again expecting it.
        self._expect_endpoints = False
        self._runs: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._pending_checked = 0.0
        self.attempts = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-deliverer")

    async def stop(self) -> None:
        """Stop: finish the database step in hand, let runs in flight settle what they sent
        (they send nothing more), then close. Runs still going after one more timeout are
        cancelled: their leases run out, and the events are sent again by whichever worker
        takes the queue next. (A task cancelled inside a database call can leave the
        connection unreleased, so nothing is cancelled while there is a choice.)"""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.timeout_s + 5)
            except TimeoutError:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._runs:
            _, late = await asyncio.wait(self._runs, timeout=self.timeout_s + 5)
            for run in late:
                run.cancel()
            await asyncio.gather(*self._runs, return_exceptions=True)
            self._runs.clear()
        await self._client.aclose()
        self._resolver.close()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
            except (Busy, Unavailable) as exc:
                logger.warning("webhook delivery postponed: %s", exc)
                await self._pause(1.0)
            except Exception:
                logger.exception("webhook delivery failed; trying again")
                await self._pause(1.0)
            if self._runs:
                done, _ = await asyncio.wait(
                    self._runs, timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                self._runs -= done
            else:
                await self._pause(self.poll_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def step(self) -> int:
        """One turn: dispatch new events, then lease as many queues as there is room for and
        start sending from them (tasks of their own). Returns the runs started."""
        while True:
            try:
                dispatched = await self.store.write(
                    functools.partial(
                        _dispatch,
                        expect_endpoints=self._expect_endpoints,
                        postgres=not self.store.is_sqlite,
                    ),
                    index_order=True,
                )
            except webhooks.EndpointsChanged:
                self._expect_endpoints = True  # rolled back: dispatched again, to it
                continue
            # The endpoints the dispatch read, after taking its events: those the runs
            # leased below send to, and what the next dispatch expects.
            self._endpoints = {e.id: e for e in dispatched.endpoints}
            self._expect_endpoints = bool(dispatched.endpoints)
            self._forget_signers()
            if dispatched.taken < DISPATCH_BATCH:
                break
        room = self.concurrency - len(self._runs)
        if room <= 0:
            return 0
        if time.monotonic() - self._pending_checked > 5:
            self._pending_checked = time.monotonic()
            async with self.store.reader() as conn:
                WEBHOOK_PENDING.set(await webhooks.pending_total(conn))
        runs = await self.store.write(
            lambda conn: webhooks.lease(
                conn,
                owner=self.owner,
                now=now_ms(),
                lease_ms=self.lease_ms,
                queues=room,
                per_queue=PER_QUEUE,
            )
        )
        for run in runs:
            self._spawn(self._send_run(run, time.monotonic()))
        if len(runs) < room:
            redeliveries = await self.store.write(
                lambda conn: webhooks.take_redeliveries(
                    conn, now=now_ms(), lease_ms=self.lease_ms, limit=room - len(runs)
                )
            )
            for endpoint_id, outgoing in redeliveries:
                self._spawn(self._redeliver(endpoint_id, outgoing))
        return len(runs)

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._runs.add(task)

    async def drain(self, within: float = 30.0) -> None:
        """Deliver everything that can be delivered now (for tests and the benchmark: the
        loop does this by itself)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            started = await self.step()
            if self._runs:
                await asyncio.wait(self._runs)
                self._runs = {t for t in self._runs if not t.done()}
            elif not started:
                return

    async def _send_run(self, run: Run, leased_at: float) -> None:
        endpoint = self._endpoints.get(run.endpoint_id)
        if endpoint is None:
            return  # disabled meanwhile: the lease runs out, nothing was sent
        # `self._endpoints` is read again at each turn (every WEBHOOK_POLL_MS while runs go):
        # a run stops before its next attempt once its endpoint is no longer enabled. The
        # endpoints were read by the turn's dispatch and the run leased in a later
        # transaction, but an id names one endpoint for good (ids are never given again,
        # migration 0020): the endpoint listed under the run's id is the run's endpoint.
        # Stop sending while there is still time to settle before the lease runs out.
        stop_at = leased_at + self.lease_ms / 1000 - self.timeout_s - 2
        attempts: list[Attempt] = []
        for outgoing in run.deliveries:
            if time.monotonic() > stop_at or self._stopping.is_set():
                break
            if run.endpoint_id not in self._endpoints:
                # Disabled, being deleted or deleted since (this turn's dispatch read so).
                break
            attempt = await self._post(endpoint, outgoing)
            attempts.append(attempt)
            if not attempt.delivered:
                break
        failures = run.failures + (0 if not attempts or attempts[-1].delivered else 1)
        try:
            settled = await self.store.write(
                lambda conn: webhooks.settle(
                    conn,
                    run,
                    attempts,
                    owner=self.owner,
                    now=now_ms(),
                    retry_after_ms=backoff_ms(failures, self.backoff_ms),
                    give_up_after_ms=self.give_up_ms,
                )
            )
        except (Busy, Unavailable) as exc:
            # The lease runs out and the run is sent again: at least once.
            logger.warning("could not record %d webhook attempts: %s", len(attempts), exc)
            return
        now = now_ms()
        for created_at in settled.delivered.values():
            WEBHOOK_LATENESS.observe(max(now - created_at, 0) / 1000)
        if settled.disabled:
            WEBHOOK_ENDPOINTS_DISABLED.inc()
            logger.error(
                "webhook endpoint %d (%s) disabled: it has failed for %g hours "
                "(WEBHOOK_RETRY_HOURS); enable it in the console once it answers again",
                endpoint.id,
                shown_url(endpoint.url),
                self.give_up_ms / 3_600_000,
            )

    async def _redeliver(self, endpoint_id: int, outgoing: Outgoing) -> None:
        async with self.store.reader() as conn:
            found = await webhooks.endpoints(conn, endpoint_id)
        if not found:
            return
        if found[0].disabled_reason == webhooks.BEING_DELETED:
            await self.store.write(
                lambda conn: webhooks.withdraw_redelivery(conn, endpoint_id, outgoing.event_id)
            )
            return
        attempt = await self._post(found[0], outgoing)
        await self.store.write(lambda conn: webhooks.settle_redelivery(conn, endpoint_id, attempt))

    async def _post(self, endpoint: Endpoint, outgoing: Outgoing) -> Attempt:
        """One signed POST of an event; never raises for what the receiver does, nor for an
        event whose body cannot be built (a failed attempt that says why)."""
        at = now_ms()
        seconds = at // 1000
        moment = datetime.fromtimestamp(seconds, UTC)
        try:
            payload = outgoing.body()
        except ValueError as exc:
            # A reservation event whose ledger row is gone (a worker of a release before
            # 9276530 removed it, not knowing the body is rendered from it): a failed
            # attempt, recorded and backed off like any (the endpoint is disabled in time,
            # the console shows why), not an error out of the run at every lease.
            FAILED.inc()
            problem = text.storable(f"the event's body cannot be built: {exc}", MAX_ERROR_CHARS)
            logger.warning("webhook %s not sent: %s", outgoing.event_id, problem)
            return Attempt(outgoing.event_id, at, None, problem)
        signature = " ".join(
            self._signer(secret).sign(outgoing.event_id, moment, payload)
            for secret in endpoint.secrets(at)
        )
        headers = {
            "content-type": "application/json",
            "webhook-id": outgoing.event_id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": signature,
        }
        self.attempts += 1
        try:
            # The whole attempt within the timeout, the name's lookup included: httpx's own
            # applies to each read and write, so a receiver that sent its answer a byte
            # every few seconds held an attempt (and one of WEBHOOK_CONCURRENCY slots) for
            # as long as it liked, past the queue's lease.
            async with (
                asyncio.timeout(self.timeout_s),
                self._client.stream(
                    "POST", endpoint.url, content=payload.encode(), headers=headers
                ) as response,
            ):
                status = response.status_code
                error = None
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {await _start_of(response)}"
        except TimeoutError:
            status = None
            error = f"TimeoutError: no whole answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            # InvalidURL and ValueError (an IDNA host's UnicodeError): a URL stored before
            # the API checked that it can be sent to fails each attempt, and the endpoint is
            # disabled in time, instead of raising out of the run.
            status, error = None, f"{type(exc).__name__}: {exc}"[:300]
        (DELIVERED if status is not None and 200 <= status < 300 else FAILED).inc()
        # What the receiver said is stored: a NUL in its body once made PostgreSQL refuse
        # the whole settling transaction, so the attempt was never recorded (issue 15).
        error = None if error is None else text.storable(error, MAX_ERROR_CHARS)
        return Attempt(outgoing.event_id, at, status, error)

    def _forget_signers(self) -> None:
        """Keep the signers of the enabled endpoints' live secrets only (at most
        MAX_LIVE_SECRETS each): one was kept for every secret ever signed with, one more
        at each rotation for the worker's life, deleted endpoints' secrets included. A
        redelivery to a disabled endpoint makes its signer again when it needs one."""
        now = now_ms()
        live = {s for e in self._endpoints.values() for s in e.secrets(now)}
        if any(secret not in live for secret in self._signers):
            self._signers = {s: w for s, w in self._signers.items() if s in live}

    def _signer(self, secret: str) -> Webhook:
        signer = self._signers.get(secret)
        if signer is None:
            signer = self._signers[secret] = Webhook(secret)
        return signer


async def _dispatch(
    conn: Executor, *, expect_endpoints: bool, postgres: bool
) -> webhooks.Dispatched:
    """One dispatch of up to DISPATCH_BATCH events, timed inside its transaction."""
    return await webhooks.dispatch(
        conn,
        now=now_ms(),
        limit=DISPATCH_BATCH,
        expect_endpoints=expect_endpoints,
        postgres=postgres,
    )


def shown_url(url: str) -> str:
    """An endpoint's URL as a log line shows it: its scheme, host and port, and "..." for
    the rest, if any. A receiver's URL often carries a secret (credentials as `user:password@`,
    a token in its query or its path: `/services/T0/B0/XXXX`), and a log is read by more
    people than the console, which shows the operator the whole URL."""
    try:
        parsed = httpx.URL(url)
        origin = str(parsed.copy_with(userinfo=b"", path="/", query=None, fragment=None))
    except (httpx.InvalidURL, ValueError):
        return "a URL that cannot be read"
    more = parsed.path not in ("", "/") or parsed.query or parsed.fragment
    return origin.rstrip("/") + ("/..." if more else "")


async def _start_of(response: httpx.Response) -> str:
    """The first few hundred bytes of a refusal's body, as text (for the console)."""
    taken = b""
    async for chunk in response.aiter_bytes():
        taken += chunk
        if len(taken) >= ERROR_BODY_BYTES:
            break
    return taken[:ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
