"""`python -m server.web`: uvicorn's own command line, with one change to its supervisor.

With `--workers 2` or more, uvicorn's supervisor holds the listening socket until every
worker has drained and exited, so during a graceful stop the kernel keeps accepting
connections that nobody will serve: they hang for up to the grace period and are then
reset, instead of being refused at once so that the client (or load balancer) goes
elsewhere. Here the supervisor lets go of its copy of the socket as soon as it has told
the workers to stop; each worker closes its own when its shutdown begins, so the port
stops accepting while in-flight requests finish. tests/test_drills.py checks this with
one and with two workers.

It also gives the web processes their metrics directory (prometheus-client's multiprocess
mode) when `PROMETHEUS_MULTIPROC_DIR` is not set: a fresh one under the temp directory,
removed when the command exits, and it removes those that earlier runs left behind when they
were killed (the Procfile used to make one per start with `mktemp` and never remove it: 132
were found on one machine). A directory given in the environment is used as it is and left
alone.

And it serves the web processes' metrics on `WEB_METRICS_PORT` (server/infra/metrics.py:
`serve`), from a thread of this process: with several workers that is the supervisor,
which does nothing else; with one, a thread beside the event loop, never the loop itself.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uvicorn.supervisors import Multiprocess

from server.infra.settings import Settings

logger = logging.getLogger("flashsale.web")


class ReleasingMultiprocess(Multiprocess):
    def terminate_all(self) -> None:
        super().terminate_all()
        # Only called on the way out (restarts replace workers one by one, elsewhere).
        for sock in self.sockets:
            sock.close()


METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PREFIX = "flashsale-metrics-"  # then host, the owner's pid, mkdtemp's suffix
# What the Procfile's `mktemp -d -t flashsale-metrics.XXXXXX` made before: no owner in the
# name, but prometheus-client names its files after the processes that write them.
_UNOWNED = re.compile(r"^flashsale-metrics\.[A-Za-z0-9]+$")
_WRITER = re.compile(r"_(\d+)\.db$")
UNOWNED_GRACE_SECONDS = 3600  # an unowned directory with no live writer, untouched this long


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _abandoned(directory: Path) -> bool:
    """A metrics directory of this service that no running process uses any more.

    Judged only by a process on the same host (the name says which), in case the temp
    directory is shared with other machines or containers, whose processes we cannot see."""
    name = directory.name
    if name.startswith(METRICS_PREFIX):
        owner = name.removeprefix(f"{METRICS_PREFIX}{_host()}-").split("-", 1)[0]
        return owner != name and owner.isdigit() and not _alive(int(owner))
    if not _UNOWNED.match(name):
        return False
    writers = [int(m[1]) for f in directory.iterdir() if (m := _WRITER.search(f.name))]
    if any(_alive(pid) for pid in writers):
        return False
    return time.time() - directory.stat().st_mtime > UNOWNED_GRACE_SECONDS


def remove_abandoned_metrics_dirs(parent: Path) -> list[Path]:
    """Remove the metrics directories under `parent` whose web command is gone (killed
    before it could remove its own); returns them."""
    removed = []
    for directory in parent.glob("flashsale-metrics[-.]*"):
        with contextlib.suppress(OSError):  # another web starting at once may be at it too
            if directory.is_dir() and _abandoned(directory):
                shutil.rmtree(directory)
                removed.append(directory)
    return removed


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """`PROMETHEUS_MULTIPROC_DIR` for this command and the workers it starts: the one given,
    or a fresh one removed on the way out (normal exit, SIGTERM, Ctrl-C; after a SIGKILL,
    the next start removes it)."""
    given = os.environ.get(METRICS_ENV)
    if given:
        yield given
        return
    parent = Path(tempfile.gettempdir())
    remove_abandoned_metrics_dirs(parent)
    made = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{_host()}-{os.getpid()}-", dir=parent)
    os.environ[METRICS_ENV] = made  # before anything imports prometheus_client
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def serve_metrics(settings: Settings) -> None:
    """Start the metrics server, unless `WEB_METRICS_PORT` is 0. A port already taken is
    reported and the service runs on without it (as the worker does). Call it once the
    metrics directory is set: prometheus-client picks its mode when first imported."""
    if not settings.web_metrics_port:
        return
    from server.infra import metrics

    host = os.environ.get("HOST", "0.0.0.0")
    try:
        metrics.serve(host, settings.web_metrics_port)
    except OSError as exc:
        logging.basicConfig()
        logger.error("no metrics on port %d: %s", settings.web_metrics_port, exc)


def main() -> None:
    # uvicorn's run() builds its supervisor itself; this is the one way in. (The module,
    # not `uvicorn.main`, which the package rebinds to the command.)
    cli: Any = importlib.import_module("uvicorn.main")
    cli.Multiprocess = ReleasingMultiprocess
    with metrics_directory():
        serve_metrics(Settings.for_command())
        cli.main()


if __name__ == "__main__":
    main()
