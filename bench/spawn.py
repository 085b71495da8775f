"""The benchmark's client processes (`python -m bench.<module> ...`: shoppers, queuers, socket
holders): each opens its connections, then prints a line `ready N`; the scenario waits for
every one before the sale starts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.stack import Target

ROOT = Path(__file__).resolve().parent.parent


def host_port(service: Target) -> tuple[str, int]:
    """The host and port of `service.base_url` (`http://host:port`), as the client processes
    take them (127.0.0.1 and 80 where it names none)."""
    address = urlsplit(service.base_url)
    return address.hostname or "127.0.0.1", address.port or 80


def shares(count: int, processes: int) -> list[int]:
    """`count` split among `processes` as evenly as it goes, the first ones one more:
    `shares(10, 4) == [3, 3, 2, 2]` (0 for each beyond `count`)."""
    return [count // processes + (1 if i < count % processes else 0) for i in range(processes)]


def start_ready(
    module: str,
    arguments: Sequence[Sequence[str]],
    *,
    what: str,
    stdin: bool = False,
    first_lines: Sequence[str] | None = None,
) -> list[subprocess.Popen[str]]:
    """One `python -m module *args` per item of `arguments`, from the repository's root, its
    stdout a text pipe; once all are started, waits for each one's first line, `ready ...`.

    `stdin`: each gets a pipe for commands (otherwise it inherits this process's stdin);
    `first_lines[i]` (implies `stdin`) is written to the i-th at once, a line of its own.
    Raises RuntimeError naming `what` and the line a process printed instead of `ready`
    (the processes started are not stopped)."""
    piped = stdin or first_lines is not None
    procs = []
    for i, args in enumerate(arguments):
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE if piped else None,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        if first_lines is not None:
            assert proc.stdin is not None
            proc.stdin.write(first_lines[i] + "\n")
            proc.stdin.flush()
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"a {what} process failed: {line!r}")
    return procs
