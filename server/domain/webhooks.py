"""Webhook endpoints and the deliveries of the outbox to them: the SQL.

The worker's cycle (`server.service.delivery.Deliverer`), each step its own short
transaction, the network calls between them and never inside one:

1. `dispatch`: hand new outbox events to the endpoints that want them, product by product
   in order: a delivery row per (event, endpoint), and the (endpoint, product) queue's
   `pending` count raised. An event is dispatched once (`dispatched_at`, set by a
   conditional UPDATE: two workers cannot both take it). With no endpoint enabled, the
   waiting events are removed instead: none will ever be sent.
2. `lease`: take queues that have deliveries due, for `lease_ms`: while the lease holds, no
   other worker sends from that queue, so a product's events go to an endpoint one at a
   time, in order (a conditional UPDATE again: the same on SQLite and PostgreSQL, where
   `FOR UPDATE SKIP LOCKED` would have to hold a transaction open across the HTTP calls).
   With each queue, its next deliveries in (version, seq) order.
3. (the worker sends them, in order, stopping at the first failure)
4. `settle`: mark what was delivered, count the failure, set the queue's next attempt
   (exponential backoff with jitter), give the lease back; disable an endpoint whose queue
   has been failing for longer than the retry window.

A lease outlives the longest run it covers (the sender stops a run before its lease runs
out), so a queue is only taken over from a worker that died; the events it was sending are
then sent again, with the same webhook-id: at least once, in order.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from server.domain import outbox
from server.domain.executor import Executor, Row

ENDPOINT = (
    "id, url, description, events, secret, previous_secret, previous_secret_until, "
    "older_secret, older_secret_until, enabled, disabled_reason, created_at, updated_at"
)
# Secrets that sign at once, at most: the current one and the two rotated out within their
# day (migration 0019). Standard Webhooks receivers accept any of the signatures.
MAX_LIVE_SECRETS = 3


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A receiver. `events`: the types it wants (empty: all). `pending`/`failing_since`:
    its deliveries waiting, and since when (ms) one of its queues has been failing.
    `previous_secret`/`older_secret`: the secrets rotated out last and before it, which
    sign too until their `…_until` (ms)."""

    id: int
    url: str
    description: str
    events: tuple[str, ...]
    secret: str
    previous_secret: str | None
    previous_secret_until: int | None
    older_secret: str | None
    older_secret_until: int | None
    enabled: bool
    disabled_reason: str | None
    created_at: int
    updated_at: int
    pending: int = 0
    failing_since: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> Endpoint:
        events = str(row["events"])
        until = row["previous_secret_until"]
        previous = row["previous_secret"]
        older = row["older_secret"]
        older_until = row["older_secret_until"]
        reason = row["disabled_reason"]
        return cls(
            id=int(row["id"]),
            url=str(row["url"]),
            description=str(row["description"]),
            events=tuple(e for e in events.split(",") if e),
            secret=str(row["secret"]),
            previous_secret=None if previous is None else str(previous),
            previous_secret_until=None if until is None else int(until),
            older_secret=None if older is None else str(older),
            older_secret_until=None if older_until is None else int(older_until),
            enabled=bool(row["enabled"]),
            disabled_reason=None if reason is None else str(reason),
            created_at=int(row["created_at"]),
            updated_at=int(row["updated_at"]),
        )

    def wants(self, event_type: str) -> bool:
        return not self.events or event_type in self.events

    def secrets(self, now: int) -> list[str]:
        """The secrets to sign with at `now`, newest first: the current one, and each one
        rotated out whose grace period lasts past `now` (at most `MAX_LIVE_SECRETS`)."""
        found = [self.secret]
        for secret, until in (
            (self.previous_secret, self.previous_secret_until),
            (self.older_secret, self.older_secret_until),
        ):
            if secret and until is not None and until > now:
                found.append(secret)
        return found


# -- endpoints (the operator) -------------------------------------------------------------

# Endpoints enabled at once, as Stripe's 16 webhook endpoints per account. Each is sent
# every event it wants: the worker's dispatch writes a delivery row per event and enabled
# endpoint, up to DISPATCH_BATCH events at a time, in one write transaction beside the
# reservations' writer (server/service/delivery.py), and each endpoint's queues take lease
# slots. Unbounded, an operator's script registering in a loop made every hold that many
# rows and that many requests. Disabled endpoints are sent nothing and not counted.
MAX_ENABLED_ENDPOINTS = 16

# PostgreSQL's transaction advisory lock between dispatches (shared) and deletions
# (exclusive): see `begin_delete`.
DELETE_LOCK = 0x5748_4B32
# `disabled_reason` of an endpoint while `DELETE /api/admin/webhooks/{id}` waits for the
# attempts in flight to it to end (server/service/webhooks.py: `Webhooks.delete`).
BEING_DELETED = "being deleted"


class EndpointBeingDeleted(Exception):
    """The endpoint is being deleted (`BEING_DELETED`): it cannot be enabled, disabled or
    given a new secret, only deleted (a DELETE again finishes one stopped half-way)."""

    def __init__(self, endpoint_id: int) -> None:
        super().__init__(endpoint_id)
        self.endpoint_id = endpoint_id


