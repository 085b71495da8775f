"""The run command a newcomer types: everything starts, the shop answers, and whatever stops
it (Ctrl-C, a process manager's SIGTERM, a closed terminal's SIGHUP, also when started in
the background) stops everything it started and frees the port (issue 15, item 6)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.devtools.embedded_redis import free_port

pytestmark = pytest.mark.slow

STARTED_WITHIN_S = 180  # the wait ends when the URLs are up; 60 s ran out once at load 15
STOPPED_WITHIN_S = 45  # honcho's 5 s grace and uvicorn's shutdown, on a loaded machine


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), None if it is gone or a
    zombie: with its pid, it names one process, even if the pid is used again."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its start time."""
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except FileNotFoundError:
                continue
            for kid in map(int, kids):
                started = _start_time(kid)
                if started is not None and kid not in found:
                    found[kid] = started
                    frontier.append(kid)
    return found


def _alive(processes: dict[int, str]) -> set[int]:
    return {pid for pid, started in processes.items() if _start_time(pid) == started}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ignore_sigint() -> None:
    # What a non-interactive shell does to a background job (`bin/serve &` in a script).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def serve_env(**settings: str) -> dict[str, str]:
    """This process's environment for a `bin/serve` of the test's own (its embedded Redis
    and database: no REDIS_URL, DATABASE_URL or ADMIN_TOKEN of ours), with `settings`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN")
    }
    env.update(settings)
    return env


@contextlib.contextmanager
def _serving(
    tmp_path: Path,
    *,
    background: bool = False,
    until_answering: bool = True,
    metrics_ports: tuple[int, int] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`bin/serve` on a free port, once the shop answers (or at once: `until_answering`);
    the web's and the worker's metrics on `metrics_ports` (default: free ones)."""
    port = free_port()
    web_metrics, worker_metrics = metrics_ports or (free_port(), free_port())
    env = serve_env(
        PORT=str(port),
        LOG_LEVEL="WARNING",
        WEB_METRICS_PORT=str(web_metrics),
        WORKER_METRICS_PORT=str(worker_metrics),
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            cwd=tmp_path,  # ./var/ (database, Redis data) lands here
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_ignore_sigint if background else None,
        )
    descendants: dict[int, str] = {}
    try:
        if until_answering:
            _until_answering(launcher, port, log)
        yield launcher, port
    finally:
        descendants = _descendants(launcher.pid)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _alive(descendants):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _until_answering(launcher: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the shop on `port` answers `GET /api/products` with 200 (fails if the launcher
    exits, or after STARTED_WITHIN_S)."""
    deadline = time.monotonic() + STARTED_WITHIN_S
    while True:
        assert launcher.poll() is None, log.read_text()
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/api/products", timeout=1)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)  # polling a server that is starting: no event to wait on


def _metric(page: str, name: str) -> float:
    """The sum of a metric's samples on a Prometheus text page (0: none)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def test_serve_starts_everything(tmp_path: Path) -> None:
    """Everything starts, and the URLs are printed once the shop answers: a newcomer clicks
    the printed URL at once; it was printed ~5 s before the web process listened, and the
    click got "connection refused"."""
    web_metrics, worker_metrics = free_port(), free_port()
    with _serving(tmp_path, until_answering=False, metrics_ports=(web_metrics, worker_metrics)) as (
        launcher,
        port,
    ):
        log_path = tmp_path / "serve.log"
        deadline = time.monotonic() + STARTED_WITHIN_S
        while f"http://127.0.0.1:{port}/" not in log_path.read_text():
            assert launcher.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)  # reading a log as it is written: no event to wait on
        assert _listening(port), "the URLs were printed before the shop listened"

        _until_answering(launcher, port, log_path)
        response = httpx.get(f"http://127.0.0.1:{port}/api/products")
        assert len(response.json()) == 10  # the demo products
        (drop,) = [p for p in response.json() if p["queue"] != "off"]  # a waiting room to try
        assert drop["queue"] == "random", drop
        lobby = httpx.post(
            f"http://127.0.0.1:{port}/api/products/{drop['id']}/queue",
            cookies=httpx.get(f"http://127.0.0.1:{port}/api/me").cookies,
        )
        assert lobby.status_code == 201, lobby.text  # the room is open: the sale starts soon
        held = httpx.post(
            f"http://127.0.0.1:{port}/api/reservations",
            json={"productId": response.json()[0]["id"], "quantity": 1},
            cookies=httpx.get(f"http://127.0.0.1:{port}/api/me").cookies,
        )
        assert held.status_code == 201, held.text
        # Each port shows its own processes' metrics: the worker's showed the web's too (one
        # metrics directory for both), and a Prometheus scraping both counted holds twice.
        reservations = "flashsale_reservations_total"
        deadline = time.monotonic() + STARTED_WITHIN_S
        while not _metric(httpx.get(f"http://127.0.0.1:{web_metrics}/metrics").text, reservations):
            assert time.monotonic() < deadline, "the web's metrics never counted the hold"
            time.sleep(0.1)  # metrics are written out up to a second late: nothing to wait on
        worker_page = httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics").text
        assert "flashsale_holds_expired_total" in worker_page
        assert _metric(worker_page, reservations) == 0, worker_page
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ok"
        log = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}/" in log
        assert httpx.get(f"http://127.0.0.1:{port}/api/docs").status_code == 200
        assert f"http://127.0.0.1:{port}/api/docs" in log
        assert "token:" in log
        assert (tmp_path / "var" / "flashsale.db").exists()
        assert (tmp_path / "var" / "redis").is_dir()
        assert len(_descendants(launcher.pid)) >= 4  # honcho, web, worker, Redis


