"""The run command a newcomer types: everything starts, the shop answers, Ctrl-C stops it all."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.devtools.embedded_redis import free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        kids: set[int] = set()
        # Every thread's children: the embedded Redis is started again by a thread.
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids.update(map(int, task.read_text().split()))
        for kid in kids:
            found.add(kid)
            frontier.append(kid)
    return found


def test_serve_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN")
    }
    env.update({"PORT": str(port), "LOG_LEVEL": "WARNING"})
    out = (tmp_path / "serve.log").open("wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=tmp_path,  # ./var/ (database, Redis data) lands here
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert launcher.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/products", timeout=1)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        assert len(response.json()) == 10  # the demo products
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ok"
        log = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}/" in log
        assert "token:" in log
        assert (tmp_path / "var" / "flashsale.db").exists()
        assert (tmp_path / "var" / "redis").is_dir()
        descendants = _children(launcher.pid)
        assert len(descendants) >= 4  # honcho, web, worker, Redis

        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)  # raises if it does not stop
        still_running = {pid for pid in descendants if Path(f"/proc/{pid}").exists()}
        assert not still_running, f"left running: {still_running}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.close()


def _redis_pids(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"valkey-server" in command or b"redis-server" in command:
            found.add(pid)
    return found


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _until(check: Callable[[], bool], what: str, log: Path, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.05)


def test_serve_starts_its_embedded_redis_again_when_it_dies(tmp_path: Path) -> None:
    """A one-machine service must not run without Redis until a human restarts it (issue
    15): the embedded server killed (a crash, the OOM killer) is started again, on the same
    port, and the web processes are ready and live again."""
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN")
    }
    env.update({"PORT": str(port), "LOG_LEVEL": "WARNING"})
    log = tmp_path / "serve.log"
    out = log.open("wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    descendants: set[int] = set()

    def ready() -> bool:
        assert launcher.poll() is None, log.read_text()
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and answer.json()["status"] == "ok"

    try:
        _until(ready, "the service to be ready", log)
        match = re.search(r"redis://127\.0\.0\.1:(\d+)/", log.read_text())
        assert match, log.read_text()
        redis_port = int(match[1])
        (first,) = _redis_pids(_children(launcher.pid))

        os.kill(first, signal.SIGKILL)
        _until(lambda: not Path(f"/proc/{first}/cmdline").exists(), "the kill", log, 10)
        _until(lambda: "redis: started again" in log.read_text(), "a new Redis", log)
        assert _answers_ping(redis_port)
        (second,) = _redis_pids(_children(launcher.pid))
        assert second != first
        _until(ready, "the service to be ready with the new Redis", log)

        descendants = _children(launcher.pid)
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
        still_running = {pid for pid in descendants if Path(f"/proc/{pid}").exists()}
        assert not still_running, f"left running: {still_running}"
        assert not _answers_ping(redis_port)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in descendants | _children(launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.close()