class TooManyEndpoints(Exception):
    """Creating or enabling an endpoint would make more than MAX_ENABLED_ENDPOINTS enabled
    (the caller's transaction is rolled back by raising this)."""


# PostgreSQL: the advisory lock (transaction-scoped) that takes the limit's check one
# transaction at a time (`_refuse_beyond_the_limit`); any number, the service's only one.
LIMIT_LOCK = 0x5748_4B31


async def _refuse_beyond_the_limit(conn: Executor, *, postgres: bool) -> None:
    """Raise TooManyEndpoints if more than MAX_ENABLED_ENDPOINTS endpoints are enabled (after
    the caller's change, which raising undoes).

    The count must see every other transaction's change: two made at once, each counting
    the committed endpoints and its own, both passed with fifteen enabled. SQLite's writer
    runs one write transaction at a time, so there it does. On PostgreSQL (`postgres`)
    transactions of several processes run together, under READ COMMITTED: the count is
    taken under `pg_advisory_xact_lock(LIMIT_LOCK)`, held to the transaction's end, and as
    a statement after the lock is granted it sees the change of whichever transaction held
    it before (committed by then); the lock is taken after the caller's own row, and by no
    other statement, so it cannot close a cycle of waits."""
    if postgres:
        await conn.fetch_one("SELECT pg_advisory_xact_lock(:key) AS locked", {"key": LIMIT_LOCK})
    row = await conn.fetch_one("SELECT COUNT(*) AS n FROM webhook_endpoints WHERE enabled = 1")
    if row is not None and int(row["n"]) > MAX_ENABLED_ENDPOINTS:
        raise TooManyEndpoints


async def create_endpoint(
    conn: Executor,
    *,
    url: str,
    events: Sequence[str],
    description: str,
    secret: str,
    now: int,
    postgres: bool,
) -> Endpoint:
    """Register an enabled endpoint. Raises TooManyEndpoints if MAX_ENABLED_ENDPOINTS are
    enabled already, counting those of transactions at once (`postgres`: the database runs
    them together; see `_refuse_beyond_the_limit`)."""
    # The id from the counter (migration 0020), never one an endpoint had before: with
    # `MAX(id) + 1` the next endpoint after the newest was deleted took its id, and a
    # second DELETE of the old one deleted it. On PostgreSQL the counter row's lock, held
    # to commit, takes registrations one at a time. The counter never falls behind a row
    # it did not give (one registered by the release before 0020 still running beside
    # this one, a restored or hand-made row): the id is past both, or every registration
    # would hit the primary key, a 500, until the counter was mended by hand (the
    # attacker's review, 12-02). MAX(id) is one seek of the primary key.
    top = "(SELECT COALESCE(MAX(id), 0) FROM webhook_endpoints)"
    counted = await conn.fetch_one(
        f"UPDATE id_counters SET last_id = 1 + CASE WHEN last_id >= {top} THEN last_id "
        f"ELSE {top} END WHERE name = 'webhook_endpoints' RETURNING last_id"
    )
    assert counted is not None, "migration 0020 makes the counter's row"
    row = await conn.fetch_one(
        "INSERT INTO webhook_endpoints (id, url, description, events, secret, enabled, "
        "created_at, updated_at) VALUES (:id, :url, :description, :events, :secret, 1, "
        f":now, :now) RETURNING {ENDPOINT}",
        {
            "id": int(counted["last_id"]),
            "url": url,
            "description": description,
            "events": ",".join(events),
            "secret": secret,
            "now": now,
        },
    )
    assert row is not None
    await _refuse_beyond_the_limit(conn, postgres=postgres)
    return Endpoint.from_row(row)


async def endpoints(conn: Executor, endpoint_id: int | None = None) -> list[Endpoint]:
    """Every endpoint (or one), by id, with its pending deliveries and failing time."""
    where = "WHERE e.id = :id " if endpoint_id is not None else ""
    rows = await conn.fetch_all(
        f"SELECT {', '.join('e.' + c.strip() for c in ENDPOINT.split(','))}, "
        "COALESCE(SUM(q.pending), 0) AS pending, MIN(q.failing_since) AS failing_since "
        "FROM webhook_endpoints e LEFT JOIN webhook_queues q ON q.endpoint_id = e.id "
        f"{where}GROUP BY {', '.join('e.' + c.strip() for c in ENDPOINT.split(','))} "
        "ORDER BY e.id",
        {"id": endpoint_id} if endpoint_id is not None else {},
    )
    found = []
    for row in rows:
        failing = row["failing_since"]
        found.append(
            replace(
                Endpoint.from_row(row),
                pending=int(row["pending"]),
                failing_since=None if failing is None else int(failing),
            )
        )
    return found