def _stops_everything(
    tmp_path: Path, launcher: subprocess.Popen[bytes], port: int, signum: signal.Signals
) -> None:
    """`signum` to the launcher stops it, exit 0, and everything it started, and frees the
    port; its log says so."""
    descendants = _descendants(launcher.pid)
    assert len(descendants) >= 4, descendants  # honcho, web, worker, Redis
    launcher.send_signal(signum)
    launcher.wait(STOPPED_WITHIN_S)  # raises if it does not stop
    assert launcher.returncode == 0
    # Everything it started is gone: the launcher waits for each before it exits.
    assert not _alive(descendants), f"left running: {_alive(descendants)}"
    assert not _listening(port)
    log = (tmp_path / "serve.log").read_text()
    assert f"serve: {signum.name} received" in log, log
    assert "redis: stopped" in log, log
    assert f"serve: stopped everything; port {port} is free" in log, log


# SIGTERM in the foreground is the end of the killed-worker test (each start of bin/serve
# costs a test seconds: one start checks both).
@pytest.mark.parametrize(
    ("signum", "background"),
    [
        (signal.SIGINT, False),
        (signal.SIGINT, True),
        (signal.SIGTERM, True),
        (signal.SIGHUP, False),
    ],
    ids=["SIGINT", "SIGINT-background", "SIGTERM-background", "SIGHUP"],
)
def test_any_stop_signal_stops_everything_and_frees_the_port(
    tmp_path: Path, signum: signal.Signals, background: bool
) -> None:
    with _serving(tmp_path, background=background) as (launcher, port):
        _stops_everything(tmp_path, launcher, port, signum)


def _run_to_end(
    tmp_path: Path, env: dict[str, str], command: tuple[str, ...] = ("server", "serve")
) -> subprocess.CompletedProcess[str]:
    """`python -m <command>` in `tmp_path` with `env`, to its end (a refusal: these exit
    at once), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=STARTED_WITHIN_S,
        check=False,
    )


def test_a_port_in_use_stops_it_at_once_naming_the_setting(tmp_path: Path) -> None:
    """With another bin/serve on port 8000, the web process failed to bind, yet the URLs
    were printed, pointing at the other service's shop, which answered them."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = serve_env(PORT=str(port), WEB_METRICS_PORT=str(free_port()), WORKER_METRICS_PORT="0")
        done = _run_to_end(tmp_path, env)
    assert done.returncode == 1, done
    assert f"port {port} (PORT) already in use" in done.stdout, done.stdout
    assert "PORT=8001" in done.stdout, done.stdout
    assert "Shop:" not in done.stdout, done.stdout
    assert not (tmp_path / "var").exists()  # nothing was started: no Redis, no database


