"""Live updates over `/ws` (docs/design.md §6): this process's sockets, and the fan-out to them.

Frames arrive from the process's one Redis subscription (server/live/subscriber.py), already in
their final form. The hub keeps, per product, the newest frame not yet sent, and flushes at
most every `FLUSH_SECONDS` (at once if it has not flushed for that long): a product that
changes a thousand times a second reaches each page about twenty times a second, always
ending on its latest value. Reservation frames go only to the sockets watching that hold.

Fan-out is a pass over the sockets, in slices of `FLUSH_SLICE` sockets or `SLICE_SECONDS`,
whichever ends first, between which the event loop runs what else is ready (requests, new
connections, the joins of a waiting room). Each frame is encoded once and written to
every socket as it is (a flush's frames in one write to a page that takes them all: the
write, a send to the kernel, is most of a flush's cost), through the
`flashsale.prepared_frames` extension of our uvicorn protocol (server/live/wsprotocol.py):
a few µs a socket, against ~15 µs through `send_text`.
Where that is not available, or a socket's buffer is full, the frame goes through the
ordinary `send`; a send that would wait is finished by a task of that socket's own, with a
deadline, while its later frames are coalesced to the newest per product, so that a slow or
dead client never holds up the others, and one that stays stuck is closed.

While changes keep coming, flushes are spaced so that fan-out takes at most `FANOUT_SHARE`
of the process, but never more than `MAX_FLUSH_GAP` apart, unless that would take more than
`MAX_FANOUT_SHARE`: a flush to 10,000 sockets costs ~125 ms here (mostly the kernel's send
per socket), so at that size pages see sustained changes about every 0.5 s and fan-out takes
~20%; up to a few thousand sockets, 10%; a flush of 0.3 s (15,000 sockets on a loaded
machine) comes every 0.9 s, a quarter of the loop. The
share is a budget that builds up while things are quiet (up to `FANOUT_BURST` seconds of
fan-out), so the few changes of a sale's first second (units going, then none left) go out
50 ms apart rather than a throttled half-second apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from pydantic_core import from_json, to_json
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server.domain.clock import iso, now_ms
from server.domain.errors import DomainError
from server.domain.inventory import is_reservation_id
from server.domain.model import Product, ReservationChanged
from server.domain.text import SHOWN_CHARS
from server.domain.waitingroom import (
    OPEN,
    Lineup,
    RoomChanged,
    Ticket,
    TicketState,
    order_hidden,
)
from server.infra.buckets import TokenBucket, TokenBuckets
from server.infra.clients import SIGNED_IN, client_key
from server.infra.logs import RareLog, loggable
from server.infra.metrics import (
    DEFERRED,
    FANOUT_DURATION,
    QUEUE_JOIN_DURATION,
    WEBSOCKETS,
    WEBSOCKETS_DROPPED,
)
from server.live.wsprotocol import EXTENSION, PreparedFrames, prepare_text
from server.service.catalog import Catalog
from server.service.shop import Shop
from server.service.waitingroom import LINE_SECONDS, WaitingRoom
from server.storage.errors import StorageError
from server.wire.frames import (
    queue_frame,
    reservation_frame,
    room_from_message,
    room_message,
    ticket_frame,
)
from server.wire.json_text import repeated_key
from server.wire.schemas import JoinMessage, parse_product_ids, plain_join, ticket_view

logger = logging.getLogger(__name__)

# The tasks started and left to finish on their own (closing a socket, telling a join's
# answer): the event loop keeps only a weak reference to a task, so one nothing else holds
# may be collected before it ends (Python's documentation of `asyncio.create_task`).
_DETACHED: set[asyncio.Task[Any]] = set()


def _detach(work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run `work` in a task kept until it ends (`_DETACHED`); the task, for callbacks."""
    task = asyncio.get_running_loop().create_task(work)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    return task


# What a ticket's view says that is not the shopper's own news (see `_tell_tickets`).
AMBIENT = frozenset({"serverTime", "waiting", "estimatedWaitSeconds", "heldUnits", "message"})

FLUSH_SECONDS = 0.05  # at most twenty flushes a second
FANOUT_SHARE = 0.1  # while changes keep coming, of the event loop's time...
MAX_FLUSH_GAP = 0.5  # ...unless that would leave pages staler than this...
# ...and yet never more than this share, however large a flush (the gap stretches to
# `flush_gap_cap`): a flush to 15,000 sockets took 0.2-0.4 s of a loaded machine, so every
# MAX_FLUSH_GAP was 30-45% of the event loop while a waiting room's sale sold (py-spy, the
# waiting room's bench: the flushes 28% of the loop's samples in the sale's first seconds),
# and the joins and the admitted shoppers' reservations queued behind them.
MAX_FANOUT_SHARE = 0.25
# A flush goes out to this many sockets at a time, the event loop running whatever else is
# ready between two slices: a flush to 15,000 sockets blocked it for a few hundred ms (the
# waiting room's bench), and every request and connection arriving meanwhile waited.
FLUSH_SLICE = 1_000
# ...and a slice ends sooner once it has taken this long (s), checked every
# `SLICE_CHECK_EVERY` sockets: a join waits for a slice at each of its few turns of the loop
# (the socket's frame, the batch's transaction, its answer), so on a loaded machine 1,000
# sockets a slice (tens of ms) put a flush's whole length on a join answered meanwhile
# (p99 311 ms before the start in the waiting room's bench, at each `queue` frame's flush).
SLICE_SECONDS = 0.004
SLICE_CHECK_EVERY = 64
# ...but a room's close (`sold_out` to every page still in it) and its admissions go in
# slices this long: they are what those pages wait for, and on a loop busy with a sale's
# joins each slice waits a turn of the loop (10-50 ms) before the next. The waiting room's
# bench (SQLite, one web process, loaded machine, one run each): a close took 129 µs a page
# in 4 ms slices, 114 in 20 ms slices and 115 in 50 ms ones: little either way, most of it
# is the socket write per page on a loop short of CPU.
NEWS_SLICE_SECONDS = 0.02
# A line's counts (`queue` frames) reach every page at most this often (s): they change with
# every join, and each change is a frame for every socket. With 15,000 pages in a line once
# a second was half of a web process (the bench's `queue`, py-spy): a count a page shows
# may be three seconds old.
QUEUE_FRAME_SECONDS = 3.0
# ...or less often: the counts' own flushes (a write to every page) take at most this share
# of the event loop, the last flush to every page's cost standing for the next's, up to
# QUEUE_FRAME_MAX_SECONDS between two. With 15,000 pages in a line filling up before a sale
# they were 300,000 writes in its last minute (a flush every 3 s, each 0.3-0.9 s of a
# loaded machine's loop): every 6-10 s instead. Counts that ride with a flush of stock or
# product frames (QUEUE_RIDE_SECONDS) cost nothing more and are not held back by this.
QUEUE_FRAME_SHARE = 0.05
QUEUE_FRAME_MAX_SECONDS = 10.0
_NEVER = -1e9  # the loop time a room's counts were "last sent" before they ever were
# ...but they go sooner, at most this often, with a flush of stock or product frames that
# goes to every page anyway: in the same write as those (`Client.offer_all`), they cost a
# socket nothing more, where a flush of their own costs a write to each.
QUEUE_RIDE_SECONDS = 1.0
# A flush of counts alone (no stock, product or hold frames: nothing a page must hear soon)
# goes out paced: slices of COUNTS_SLICE_SECONDS at most, each followed by a pause that
# keeps the flush to COUNTS_FLUSH_SHARE of the event loop while it lasts. Back to back, a
# flush to 15,000 pages was 0.4 s of the loop and of the pages' own (their clients read
# 15,000 frames in that time): the joins made meanwhile, a minute before a sale, waited
# 60-110 ms, every ~8 s (the waiting room's bench, 12-02). Paced, it is spread over about
# four times as long; a flush of anything else due meanwhile ends the pacing (the rest of
# the counts go at once, then it: no socket gets frames out of order).
COUNTS_SLICE_SECONDS = 0.002
COUNTS_FLUSH_SHARE = 0.25
FANOUT_BURST = 0.25  # seconds of fan-out that may be spent at once after a quiet spell
# Whether the event loop is behind: a timer due every LAG_PROBE_SECONDS that runs
# BUSY_LAG_SECONDS late or more marks the loop busy for BUSY_HOLD_SECONDS. While it is, the
# rounds that tell waiting pages their new positions (a ticket frame to each: 15,000 in the
# waiting room's bench, a tenth of its web process's loop in the sale's first seconds, when
# its 10,000 joins already wanted more than the loop has) wait, up to
# POSITIONS_MAX_DEFER_SECONDS; a change of a ticket's state (admitted, sold out) never waits.
LAG_PROBE_SECONDS = 0.05
BUSY_LAG_SECONDS = 0.05
# ...and so does a storm of joins, JOINS_BUSY_PER_SECOND or more taken here between two
# probes: it is about to be behind, before its timers say so. A sale's start shows a random
# room's drawn order, a round of positions to every page that waited (5,000 in the bench),
# which went out right as its first second's 10,000 joins came (a tenth of the web's
# samples then, py-spy), since the first probe found the loop behind only after it.
JOINS_BUSY_PER_SECOND = 1_000
BUSY_HOLD_SECONDS = 0.5
POSITIONS_MAX_DEFER_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 5.0
MAX_WATCHED = 50
MAX_BAD_MESSAGES = 10
# Messages (`watch`, `join`, anything) a socket may send at once, and then one every
# MESSAGE_REFILL_S (a token bucket): a page sends a `watch` when it opens and when its holds
# change and a `join` per room, a handful a minute. Each valid message costs a database read
# or write, and a client that reads its answers could otherwise send them as fast as the event
# loop answers: 20 sockets of one client sending `watch` of 50 holds took another shopper's
# reservation from 0.1 to 2 s (p95). Past the bucket, a message is refused with an `error`
# frame (`rate_limited`) without being read, and counts as a bad message (MAX_BAD_MESSAGES
# close the socket). Pings and pongs have their own bucket (server/live/wsprotocol.py).
MESSAGE_BURST = 30
MESSAGE_REFILL_S = 0.5
# ...and per client (`Client.key`), over all its sockets on this process: as many as its
# WS_MAX_PER_CLIENT sockets would be allowed together (`Hub.allowances`). A socket's own
# bucket starts full, so a client that closed each socket after its burst and opened another
# sent 230 `watch` a second from one address (20 sockets at a time), against the 40 that its
# 20 open sockets may send, and took another shopper's reservation from 46 to 520 ms (p95).