async def set_enabled(
    conn: Executor,
    endpoint_id: int,
    *,
    enabled: bool,
    reason: str | None,
    now: int,
    postgres: bool,
) -> bool:
    """Turn an endpoint on (its failing queues are tried again at once) or off; False if
    there is no such endpoint. Raises EndpointBeingDeleted if it is being deleted
    (`BEING_DELETED`: enabling it would let a worker send to it again). Enabling one raises
    TooManyEndpoints if MAX_ENABLED_ENDPOINTS others are enabled, counting those of
    transactions at once (`postgres`: see `_refuse_beyond_the_limit`)."""
    row = await conn.fetch_one(
        "UPDATE webhook_endpoints SET enabled = :on, disabled_reason = :reason, "
        "updated_at = :now WHERE id = :id "
        "AND (disabled_reason IS NULL OR disabled_reason <> :deleting) RETURNING id",
        {
            "id": endpoint_id,
            "on": 1 if enabled else 0,
            "reason": reason,
            "now": now,
            "deleting": BEING_DELETED,
        },
    )
    if row is None:
        await _refuse_being_deleted(conn, endpoint_id)
    if row is not None and enabled:
        await _refuse_beyond_the_limit(conn, postgres=postgres)
        await conn.execute(
            "UPDATE webhook_queues SET next_attempt_at = 0, failures = 0, failing_since = NULL "
            "WHERE endpoint_id = :id",
            {"id": endpoint_id},
        )
    return row is not None


async def _refuse_being_deleted(conn: Executor, endpoint_id: int) -> None:
    """Raise EndpointBeingDeleted if the endpoint is being deleted (`BEING_DELETED`)."""
    found = await conn.fetch_one(
        "SELECT 1 AS deleting FROM webhook_endpoints WHERE id = :id "
        "AND disabled_reason = :deleting",
        {"id": endpoint_id, "deleting": BEING_DELETED},
    )
    if found is not None:
        raise EndpointBeingDeleted(endpoint_id)


async def begin_delete(conn: Executor, endpoint_id: int, *, now: int, postgres: bool) -> bool:
    """The first step of deleting an endpoint: disable it (no queue of it is leased again,
    no event is handed to it, a worker stops its runs at their next attempt) and withdraw
    the redeliveries not yet taken. False if there is no such endpoint.

    Once this has committed, no delivery to the endpoint is still to be written, so the
    deletion's later steps leave none behind (one written after them would wait forever,
    for an endpoint that is gone: ids are never given again). SQLite's writer runs one write
    transaction at a time, so a dispatch committed before this or reads it disabled. On
    PostgreSQL (`postgres`), where they run together, a dispatch that read the endpoint
    enabled before this commits could write its deliveries after: each dispatch hands
    events out under `pg_advisory_xact_lock_shared(DELETE_LOCK)`, and this takes it
    exclusively first, so it waits for the dispatches under way to commit, and a dispatch
    after it reads the endpoint disabled. The lock is the first either takes, so it cannot
    close a cycle of waits."""
    if postgres:
        await conn.fetch_one("SELECT pg_advisory_xact_lock(:key) AS locked", {"key": DELETE_LOCK})
    row = await conn.fetch_one(
        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = :reason, "
        "updated_at = :now WHERE id = :id RETURNING id",
        {"id": endpoint_id, "reason": BEING_DELETED, "now": now},
    )
    if row is None:
        return False
    await conn.execute(
        "UPDATE webhook_deliveries SET redeliver_at = NULL "
        "WHERE endpoint_id = :id AND redeliver_at IS NOT NULL AND redeliver_at <= :now",
        {"id": endpoint_id, "now": now},
    )
    return True


async def sending(conn: Executor, endpoint_id: int, *, now: int) -> bool:
    """Whether a worker may be sending to an endpoint at `now`: a queue of it leased, or a
    redelivery to it taken, until later (ms)."""
    row = await conn.fetch_one(
        "SELECT 1 AS busy FROM webhook_queues WHERE endpoint_id = :id AND lease_until > :now "
        "UNION ALL SELECT 1 AS busy FROM webhook_deliveries "
        "WHERE endpoint_id = :id AND redeliver_at > :now",
        {"id": endpoint_id, "now": now},
    )
    return row is not None


# The later steps of a delete act only on an endpoint still being deleted, as its
# `begin_delete` left it: never on one that is not (ids are never given again, migration
# 0020; this keeps a step from acting on an endpoint no delete began, whatever the id).
_STILL_BEING_DELETED = (
    "EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = :id AND disabled_reason = :deleting)"
)


async def remove_deliveries(conn: Executor, endpoint_id: int, *, limit: int) -> tuple[int, int]:
    """Remove up to `limit` deliveries to an endpoint being deleted (`begin_delete`),
    delivered or not (a step of deleting it: its whole history at once could hold SQLite's
    write lock for seconds); none of an endpoint that is not being deleted. Returns how
    many were removed and how many of those were still waiting."""
    removed = await conn.fetch_all(
        "DELETE FROM webhook_deliveries WHERE endpoint_id = :id AND event_id IN "
        "(SELECT event_id FROM webhook_deliveries WHERE endpoint_id = :id LIMIT :limit) "
        f"AND {_STILL_BEING_DELETED} RETURNING delivered_at",
        {"id": endpoint_id, "limit": limit, "deleting": BEING_DELETED},
    )
    return len(removed), sum(1 for r in removed if r["delivered_at"] is None)


