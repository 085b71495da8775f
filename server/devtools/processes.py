"""The service as real processes, started with the Procfile's own commands.

Concurrency claims need real processes: in-process tests share one event loop and one
connection and can hide races (docs/design.md §9.8). These run `web` (uvicorn, WEB_CONCURRENCY
processes) and `worker` exactly as the Procfile says, with the environment a deployment
would set.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from server.devtools.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "operator-secret"
# One key for every web process of a run, as bin/serve gives them (var/session-secret).
SESSION_SECRET = "test-session-secret-for-every-web-process"


def procfile() -> dict[str, str]:
    commands = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


class Process:
    """One Procfile entry, running under bash like a process manager would run it."""

    def __init__(
        self, name: str, env: Mapping[str, str], log: Path, *, max_open_files: int | None = None
    ) -> None:
        self.name = name
        self.command = procfile()[name]
        self.env = dict(env)
        self.log = log
        # A lower descriptor limit (RLIMIT_NOFILE), as a process manager may set one.
        self.max_open_files = max_open_files
        self._popen: subprocess.Popen[bytes] | None = None
        self._terminated = False  # SIGTERM sent to the running process

    def start(self) -> None:
        self._terminated = False
        with self.log.open("ab") as out:
            self._popen = subprocess.Popen(
                ["bash", "-c", self.command],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: signals reach uvicorn's workers too
                preexec_fn=self._limit if self.max_open_files else None,
            )

    def _limit(self) -> None:
        assert self.max_open_files is not None
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, hard))

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            os.killpg(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to its process group, once, without waiting: `stop` then only waits."""
        if self.running and not self._terminated:
            os.killpg(self.pid, signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (unless `terminate` sent it), then SIGKILL if it does not exit in time;
        returns the exit code."""
        if self._popen is None:
            return None
        if self.running:
            self.terminate()
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self._popen.wait()
        code = self._popen.returncode
        self._popen = None
        self._terminated = False
        return code

    def wait(self, timeout: float) -> int:
        """Until it exits by itself (after a signal sent with `signal`); its exit code."""
        assert self._popen is not None
        code = self._popen.wait(timeout)
        self._popen = None
        return code

    def children(self) -> list[int]:
        """The pids of its child processes (uvicorn's workers, under its supervisor)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            try:
                found.extend(int(pid) for pid in task.read_text().split())
            except OSError:  # the thread ended meanwhile
                continue
        return sorted(set(found))

    def kill(self) -> None:
        """SIGKILL to the whole process group, as a crash would."""
        if self.running:
            os.killpg(self.pid, signal.SIGKILL)
            assert self._popen is not None
            self._popen.wait()
        self._popen = None


class Service:
    def __init__(
        self,
        database_url: str,
        redis_url: str,
        log_dir: Path,
        *,
        web_concurrency: int = 2,
        **settings: str,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "SESSION_SECRET": SESSION_SECRET,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(web_concurrency),
            "LOG_LEVEL": "WARNING",
            "WORKER_METRICS_PORT": str(free_port()),
            "WEB_METRICS_PORT": str(free_port()),
            **settings,
        }
        self.web_concurrency = web_concurrency
        self._web_log_start = 0  # where this start's lines begin in web.log
        self.web = Process("web", env, log_dir / "web.log")
        self.worker = Process("worker", env, log_dir / "worker.log")

    # How many times `start` tries ports before it gives up on "address already in use".
    START_TRIES = 3

    def start(self, *, worker: bool = True) -> None:
        """Start the web processes (and the worker), and wait until they are ready.

        If the web exits at start because its port was taken meanwhile ("[Errno 98] …
        address already in use": `free_port` tests a port, and another process may bind it
        before uvicorn does), it starts again on a fresh port, `START_TRIES` times in all:
        `port` and `base_url` are then the new port's."""
        for tries_left in reversed(range(self.START_TRIES)):
            self._web_log_start = self.web.log.stat().st_size if self.web.log.exists() else 0
            self.web.start()
            if worker:
                self.worker.start()
            try:
                self.wait_ready()
                if worker:
                    self.wait_worker_ready()
                return
            except RuntimeError:
                if not tries_left or self.web.running or not self._port_was_taken():
                    raise
            self.stop()
            self._move_to(free_port())

    def _port_was_taken(self) -> bool:
        """Whether this start's web log says its port was in use."""
        with self.web.log.open("rb") as log:
            log.seek(self._web_log_start)
            return b"address already in use" in log.read()

    def _move_to(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        for process in (self.web, self.worker):
            process.env["PORT"] = str(port)

    # How long `start` waits for the web processes, and then the worker, to be ready (s): a
    # few seconds on a quiet machine; on two cores at a load average of 15-20 (other test
    # runs beside) uvicorn's import and the app's startup took more than 30 s, and tests
    # failed on a busy machine, not on anything they test.
    READY_WITHIN = 120.0

    def wait_ready(self, within: float = READY_WITHIN) -> None:
        """Until /readyz answers 200 and every web process has started (the processes take a
        moment to start). One process answering is not enough: the others share its listening
        socket from the start, so a connection the kernel hands to one still in its startup
        waits for it, and a test that stops the service then would meet that, not what it
        tests."""
        deadline = time.monotonic() + within
        while True:
            if not self.web.running:
                raise RuntimeError(f"web exited at start:\n{self.logs()}")
            try:
                ready = httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and self._web_processes_started() >= self.web_concurrency:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"web not ready within {within} s:\n{self.logs()}")
            time.sleep(0.05)

    def wait_worker_ready(self, within: float = READY_WITHIN) -> None:
        """Until the worker's metrics port takes a connection: the worker opens it first
        thing, so a test that scrapes it, or counts the worker's threads, starts after the
        worker's own start-up. Raises RuntimeError if the worker exits or is not up in
        `within` seconds."""
        if not self.worker.env.get("WORKER_METRICS_PORT"):
            return
        port = int(self.worker.env["WORKER_METRICS_PORT"])
        deadline = time.monotonic() + within
        while True:
            if not self.worker.running:
                raise RuntimeError(f"worker exited at start:\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready within {within} s:\n{self.logs()}")
            time.sleep(0.05)

    def _web_processes_started(self) -> int:
        """How many web processes have finished their startup, by uvicorn's log line."""
        with self.web.log.open("rb") as log:
            log.seek(self._web_log_start)
            return log.read().count(b"Application startup complete")

    def stop(self) -> None:
        """Stop the worker and the web processes together: SIGTERM to both, then wait for
        each (SIGKILL after 15 s). One after the other, a test waited for the sum of their
        graceful shutdowns (the worker's 0.8-4 s and the web's 0.5-1 s at a load of 10-15)."""
        self.worker.terminate()
        self.web.terminate()
        self.worker.stop()
        self.web.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text()[-4000:]}"
            for p in (self.web, self.worker)
            if p.log.exists()
        )

    @property
    def metrics_url(self) -> str:
        """The web processes' metrics (their own port, `WEB_METRICS_PORT`)."""
        return f"http://127.0.0.1:{self.web.env['WEB_METRICS_PORT']}/metrics"

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """A client of the service (httpx.AsyncClient's keyword arguments; timeout 30 s)."""
        kwargs.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=self.base_url, **kwargs)  # type: ignore[arg-type]

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def new_product(self, stock: int, **fields: object) -> dict[str, Any]:
        """A product made through the operator API, as a shop would make it."""
        async with self.client() as client:
            response = await client.post(
                "/api/admin/products",
                json={"name": "Test product", "price": 10, "stock": stock, **fields},
                headers=self.admin_headers(),
            )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


@contextmanager
def running(
    database_url: str, redis_url: str, log_dir: Path, *, worker: bool = True, **kwargs: object
) -> Iterator[Service]:
    service = Service(database_url, redis_url, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        service.start(worker=worker)
        yield service
    finally:
        service.stop()