# Steps of a room told here at once whose echo from Redis is awaited (`Hub._echoes`).
MAX_ECHOES = 64
# News of a step more than this many below the newest told of its room is the room's count
# started again (a database restored from a backup), not late news: told, and counted from
# (`Hub._room_news`). Late news is a few steps late (a process that lost the lease while
# its news was on the way: the lease lapses in QUEUE_LEASE_MS, 2 s, and a room steps at most
# every 20 ms); a restore takes the count back by every step since the backup (a room
# steps every QUEUE_TICK_MS, 200 ms, while anyone waits: 18,000 an hour). Taking late news
# for a restart costs a moment of its older counts on the pages, until the next step's.
STEP_RESET = 1_000
# Rooms whose steps are counted again: at most one warning this often (s), per hub.
BAD_NEWS_LOG_SECONDS = 60.0

# WebSocket close codes
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013

Key = tuple[str, int | str]  # ("stock", product id) or ("reservation", id): what coalesces


class Client:
    """One socket: sends what it is offered, now if it can, else soon, in order."""

    def __init__(
        self,
        websocket: WebSocket,
        hub: Hub,
        key: str,
        address: str,
        products: frozenset[int] | None = None,
    ) -> None:
        self.websocket = websocket
        # Who it is, for the per-client caps: a shopper the shop signed in (`shop:<sub>`),
        # else `address` (server/infra/clients.py `client_key`); `address` from the shop's
        # token's expiry on (`Hub.signed_out`).
        self.key = key
        self.address = address  # where from (`address_key`), for the per-address caps
        # The products this page shows (`/ws?ids=…`), or None: every product.
        self.products = products
        extension = websocket.scope.get("extensions", {}).get(EXTENSION)
        self.prepared: PreparedFrames | None = extension
        self.watching: set[str] = set()
        # The shopper of the socket (its cookie, Shopper-Token or token), whose holds it may
        # watch; None: only holds without a shopper.
        self.shopper: str | None = None
        # Until when (Unix seconds) the shop's token the socket was opened with names its
        # shopper (None: no token, or an anonymous shopper, whose cookie does not expire).
        self.signed_in_until: float | None = None
        self.sign_out: asyncio.TimerHandle | None = None  # at `signed_in_until`
        self.bad_messages = 0
        # The messages the socket may send (MESSAGE_BURST, one every MESSAGE_REFILL_S).
        self._allowance = TokenBucket.full(MESSAGE_BURST, 1 / MESSAGE_REFILL_S)
        # The shopper's waiting-room tickets, by product, and what the page was last told
        # of each (`_told`: the view without its clock, to send only what changed).
        self.tickets: dict[int, Ticket] = {}
        self.told: dict[int, tuple[object, ...]] = {}
        self._hub = hub
        self._backlog: dict[Key, str] = {}
        self._sending: asyncio.Task[None] | None = None
        self.closed = False
        # Whether the socket's task is reading or handling a message (or not yet reading):
        # a message is then not taken in the protocol (`Hub.take_join`), so that messages
        # are answered in the order sent.
        self.handling = True
        # A join taken in the protocol whose answer has not gone out yet: done when it has
        # (the socket's task waits for it before the next message it reads).
        self.answering: asyncio.Future[None] | None = None
        # ...and when it was read off the socket (`time.monotonic()`), for
        # QUEUE_JOIN_DURATION.
        self.join_read_at = 0.0

    def may_send(self) -> bool:
        """Count one message of the client's: False when it is past `MESSAGE_BURST` at once
        and one every `MESSAGE_REFILL_S` after that (the message is then not to be read)."""
        return self._allowance.take(time.monotonic())

    def offer_all(self, prepared: bytes) -> bool:
        """Write several frames already encoded, in one write, if the socket can take them
        now; False: offer each instead (`offer`), as the socket has a send under way, or no
        prepared frames, or a full buffer."""
        if self.closed:
            return True
        if self._sending is not None or self.prepared is None:
            return False
        return self.prepared.write(prepared)

    def offer(self, key: Key, text: str, prepared: bytes | None = None) -> None:
        """Send a frame: `text`, and the same already encoded, if the caller has it."""
        if self.closed:
            return
        if self._sending is not None:
            # Still finishing an earlier send: keep only the newest frame per key.
            self._backlog.pop(key, None)
            self._backlog[key] = text
            return
        if prepared is not None and self.prepared is not None and self.prepared.write(prepared):
            return
        self._start(self.websocket.send_text(text))

    def _start(self, send: Coroutine[Any, Any, None]) -> None:
        """Run `send` up to its first wait; if it has to wait, finish it in a task."""
        try:
            waiting_on = send.send(None)
        except StopIteration:
            return
        except Exception as exc:  # the socket is gone, or going
            send.close()
            self._hub.leave(self, f"send failed: {exc!r}")
            return
        self._sending = asyncio.create_task(self._finish(send, waiting_on))

    async def sent(self) -> bool:
        """Wait until nothing offered to this socket is still waiting to go out (no wait,
        usually): True; or until it is dropped (`SEND_TIMEOUT_SECONDS` at most): False.
        The socket's messages are answered only then: a client that sends and never reads
        is taken no further message, so it cannot grow its backlog (a `join` for each of
        a million product ids queued an `error` frame for each, for 5 s)."""
        while self._sending is not None and not self.closed:
            await asyncio.wait((self._sending,))
        return not self.closed

    def shopper_now(self) -> str | None:
        """The socket's shopper, unless the shop's token it was opened with has expired
        since: then nobody (as over HTTP, where such a token is refused)."""
        until = self.signed_in_until
        if until is not None and time.time() > until:
            return None
        return self.shopper

    async def _finish(self, send: Coroutine[Any, Any, None], waiting_on: object) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await _resume(send, waiting_on)
                while self._backlog and not self.closed:
                    key = next(iter(self._backlog))
                    await self.websocket.send_text(self._backlog.pop(key))
        except TimeoutError:
            self._hub.leave(self, f"stuck: could not send for {SEND_TIMEOUT_SECONDS:g} s")
        except Exception as exc:
            self._hub.leave(self, f"send failed: {exc!r}")
        finally:
            self._sending = None


def _told(view: dict[str, Any]) -> tuple[object, ...]:
    """What a page was told of its ticket that is its own news (`AMBIENT` left out). The
    estimate of its wait is a number that moves, ambient; but its coming or going, and why
    there is none (`waitUnknownBecause`: the passes out came to cover every unit available,
    with nobody moving), is news: the page said "about 1 s" while its ticket's view gave
    none."""
    return tuple(v for k, v in view.items() if k not in AMBIENT)


class _EndedFrames:
    """Ticket frames of ended tickets (`sold_out`, `reserved`, `lapsed`, `left`) of one
    product at one moment. Such a ticket's view (`ticket_view`) is the same for every ticket
    of its state but for `joinedAt`: it is made and encoded once per state, and each
    ticket's frame is that text with its own `joinedAt` put in, ~1 µs where a view and its
    JSON took ~10 µs (a room of 15,000 that sold out is told to every page at once)."""

    def __init__(self, product: Product, line: Lineup, now: int) -> None:
        self._product = product
        self._line = line
        self.now = now
        # state → (the text before and after `"joinedAt":"…"`, the told tuple, its index)
        self._made: dict[TicketState, tuple[str, str, tuple[object, ...], int]] = {}

    def frame(self, ticket: Ticket) -> tuple[tuple[object, ...], str]:
        """The ticket's told tuple (`_told`) and its frame's text."""
        made = self._made.get(ticket.state)
        if made is None:
            view = ticket_view(ticket, self._product, self._line, now=self.now)
            text = to_json(ticket_frame(view)).decode()
            joined = _JOINED.format(view["joinedAt"])
            at = text.index(joined)
            told = _told(view)
            index = [k for k in view if k not in AMBIENT].index("joinedAt")
            made = (text[:at], text[at + len(joined) :], told, index)
            self._made[ticket.state] = made
        before, after, told, index = made
        joined_at = iso(ticket.joined_at)
        told = (*told[:index], joined_at, *told[index + 1 :])
        return told, f'{before}"joinedAt":"{joined_at}"{after}'


_JOINED = '"joinedAt":"{}"'


async def _resume(coroutine: Coroutine[Any, Any, None], waiting_on: object) -> None:
    """Carry on a coroutine that was started by hand and stopped at `waiting_on`.

    What a coroutine yields when it waits is the future it waits on (or None, to be
    rescheduled); once that is done, sending into the coroutine resumes it, exactly as
    asyncio's own Task does. (Python 3.12's eager tasks do the same for every task.)"""
    try:
        while True:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                await _wait(waiting_on)
            waiting_on = coroutine.send(None)
    except StopIteration:
        return
    finally:
        coroutine.close()


def _wait(future: object) -> Awaitable[object]:
    assert isinstance(future, asyncio.Future), f"unexpected awaitable {future!r}"
    # Shielded: if our deadline cancels us, the socket's own future must not be cancelled
    # under uvicorn's feet.
    return asyncio.shield(future)