async def delete_endpoint(conn: Executor, endpoint_id: int) -> bool:
    """The last step of deleting an endpoint being deleted (`begin_delete`): its queues
    (one per product) and itself; False if there is no such endpoint being deleted (gone
    already: another DELETE of it finished first). Its events stay in the outbox for the
    other endpoints; retention removes those none waits for."""
    values = {"id": endpoint_id, "deleting": BEING_DELETED}
    await conn.execute(
        f"DELETE FROM webhook_queues WHERE endpoint_id = :id AND {_STILL_BEING_DELETED}", values
    )
    row = await conn.fetch_one(
        "DELETE FROM webhook_endpoints WHERE id = :id AND disabled_reason = :deleting RETURNING id",
        values,
    )
    return row is not None


async def rotate_secret(
    conn: Executor, endpoint_id: int, *, secret: str, grace_until: int, now: int
) -> bool:
    """A new signing secret; the one it replaces signs too until `grace_until` (ms), and the
    one rotated out before that keeps its own grace period if it lasts past `now`. A third
    secret rotated out within its grace period drops the oldest (`MAX_LIVE_SECRETS`). One
    UPDATE: its right-hand sides all read the row as it was (SQLite and PostgreSQL). False
    if there is no such endpoint; raises EndpointBeingDeleted if it is being deleted (a
    secret shown for an endpoint about to go would be deployed for nothing)."""
    row = await conn.fetch_one(
        "UPDATE webhook_endpoints SET "
        "older_secret = CASE WHEN previous_secret_until > :now THEN previous_secret END, "
        "older_secret_until = CASE WHEN previous_secret_until > :now "
        "THEN previous_secret_until END, "
        "previous_secret = secret, previous_secret_until = :until, secret = :secret, "
        "updated_at = :now WHERE id = :id "
        "AND (disabled_reason IS NULL OR disabled_reason <> :deleting) RETURNING id",
        {
            "id": endpoint_id,
            "secret": secret,
            "until": grace_until,
            "now": now,
            "deleting": BEING_DELETED,
        },
    )
    if row is None:
        await _refuse_being_deleted(conn, endpoint_id)
    return row is not None


# -- deliveries (the operator's view) -----------------------------------------------------

