"""The supervisor `bin/serve` runs its worker under: a process that exits is started again,
with a growing wait, and each exit is said; a stop signal stops it and its process."""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from server.devtools import supervisor
from server.devtools.supervisor import FIRST_DELAY_S, MAX_DELAY_S, STABLE_AFTER_S, next_delay

WITHIN_S = 30


def _supervised(command: str) -> subprocess.Popen[str]:
    """`python -m server.devtools.supervisor demo`, COMMAND in its environment, its stdout
    to read; in a session (and process group) of its own, so that a signal by pattern can be
    kept to what this test started."""
    return subprocess.Popen(
        [sys.executable, "-m", "server.devtools.supervisor", "demo"],
        env={**os.environ, supervisor.COMMAND_VARIABLE: command},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_the_wait_doubles_while_it_keeps_dying_and_starts_afresh_after_a_long_run() -> None:
    delay = FIRST_DELAY_S / 2
    waits = []
    for _ in range(8):
        delay = next_delay(delay, ran_for=0.1)
        waits.append(delay)
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
    assert max(waits) == MAX_DELAY_S
    assert next_delay(MAX_DELAY_S, ran_for=STABLE_AFTER_S) == FIRST_DELAY_S


def test_exits_are_described() -> None:
    assert supervisor.describe_exit(3) == "code 3"
    assert supervisor.describe_exit(-9) == "killed by SIGKILL"


def test_a_process_that_exits_is_started_again_and_a_stop_ends_both(tmp_path: Path) -> None:
    started = tmp_path / "started"
    command = f"echo started >> {started}; exit 3"
    with _supervised(command) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[0].startswith("supervisor: demo exited (code 3) after ")
        assert lines[0].rstrip().endswith("starting it again in 1 s (restart 1)")
        assert lines[1].rstrip().endswith("starting it again in 2 s (restart 2)")
        assert started.read_text().count("started") == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(WITHIN_S) == 0


def test_a_stop_is_passed_on_to_the_running_process() -> None:
    # The process says when it is up, and on SIGTERM says so and exits 0; it shares the
    # supervisor's stdout, so reading that waits for each.
    command = (
        "exec sh -c 'trap \"echo stopped; exit 0\" TERM; echo up; while :; do sleep 0.1; done'"
    )
    with _supervised(command) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "up\n"
        process.send_signal(signal.SIGTERM)  # the supervisor alone, not its process group
        assert process.wait(WITHIN_S) == 0
        assert process.stdout.read() == "stopped\n"  # and no restart


def test_pkill_f_of_the_command_kills_the_process_alone_and_it_is_restarted() -> None:
    # `pkill -f "python -m jobs"` is how one stops a worker by hand; it used to match the
    # supervisor too (the command was its argument), and then no one started the worker
    # again. Kept to this test's process group (-g): other work runs on this machine.
    mark = f"supervised-{secrets.token_hex(6)}"
    sleeper = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(600)'"
    command = f"echo up; exec {sleeper} {mark}"  # its argv holds the mark
    with _supervised(command) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "up\n"
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert mark.encode() not in cmdline
        assert b"time.sleep" not in cmdline
        assert supervisor.COMMAND_VARIABLE.encode() not in _child_environ(process.pid)
        killed = subprocess.run(["pkill", "-g", str(process.pid), "-f", mark], check=False)
        assert killed.returncode == 0  # something matched: the process, not the supervisor
        line = process.stdout.readline()
        assert line.startswith("supervisor: demo exited (killed by SIGTERM) after "), line
        assert process.poll() is None  # the supervisor lives on
        assert process.stdout.readline() == "up\n"  # and started it again
        process.send_signal(signal.SIGTERM)
        assert process.wait(WITHIN_S) == 0


def _child_environ(pid: int) -> bytes:
    """The environment of `pid`'s first child (the supervised process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return Path(f"/proc/{children[0]}/environ").read_bytes()


def test_without_a_command_in_the_environment_it_says_how_to_run_it() -> None:
    assert supervisor.main(["demo"]) == 2
    assert supervisor.main(["demo", "exec sleep 1"]) == 2