class Hub:
    """Every socket of this process, and what to send them.

    At most `max_clients` sockets in all, and `max_per_client` per client
    (`server.infra.clients.client_key`: a shopper the shop signed in, else an address), so
    that one client cannot take every slot: 300 sockets from one address once
    filled `WS_MAX_CLIENTS=300` and every page got 1013 for as long as they were held.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_clients: int,
        max_per_client: int = 20,
        max_per_address: int = 100,
        room: WaitingRoom | None = None,
    ) -> None:
        self._catalog = catalog
        self._room = room
        # Sockets by shopper (those that have one), for their tickets' frames.
        self._shoppers: dict[str, set[Client]] = {}
        # Per room: shoppers whose tickets changed, to read again (None: every one here).
        self._rooms: dict[int, set[str] | None] = {}
        # Per room: shoppers here whose open tickets a step ended `sold_out`, and when (ms):
        # told from the news alone, after the reads above (`_close_tickets`).
        self._closing: dict[int, dict[str, int]] = {}
        # ...and those whose waiting tickets a step admitted: when, and their pass's end (ms).
        self._passing: dict[int, dict[str, tuple[int, int]]] = {}
        # Rooms whose news said someone moved in line (admitted, left, ended): their line is
        # read again sooner when their tickets are.
        self._moved_rooms: set[int] = set()
        self._queues: dict[int, str] = {}  # product → `queue` frame, not yet due
        self._due_queues: dict[int, str] = {}  # product → `queue` frame for the next flush
        self._queue_sent_at: dict[int, float] = {}  # product → loop time it was last sent
        self._queue_timer: asyncio.TimerHandle | None = None
        self._queue_counts: dict[int, tuple[int, int]] = {}
        # ...and its newest `queue` frame, told to a socket when it connects: counts go to
        # the pages only when they change, and a page opened after they stopped changing
        # would show none (and a waitlist with people in it as open to anyone).
        self._queue_texts: dict[int, str] = {}
        # Per room, the number of the newest admission step whose news was told here
        # (`RoomChanged.step`): news of a step not newer is not told (`_room_news`).
        self._steps: dict[int, int] = {}
        # Per room, the steps this process's admitter told here at once (`room_news`) whose
        # echo from Redis has not come back yet: at most MAX_ECHOES each, the oldest
        # forgotten first (an echo of a forgotten step is read like late news: no harm).
        self._echoes: dict[int, set[int]] = {}
        self._resets = RareLog(logger, BAD_NEWS_LOG_SECONDS)  # steps counted again
        self._unknown_rooms = RareLog(logger, BAD_NEWS_LOG_SECONDS)  # news of no product here
        self._tickets_due = asyncio.Event()
        self._ticketer: asyncio.Task[None] | None = None
        self._lag_probe: asyncio.TimerHandle | None = None
        self._busy_until = 0.0  # loop time until which the loop counts as busy
        self._joins_taken = 0  # joins taken since the last lag probe
        # Per room, the line as its positions were last told: (whether its order was hidden,
        # the places waiting, the last place). Positions move only when someone ahead leaves
        # the line (admitted, left), or show at a random room's start; joins go to the
        # back, so a line that only grew moves nobody. A random room's line before its start
        # shows no position (`order_hidden`): joins anywhere in it move nobody either.
        self._told_lines: dict[int, tuple[bool, frozenset[int], int]] = {}
        # Per line, the page (its index in the round) where a round of positions last gave
        # way: the next gives way only past it (`_tell_positions`).
        self._positions_stopped: dict[int, int] = {}
        self._max_clients = max_clients
        self._max_per_client = max_per_client
        self._per_client: Counter[str] = Counter()
        # Sockets by address, whoever's they are: shoppers the shop signed in are clients of
        # their own (`Client.key`), but one address with many accounts must not fill the
        # process (WS_MAX_CLIENTS / WS_MAX_PER_CLIENT accounts did): at most
        # `max_per_address` (MAX_CONNECTIONS_PER_CLIENT, the connections an address may
        # hold) from one address, and their messages within one client's allowance
        # (`address_allowances`, kept and forgotten as `allowances` are): a browser's socket
        # is keyed by its address anyway (it cannot send the shop's token), and more would
        # go only to the scripts of an address's many accounts. Within it, the address's
        # anonymous sockets together have a share of their own, half of it
        # (`anonymous_allowances`): one anonymous script drained the whole, and every
        # shopper the shop signed in behind that address was refused (the attacker's
        # review); now half stays theirs whatever the anonymous sockets send.
        self._max_per_address = max(max_per_address, max_per_client)
        self._per_address: Counter[str] = Counter()
        # The messages each client may send over all its sockets (MESSAGE_BURST and
        # MESSAGE_REFILL_S for each socket it may hold), kept across its reconnects: while
        # the client has a socket and, once its last closes, until its bucket would be full
        # again (`_forget_allowance`): at most one bucket per client with a socket, or whose
        # last socket closed within the last MESSAGE_BURST * MESSAGE_REFILL_S seconds.
        self.allowances = TokenBuckets(
            MESSAGE_BURST * max_per_client, max_per_client / MESSAGE_REFILL_S
        )
        self.address_allowances = TokenBuckets(self.allowances.capacity, self.allowances.rate)
        self.anonymous_allowances = TokenBuckets(
            self.allowances.capacity / 2, self.allowances.rate / 2
        )
        self._forgetting: set[str] = set()  # clients with a timer to forget their bucket
        self.clients: set[Client] = set()
        self._watchers: dict[str, set[Client]] = {}
        self._stock: dict[int, tuple[int, str]] = {}  # product → (version, frame) to send
        self._sent_version: dict[int, int] = {}
        # Products taken back from the database whose `reset` frame has not gone out yet.
        self._resetting: set[int] = set()
        self._products: dict[int, str] = {}
        self._reservations: list[tuple[str, str]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        # A flush under way, slice by slice (its next slice's handle), and whether another
        # was due meanwhile (it waits for this one, so that no socket gets frames out of
        # order).
        self._slice_handle: asyncio.Handle | None = None
        self._flush_again = False
        # ...whether it is a flush of counts alone, paced (COUNTS_FLUSH_SHARE), and the
        # arguments of its next slice, to send it at once when another flush is due.
        self._paced = False
        self._next_slice: tuple[Any, ...] = ()
        self._last_flush = 0.0
        self._flush_cost = 0.0
        self._budget = FANOUT_BURST  # seconds of fan-out that may be spent now
        self._budget_at = 0.0  # loop time when the budget was last topped up
        self.dropped = 0
        # The ended tickets' templates last made (`_ended_frames`): when, of what.
        self._ended: tuple[int, Product, Lineup, _EndedFrames] | None = None

    @property
    def full(self) -> bool:
        return len(self.clients) >= self._max_clients

    def full_for(self, key: str, address: str | None = None) -> str | None:
        """Whose sockets here are at their cap, if any: "you" when the client `key` has its
        `max_per_client`, "your address" when it is the address or `address` (the key of
        the address it connects from, for a shopper the shop signed in) has its
        `max_per_address`; None: another may open."""
        if self._per_client[key] >= self._max_per_client:
            return "your address" if key.startswith("addr:") else "you"
        if address is not None and self._per_address[address] >= self._max_per_address:
            return "your address"
        return None

    def refusal(self, client: Client) -> str | None:
        """Count a message the socket `client` sent: None if it may be read, else why not (it
        is past its socket's MESSAGE_BURST and MESSAGE_REFILL_S; or a signed-in shopper past
        what the sockets one client may hold may send together, `allowances`; or an
        anonymous socket's address past half that over its anonymous sockets,
        `anonymous_allowances`; or the address past all of it over every socket from it,
        `address_allowances`), however often it reconnected. A message refused spends
        nothing of the allowances after the one that refused it."""
        if not client.may_send():
            return (
                f"Too many messages: at most {MESSAGE_BURST} at once, then one every "
                f"{MESSAGE_REFILL_S:g} s; this one was not read."
            )
        address = client.address
        if client.key == address:
            # Anonymous: within the share of the address's anonymous sockets first, so that
            # they cannot take what its signed-in shoppers may send.
            if self.anonymous_allowances.left(address) < 1:
                return self._too_many(
                    "your address's sockets without a sign-in", self.anonymous_allowances
                )
            if not self.address_allowances.take(address):
                return self._too_many("your address over its sockets", self.address_allowances)
            self.anonymous_allowances.take(address)
            return None
        # A shopper the shop signed in: theirs first, so that one past it spends nothing
        # of their address's. Then the address's, which counts every socket from it.
        if not self.allowances.take(client.key):
            return self._too_many("you over your sockets", self.allowances)
        if not self.address_allowances.take(address):
            return self._too_many("your address over its sockets", self.address_allowances)
        return None

    @staticmethod
    def _too_many(whose: str, buckets: TokenBuckets) -> str:
        return (
            f"Too many messages from {whose}: at most {buckets.capacity:g} at once, then "
            f"{buckets.rate:g} a second; this one was not read."
        )

    def _forget_allowance(self, key: str, *, timer: bool = False) -> None:
        """The client or address `key` closed its last socket (or, `timer`, did a while
        ago): once its buckets are full again, drop them (a full bucket is what a client
        without one gets).
        At most one timer per client: a client that drained its bucket and opened and
        closed a socket again and again left a timer for each, each setting itself again
        while the bucket was short (one per socket opened, however many)."""
        if timer:
            self._forgetting.discard(key)
        elif key in self._forgetting:
            return  # its timer sees to it
        if key in self._per_client or key in self._per_address:
            return  # it came back; its last socket to close will see to it
        every = (self.allowances, self.address_allowances, self.anonymous_allowances)
        wait = max(buckets.seconds_to_full(key) for buckets in every)
        if wait <= 0:
            for buckets in every:
                buckets.forget(key)
        else:
            self._forgetting.add(key)
            asyncio.get_running_loop().call_later(
                wait, functools.partial(self._forget_allowance, key, timer=True)
            )

    # -- sockets ---------------------------------------------------------------------

    def join(
        self,
        websocket: WebSocket,
        key: str | None = None,
        products: frozenset[int] | None = None,
        *,
        address: str | None = None,
    ) -> Client:
        """A new socket: its snapshot now (of `products` only, when it names them: with
        10,000 products the whole snapshot is 1.35 MB), then the frames of those products.
        `address`: the key of the address it connects from (`client_key(scope)`), and
        `key`: its client's (a signed-in shopper's, else the address); each worked out
        from the socket's scope when not given."""
        if address is None:
            address = client_key(websocket.scope)
        client = Client(websocket, self, key or address, address, products)
        self._per_client[client.key] += 1
        self._per_address[client.address] += 1
        listing = self._catalog.listing() if products is None else self._catalog.selection(products)
        snapshot = (
            '{"type":"snapshot","serverTime":"' + iso(now_ms()) + '","products":'
            + listing.body.decode() + "}"
        )  # fmt: skip
        client.offer(("snapshot", 0), snapshot)
        for product_id, text in self._queue_texts.items():
            if (products is None or product_id in products) and self._catalog.get(product_id):
                client.offer(("queue", product_id), text)
        self.clients.add(client)
        WEBSOCKETS.inc()
        return client

    def leave(self, client: Client, reason: str | None = None) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.discard(client)
        self._per_client[client.key] -= 1
        if self._per_client[client.key] <= 0:
            del self._per_client[client.key]
        self._per_address[client.address] -= 1
        if self._per_address[client.address] <= 0:
            del self._per_address[client.address]
        for key in {client.key, client.address}:
            self._forget_allowance(key)
        WEBSOCKETS.dec()
        if client.sign_out is not None:
            client.sign_out.cancel()
            client.sign_out = None
        self._unlist(client)
        for reservation_id in client.watching:
            watchers = self._watchers.get(reservation_id)
            if watchers is not None:
                watchers.discard(client)
                if not watchers:
                    del self._watchers[reservation_id]
        if reason is not None:
            self.dropped += 1
            WEBSOCKETS_DROPPED.inc()
            logger.info("live updates: dropping a client (%s)", reason)
            if client.prepared is not None:
                client.prepared.abort()  # the socket is gone now, RST; see wsprotocol
            else:
                _detach(_abandon(client.websocket))

    def _unlist(self, client: Client) -> None:
        """The socket is told of its shopper's tickets no more."""
        if client.shopper is not None:
            same = self._shoppers.get(client.shopper)
            if same is not None:
                same.discard(client)
                if not same:
                    del self._shoppers[client.shopper]

    def signed_out(self, client: Client) -> None:
        """The shop's token the socket was opened with has expired (`signed_in_until`): it
        is told of its shopper's tickets and of the holds it watched no more. Watching
        them, and joining rooms, it is nobody already (`Client.shopper_now`); it kept
        being told of those it watched before, for as long as it stayed open.
        From now on it is a socket of its address, as one opened without the token: it
        counts towards the address's `max_per_client` (past it, it is closed 1013, as such
        a socket would have been refused) and its messages are the address's anonymous
        ones (`refusal`). It kept the shopper's key, and with it a place and messages of
        the shopper's, for as long as it stayed open."""
        client.sign_out = None
        if client.closed:
            return
        self._unlist(client)
        client.tickets.clear()
        client.told.clear()
        self.watch(client, [])
        address, shopper = client.address, client.key
        if shopper == address:
            return
        self._per_client[shopper] -= 1
        if self._per_client[shopper] <= 0:
            del self._per_client[shopper]
        client.key = address
        self._per_client[address] += 1
        self._forget_allowance(shopper)
        if self._per_client[address] > self._max_per_client:
            self.leave(client)
            _detach(_abandon(client.websocket, "too many connections from your address"))

    def watch(self, client: Client, reservation_ids: list[str]) -> None:
        for reservation_id in client.watching - set(reservation_ids):
            watchers = self._watchers.get(reservation_id)
            if watchers is not None:
                watchers.discard(client)
                if not watchers:
                    del self._watchers[reservation_id]
        client.watching = set(reservation_ids)
        for reservation_id in client.watching:
            self._watchers.setdefault(reservation_id, set()).add(client)

    def tell(self, client: Client, reservation_id: str, frame: dict[str, Any]) -> None:
        """Send one client the current state of a hold it watches."""
        client.offer(("reservation", reservation_id), to_json(frame).decode())

    # -- the waiting room's tickets (issue 17) ------------------------------------------

    async def identify(self, client: Client, shopper: str | None) -> None:
        """The socket's shopper: it is told of their tickets now, and as they change, until
        the shop's token it was opened with expires (`signed_out`)."""
        client.shopper = shopper
        if shopper is None or client.closed:
            return
        if client.signed_in_until is not None:
            client.sign_out = asyncio.get_running_loop().call_later(
                max(0.0, client.signed_in_until - time.time()), self.signed_out, client
            )
        if self._room is None:
            return
        self._shoppers.setdefault(shopper, set()).add(client)
        if not self._room.any_rooms():
            return  # a storm of sockets on a shop without rooms costs no query each
        for ticket in await self._room.tickets_of_shopper(shopper):
            client.tickets[ticket.product_id] = ticket
        await self._tell_tickets([client], set(client.tickets), force=True)
        if any(ticket.state in OPEN for ticket in client.tickets.values()):
            self._start_ticketer()  # its position, as the line moves

    @property
    def room(self) -> WaitingRoom | None:
        return self._room

    def count_join(self) -> None:
        """A join is being made here (`loop_busy`: a storm of them)."""
        self._joins_taken += 1

    async def joined(self, client: Client, ticket: Ticket) -> None:
        """The socket's shopper has joined (over this socket): its ticket frame now, and
        its position as the line moves. If its line cannot be read now (the database is
        unreachable: StorageError), the join is answered with an `unavailable` error frame
        naming the product, as a join that could not be made is; the ticket was made, so
        joining again gives it, and its frame follows once the line can be read. Before,
        the error ended the task: a join taken in the protocol was never answered (the
        page waited its 5 s for the answer), and one taken the ordinary way closed the
        socket."""
        if self.joined_now(client, ticket):
            return
        client.tickets[ticket.product_id] = ticket
        try:
            await self._tell_tickets([client], {ticket.product_id}, force=True)
        except StorageError:
            _refuse_join(client, ticket.product_id, "unavailable", UNAVAILABLE)
        if ticket.state in OPEN:
            self._start_ticketer()

    def joined_now(self, client: Client, ticket: Ticket) -> bool:
        """`joined`, if it needs no read of the line (the process's copy is fresh enough
        for `WaitingRoom.line`): True, told; False, nothing done."""
        assert self._room is not None
        product_id = ticket.product_id
        product = self._catalog.get(product_id)
        line = self._room.fresh_line(product_id)
        if product is None or line is None:
            return False
        client.tickets[product_id] = ticket
        if not client.closed:
            self._tell_one(client, ticket, product, line, self._ended_frames(product, line), True)
        if ticket.state in OPEN:
            self._start_ticketer()
        return True

    def _ended_frames(self, product: Product, line: Lineup) -> _EndedFrames:
        """The templates of ended tickets' frames of `product` now: the last ones made, if
        made this millisecond of this product and line (the answers to a batch of joins
        go out together: a room that closed answers each `sold_out`)."""
        now = now_ms()
        made = self._ended
        if made is not None and made[0] == now and made[1] is product and made[2] is line:
            return made[3]
        ended = _EndedFrames(product, line, now)
        self._ended = (now, product, line, ended)
        return ended

    def take_join(self, client: Client, text: str) -> bool:
        """A message of the socket's, offered by its protocol before the ASGI queue
        (`PreparedFrames.take_text`): a join written the page's way (`plain_join`) by a
        socket whose task has no message in hand, nothing left to send and no join being
        answered, of a product in the catalog, is taken here: counted (`refusal`) and
        joined as `_join` does, without the message's trip through the socket's task (the
        join's answer is a callback of its batch's future). False: it goes the ordinary
        way (`live_updates`), which refuses what is to be refused."""
        if client.handling or client.answering is not None or client.closed:
            return False
        if client._sending is not None:  # a client that does not read: `Client.sent`
            return False
        room = self._room
        product_id = plain_join(text)
        if room is None or product_id is None:
            return False
        product = room.cached_product(product_id)
        shopper = client.shopper_now()
        if product is None or shopper is None:
            return False
        read_at = time.monotonic()
        if (refusal := self.refusal(client)) is not None:
            if _refused(client, "rate_limited", refusal):
                self.leave(client)
                _detach(_close_malformed(client.websocket))
            # Counted as the socket's task counts its refusal (`_handle`): an error frame
            # is an answer too.
            join_answered(read_at)
            return True
        try:
            joining = room.join_soon(product, shopper)
        except DomainError as exc:
            _refuse_join(client, product_id, exc.code, str(exc))
            join_answered(read_at)
            return True
        except RuntimeError:
            # The process's joins have stopped (it is shutting down): raised out of the
            # protocol's `data_received`, this closed the connection unanswered.
            _refuse_join(client, product_id, "unavailable", UNAVAILABLE)
            join_answered(read_at)
            return True
        client.join_read_at = read_at
        client.answering = asyncio.get_running_loop().create_future()
        self.count_join()
        joining.add_done_callback(functools.partial(self._answer_join, client, product_id))
        return True

    def _answer_join(
        self, client: Client, product_id: int, joining: asyncio.Future[tuple[Ticket, bool]]
    ) -> None:
        """A join taken in the protocol (`take_join`) has its batch's answer: tell it."""
        answering = client.answering
        if joining.cancelled():
            client.answering = None  # the process is stopping
            if answering is not None:
                answering.set_result(None)
            return
        exc = joining.exception()
        if isinstance(exc, DomainError):
            _refuse_join(client, product_id, exc.code, str(exc))
        elif isinstance(exc, StorageError):
            _refuse_join(client, product_id, "unavailable", UNAVAILABLE)
        elif exc is not None:
            logger.error("live updates: a join failed", exc_info=exc)
            _refuse_join(client, product_id, "unavailable", UNAVAILABLE)
        else:
            ticket, _ = joining.result()
            if not self.joined_now(client, ticket):
                # The line must be read first: told by a task, the answer still held.
                task = _detach(self.joined(client, ticket))
                task.add_done_callback(functools.partial(self._answered, client))
                return
        self._answered(client)

    @staticmethod
    def _answered(client: Client, _: object = None) -> None:
        answering, client.answering = client.answering, None
        if answering is not None and not answering.done():
            join_answered(client.join_read_at)
            answering.set_result(None)

    def room_news(self, news: Sequence[RoomChanged]) -> None:
        """News of rooms made in this process (its admitter's steps), told here at once;
        the same comes back from the subscription later, as news of a step told already,
        and is not told again (`_room_news`). Each as the other processes read it
        (`room_message`: past so many names, `everyone`)."""
        for one in news:
            self._room_news(room_from_message(room_message(one)), local=True)

    def _room_news(self, news: RoomChanged, *, local: bool = False) -> None:
        """Room news, checked already, from this process's admitter or the subscription. News
        of an admission step (its `step` number) that is not newer than the newest told here
        of the room is not told: the echo of news this process's admitter told at once (it
        came back from Redis after the next step's, and put the line's older counts back on
        the pages for QUEUE_FRAME_SECONDS), or an older step's news that comes after a newer
        one's (from a process that lost the lease meanwhile). Its counts are dropped (those
        told are newer); its admissions and closes change a page's copy only if it is still
        in the state before them (`_tell_named`); and the tickets it names to read again
        (passes it lapsed or renewed; `everyone`) are read, unless it is the echo of news
        this process told itself (`local`, `room_news`), whose reads were made then: a
        step's news that came late is not lost (the newer step's news does not name them).
        A step more than STEP_RESET below the newest told is not old news but the room's
        count started again (the database restored from a backup): it is told, and counted
        from.

        News of a product this process's catalog does not have is dropped: what is kept per
        room (steps, counts, frames, echoes, tickets to read) is kept for the catalog's
        products only, so a faulty peer naming ids without end grows nothing here. A
        product is in the catalog before news of its room can be: made here, it is there
        at its commit; made elsewhere, its `product` frame comes first, and the catalog is
        read again after every subscribe and every RELOAD_SECONDS."""
        product_id = news.product_id
        if self._catalog.get(product_id) is None:
            self._unknown_rooms.warning(
                "waiting room news of product %d, which this process does not know: ignored",
                product_id,
            )
            return
        waiting, admitted = news.waiting, news.admitted
        shoppers, everyone = news.shoppers, news.everyone
        number = news.step
        if number is not None:
            newest = self._steps.get(product_id, -1)
            echoes = self._echoes.get(product_id)
            if number < newest - STEP_RESET:
                # Restored from a backup: the steps told here, and the echoes awaited, are
                # of a past the database no longer has. Otherwise pages would be told no
                # counts until the room's steps passed the old number again.
                self._resets.warning(
                    "waiting room of product %d: step %d after step %d; counting its steps "
                    "from there (the database was restored?)",
                    product_id,
                    number,
                    newest,
                )
                self._steps.pop(product_id, None)
                self._echoes.pop(product_id, None)
                newest, echoes = -1, None
            echo = not local and echoes is not None and number in echoes
            if echo and echoes is not None:  # and of every older step of ours: they merge
                echoes.difference_update([n for n in echoes if n <= number])
                if not echoes:
                    del self._echoes[product_id]
            elif local:
                # Only the steps this process told itself are awaited back: news it merely
                # gets from others makes no set here.
                echoes = self._echoes.setdefault(product_id, set())
                echoes.add(number)
                if len(echoes) > MAX_ECHOES:
                    echoes.discard(min(echoes))
            if number <= newest:
                waiting = admitted = None
                if echo:
                    shoppers, everyone = frozenset(), False
            else:
                self._steps[product_id] = number
        if waiting is not None and admitted is not None:
            counts = (waiting, admitted)
            if self._queue_counts.get(product_id) != counts:
                self._queue_counts[product_id] = counts
                text = to_json(queue_frame(product_id, counts[0], counts[1])).decode()
                self._queues[product_id] = self._queue_texts[product_id] = text
                self._schedule_queues()
        if self._room is None:
            return
        if everyone:
            self._rooms[product_id] = None
            self._moved_rooms.add(product_id)
        else:
            here = {s for s in shoppers if s in self._shoppers}
            if news.closed_at is not None:
                # Closed: known from the news, no read (a room of 15,000 that sold out).
                at = news.closed_at
                closing = {s: at for s in news.closed if s in self._shoppers}
                if closing:
                    self._moved_rooms.add(product_id)
                    self._closing.setdefault(product_id, {}).update(closing)
            if news.passed_at is not None and news.pass_until is not None:
                # Admitted: known from the news too, no read.
                until = (news.passed_at, news.pass_until)
                passing = {s: until for s in news.passed if s in self._shoppers}
                if passing:
                    self._moved_rooms.add(product_id)
                    self._passing.setdefault(product_id, {}).update(passing)
            if here:
                self._moved_rooms.add(product_id)
            # A join moves nobody: only this process's other pages of the shopper who do
            # not hold a waiting ticket of theirs yet (the page that joined here was told
            # at once, `joined`) have anything to learn; a ticket that ended in between is
            # named by the news of its end, read again then.
            here.update(
                s
                for s in news.joined - news.shoppers
                if s in self._shoppers
                and not all(_waiting_in(c, product_id) for c in self._shoppers[s])
            )
            if here:
                pending = self._rooms.setdefault(product_id, set())
                if pending is not None:
                    pending.update(here)
        if product_id in self._rooms or product_id in self._closing or product_id in self._passing:
            self._start_ticketer()
            self._tickets_due.set()

    @property
    def queue_gap(self) -> float:
        """The least time between two of a room's counts in flushes of their own (s):
        QUEUE_FRAME_SECONDS, or longer where a flush to every page costs so much that this
        would take more than QUEUE_FRAME_SHARE of the event loop (the last flush to every
        page's cost standing for the next's), up to QUEUE_FRAME_MAX_SECONDS."""
        stretched = min(QUEUE_FRAME_MAX_SECONDS, self._flush_cost / QUEUE_FRAME_SHARE)
        return max(QUEUE_FRAME_SECONDS, stretched)

    def _schedule_queues(self) -> None:
        """The pending `queue` frames go out with a flush once each product's last one is
        `queue_gap` old: the newest counts, at most that often."""
        if self._queue_timer is not None or not self._queues:
            return
        loop = asyncio.get_running_loop()
        gap = self.queue_gap
        due = min(self._queue_sent_at.get(product_id, _NEVER) + gap for product_id in self._queues)
        self._queue_timer = loop.call_at(due, self._queues_due)

    def _queues_due(self) -> None:
        self._queue_timer = None
        now = asyncio.get_running_loop().time()
        gap = self.queue_gap
        for product_id in list(self._queues):
            sent = self._queue_sent_at.get(product_id, _NEVER)
            if now >= sent + gap:
                self._due_queues[product_id] = self._queues.pop(product_id)
                self._queue_sent_at[product_id] = now
        if self._due_queues:
            self._schedule_flush()
        self._schedule_queues()

    def _start_ticketer(self) -> None:
        if self._ticketer is None or self._ticketer.done():
            loop = asyncio.get_running_loop()
            self._ticketer = loop.create_task(self._tell_tickets_forever(), name="ticket-frames")
            if self._lag_probe is None:
                due = loop.time() + LAG_PROBE_SECONDS
                self._lag_probe = loop.call_at(due, self._probe_lag, due)

    def _probe_lag(self, due: float) -> None:
        """The lag probe's timer, due at `due` (loop time): how late it runs says how far
        behind the event loop is (`loop_busy`)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        joins, self._joins_taken = self._joins_taken, 0
        since_last = now - due + LAG_PROBE_SECONDS  # since the last probe ran
        storm = joins >= JOINS_BUSY_PER_SECOND * since_last
        if now - due >= BUSY_LAG_SECONDS or storm:
            self._busy_until = now + BUSY_HOLD_SECONDS
        self._lag_probe = loop.call_at(
            now + LAG_PROBE_SECONDS, self._probe_lag, now + LAG_PROBE_SECONDS
        )

    @property
    def loop_busy(self) -> bool:
        """Whether the event loop has lately run a timer BUSY_LAG_SECONDS late or more, or
        taken JOINS_BUSY_PER_SECOND joins or more (only known while some page here holds a
        ticket: the probe runs with the ticket frames)."""
        return asyncio.get_running_loop().time() < self._busy_until

    async def _tell_tickets_forever(self) -> None:
        """Tickets that changed state are read again and told at once; positions, which
        change whenever the head of a line moves, at most every `LINE_SECONDS`, and while
        the event loop is behind (`loop_busy`) only every POSITIONS_MAX_DEFER_SECONDS."""
        loop = asyncio.get_running_loop()
        # As if a round had just been due: the first may be deferred too.
        last_positions = loop.time() - LINE_SECONDS
        while True:
            try:
                async with asyncio.timeout(LINE_SECONDS):
                    await self._tickets_due.wait()
            except TimeoutError:
                pass
            self._tickets_due.clear()
            try:
                rooms, self._rooms = self._rooms, {}
                for product_id, shoppers in rooms.items():
                    await self._reload_tickets(product_id, shoppers)
                # After the reads: one begun before a close committed may have read its
                # tickets still open.
                passing, self._passing = self._passing, {}
                for product_id, passed in passing.items():
                    await self._admit_tickets(product_id, passed)
                closing, self._closing = self._closing, {}
                for product_id, closed in closing.items():
                    await self._close_tickets(product_id, closed)
                since = loop.time() - last_positions
                forced = since >= POSITIONS_MAX_DEFER_SECONDS
                if since >= LINE_SECONDS and (forced or not self.loop_busy):
                    deferred_since, last_positions = last_positions, loop.time()
                    # A round of positions (a frame to every waiting page, seconds of a
                    # busy loop in slices) stops for news of a close or of admissions
                    # that comes meanwhile: it is told first, and the round is done again
                    # in full at its next turn. A close once waited 0.7 s behind a round
                    # begun just before it (the waiting room's bench). It also stops once
                    # the loop is found busy (a storm of joins begun as it began: a sale's
                    # start), unless it was deferred for as long as it may be already: it
                    # is deferred, still, from when it first was.
                    busy = [False]

                    def give_way(forced: bool = forced, busy: list[bool] = busy) -> bool:
                        if self._news_due():
                            return True
                        busy[0] = not forced and self.loop_busy
                        return busy[0]

                    if not await self._tell_positions(give_way=give_way) and busy[0]:
                        last_positions = deferred_since
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("live updates: telling tickets failed")

    def _news_due(self) -> bool:
        """Whether news of a close or of admissions waits to be told (`_tell_named`)."""
        return bool(self._closing or self._passing)

    async def _reload_tickets(self, product_id: int, shoppers: set[str] | None) -> None:
        assert self._room is not None
        if shoppers is None:
            # The whole room (it closed, or too many changed to name): one read of it,
            # rather than a statement per CHUNK of this process's shoppers.
            if not self._shoppers:
                return
            tickets = await self._room.tickets_of_room(product_id)
        else:
            names = sorted(n for n in shoppers if n in self._shoppers)
            if not names:
                return
            tickets = await self._room.tickets_of(product_id, names)
        clients = []
        for ticket in tickets:
            for client in self._shoppers.get(ticket.shopper_id, ()):
                client.tickets[product_id] = ticket
                clients.append(client)
        # Who was admitted or left moves everyone behind them: read the line again, but
        # not more than five times a second however fast admissions come. Joins move
        # nobody (`_room_news`): the line as last read, as for positions.
        if product_id in self._moved_rooms:
            self._moved_rooms.discard(product_id)
            await self._room.line(product_id, max_age=0.2)
        await self._tell_tickets(clients, {product_id})

    async def _close_tickets(self, product_id: int, closed: dict[str, int]) -> None:
        """News named these shoppers' tickets closed `sold_out` (at the ms given): each page
        of theirs holding the ticket that was closed (open, joined before then) is told so
        without a read; one whose copy is not that ticket (it ended and was joined again,
        or was never read here) reads it."""
        began = now_ms()
        told = await self._tell_named(
            product_id,
            {shopper: (at, at) for shopper, at in closed.items()},
            OPEN,
            TicketState.SOLD_OUT,
            lambda ticket, at, _: dataclasses.replace(
                ticket, state=TicketState.SOLD_OUT, ended_at=at
            ),
        )
        if told:
            # Once a close (at most one a step of the room's admitter; its echo from Redis
            # tells nobody): how long its pages here waited for it, from the close's clock
            # (the step's start) to the first and the last told.
            logger.info(
                "waiting room of product %d: %d pages here told sold_out, from %d ms after "
                "the close to %d ms after it",
                product_id,
                told,
                began - min(closed.values()),
                now_ms() - min(closed.values()),
            )

    async def _admit_tickets(self, product_id: int, passed: dict[str, tuple[int, int]]) -> None:
        """News named these shoppers' waiting tickets admitted (when, and until when their
        pass runs): each page of theirs holding that ticket (waiting, joined before then) is
        told so without a read, as closed ones are (`_close_tickets`); any other reads it.
        On a loop busy with a sale's first joins, the read of the admitted tickets and of
        the line took 0.4-0.5 s each (the first admissions reached their pages 1.1 s after
        they were made)."""
        await self._tell_named(
            product_id,
            passed,
            frozenset({TicketState.WAITING}),
            TicketState.ADMITTED,
            lambda ticket, at, until: dataclasses.replace(
                ticket, state=TicketState.ADMITTED, admitted_at=at, pass_expires_at=until
            ),
        )

    async def _tell_named(
        self,
        product_id: int,
        named: dict[str, tuple[int, int]],
        was: Collection[TicketState],
        becomes: TicketState,
        change: Callable[[Ticket, int, int], Ticket],
    ) -> int:
        """The pages of the shoppers news named (shopper -> (at, until), ms) whose copy of
        their ticket in `product_id` is in a state of `was` and joined by `at`: their copy
        is `change`d and they are told, without a read. Any other page of theirs, unless
        its copy already is `becomes`, reads the ticket. Returns how many pages were told
        without a read."""
        clients = []
        again: set[str] = set()
        for shopper, (at, until) in named.items():
            for client in self._shoppers.get(shopper, ()):
                ticket = client.tickets.get(product_id)
                if ticket is not None and ticket.state in was and ticket.joined_at <= at:
                    client.tickets[product_id] = change(ticket, at, until)
                    clients.append(client)
                elif ticket is None or ticket.state is not becomes:
                    again.add(shopper)
        if again:
            await self._reload_tickets(product_id, again)
        if clients:
            await self._tell_tickets(
                clients, {product_id}, any_line=True, slice_seconds=NEWS_SLICE_SECONDS
            )
        return len(clients)

    async def _tell_positions(self, give_way: Callable[[], bool] | None = None) -> bool:
        """Every socket with a ticket waiting or admitted in a line where someone moved: its
        view, if its standing changed. A line that only grew at the back (joins) moves
        nobody: nothing is computed for it (with 15,000 pages in a line filling up before a
        sale, recomputing every view every second was the whole of a web process).
        `give_way`: asked between slices; when it says so the round stops (False), and the
        line it was telling counts as not told (the next round considers every page of it;
        those told already are not told again, `_told`; and it gives way only past the page
        where this one stopped, so rounds get further however often news comes). True: the
        round was done."""
        assert self._room is not None
        by_product: dict[int, list[Client]] = {}
        for clients in self._shoppers.values():
            for client in clients:
                for product_id, ticket in client.tickets.items():
                    if ticket.state in OPEN:
                        by_product.setdefault(product_id, []).append(client)
        now = now_ms()
        for product_id, open_ones in by_product.items():
            line = await self._room.line(product_id)
            product = self._catalog.get(product_id)
            hidden = product is not None and order_hidden(product, now)
            places = frozenset(line.places)
            last = self._told_lines.get(product_id)
            self._told_lines[product_id] = (hidden, places, max(line.places, default=-1))
            if last is not None:
                was_hidden, before, back = last
                if hidden and was_hidden:
                    continue
                joined_behind = all(place > back for place in places - before)
                if hidden == was_hidden and before <= places and joined_behind:
                    continue
            # A round gives way only past the page where the last one stopped: restarted
            # from the first page and stopped by news about as often, rounds never reached
            # the back of a long line while admissions flowed.
            stopped_at = self._positions_stopped.pop(product_id, -1)

            def stop(n: int, product_id: int = product_id, stopped_at: int = stopped_at) -> bool:
                if n <= stopped_at or give_way is None or not give_way():
                    return False
                self._positions_stopped[product_id] = n
                return True

            if not await self._tell_tickets(open_ones, {product_id}, give_way=stop):
                self._told_lines.pop(product_id, None)
                return False
        return True

    async def _tell_tickets(
        self,
        clients: list[Client],
        products: set[int],
        *,
        force: bool = False,
        any_line: bool = False,
        slice_seconds: float | None = None,
        give_way: Callable[[int], bool] | None = None,
    ) -> bool:
        """Each client's ticket of `products`, if its standing changed (always: `force`).
        `any_line`: the tickets are not waiting (admitted, ended), whose views take only the
        line's total from it: the copy at hand does, however old, with no read. The pages
        go in slices of `slice_seconds` (SLICE_SECONDS), the loop running what else is
        ready between two;
        `give_way`, asked after each with the index of the next page, stops it there when it
        says so: False. True: every page was considered."""
        assert self._room is not None
        if slice_seconds is None:
            slice_seconds = SLICE_SECONDS
        for product_id in products:
            product = self._catalog.get(product_id)
            if product is None:
                continue
            known = self._room.cached_line(product_id) if any_line else None
            line = known if known is not None else await self._room.line(product_id)
            # The views' clock (`serverTime`) once the line is at hand: taken before its
            # read, a join's answer said it was made up to 0.3 s before it was (a busy
            # loop's read, in the waiting room's bench).
            now = now_ms()
            loop = asyncio.get_running_loop()
            began = loop.time()
            ended = _EndedFrames(product, line, now)
            for n, client in enumerate(clients):
                if n % SLICE_CHECK_EVERY == 0 and loop.time() - began >= slice_seconds:
                    # A whole room's frames (it sold out: 15,000 pages) in slices, as a
                    # flush goes: the reservations and steps under way meanwhile are not
                    # held up for the whole of it.
                    await asyncio.sleep(0)
                    if give_way is not None and give_way(n):
                        return False
                    began = loop.time()
                ticket = client.tickets.get(product_id)
                if ticket is None or client.closed:
                    continue
                self._tell_one(client, ticket, product, line, ended, force)
        return True

    @staticmethod
    def _tell_one(
        client: Client,
        ticket: Ticket,
        product: Product,
        line: Lineup,
        ended: _EndedFrames,
        force: bool,
    ) -> None:
        """`client`'s `ticket`, if its standing changed since it was last told (always:
        `force`); `ended`: the templates of ended tickets' frames, whose `now` is the
        view's."""
        product_id = ticket.product_id
        if ticket.state not in OPEN:
            # An ended ticket's frame, from its state's template (a room that sold out:
            # 15,000 of them at once).
            told, text = ended.frame(ticket)
            if not force and client.told.get(product_id) == told:
                return
            client.told[product_id] = told
            client.offer(("ticket", product_id), text, prepare_text(text))
            return
        view = ticket_view(ticket, product, line, now=ended.now)
        # The shopper's own standing: their state, place, pass. The line's total and the
        # held units change with every join and every hold, and every page hears of them
        # from `queue` and `stock` frames: they alone are no news.
        told = _told(view)
        if not force and client.told.get(product_id) == told:
            return
        client.told[product_id] = told
        text = to_json(ticket_frame(view)).decode()
        # Encoded here, once (a few µs), and written straight to the socket when it can
        # take it: through the ASGI `send` a frame costs several times more, and a room
        # that sells out tells every page in it at once.
        client.offer(("ticket", product_id), text, prepare_text(text))

    # -- frames ----------------------------------------------------------------------

    def publish(self, frame: dict[str, Any], raw: bytes, news: RoomChanged | None = None) -> None:
        """A frame from the subscription (or a resync), checked there: queue it for the next
        flush. A `room` message comes with `news`, what the subscription's check made of it
        (`room_from_message`), told as it is: one without is not told."""
        kind = frame.get("type")
        if kind == "stock":
            product_id, version = int(frame["productId"]), int(frame["version"])
            queued = self._stock.get(product_id)
            if version <= self._sent_version.get(product_id, -1):
                return
            if queued is None or queued[0] < version:
                self._stock[product_id] = (version, raw.decode())
        elif kind == "product":
            product_id = int(frame["product"]["id"])
            text = raw.decode()
            if frame.get("reset") is True:
                # Taken back from the database (`Subscriber._resync`): its frames go on
                # from this version, where every one below the versions told was dropped.
                self._sent_version[product_id] = int(frame["product"]["version"])
                self._stock.pop(product_id, None)
                self._resetting.add(product_id)
            elif product_id in self._resetting:
                # Newer news of the product before the reset went out: it goes in its place,
                # and must be taken as a reset too.
                text = to_json({**frame, "reset": True}).decode()
            self._products[product_id] = text
        elif kind == "reservation":
            reservation_id = str(frame["reservation"]["id"])
            if reservation_id in self._watchers:
                self._reservations.append((reservation_id, raw.decode()))
        elif kind == "room":
            if news is not None:
                self._room_news(news)
            return
        else:
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # The budget grows by FANOUT_SHARE of the time that passes, up to FANOUT_BURST; a
        # flush spends what it took. Expecting the next to cost what the last did, wait
        # until the budget covers it: on average fan-out keeps to its share however long
        # a flush takes, yet a quiet hub can answer a short burst of changes at once.
        self._budget = min(FANOUT_BURST, self._budget + (now - self._budget_at) * FANOUT_SHARE)
        self._budget_at = now
        wait_for_budget = max(0.0, self._flush_cost - self._budget) / FANOUT_SHARE
        soonest = self._last_flush + FLUSH_SECONDS
        at = min(max(soonest, now + wait_for_budget), self._last_flush + self.flush_gap_cap)
        self._flush_handle = loop.call_later(max(0.0, at - now), self.flush)

    @property
    def flush_gap_cap(self) -> float:
        """The longest a change waits for a flush after the last one ended (s) while
        changes keep coming: MAX_FLUSH_GAP, or longer where a flush costs so much that
        flushing that often would take more than MAX_FANOUT_SHARE of the event loop
        (the last flush's cost standing for the next's)."""
        return max(MAX_FLUSH_GAP, self._flush_cost * (1 / MAX_FANOUT_SHARE - 1))

    def flush(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._flush_handle = None
        if self._slice_handle is not None:
            self._flush_again = True  # after the one under way
            if self._paced:
                # A flush of counts alone is under way, paced: the rest of it now, so that
                # the frames due now are not held up by its pauses.
                self._paced = False
                self._slice_handle.cancel()
                self._slice_handle = loop.call_soon(self._flush_slice, *self._next_slice)
            return
        products, self._products = self._products, {}
        self._resetting.clear()
        stock, self._stock = self._stock, {}
        reservations, self._reservations = self._reservations, []
        frames: list[tuple[Key, str]] = [(("product", pid), text) for pid, text in products.items()]
        queues, self._due_queues = self._due_queues, {}
        if products or stock:
            # A flush goes to every page anyway: counts not yet due go with it, at most
            # every QUEUE_RIDE_SECONDS, rather than in a flush of their own later (each a
            # write to every socket: 15,000 in the waiting room's bench, while its sale's
            # stock changes are flushed every MAX_FLUSH_GAP).
            now = loop.time()
            for product_id in list(self._queues):
                if now >= self._queue_sent_at.get(product_id, _NEVER) + QUEUE_RIDE_SECONDS:
                    queues[product_id] = self._queues.pop(product_id)
                    self._queue_sent_at[product_id] = now
        frames.extend((("queue", pid), text) for pid, text in queues.items())
        for product_id, (version, text) in stock.items():
            self._sent_version[product_id] = version
            frames.append((("stock", product_id), text))
        for reservation_id, text in reservations:
            for client in list(self._watchers.get(reservation_id, ())):
                client.offer(("reservation", reservation_id), text)
        prepared = [(key, text, prepare_text(text)) for key, text in frames]
        clients = list(self.clients) if prepared else []
        together = b"".join(encoded for _, _, encoded in prepared) if len(prepared) > 1 else b""
        self._paced = bool(frames) and not products and not stock
        self._flush_slice(prepared, together, clients, 0, loop.time() - started)

    def _flush_slice(
        self,
        prepared: list[tuple[Key, str, bytes]],
        together: bytes,
        clients: list[Client],
        start: int,
        cost: float,
    ) -> None:
        """The flush's frames to `clients[start:start + FLUSH_SLICE]` (fewer once the slice
        has taken `SLICE_SECONDS`); the next slice once the loop has run what else was
        ready. `together`: every frame of `prepared` in one piece, when there are several,
        written to a page that takes every product in one write (most of a flush's cost is
        the kernel's send, one a write). `cost`: the flush's time so far (s)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._slice_handle = None
        end = min(start + FLUSH_SLICE, len(clients))
        at = start
        paced = self._paced
        slice_seconds = COUNTS_SLICE_SECONDS if paced else SLICE_SECONDS
        check_every = SLICE_CHECK_EVERY // 4 if paced else SLICE_CHECK_EVERY
        while at < end:
            for client in clients[at : min(at + check_every, end)]:
                wanted = client.products
                if wanted is None and together and client.offer_all(together):
                    continue
                for key, text, encoded in prepared:
                    if wanted is None or key[1] in wanted:
                        client.offer(key, text, encoded)
            at = min(at + check_every, end)
            if loop.time() - began >= slice_seconds:
                break
        took = loop.time() - began
        cost += took
        if at < len(clients):
            self._next_slice = (prepared, together, clients, at, cost)
            if paced:
                pause = took * (1 / COUNTS_FLUSH_SHARE - 1)
                self._slice_handle = loop.call_later(pause, self._flush_slice, *self._next_slice)
            else:
                self._slice_handle = loop.call_soon(self._flush_slice, *self._next_slice)
            return
        self._paced = False
        self._next_slice = ()
        self._last_flush = loop.time()
        # Debt beyond the budget is not carried: past `flush_gap_cap` it is spent anyway.
        self._budget = max(0.0, self._budget - cost)
        if clients:
            # What the next flush to every socket is expected to cost. One with only the
            # frames of watched holds (an admitted shopper's, in a sale) costs next to
            # nothing, and would have let the next flush to all come as if it did too.
            self._flush_cost = cost
            FANOUT_DURATION.observe(cost)
        if self._flush_again:
            self._flush_again = False
            self._schedule_flush()

    async def close_all(self, code: int = 1001) -> None:
        """Going away (shutdown): tell every client, so that pages reconnect elsewhere."""
        if self._ticketer is not None:
            self._ticketer.cancel()
            await asyncio.gather(self._ticketer, return_exceptions=True)
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            self._lag_probe = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
        if self._slice_handle is not None:
            self._slice_handle.cancel()
            self._slice_handle = None
        for client in list(self.clients):
            self.leave(client)
            try:
                async with asyncio.timeout(1.0):
                    await client.websocket.close(code)
            except (TimeoutError, RuntimeError, OSError):
                pass


async def _abandon(websocket: WebSocket, reason: str | None = None) -> None:
    """Close a socket we gave up on (1013, with `reason`), without waiting on it for long."""
    if websocket.application_state is WebSocketState.DISCONNECTED:
        return
    try:
        async with asyncio.timeout(1.0):
            await websocket.close(TRY_AGAIN_LATER, reason)
    except (TimeoutError, RuntimeError, OSError):
        pass


def origin_allowed(websocket: WebSocket, allowed: tuple[str, ...]) -> bool:
    """The page's own origin, or one of CORS_ORIGINS. No Origin (not a browser): allowed."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if origin in allowed:
        return True
    host = websocket.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


async def live_updates(websocket: WebSocket) -> None:
    """`WS /ws`: a snapshot, then stock frames; `watch` adds reservation frames.

    `/ws?ids=3,8,9`: only those products, in the snapshot and after (a page that shows a
    few products of 10,000 need not take a 1.35 MB snapshot). Ids that are not a list of
    at most `MAX_PRODUCT_IDS`, or `ids` sent twice, get an `error` frame (`invalid_ids`)
    and close 1008."""
    app = websocket.app
    hub: Hub = app.state.hub
    if not origin_allowed(websocket, app.state.settings.cors_origins):
        await websocket.close(POLICY_VIOLATION)  # before accept: the handshake gets 403
        return
    await websocket.accept()
    products = None
    # Every value, not the last: `?ids=3,8&ids=9` watched product 9 alone, where the API
    # refuses a parameter sent twice (`parse_params`).
    if given := websocket.query_params.getlist("ids"):
        ids = given[-1]
        try:
            if len(given) > 1:
                raise ValueError(f"was sent {len(given)} times; send it once")
            products = parse_product_ids(ids)
        except ValueError as exc:
            sent = loggable(ids, SHOWN_CHARS)
            frame = {
                "type": "error",
                "code": "invalid_ids",
                "message": f'ids: {exc}; "{sent}" was sent.',
            }
            await websocket.send_text(to_json(frame).decode())
            await websocket.close(POLICY_VIOLATION, "invalid ids")
            return
    if hub.full:
        await websocket.close(TRY_AGAIN_LATER, "too many connections here; try again")
        return
    # The app's `server.api.identity.Identities` (the layer above this one keeps it).
    identities = app.state.identities
    shopper = identities.shopper_id_or_none(websocket)
    # A shopper the shop signed in is counted as themselves, anyone else by address: both
    # worked out once here, and the socket's `Client` takes them as they are.
    address = client_key(websocket.scope)
    key = shopper if shopper is not None and shopper.startswith(SIGNED_IN) else address
    if (whose := hub.full_for(key, address)) is not None:
        await websocket.close(TRY_AGAIN_LATER, f"too many connections from {whose}")
        return
    client = hub.join(websocket, key, products, address=address)
    client.signed_in_until = identities.signed_in_until(websocket)
    await hub.identify(client, shopper)
    # A page's joins are taken in the protocol (`Hub.take_join`), unless each must wait
    # on Redis for the rate limit (RESERVE_RATE_LIMIT): then they come through here.
    if client.prepared is not None and getattr(app.state, "rate_limiter", None) is None:
        client.prepared.take_text(functools.partial(hub.take_join, client))
    try:
        while not client.closed:
            client.handling = False
            message = await websocket.receive()
            client.handling = True
            if message["type"] == "websocket.disconnect":
                break
            if (answering := client.answering) is not None:
                await asyncio.wait((answering,))  # the join taken before it, answered first
            if not await client.sent():  # a client that does not read is answered no more
                break
            if (refusal := hub.refusal(client)) is not None:
                await _refuse(websocket, hub, client, "rate_limited", refusal)
                continue
            await _handle(websocket, hub, client, message.get("text"))
    except WebSocketDisconnect:
        pass
    finally:
        if client.prepared is not None:
            client.prepared.take_text(None)
        hub.leave(client)


def join_answered(read_at: float) -> None:
    """A join over a socket, read at `read_at` (`time.monotonic()`), has its answer handed
    to the socket now: QUEUE_JOIN_DURATION (the process's part of the join's latency)."""
    DEFERRED.observe(QUEUE_JOIN_DURATION, time.monotonic() - read_at)


async def _handle(websocket: WebSocket, hub: Hub, client: Client, text: str | None) -> None:
    if text is not None and (product_id := plain_join(text)) is not None:
        read_at = time.monotonic()
        await _join(websocket, hub, client, product_id)  # the page's join, as it sends it
        join_answered(read_at)
        return
    problem = None
    try:
        message = from_json(text) if text is not None else None
    except ValueError:
        message, problem = None, ("invalid_json", "Messages must be JSON text.")
    if problem is None and text is not None and (repeated := repeated_key(text)) is not None:
        shown = loggable(repeated, SHOWN_CHARS)
        problem = ("invalid_json", f'Messages must name each key once: "{shown}" is named twice.')
    if problem is None:
        if isinstance(message, dict) and message.get("type") == "join":
            try:
                join = JoinMessage.model_validate(message)
            except ValidationError:
                problem = (
                    "invalid_join",
                    'A join is {"type": "join", "productId": <a product\'s id>}, and nothing else.',
                )
            else:
                read_at = time.monotonic()
                await _join(websocket, hub, client, join.product_id)
                join_answered(read_at)
                return
        elif not isinstance(message, dict) or message.get("type") != "watch":
            problem = (
                "unknown_message",
                'The messages understood are {"type": "watch", …} and {"type": "join", …}.',
            )
        else:
            ids = message.get("reservations")
            if (
                not isinstance(ids, list)
                or len(ids) > MAX_WATCHED
                or not all(isinstance(i, str) and is_reservation_id(i) for i in ids)
                or set(message) - {"type", "reservations"}
            ):
                problem = ("invalid_watch", _watch_problem(message, ids))
            else:
                await _watch(websocket, hub, client, ids)
                return
    await _refuse(websocket, hub, client, *problem)


async def _refuse(websocket: WebSocket, hub: Hub, client: Client, code: str, text: str) -> None:
    """An `error` frame for a message that was not taken; the socket is closed (1008) at the
    client's MAX_BAD_MESSAGES-th."""
    if _refused(client, code, text):
        hub.leave(client)
        await _close_malformed(websocket)


def _refused(client: Client, code: str, text: str) -> bool:
    """`_refuse`'s frame; True: that was the client's MAX_BAD_MESSAGES-th, to be closed."""
    client.bad_messages += 1
    client.offer(
        ("error", client.bad_messages),
        to_json({"type": "error", "code": code, "message": text}).decode(),
    )
    return client.bad_messages >= MAX_BAD_MESSAGES


async def _close_malformed(websocket: WebSocket) -> None:
    with contextlib.suppress(RuntimeError, OSError):  # closed meanwhile
        await websocket.close(POLICY_VIOLATION, "too many malformed messages")


def _refuse_join(client: Client, product_id: int, code: str, text: str) -> None:
    """A join's `error` frame, naming the product."""
    frame = {"type": "error", "code": code, "message": text, "productId": product_id}
    # One slot for every refused join of the socket: a socket that stops reading while it
    # joins product after product keeps only the newest refusal, not one per id.
    client.offer(("join", 0), to_json(frame).decode())


UNAVAILABLE = "The database cannot be reached now; try again in a moment."


async def _join(websocket: WebSocket, hub: Hub, client: Client, product_id: int) -> None:
    """A `join` over the socket: the shopper's ticket, as `POST /api/products/{id}/queue`
    makes it (the same rate limit), answered with its `ticket` frame or an `error` frame
    naming the product. The page's join needs no connection of its own."""

    def refuse(code: str, text: str) -> None:
        _refuse_join(client, product_id, code, text)

    room = hub.room
    if room is None:
        refuse("queue_off", f"Product {product_id} has no waiting room; reserve it directly.")
        return
    shopper = client.shopper_now()
    if shopper is None:
        refuse(
            "no_shopper",
            "Joining a waiting room needs a shopper: open the socket with the `shopper` "
            "cookie (set by the shop's page and by GET /api/me) or a Shopper-Token."
            if client.shopper is None
            else "The sign-in token this socket was opened with has expired: join with "
            "the POST, or open the socket again with a new token.",
        )
        return
    limiter = getattr(websocket.app.state, "rate_limiter", None)
    if limiter is not None:
        # As over HTTP: a signed-in shopper is limited as themselves, anyone else per address
        # (the socket's key, worked out when it opened).
        wait = await limiter.retry_after(client.key)
        if wait is not None:
            refuse("rate_limited", f"Too many requests from you; try again in {wait} seconds.")
            return
    hub.count_join()
    try:
        answer = await room.join(product_id, shopper, view=False)  # told below
    except DomainError as exc:
        refuse(exc.code, str(exc))
        return
    except StorageError:
        refuse("unavailable", UNAVAILABLE)
        return
    assert answer.ticket is not None
    await hub.joined(client, answer.ticket)


def _waiting_in(client: Client, product_id: int) -> bool:
    ticket = client.tickets.get(product_id)
    return ticket is not None and ticket.state is TicketState.WAITING


def _watch_problem(message: dict[str, Any], ids: object) -> str:
    """Why a `watch` message was refused, naming what was sent (cut short and escaped)."""
    rule = f'"reservations" must be a list of at most {MAX_WATCHED} reservation ids'
    if extra := sorted(str(k) for k in set(message) - {"type", "reservations"}):
        return f'"{loggable(extra[0], SHOWN_CHARS)}" is not a field of a watch message.'
    if not isinstance(ids, list):
        return f"{rule}; {type(ids).__name__ if ids is not None else 'nothing'} was sent."
    if len(ids) > MAX_WATCHED:
        return f"{rule}; {len(ids)} were sent."
    bad = next(i for i in ids if not (isinstance(i, str) and is_reservation_id(i)))
    sent = loggable(bad, SHOWN_CHARS) if isinstance(bad, str) else repr(bad)[:SHOWN_CHARS]
    return f'{rule}; "{sent}" is not one.'


async def _watch(websocket: WebSocket, hub: Hub, client: Client, ids: list[str]) -> None:
    """Watch those of `ids` that are holds the socket's shopper may see (another
    shopper's hold is as unknown here as over HTTP), and send each one's current state:
    it may have changed while the page was away."""
    shop: Shop = websocket.app.state.shop
    visible = await shop.reservations_by_id(ids, client.shopper_now())
    hub.watch(client, [r.id for r in visible])
    now = now_ms()
    for reservation in visible:
        product = await shop.product(reservation.product_id)
        assert product is not None, "a hold's product cannot vanish"
        frame = reservation_frame(ReservationChanged(reservation, product), now=now)
        hub.tell(client, reservation.id, frame)
