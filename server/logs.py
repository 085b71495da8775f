"""Logging set-up for every process: one format, one level, from the settings."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLevelName(level) > logging.DEBUG:
        # arq logs every job's start and end at INFO: a line per second from the sweeper
        # alone. Its warnings and errors still show.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
