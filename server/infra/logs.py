"""Logging for every process: one format, one level, from the settings.

`LOG_FORMAT=json` writes one JSON object per line (time, level, logger, message, and the
request id where there is one), for log collectors; otherwise plain text lines.

Values from clients reach the log: paths, methods, exceptions' messages. In either format a
line's message never carries a control character, a line break or a non-ASCII character as
it is: each is written as an escape (`\x1b`, `\n`, `\u2028`), so a request cannot forge a
log line or send escape sequences to an operator's terminal. Code that logs a client's value
also passes it through `loggable`, which cuts it short.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_VALUE_CHARS = 200


def escaped(text: str) -> str:
    """`text` with every character that is not printable ASCII written as an escape, and
    backslashes doubled (so an escape in the output always means one was made here)."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isascii() and char.isprintable():
            out.append(char)
        elif (code := ord(char)) < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def loggable(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """A client's value, fit for a log line: escaped (`escaped`), and cut to `limit`
    characters with `...` after."""
    if len(value) > limit:
        return escaped(value[:limit]) + "..."
    return escaped(value)


class RareLog:
    """Warnings of one kind, at most one every `every_s` seconds: the first at once, the
    next once that long has passed, saying how many were left out meanwhile. For what a
    peer may send again and again (a malformed message), so that it cannot fill the log:
    at most one line a window, whatever it sends. `clock`: monotonic seconds."""

    def __init__(
        self,
        log: logging.Logger,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self.every_s = every_s
        self._clock = clock
        self._last: float | None = None
        self.left_out = 0  # since the last line written

    def warning(self, message: str, *args: object) -> bool:
        """Log `message % args` as a WARNING, unless one was logged in the last `every_s`
        seconds: then count it, and say so in the next line. True: it was logged."""
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s:
            self.left_out += 1
            return False
        if self.left_out:
            message += f" (and {self.left_out} more like it left out of the log before it)"
        self._log.warning(message, *args)
        self._last, self.left_out = now, 0
        return True


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escaped(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class WithRequestId(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [{request_id}]" if request_id else text


def configure_logging(level: str, log_format: str = "text") -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines() if log_format == "json" else WithRequestId(TEXT_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    # uvicorn gives its loggers handlers of their own: send their lines through ours, so
    # that every line of the process has one format (JSON lines for LOG_FORMAT=json) and
    # is escaped (its WebSocket lines carry the client's path). Its access lines stay off:
    # the service writes its own (server/api/middleware.py), which never show a whole
    # reservation id; uvicorn writes them whenever its logger has a handler, its
    # ancestors' included, so that one must not propagate.
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    if logging.getLevelName(level) > logging.DEBUG:
        # arq logs every job's start and end at INFO: a line per second from the sweeper
        # alone. Its warnings and errors still show.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
    # httpx logs every request it sends at INFO with its URL whole: each webhook delivery
    # wrote the receiver's credentials and token (`user:password@`, `?token=`) to the
    # worker's log. What a delivery did is recorded with it, for the console.
    logging.getLogger("httpx").setLevel(logging.WARNING)
