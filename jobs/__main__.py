"""`python -m jobs`: run the worker. `python -m jobs --check`: exit 0 if a worker is alive."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from jobs import worker
from server.infra import metrics
from server.infra.keys import HEALTH_CHECK_KEY
from server.infra.logs import configure_logging
from server.infra.redis_client import redis_client_for
from server.infra.settings import Settings

logger = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    if settings.worker_metrics_port:
        try:
            # The web processes' bounded server (a few connections at a time, each timed out),
            # not prometheus-client's, which gives every connection a thread of its own and
            # waits on it forever: a few hundred silent ones were a few hundred threads.
            metrics.serve(os.environ.get("HOST", "0.0.0.0"), settings.worker_metrics_port)
        except OSError as exc:
            # Metrics are worth less than expiring holds: run without them.
            logger.error("no metrics on port %d: %s", settings.worker_metrics_port, exc)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await worker.run(settings, stopping)


async def check_health(settings: Settings) -> int:
    """0 while a worker is alive, 1 otherwise: arq's health check (a worker refreshes its
    health key every 30 s, and it expires soon after), through the service's own Redis
    client, so that it reaches Redis however the service does (Sentinel with passwords
    included, which arq's own pool cannot give the Sentinels)."""
    redis = redis_client_for(settings)
    try:
        found = await redis.get(HEALTH_CHECK_KEY)
    finally:
        await redis.aclose()
    if not found:
        logger.warning("health check failed: no worker has written %s lately", HEALTH_CHECK_KEY)
        return 1
    logger.info("health check successful: %s", found.decode(errors="replace"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="health check, for probes")
    args = parser.parse_args(argv)
    settings = Settings.for_command()
    configure_logging(settings.log_level, settings.log_format)
    if args.check:
        return asyncio.run(check_health(settings))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