# Port settings bin/serve cannot use, and what its one line must name. A traceback for
# `abc`; 65536 and -1 started everything anyway (the web process then failed to bind, or
# bound another port); two settings on one port passed the check, which looked for
# something listening before anything was started.
BAD_PORTS: list[tuple[dict[str, str], list[str]]] = [
    ({"PORT": "abc"}, ["PORT", "'abc'"]),
    ({"PORT": "65536"}, ["PORT", "'65536'"]),
    ({"PORT": "-1"}, ["PORT", "'-1'"]),
    ({"PORT": "80.5"}, ["PORT", "'80.5'"]),
    # More digits than Python turns into an integer (4,300): int()'s ValueError, a traceback.
    ({"PORT": "9" * 5000}, ["PORT", "'99999"]),
    ({"PORT": "9117", "WEB_METRICS_PORT": "9117"}, ["PORT", "WEB_METRICS_PORT", "9117"]),
    (
        {"WEB_METRICS_PORT": "9118", "WORKER_METRICS_PORT": "9118"},
        ["WEB_METRICS_PORT", "WORKER_METRICS_PORT", "9118"],
    ),
    ({"WORKER_METRICS_PORT": "70000"}, ["WORKER_METRICS_PORT", "'70000'"]),
]


@pytest.mark.parametrize(("settings", "named"), BAD_PORTS)
def test_a_port_setting_that_cannot_be_used_stops_it_at_once_naming_it(
    tmp_path: Path, settings: dict[str, str], named: list[str]
) -> None:
    """PORT, WEB_METRICS_PORT and WORKER_METRICS_PORT are each a port number (1-65535; `0`
    for a metrics port: none) and no two the same, checked before anything is started or
    made: exit 1 and one line naming the setting(s) and the value."""
    ports = {"PORT": str(free_port()), "WEB_METRICS_PORT": "0", "WORKER_METRICS_PORT": "0"}
    env = serve_env(**{**ports, **settings})
    done = _run_to_end(tmp_path, env)
    assert done.returncode == 1, done
    assert done.stderr == "", done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert all(name in lines[0] for name in named), lines[0]
    assert not (tmp_path / "var").exists()  # nothing was started: no Redis, no database


RESTARTED_WITHIN_S = 90  # the supervisor's first wait is 1 s; the rest is a loaded machine


def _worker(launcher: int) -> int | None:
    """The worker's pid (`python -m jobs`, below the launcher), None while there is none."""
    for pid in _alive(_descendants(launcher)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if args[1:3] == [b"-m", b"jobs"]:
            return pid
    return None


def test_a_killed_worker_is_started_again_and_the_shop_stays_up(tmp_path: Path) -> None:
    """A worker killed is started again, the shop answering meanwhile; then SIGTERM (in the
    foreground) stops everything, the new worker too, and frees the port."""
    with _serving(tmp_path) as (launcher, port):
        log = tmp_path / "serve.log"
        deadline = time.monotonic() + STARTED_WITHIN_S
        while (worker := _worker(launcher.pid)) is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)  # polling /proc: no event to wait on
        # Its supervisor's command line does not hold the worker's: `pkill -f "python -m
        # jobs"` kills the worker alone, and the supervisor starts it again.
        parent = int(Path(f"/proc/{worker}/stat").read_text().rpartition(")")[2].split()[1])
        supervisor = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        assert supervisor[1:3] == [b"-m", b"server.devtools.supervisor"], supervisor
        assert not any(b"jobs" in arg for arg in supervisor), supervisor
        os.kill(worker, signal.SIGKILL)

        deadline = time.monotonic() + RESTARTED_WITHIN_S
        while (again := _worker(launcher.pid)) in (None, worker):
            assert launcher.poll() is None, f"the launcher stopped:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)  # polling /proc: no event to wait on
        assert again is not None
        assert launcher.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/api/products").status_code == 200
        assert "supervisor: worker exited (killed by SIGKILL)" in log.read_text()
        _stops_everything(tmp_path, launcher, port, signal.SIGTERM)


@pytest.mark.parametrize(
    "command",
    [
        ["server", "serve"],
        ["server", "migrate"],
        ["jobs"],
        ["server.web", "--factory", "server.api.app:create_app"],
    ],
    ids=["serve", "migrate", "worker", "web"],
)
def test_a_setting_that_cannot_be_used_ends_a_command_with_one_line_naming_it(
    tmp_path: Path, command: list[str]
) -> None:
    """Each command's start: exit code 2 and the setting named on one line, not a traceback
    through the settings' code (a newcomer's `HOLD_SECONDS=soon bin/serve` got 12 lines)."""
    env = {**os.environ, "HOLD_SECONDS": "soon"}
    done = _run_to_end(tmp_path, env, tuple(command))
    assert done.returncode == 2, done
    assert done.stderr.strip() == "configuration error: HOLD_SECONDS must be a number, got 'soon'"
    assert not (tmp_path / "var").exists()  # nothing was started or made
