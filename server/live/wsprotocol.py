"""uvicorn's WebSocket protocol (websockets, sans-I/O), able to take a frame encoded once.

Live updates send the same frame to thousands of sockets. Through the ASGI `send`, every
socket encodes it again, through Starlette, uvicorn and websockets: ~15 µs a socket here,
more than a storm of changes can afford at 10,000 sockets (bench/README.md). This subclass
adds one thing: an ASGI scope extension, `flashsale.prepared_frames`, through which the
application hands it a text frame already encoded with websockets' own `Frame.serialize`,
written to the socket as it is (a server's frames are not masked, and permessage-deflate is
off in the Procfile). It writes only while the socket is open and its buffer is not full,
and otherwise says no, so the application falls back to the ordinary `send`, which waits.

It also bounds what a client that stops reading can hold (a socket once stayed established
with almost 4 MB queued in the kernel after the hub had dropped it):

- each socket's kernel send buffer is `SEND_BUFFER_BYTES` (the kernel would otherwise grow
  it to megabytes for a client that never reads), so such a client is noticed after a few
  hundred kilobytes at most, and costs no more;
- the hub drops a socket that could not take a frame for 5 s with `abort()`: an RST, and
  the socket and its buffers are gone at once (a close would wait for the client to read
  what is queued, which it never does);
- every other close (the closing handshake's timeout, a ping that got no answer, the end
  of the application) is given `CLOSE_GRACE_S` to send what is queued, then aborted.

A client's pings (`handle_ping`) are answered only while the socket can take more, and a
client may send `PING_BURST` pings and pongs at once and one a second after that; past it,
it is dropped (RST). uvicorn wrote a pong for every ping, so a client that sent pings and
read nothing had them all kept for it in the process's memory (100 MiB of pings, 98 MiB
kept, however quiet the shop: the hub notices a client that stops reading only when it has
frames to send), and each ping or pong took the event loop about 30 µs: 64 MiB of them held
a shopper's request up for 14 s. Browsers send none; a client's keep-alive pings
come every few seconds. RFC 6455 (§5.5.3) lets an endpoint answer only the latest of several pings.

uvicorn logs each handshake with its path and query as sent (`"WebSocket /ws?ids=3" [accepted]`):
here that line shows them as the access log shows a path no route matches (`HandshakeLog`):
cut to `MAX_VALUE_CHARS`, and any run of characters that may be a hold id cut to its first
ones. Whole, a query of 8 KiB was a line of 8 KiB, and a hold id in a path was written out.

Run it with `uvicorn --ws server.live.wsprotocol:FanOutProtocol`; without it, everything works
through `send` alone, and a client that stops reading is closed by the ping timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.protocol import State

try:  # websockets' own unmasking, in C where it was built (as its parser does)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from server.domain.inventory import ids_cut
from server.infra.logs import loggable
from server.infra.sockets import abort

EXTENSION = "flashsale.prepared_frames"
SEND_BUFFER_BYTES = 64 * 1024  # the kernel doubles it for its own bookkeeping
CLOSE_GRACE_S = 5.0
# Pings a client may send at once, and then one every PING_REFILL_S (a token bucket).
PING_BURST = 10
PING_REFILL_S = 1.0

logger = logging.getLogger(__name__)


def prepare_text(text: str) -> bytes:
    """A server's text frame for `text`, to hand to `PreparedFrames.write`: what websockets'
    `Frame(Opcode.TEXT, …).serialize(mask=False, extensions=[])` makes, byte for byte
    (tests/test_live_hub.py compares them), with the header written here (RFC 6455 §5.2: FIN
    and the text opcode, then the payload's length in 7, 7+16 or 7+64 bits; a server's frame
    is not masked, and permessage-deflate is off). websockets' `serialize` is a general path
    (any opcode, masking, extensions, checks): 16 µs a frame against 3.7 µs here, in process
    on the loaded 2-core machine, and a waiting room encodes one frame per page for its
    rounds of positions and for its close (15,000 pages: ~180 ms of the event loop a round,
    the bench's `queue`)."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        return _TEXT_SHORT[length] + payload
    if length < 65536:
        return _TEXT_16.pack(0x81, 126, length) + payload
    return _TEXT_64.pack(0x81, 127, length) + payload


# FIN + text (0x81), then the length: in the second byte under 126, else 126 and 16 bits, or
# 127 and 64 bits (network byte order). No mask bit: a server's frames are not masked.
_TEXT_SHORT = [bytes((0x81, n)) for n in range(126)]
_TEXT_16 = struct.Struct("!BBH")
_TEXT_64 = struct.Struct("!BBQ")


class PreparedFrames:
    """What the application sees in `scope["extensions"]`."""

    def __init__(self, protocol: FanOutProtocol) -> None:
        self._protocol = protocol

    def write(self, frame: bytes) -> bool:
        """Write an encoded frame now, or return False if the socket cannot take it now."""
        protocol = self._protocol
        if (
            not protocol.handshake_complete
            or protocol.close_sent
            or protocol.transport.is_closing()
            or not protocol.writable.is_set()
        ):
            return False
        protocol.transport.write(frame)
        return True

    def abort(self) -> None:
        """Drop the connection now: RST, nothing more sent, the socket freed at once."""
        self._protocol.abort()

    def take_text(self, receiver: Receiver | None) -> None:
        """Offer each small text message (a frame of under 126 bytes, whole) to `receiver`
        first, when nothing is waiting in the ASGI queue: True, it took the message, which
        never reaches `receive`; False, it goes through `receive` as any other. None: stop.
        See `FanOutProtocol.data_received`."""
        self._protocol.receiver = receiver


# What a small text message is offered to (`PreparedFrames.take_text`): True if it took it.
Receiver = Callable[[str], bool]


def _frame_head(head: bytes) -> tuple[int, int] | None:
    """The length of a frame's header and of its payload, from its first bytes (RFC 6455
    §5.2), or None when `head` is too short to say."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    size = 2 + (4 if head[1] & 0x80 else 0)
    if length == 126:
        size += 2
        if len(head) < size:
            return None
        length = int.from_bytes(head[2:4], "big")
    elif length == 127:
        size += 8
        if len(head) < size:
            return None
        length = int.from_bytes(head[2:10], "big")
    return (size, length) if len(head) >= size else None


class _GracefulTransport:
    """The connection's transport, whose `close()` is sure to end within `CLOSE_GRACE_S`:
    asyncio's close waits until the client has read everything queued, which a client
    that stopped reading never does."""

    def __init__(self, transport: asyncio.Transport, protocol: FanOutProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        # The calls made for every frame, bound once (no __getattr__ on the hot path).
        self.write = transport.write
        self.is_closing = transport.is_closing

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
            self._protocol.loop.call_later(CLOSE_GRACE_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self._protocol.disconnected:
            abort(self._transport)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HandshakeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's logger for a socket, whose handshake lines (`"WebSocket %s" …`: the path
    and query as sent) show them cut (`inventory.ids_cut`, then `loggable`); every other
    line as it is."""

    @property
    def level(self) -> int:  # uvicorn reads it to decide on its TRACE lines
        level: int = self.logger.level
        return level

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if len(args) >= 2 and isinstance(msg, str) and '"WebSocket %s"' in msg:
            args = (args[0], loggable(ids_cut(str(args[1]))), *args[2:])
        self.logger.log(level, msg, *args, **kwargs)


class FanOutProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = HandshakeLog(self.logger)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(transport)
        self.transport = _GracefulTransport(self.transport, self)  # type: ignore[assignment]
        self._pings = float(PING_BURST)  # pings the client may send now
        self._pinged_at = self.loop.time()
        self._dropped = False
        # Where websockets' parser is in the stream of frames (`_follow`): the bytes still to
        # come of the frame it is reading, and the first bytes of a header it has only part
        # of. None: not known (frames came before the handshake was complete), so every
        # byte goes to it.
        self._rest: int | None = None
        self._head = b""
        self._clean = True  # nothing came between the request and the handshake's end
        self.receiver: Receiver | None = None

    def data_received(self, data: bytes) -> None:
        """The frames received. Where the stream is at a frame's start (websockets' parser
        has no part of a frame), each whole small text frame (FIN, masked, under 126
        bytes: a page's `join`) is read here and offered to the application's `receiver`
        (`PreparedFrames.take_text`), when nothing waits in the ASGI queue (so that
        messages are taken in the order sent): one the receiver takes costs no event in
        websockets, no ASGI message, no pause and resumption of the socket's reading and
        no wake of the application's task (~40% of a join's CPU in the waiting room's
        bench). Anything else, and a message the receiver leaves, goes through websockets
        as before, which also checks it as before (UTF-8, sizes, fragments)."""
        if self._rest is None:
            if self.handshake_complete and self._clean:
                self._rest = 0  # the frames start here
            else:
                initiated = self.handshake_initiated
                super().data_received(data)
                if initiated or (self.handshake_initiated and not data.endswith(b"\r\n\r\n")):
                    # Bytes after the request, before the handshake was complete: where
                    # websockets' parser is in them is not followed here.
                    self._clean = False
                return
        while self._rest == 0 and not self._head and self.receiver is not None:
            taken = self._take_small_text(data)
            if taken == 0:
                break
            data = data[taken:]
            if not data:
                return
        self._follow(data)
        super().data_received(data)

    def _take_small_text(self, data: bytes) -> int:
        """If `data` starts with a whole small text frame that the receiver takes, how many
        bytes it was; else 0."""
        if len(data) < 6 or data[0] != 0x81 or not data[1] & 0x80:
            return 0
        length = data[1] & 0x7F
        end = 6 + length
        if length >= 126 or len(data) < end:
            return 0
        receiver = self.receiver
        if (
            receiver is None
            or self.close_sent
            or self.conn.state is not State.OPEN
            or self.conn.current_size is not None
            or self.conn.parser_exc is not None
            or not self.queue.empty()
        ):
            return 0
        try:
            text = apply_mask(data[6:end], data[2:6]).decode()
        except UnicodeDecodeError:
            return 0  # websockets and uvicorn close it, as for any such frame
        return end if receiver(text) else 0

    def _follow(self, data: bytes) -> None:
        """Follow the frames in `data`, on their way to websockets' parser: where the last
        one ends (`_rest`, `_head`)."""
        at, size = 0, len(data)
        while at < size:
            if self._rest:
                step = min(self._rest, size - at)
                self._rest -= step
                at += step
                continue
            head = self._head + data[at : at + 14]
            found = _frame_head(head)
            if found is None:
                self._head = head
                return
            header, length = found
            at += header - len(self._head)
            self._head = b""
            self._rest = length

    def handle_ping(self) -> None:
        """The ping's pong, if the socket can take it now (its buffers are not full) and
        the client is within its pings (`_over_budget`). See the module's text."""
        output = self.conn.data_to_send()
        if self._over_budget():
            return
        if self.writable.is_set() and not self.transport.is_closing():
            self.transport.write(b"".join(output))

    def handle_pong(self, event: Frame) -> None:
        if not self._over_budget():  # unasked-for pongs cost the loop as much as pings
            super().handle_pong(event)

    def _over_budget(self) -> bool:
        """Count a ping or pong of the client's: True, and the client dropped, when it is
        past `PING_BURST` of them at once and one every `PING_REFILL_S` after that."""
        now = self.loop.time()
        self._pings = min(PING_BURST, self._pings + (now - self._pinged_at) / PING_REFILL_S)
        self._pinged_at = now
        if self._pings >= 1:
            self._pings -= 1
            return False
        if not self._dropped:
            self._dropped = True
            logger.info("live updates: dropping a client (more than %d pings)", PING_BURST)
            self.abort()
        return True

    def abort(self) -> None:
        """Drop the connection now (see `abort`); the application hears a disconnect."""
        if not self.disconnected:
            self.stop_keepalive()
            abort(self.transport)

    def shutdown(self) -> None:
        """The server is stopping: close with 1001 (going away), so that pages reconnect
        elsewhere, rather than uvicorn's 1012."""
        if self.handshake_complete and not self.close_sent and not self.transport.is_closing():
            self.stop_keepalive()
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001})
            self.conn.send_close(1001, "the server is going away")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
            return
        super().shutdown()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = PreparedFrames(self)
