"""`python -m server serve`: the whole service on one machine, for development and demos.

Starts a Redis-compatible server when REDIS_URL is unset (append-only file under ./var/,
bound to loopback; started again on the same port whenever it exits), applies migrations,
seeds demo products into an empty database, then runs the Procfile's `web` and `worker`
under honcho, the worker kept running by server/devtools/supervisor.py: honcho stops
everything when one of its processes exits, and a crashed worker must not take the shop
down with it (attack finding A10); it is started again, with a growing wait, and the log
says so.

Whatever stops it, it stops everything it started, and says so (issue 15): SIGINT (Ctrl-C,
even when started in the background, where a shell has it ignored), SIGTERM (a process
manager, a container runtime) and SIGHUP (a closed terminal) each stop honcho with SIGTERM
(honcho stops the web processes and the worker, gracefully, and kills what is left after
5 s), then Redis; then it checks that the port and the metrics ports are free, and prints
one line per step. Once only this process died of the signal: SIGTERM or SIGHUP left honcho,
the web processes, the worker and Redis running with the port taken.

Honcho runs in a session of its own, so that a terminal's signals reach this process alone,
which decides; and on Linux this process is the "child subreaper" of everything below it,
so a process orphaned on the way (a web worker whose master died) comes back to it and is
stopped too, not left to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from server.devtools import demo, supervisor
from server.devtools.embedded_redis import EmbeddedRedis
from server.infra.settings import Settings
from server.storage import migrate
from server.storage.database import Store

MAX_PORT = 65_535
VAR = Path("var")  # relative to where it is run, like the default DATABASE_URL
PROCFILE = Path(__file__).resolve().parents[2] / "Procfile"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Honcho gives its processes 5 s after SIGTERM, then kills them; this is its own bound.
HONCHO_GRACE_S = 20.0
LEFTOVER_GRACE_S = 5.0
PORT_FREE_WITHIN_S = 10.0
LISTEN_WITHIN_S = 60.0  # how long the URLs wait for the web process to listen
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class Stop(BaseException):
    """A stop signal arrived (`signum`). A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signum)


def _stopping(signum: int, frame: FrameType | None) -> None:
    print(f"serve: {signal.Signals(signum).name} received; already stopping", flush=True)


def _say(line: str) -> None:
    print(f"serve: {line}", flush=True)


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


def session_secret(path: Path) -> str:
    """The key that signs anonymous shoppers' cookies: made up on the first run and kept in
    `path` (readable by its owner only), so that shoppers keep their holds across
    restarts and every web process signs alike."""
    if path.exists():
        kept = path.read_text().strip()
        if len(kept) >= 32:
            return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    made = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(made + "\n")
    return made