DELIVERY = (
    "event_id, endpoint_id, product_id, version, seq, type, created_at, attempts, "
    "last_attempt_at, last_status, last_error, delivered_at, redeliver_at"
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event's delivery to one endpoint. Times in ms."""

    event_id: str
    endpoint_id: int
    product_id: int
    version: int
    seq: int
    type: str
    created_at: int
    attempts: int
    last_attempt_at: int | None
    last_status: int | None
    last_error: str | None
    delivered_at: int | None
    redeliver_at: int | None

    @classmethod
    def from_row(cls, row: Row) -> Delivery:
        def maybe(name: str) -> int | None:
            value = row[name]
            return None if value is None else int(value)

        error = row["last_error"]
        return cls(
            event_id=str(row["event_id"]),
            endpoint_id=int(row["endpoint_id"]),
            product_id=int(row["product_id"]),
            version=int(row["version"]),
            seq=int(row["seq"]),
            type=str(row["type"]),
            created_at=int(row["created_at"]),
            attempts=int(row["attempts"]),
            last_attempt_at=maybe("last_attempt_at"),
            last_status=maybe("last_status"),
            last_error=None if error is None else str(error),
            delivered_at=maybe("delivered_at"),
            redeliver_at=maybe("redeliver_at"),
        )

    @property
    def status(self) -> str:
        if self.redeliver_at is not None:
            return "redelivering"
        return "pending" if self.delivered_at is None else "delivered"


async def recent_deliveries(conn: Executor, endpoint_id: int, *, limit: int) -> list[Delivery]:
    """An endpoint's `limit` most recent deliveries, newest first."""
    rows = await conn.fetch_all(
        f"SELECT {DELIVERY} FROM webhook_deliveries WHERE endpoint_id = :e "
        "ORDER BY created_at DESC, event_id DESC LIMIT :limit",
        {"e": endpoint_id, "limit": limit},
    )
    return [Delivery.from_row(row) for row in rows]


async def redeliver(conn: Executor, endpoint_id: int, event_id: str, *, now: int) -> bool:
    """Send an event to an endpoint again, soon. A delivered one is sent once more on its
    own (the receiver tells it by its webhook-id); an undelivered one's queue is tried now,
    without waiting for its backoff. False if there is no such delivery."""
    row = await conn.fetch_one(
        "SELECT product_id, delivered_at FROM webhook_deliveries "
        "WHERE event_id = :id AND endpoint_id = :e",
        {"id": event_id, "e": endpoint_id},
    )
    if row is None:
        return False
    if row["delivered_at"] is not None:
        await conn.execute(
            "UPDATE webhook_deliveries SET redeliver_at = :now "
            "WHERE event_id = :id AND endpoint_id = :e",
            {"id": event_id, "e": endpoint_id, "now": now},
        )
    else:
        await conn.execute(
            "UPDATE webhook_queues SET next_attempt_at = 0 "
            "WHERE endpoint_id = :e AND product_id = :p",
            {"e": endpoint_id, "p": int(row["product_id"])},
        )
    return True


# -- the worker: dispatch -----------------------------------------------------------------


class EndpointsChanged(Exception):
    """`dispatch` was told to expect no endpoint and found one enabled after removing the
    waiting events as having none to go to: the caller's transaction must be rolled back
    (raising this does) and the dispatch run again, expecting endpoints."""


@dataclass(frozen=True, slots=True)
class Dispatched:
    """What a `dispatch` did: `taken`, the events it read back and marked (0: none was
    waiting; with no endpoint expected, none is read back: `limit` while more wait, else 0);
    `endpoints`, the
    enabled endpoints as it read them (once, after taking the events)."""

    taken: int
    endpoints: tuple[Endpoint, ...]


async def dispatch(
    conn: Executor,
    *,
    now: int,
    limit: int,
    expect_endpoints: bool = True,
    postgres: bool = False,
) -> Dispatched:
    """Hand up to `limit` undispatched events, in order per product, to the enabled
    endpoints that want them.

    An endpoint gets the events committed after it was registered: the enabled endpoints
    are read once, after the events are taken (an endpoint not yet seen then committed after
    every event taken). `expect_endpoints` (the last dispatch's finding; True if unknown)
    chooses how the events are taken:

    Either way the first `limit` waiting keys are read in the index's order (run it in a
    `Store.write(..., index_order=True)`: PostgreSQL otherwise read and sorted the whole
    backlog for them when its statistics were stale), then taken by key range
    (`_read_ranges`), so a dispatch costs the events it takes, not the backlog.

    - True: the waiting events are marked, read back and handed out.
    - False: the events are removed, not read back: reading each event back, naming it and
      sorting it cost the worker about 60 µs a hold on SQLite, in write transactions
      beside the web's writer (the bench's `paths`, a shop with no endpoint). Removed,
      not marked dispatched: no endpoint will ever be sent an event that none was enabled
      for when it was dispatched, so retention would only remove it later, and marking
      rewrote each row (and its entries in the indexes of waiting and of dispatched
      events), about 5 µs a hold more on SQLite, with an outbox that grew by a row a hold
      beside the ledger. `taken` is then `limit` while more are waiting (the caller
      dispatches again, in a transaction of its own), 0 once none is: all at once,
      100,000 waiting events (a worker back after a long spell down) held SQLite's write
      lock for 8 s, and every reservation waited DB_BUSY_TIMEOUT_MS for it, then got 503.
      If an endpoint is enabled after all (registered since the last dispatch, or on
      PostgreSQL while this one ran), raises EndpointsChanged: the caller rolls back and
      dispatches again with True, and the endpoint gets its events.

    Either way the endpoints table is read once. On PostgreSQL (`postgres`), where a deletion
    runs beside it, events are handed out under `pg_advisory_xact_lock_shared(DELETE_LOCK)`
    (`begin_delete`)."""
    waiting = await conn.fetch_all(
        "SELECT product_id, version, seq FROM outbox WHERE dispatched_at IS NULL "
        "ORDER BY product_id, version, seq LIMIT :limit",
        {"limit": limit},
    )
    if not expect_endpoints:
        if waiting:
            where, bounds = _read_ranges(waiting)
            await conn.execute(
                f"DELETE FROM outbox WHERE dispatched_at IS NULL AND ({where})", bounds
            )
        found = await endpoints_enabled(conn)
        if found:
            raise EndpointsChanged
        # In the index's order, so that PostgreSQL reads the index (`index_order`): without
        # an order it chose a sequential scan of the table, dead rows and all, now and then.
        more = len(waiting) == limit and await conn.fetch_one(
            "SELECT 1 FROM outbox WHERE dispatched_at IS NULL "
            "ORDER BY product_id, version, seq LIMIT 1"
        )
        return Dispatched(limit if more else 0, ())
    if not waiting:
        return Dispatched(0, tuple(await endpoints_enabled(conn)))
    where, bounds = _read_ranges(waiting)
    bounds["now"] = now
    taken = await conn.fetch_all(
        "UPDATE outbox SET dispatched_at = :now "
        f"WHERE dispatched_at IS NULL AND ({where}) "
        "RETURNING id, product_id, version, seq, type, created_at",
        bounds,
    )
    key = await id_key(conn)
    rows = sorted(taken, key=lambda r: (int(r["product_id"]), int(r["version"]), int(r["seq"])))
    ids = [outbox.stored_event_id(key, row) for row in rows]
    if postgres:
        await conn.fetch_one(
            "SELECT pg_advisory_xact_lock_shared(:key) AS locked", {"key": DELETE_LOCK}
        )
    active = await endpoints_enabled(conn)
    deliveries: list[tuple[Row, str, int]] = []
    per_queue: dict[tuple[int, int], int] = defaultdict(int)
    for row, event in zip(rows, ids, strict=True):
        for endpoint in active:
            if endpoint.wants(str(row["type"])) and int(row["created_at"]) >= endpoint.created_at:
                deliveries.append((row, event, endpoint.id))
                per_queue[(endpoint.id, int(row["product_id"]))] += 1
    for start in range(0, len(deliveries), 500):
        chunk = deliveries[start : start + 500]
        values: dict[str, object] = {}
        sql = []
        for n, (row, event, endpoint_id) in enumerate(chunk):
            sql.append(f"(:i{n}, :e{n}, :p{n}, :v{n}, :s{n}, :t{n}, :c{n})")
            values.update(
                {
                    f"i{n}": event,
                    f"e{n}": endpoint_id,
                    f"p{n}": row["product_id"],
                    f"v{n}": row["version"],
                    f"s{n}": row["seq"],
                    f"t{n}": row["type"],
                    f"c{n}": row["created_at"],
                }
            )
        await conn.execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, product_id, version, seq, "
            f"type, created_at) VALUES {', '.join(sql)}",
            values,
        )
    # Queues in a fixed order, so that two dispatchers cannot deadlock on PostgreSQL.
    for (endpoint_id, product_id), count in sorted(per_queue.items()):
        await conn.execute(
            "INSERT INTO webhook_queues (endpoint_id, product_id, pending) VALUES (:e, :p, :n) "
            "ON CONFLICT (endpoint_id, product_id) DO UPDATE "
            "SET pending = webhook_queues.pending + excluded.pending",
            {"e": endpoint_id, "p": product_id, "n": count},
        )
    return Dispatched(len(waiting), tuple(active))


