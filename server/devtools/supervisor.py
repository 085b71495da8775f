"""`SUPERVISED_COMMAND=COMMAND python -m server.devtools.supervisor NAME`: keep one process
running.

`bin/serve` runs its worker through this (server/devtools/launcher.py), because honcho stops
everything as soon as any one of its processes exits: a crashed or killed worker used to
take the web processes and Redis down with it (attack finding A10). Here the worker is
started again instead, after 1 s, then 2, 4 … up to `MAX_DELAY_S` while it keeps dying
soon after it starts; a run that lasted `STABLE_AFTER_S` starts the count afresh. Each exit
and restart is one line on stdout (honcho's log), e.g.

    supervisor: worker exited (killed by SIGKILL) after 12.3 s; starting it again in 1 s

SIGTERM or SIGINT (honcho stopping, or anyone) stops it for good: the signal is passed on
to the process, which is given `STOP_GRACE_S` to finish and then killed; the supervisor
then exits 0. COMMAND is a shell line (a Procfile's), run with `sh -c`; start it with
`exec` so that the process supervised, and signalled, is the command itself.

COMMAND comes in the environment (`SUPERVISED_COMMAND`, removed before the command is
run), not in the supervisor's arguments: `pkill -f "python -m jobs"`, meant for the worker,
would match a supervisor whose own command line held the worker's and kill it too, and
then nothing would start the worker again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 15.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
COMMAND_VARIABLE = "SUPERVISED_COMMAND"


def _say(line: str) -> None:
    print(f"supervisor: {line}", flush=True)


def describe_exit(code: int) -> str:
    """`Popen.returncode` in words: "code 3", or "killed by SIGKILL" for -9."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def next_delay(delay: float, ran_for: float) -> float:
    """The wait before the next start: `FIRST_DELAY_S` after a run of `STABLE_AFTER_S` or
    more, else twice the last wait, at most `MAX_DELAY_S` (seconds)."""
    if ran_for >= STABLE_AFTER_S:
        return FIRST_DELAY_S
    return min(delay * 2, MAX_DELAY_S)


async def supervise(name: str, command: str, report: Callable[[str], None] = _say) -> int:
    """Run `command` (a shell line) until a stop signal, starting it again whenever it
    exits. Returns 0 once stopped."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    stopped = asyncio.ensure_future(stopping.wait())
    delay = FIRST_DELAY_S / 2  # doubled before the first restart
    restarts = 0
    try:
        while True:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec("/bin/sh", "-c", command)
            exited = asyncio.ensure_future(process.wait())
            await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                await _stop(process, exited)
                return 0
            ran_for = time.monotonic() - started
            delay = next_delay(delay, ran_for)
            restarts += 1
            report(
                f"{name} exited ({describe_exit(exited.result())}) after {ran_for:.1f} s; "
                f"starting it again in {delay:g} s (restart {restarts})"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopped), delay)
            if stopping.is_set():
                return 0
    finally:
        stopped.cancel()


async def _stop(process: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
    """Pass the stop on (the process may have had it already, from its process group:
    twice is harmless) and wait `STOP_GRACE_S`, then kill it."""
    if exited.done():
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await exited


def main(argv: list[str]) -> int:
    """`argv`: NAME alone; the command is taken out of the environment (`COMMAND_VARIABLE`),
    so that the command supervised does not inherit it."""
    command = os.environ.pop(COMMAND_VARIABLE, "")
    if len(argv) != 1 or not command.strip():
        print(
            f"usage: {COMMAND_VARIABLE}=COMMAND python -m server.devtools.supervisor NAME",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(supervise(argv[0], command))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