def serve_procfile(directory: Path) -> Path:
    """The Procfile as `bin/serve` runs it, written in `directory`: the same lines, but
    the worker's runs under server/devtools/supervisor.py, which starts it again whenever
    it exits (the web processes stay honcho's: if they die, everything stops). The
    worker's command goes to the supervisor in its environment, not its arguments, so that
    `pkill -f` of the worker's command kills the worker alone, which is then restarted."""
    lines = []
    for line in PROCFILE.read_text().splitlines():
        name, colon, command = line.partition(":")
        if name.strip() == "worker" and colon:
            command = command.strip()
            line = (
                f"worker: {supervisor.COMMAND_VARIABLE}={shlex.quote(command)} "
                f"exec {shlex.quote(sys.executable)} -m server.devtools.supervisor worker"
            )
        lines.append(line)
    path = directory / "Procfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(settings: Settings) -> int:
    """Run everything until a stop signal (`STOP_SIGNALS`) or until honcho exits (a web
    process died: honcho stops the others; a worker that dies is started again instead);
    then stop all of it. Returns 0 after a stop that was asked for, 1 at once (nothing
    started) when a port setting cannot be used (`port_settings`) or something already
    listens on its port or a metrics port, else honcho's exit code."""
    env = dict(os.environ)
    # Empty counts as unset, as in the Procfile's `${PORT:-8000}`.
    env["PORT"] = env.get("PORT") or "8000"
    env["HOST"] = env.get("HOST") or "127.0.0.1"
    wanted, problem = port_settings(env["PORT"], settings)
    if problem is not None:
        _say(f"cannot start: {problem}")
        return 1
    for signum in STOP_SIGNALS:
        # Also undoes the SIG_IGN a shell gives SIGINT in a background job.
        signal.signal(signum, _stop)
    _become_subreaper()
    taken = _ports_taken(env["HOST"], wanted)
    if taken:
        # Started anyway, the web process failed to bind while the URLs printed were
        # answered by whatever held the port (another bin/serve's shop).
        _say(
            "cannot start: "
            + ", ".join(f"port {port} ({name})" for name, port in taken.items())
            + f" already in use on {env['HOST']} (another bin/serve?); choose free ones,"
            " e.g. PORT=8001 WEB_METRICS_PORT=9117 WORKER_METRICS_PORT=9118 bin/serve"
        )
        return 1
    env.setdefault("WEB_CONCURRENCY", str(settings.web_concurrency))
    redis: EmbeddedRedis | None = None
    honcho: subprocess.Popen[bytes] | None = None
    # No PROMETHEUS_MULTIPROC_DIR here: `python -m server.web` makes its web processes' own
    # (server/web.py). One given to both web and worker made each metrics port show the
    # other's values too, and a Prometheus scraping both counted every hold twice.
    procfile_dir = tempfile.TemporaryDirectory(prefix="flashsale-serve-")
    try:
        if not settings.has_redis:
            redis = EmbeddedRedis(VAR / "redis", persist=True)
            redis.start()
            redis.keep_running(lambda line: print(line, flush=True))
            env["REDIS_URL"] = redis.url
            print(f"redis: started an embedded server at {redis.url} (data in {redis.data_dir}/)")
        if not settings.admin_token:
            env["ADMIN_TOKEN"] = secrets.token_urlsafe(18)
        if not settings.session_secret:
            env["SESSION_SECRET"] = session_secret(VAR / "session-secret")
        asyncio.run(prepare_database(settings, seed=True))
        # The processes run where this does, so relative paths (./var/) mean the same.
        procfile = serve_procfile(Path(procfile_dir.name))
        command = [
            sys.executable, "-m", "honcho", "start", "--procfile", str(procfile), "web", "worker"
        ]  # fmt: skip
        honcho = subprocess.Popen(command, env=env, start_new_session=True)
        # The URLs once they answer: printed before the web process listened (~5 s), they
        # sent a newcomer who clicked at once to "connection refused".
        _wait_until_listening(env["HOST"], int(env["PORT"]), honcho)
        base = f"http://127.0.0.1:{env['PORT']}"
        metrics = (
            f"http://127.0.0.1:{settings.web_metrics_port}/metrics (web), "
            f"http://127.0.0.1:{settings.worker_metrics_port}/metrics (worker)"
        )
        print(
            f"\n  Shop:             {base}/\n"
            f"  Operator console: {base}/admin   (token: {env['ADMIN_TOKEN']})\n"
            f"  API:              {base}/api/products\n"
            f"  API reference:    {base}/api/docs\n"
            f"  Metrics:          {metrics}\n\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        code = honcho.wait()
        _say(f"honcho exited (code {code}); stopping what is left")
        return code
    except Stop as stop:
        _say(f"{stop} received; stopping the web processes, the worker and Redis")
        return 0
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stopping)
        if honcho is not None:
            _stop_honcho(honcho)
        _stop_leftovers(exclude=None if redis is None else redis.pid)
        procfile_dir.cleanup()
        if redis is not None:
            redis.stop()
            print("redis: stopped", flush=True)
        ports = [int(env["PORT"]), settings.web_metrics_port, settings.worker_metrics_port]
        _say_when_free(env["HOST"], [p for p in ports if p])


