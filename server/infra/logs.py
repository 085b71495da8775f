"""Logging for every process: one format, one level, from the settings.

`LOG_FORMAT=json` writes one JSON object per line (time, level, logger, message, and the
request id where there is one), for log collectors; otherwise plain text lines.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class WithRequestId(logging.Formatter):
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
    if log_format == "json":
        # uvicorn gives its loggers text handlers of their own: send their lines through
        # ours, so that every line of the process is JSON.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
    if logging.getLevelName(level) > logging.DEBUG:
        # arq logs every job's start and end at INFO: a line per second from the sweeper
        # alone. Its warnings and errors still show.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
