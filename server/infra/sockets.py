"""What the service does to a client's socket that it gives up on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


def abort(transport: asyncio.Transport) -> None:
    """Close at once with an RST (SO_LINGER 0), discarding whatever is unsent, so that the
    kernel frees the socket and its buffers now. A plain close would first wait for the
    client to read what is queued, which a client that stopped reading never does: the
    socket would stay established, its buffers full, for as long as TCP keeps probing."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