def _read_ranges(waiting: Sequence[Row]) -> tuple[str, dict[str, object]]:
    """A WHERE clause for exactly the waiting events `waiting` (read in key order), as one
    key range per product, from its first event read to its last: a product's events commit
    in order (a later commit has a later version), so nothing else is inside a range.

    Each range is a row-value bound on the undispatched index's whole key, which both
    databases read as the range of index entries it is. Written as `version < :v OR …`
    PostgreSQL read every waiting event of the product to filter them: a dispatch of 500
    cost as much as the product's backlog (the bench's 80,000 events: ~10 ms a dispatch,
    in the worker's transaction and PostgreSQL's CPU beside the web's writer)."""
    first: dict[int, tuple[int, int]] = {}
    last: dict[int, tuple[int, int]] = {}
    for row in waiting:
        product_id = int(row["product_id"])
        key = (int(row["version"]), int(row["seq"]))
        first.setdefault(product_id, key)
        last[product_id] = key
    bounds: dict[str, object] = {}
    ranges = []
    for n, product_id in enumerate(sorted(last)):
        ranges.append(
            f"(product_id = :p{n} AND (product_id, version, seq) >= (:p{n}, :fv{n}, :fs{n}) "
            f"AND (product_id, version, seq) <= (:p{n}, :lv{n}, :ls{n}))"
        )
        (fv, fs), (lv, ls) = first[product_id], last[product_id]
        bounds.update({f"p{n}": product_id, f"fv{n}": fv, f"fs{n}": fs, f"lv{n}": lv, f"ls{n}": ls})
    return " OR ".join(ranges), bounds


async def id_key(conn: Executor) -> bytes:
    """The database's key for webhook-ids (`outbox.event_id`), made by the first caller."""
    row = await conn.fetch_one("SELECT secret FROM webhook_id_key WHERE id = 1")
    if row is None:
        await conn.execute(
            "INSERT INTO webhook_id_key (id, secret) VALUES (1, :secret) "
            "ON CONFLICT (id) DO NOTHING",
            {"secret": secrets.token_hex(32)},
        )
        row = await conn.fetch_one("SELECT secret FROM webhook_id_key WHERE id = 1")
        assert row is not None
    return bytes.fromhex(str(row["secret"]))


async def endpoints_enabled(conn: Executor) -> list[Endpoint]:
    """The enabled endpoints, by id (without their pending counts)."""
    rows = await conn.fetch_all(
        f"SELECT {ENDPOINT} FROM webhook_endpoints WHERE enabled = 1 ORDER BY id"
    )
    return [Endpoint.from_row(row) for row in rows]


