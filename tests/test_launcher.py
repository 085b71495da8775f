"""The run command a newcomer types: everything starts, the shop answers, Ctrl-C stops it all."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.devtools.embedded_redis import free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except FileNotFoundError:
            continue
        for kid in map(int, kids):
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