def _wait_until_listening(
    host: str, port: int, honcho: subprocess.Popen[bytes], within_s: float = LISTEN_WITHIN_S
) -> None:
    """Return once `port` on `host` takes a connection (the web process listens), honcho
    has exited (the caller's wait says why), or `within_s` has passed (the URLs are then
    printed anyway, and the web's log says what it is doing)."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + within_s
    while honcho.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # a server that is starting: there is no event to wait on


def _become_subreaper() -> None:
    """On Linux, adopt every orphan below this process (prctl PR_SET_CHILD_SUBREAPER)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_honcho(honcho: subprocess.Popen[bytes]) -> None:
    """SIGTERM to honcho, which stops its processes; its whole group killed after
    `HONCHO_GRACE_S` if it has not exited by then."""
    if honcho.poll() is None:
        _say("stopping honcho (web, worker)")
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho.wait(HONCHO_GRACE_S)
        except subprocess.TimeoutExpired:
            _say(f"honcho did not exit within {HONCHO_GRACE_S:.0f} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    _say("honcho stopped")


def _children() -> set[int]:
    """This process's children, its own and adopted orphans (Linux; empty elsewhere)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/self/task/{task}/children").read_text()
                found.update(int(pid) for pid in text.split())
    return found


def _stop_leftovers(*, exclude: int | None) -> None:
    """Stop every process still below this one but `exclude` (Redis, stopped last):
    orphans of the web processes or the worker, adopted as their subreaper. SIGTERM to each
    (and its group), SIGKILL after `LEFTOVER_GRACE_S`."""
    left = _children() - {exclude}
    if not left:
        return
    _say(f"stopping {len(left)} process(es) left behind: {sorted(left)}")
    for pid in left:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while left and time.monotonic() < deadline:
        left = {pid for pid in left if not _reaped(pid)}
        if left:
            time.sleep(0.05)  # polling exits of processes that are not waitable otherwise
    for pid in left:
        _signal_group(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _say_when_free(host: str, ports: list[int]) -> None:
    """Wait (at most `PORT_FREE_WITHIN_S`) until nothing listens on `ports`; say so."""
    deadline = time.monotonic() + PORT_FREE_WITHIN_S
    taken = list(ports)
    while taken and time.monotonic() < deadline:
        taken = [port for port in taken if _listening(host, port)]
        if taken:
            time.sleep(0.05)  # polling the ports: there is no event to wait on
    if taken:
        _say(f"stopped, but something still listens on port(s) {taken}")
    else:
        _say(f"stopped everything; port {ports[0]} is free")


def port_settings(port: str, settings: Settings) -> tuple[dict[str, int], str | None]:
    """The ports `bin/serve` would use, by setting (`PORT`, as given in the environment;
    `WEB_METRICS_PORT` and `WORKER_METRICS_PORT`, as read by `settings`, 0: none), and
    why they cannot be used (None: they can): each a decimal port number of 1 to
    MAX_PORT (a metrics port may be 0), no two the same. Checked before anything is started
    or made: `PORT=abc` ended in a traceback, 65536 and -1 started everything anyway (the
    web process then failed to bind), and `PORT=9117 WEB_METRICS_PORT=9117` passed the
    check for a port in use, which could only see what listened before the start."""
    problems = []
    ports: dict[str, int] = {}
    # At most as many digits as MAX_PORT ("080" is 80, to uvicorn as well) before `int`:
    # one of more than 4,300 digits raised its ValueError, a traceback.
    if (
        port.isascii()
        and port.isdigit()
        and len(port) <= len(str(MAX_PORT))
        and 1 <= int(port) <= MAX_PORT
    ):
        ports["PORT"] = int(port)
    else:
        problems.append(f"PORT must be a port number (1-{MAX_PORT}), got {port!r}")
    for name, number in (
        ("WEB_METRICS_PORT", settings.web_metrics_port),
        ("WORKER_METRICS_PORT", settings.worker_metrics_port),
    ):
        if 0 <= number <= MAX_PORT:
            ports[name] = number
        else:
            problems.append(
                f"{name} must be a port number (1-{MAX_PORT}; 0: none), got {str(number)!r}"
            )
    by_port: dict[int, list[str]] = {}
    for name, number in ports.items():
        if number:
            by_port.setdefault(number, []).append(name)
    for number, names in by_port.items():
        if len(names) > 1:
            problems.append(f"{' and '.join(names)} are both {number}; each needs its own port")
    return ports, "; ".join(problems) or None


def _ports_taken(host: str, ports: dict[str, int]) -> dict[str, int]:
    """Those of `ports` (by their setting's name; 0: not used) something listens on."""
    return {name: port for name, port in ports.items() if port and _listening(host, port)}


def _listening(host: str, port: int) -> bool:
    address = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if address == "::":
        address = "::1"
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False
