"""`python -m server serve`: the whole service on one machine, for development and demos.

Starts a Redis-compatible server when REDIS_URL is unset (append-only file under ./var/,
bound to loopback; started again on the same port whenever it exits), applies migrations,
seeds demo products into an empty database, then runs the Procfile's `web` and `worker`
under honcho, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from server.devtools import demo
from server.devtools.embedded_redis import EmbeddedRedis
from server.infra.settings import Settings
from server.storage import migrate
from server.storage.database import Store

VAR = Path("var")  # relative to where it is run, like the default DATABASE_URL
PROCFILE = Path(__file__).resolve().parents[2] / "Procfile"


async def prepare_database(settings: Settings, *, seed: bool) -> None:
    """Apply pending migrations and, when asked, seed demo products into an empty database."""
    store = Store(settings.database_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    await store.connect()
    try:
        applied = await migrate.migrate(store)
        print(f"migrations: {len(applied)} applied, the schema is up to date")
        if seed and (count := await demo.seed_if_empty(store)):
            print(f"demo: added {count} products")
    finally:
        await store.close()


def serve(settings: Settings) -> int:
    env = dict(os.environ)
    env.setdefault("PORT", "8000")
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("WEB_CONCURRENCY", str(settings.web_concurrency))
    redis: EmbeddedRedis | None = None
    if not settings.has_redis:
        redis = EmbeddedRedis(VAR / "redis", persist=True)
        redis.start()
        redis.keep_running(lambda line: print(line, flush=True))
        env["REDIS_URL"] = redis.url
        print(f"redis: started an embedded server at {redis.url} (data in {redis.data_dir}/)")
    if not settings.admin_token:
        env["ADMIN_TOKEN"] = secrets.token_urlsafe(18)
    # The web processes' metric values, fresh for this run and removed after it.
    metrics_dir = tempfile.TemporaryDirectory(prefix="flashsale-metrics-")
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir.name)
    try:
        asyncio.run(prepare_database(settings, seed=True))
        base = f"http://127.0.0.1:{env['PORT']}"
        metrics = (
            f"http://127.0.0.1:{settings.web_metrics_port}/metrics (web), "
            f"http://127.0.0.1:{settings.worker_metrics_port}/metrics (worker)"
        )
        print(
            f"\n  Shop:             {base}/\n"
            f"  Operator console: {base}/admin   (token: {env['ADMIN_TOKEN']})\n"
            f"  API:              {base}/api/products\n"
            f"  Metrics:          {metrics}\n\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        # The processes run where this does, so relative paths (./var/) mean the same.
        honcho = [
            sys.executable, "-m", "honcho", "start", "--procfile", str(PROCFILE), "web", "worker"
        ]  # fmt: skip
        with subprocess.Popen(honcho, env=env) as process:
            try:
                return process.wait()
            except KeyboardInterrupt:
                # A terminal's Ctrl-C reached honcho too; a SIGINT sent to us alone did not.
                # Either way honcho stops its processes gracefully (it ignores a second one).
                process.send_signal(signal.SIGINT)
                return process.wait()
    finally:
        metrics_dir.cleanup()
        if redis is not None:
            redis.stop()
            print("redis: stopped")
