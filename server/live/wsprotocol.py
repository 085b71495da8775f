"""uvicorn's WebSocket protocol (websockets, sans-I/O), able to take a frame encoded once.

Live updates send the same frame to thousands of sockets. Through the ASGI `send`, every
socket encodes it again, through Starlette, uvicorn and websockets: ~15 µs a socket here,
more than a storm of changes can afford at 10,000 sockets (bench/README.md). This subclass
adds one thing: an ASGI scope extension, `flashsale.prepared_frames`, through which the
application hands it a text frame already encoded with websockets' own `Frame.serialize`,
written to the socket as it is (a server's frames are not masked, and permessage-deflate is
off in the Procfile). It writes only while the socket is open and its buffer is not full,
and otherwise says no, so the application falls back to the ordinary `send`, which waits.

Run it with `uvicorn --ws server.live.wsprotocol:FanOutProtocol`; without it, everything works
through `send` alone.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode

EXTENSION = "flashsale.prepared_frames"


def prepare_text(text: str) -> bytes:
    """A server's text frame for `text`, to hand to `PreparedFrames.write`."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


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


class FanOutProtocol(WebSocketsSansIOProtocol):
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