# -- the worker: lease, settle ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A delivery to make: the event's id, its attempts so far, and its outbox row as
    stored, with its ledger row (`event`: `outbox.StoredEvent` renders the body)."""

    event_id: str
    attempts: int
    event: outbox.StoredEvent

    @classmethod
    def from_row(cls, row: Row) -> Outgoing:
        """Of a row read with `OUTGOING` and `JOIN_OUTBOX`."""
        return cls(
            event_id=str(row["event_id"]),
            attempts=int(row["attempts"]),
            event=outbox.StoredEvent.from_row(row),
        )

    def body(self) -> str:
        """The body to send and sign, rendered now (outside any transaction): the same
        text at every attempt. Raises ValueError (`outbox.render`)."""
        return self.event.body()


# A delivery's event, by the outbox's key, and its movement's ledger row (`outbox.render`).
JOIN_OUTBOX = (
    "JOIN outbox o ON o.product_id = d.product_id AND o.version = d.version AND o.seq = d.seq "
    + outbox.LEDGER_JOIN
)
# What a delivery is read as: its own id and attempts, and its event as `StoredEvent` reads
# it, from the outbox row (the delivery's copies of its type, key and time are the same).
OUTGOING = "d.event_id, d.attempts, " + outbox.STORED_COLUMNS


@dataclass(frozen=True, slots=True)
class Run:
    """A leased queue and its next deliveries, in order. `failures`: consecutive failed
    attempts so far; `failing_since`: since when (ms)."""

    endpoint_id: int
    product_id: int
    failures: int
    failing_since: int | None
    deliveries: list[Outgoing]


async def lease(
    conn: Executor, *, owner: str, now: int, lease_ms: int, queues: int, per_queue: int
) -> list[Run]:
    """Lease up to `queues` due queues of enabled endpoints (those waiting longest first)
    until `now + lease_ms`, each with up to `per_queue` of its next deliveries."""
    due = await conn.fetch_all(
        "SELECT q.endpoint_id, q.product_id FROM webhook_queues q "
        "JOIN webhook_endpoints e ON e.id = q.endpoint_id "
        "WHERE q.pending > 0 AND q.next_attempt_at <= :now AND q.lease_until <= :now "
        "AND e.enabled = 1 ORDER BY q.next_attempt_at LIMIT :limit",
        {"now": now, "limit": queues},
    )
    runs = []
    for queue in sorted(due, key=lambda r: (int(r["endpoint_id"]), int(r["product_id"]))):
        leased = await conn.fetch_one(
            "UPDATE webhook_queues SET lease_until = :until, lease_owner = :owner "
            "WHERE endpoint_id = :e AND product_id = :p AND lease_until <= :now "
            "AND pending > 0 RETURNING failures, failing_since",
            {
                "e": queue["endpoint_id"],
                "p": queue["product_id"],
                "now": now,
                "until": now + lease_ms,
                "owner": owner,
            },
        )
        if leased is None:  # another worker took it meanwhile
            continue
        rows = await conn.fetch_all(
            f"SELECT {OUTGOING} FROM webhook_deliveries d {JOIN_OUTBOX} "
            "WHERE d.endpoint_id = :e AND d.product_id = :p AND d.delivered_at IS NULL "
            "ORDER BY d.version, d.seq LIMIT :limit",
            {"e": queue["endpoint_id"], "p": queue["product_id"], "limit": per_queue},
        )
        since = leased["failing_since"]
        runs.append(
            Run(
                endpoint_id=int(queue["endpoint_id"]),
                product_id=int(queue["product_id"]),
                failures=int(leased["failures"]),
                failing_since=None if since is None else int(since),
                deliveries=[Outgoing.from_row(r) for r in rows],
            )
        )
    return runs


@dataclass(frozen=True, slots=True)
class Attempt:
    """What became of one delivery attempt: the receiver's status (None: no answer), or
    the error, and when it was made (ms)."""

    event_id: str
    at: int
    status: int | None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class Settled:
    """What `settle` did: deliveries newly marked delivered (event id → created_at, for the
    lateness), and whether it disabled the endpoint."""

    delivered: dict[str, int]
    disabled: bool


async def settle(
    conn: Executor,
    run: Run,
    attempts: Sequence[Attempt],
    *,
    owner: str,
    now: int,
    retry_after_ms: int,
    give_up_after_ms: int,
) -> Settled:
    """Record a run's attempts (in order: delivered ones, then at most one failure) and give
    its queue's lease back. After a failure the queue waits `retry_after_ms`; when it has
    been failing for `give_up_after_ms`, its endpoint is disabled (its deliveries stay
    pending, to go once the operator enables it again)."""
    if not attempts:
        # Nothing was sent (the queue's count said there was more than there is): count
        # again, and give the lease back.
        await conn.execute(
            "UPDATE webhook_queues SET lease_until = 0, lease_owner = NULL, pending = "
            "(SELECT COUNT(*) FROM webhook_deliveries d WHERE d.endpoint_id = :e "
            "AND d.product_id = :p AND d.delivered_at IS NULL) "
            "WHERE endpoint_id = :e AND product_id = :p AND lease_owner = :owner",
            {"e": run.endpoint_id, "p": run.product_id, "owner": owner},
        )
        return Settled({}, False)
    delivered = [a for a in attempts if a.delivered]
    failed = [a for a in attempts if not a.delivered]
    done: dict[str, int] = {}
    if delivered:
        names = {f"i{n}": a.event_id for n, a in enumerate(delivered)}
        rows = await conn.fetch_all(
            "UPDATE webhook_deliveries SET delivered_at = :now, attempts = attempts + 1, "
            "last_attempt_at = :now, last_status = :status, last_error = NULL "
            f"WHERE endpoint_id = :e AND event_id IN ({', '.join(':' + n for n in names)}) "
            "AND delivered_at IS NULL RETURNING event_id, created_at",
            {"e": run.endpoint_id, "now": now, "status": delivered[-1].status, **names},
        )
        done = {str(r["event_id"]): int(r["created_at"]) for r in rows}
        if done:
            await conn.execute(
                "UPDATE webhook_queues SET pending = pending - :n "
                "WHERE endpoint_id = :e AND product_id = :p",
                {"e": run.endpoint_id, "p": run.product_id, "n": len(done)},
            )
    for attempt in failed:
        await conn.execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = :at, "
            "last_status = :status, last_error = :error WHERE endpoint_id = :e AND event_id = :id",
            {
                "e": run.endpoint_id,
                "id": attempt.event_id,
                "at": attempt.at,
                "status": attempt.status,
                "error": (attempt.error or "")[:500] or None,
            },
        )
    if failed:
        failures = run.failures + 1
        since = run.failing_since if run.failing_since is not None else failed[0].at
        next_attempt = now + retry_after_ms
    else:
        # Behind the queues that have waited longer (`lease` takes the oldest first), so
        # that a product with a long backlog does not keep the others waiting.
        failures, since, next_attempt = 0, None, now
    await conn.execute(
        "UPDATE webhook_queues SET lease_until = 0, lease_owner = NULL, failures = :f, "
        "failing_since = :since, next_attempt_at = :next "
        "WHERE endpoint_id = :e AND product_id = :p AND lease_owner = :owner",
        {
            "e": run.endpoint_id,
            "p": run.product_id,
            "f": failures,
            "since": since,
            "next": next_attempt,
            "owner": owner,
        },
    )
    disabled = False
    if since is not None and now - since >= give_up_after_ms:
        hours = give_up_after_ms / 3_600_000
        row = await conn.fetch_one(
            "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = :reason, "
            "updated_at = :now WHERE id = :e AND enabled = 1 RETURNING id",
            {
                "e": run.endpoint_id,
                "now": now,
                "reason": f"failing for {hours:g} hours (WEBHOOK_RETRY_HOURS); its deliveries "
                "are kept and go out once it is enabled again",
            },
        )
        disabled = row is not None
    return Settled(done, disabled)


# -- the worker: redeliveries the operator asked for ---------------------------------------


async def take_redeliveries(
    conn: Executor, *, now: int, lease_ms: int, limit: int
) -> list[tuple[int, Outgoing]]:
    """Delivered events the operator asked to send again: (endpoint id, delivery), each
    leased until `now + lease_ms` (a worker that dies leaves it to the next)."""
    rows = await conn.fetch_all(
        f"SELECT d.endpoint_id, {OUTGOING} FROM webhook_deliveries d "
        f"{JOIN_OUTBOX} "
        "WHERE d.redeliver_at IS NOT NULL AND d.redeliver_at <= :now "
        "ORDER BY d.redeliver_at LIMIT :limit",
        {"now": now, "limit": limit},
    )
    taken = []
    for row in rows:
        claimed = await conn.fetch_one(
            "UPDATE webhook_deliveries SET redeliver_at = :until "
            "WHERE event_id = :id AND endpoint_id = :e AND redeliver_at <= :now RETURNING event_id",
            {"id": row["event_id"], "e": row["endpoint_id"], "now": now, "until": now + lease_ms},
        )
        if claimed is not None:
            taken.append((int(row["endpoint_id"]), Outgoing.from_row(row)))
    return taken


async def withdraw_redelivery(conn: Executor, endpoint_id: int, event_id: str) -> None:
    """A redelivery taken but not to be sent (its endpoint is being deleted): given back."""
    await conn.execute(
        "UPDATE webhook_deliveries SET redeliver_at = NULL "
        "WHERE event_id = :id AND endpoint_id = :e",
        {"id": event_id, "e": endpoint_id},
    )


async def settle_redelivery(conn: Executor, endpoint_id: int, attempt: Attempt) -> None:
    """A redelivery is one attempt: done whatever the answer, recorded either way."""
    await conn.execute(
        "UPDATE webhook_deliveries SET redeliver_at = NULL, attempts = attempts + 1, "
        "last_attempt_at = :at, last_status = :status, last_error = :error "
        "WHERE event_id = :id AND endpoint_id = :e",
        {
            "id": attempt.event_id,
            "e": endpoint_id,
            "at": attempt.at,
            "status": attempt.status,
            "error": None if attempt.delivered else (attempt.error or "")[:500] or None,
        },
    )


async def pending_total(conn: Executor) -> int:
    row = await conn.fetch_one("SELECT COALESCE(SUM(pending), 0) AS n FROM webhook_queues")
    return 0 if row is None else int(row["n"])
