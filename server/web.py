"""`python -m server.web`: uvicorn's own command line, with one change to its supervisor.

With `--workers 2` or more, uvicorn's supervisor holds the listening socket until every
worker has drained and exited, so during a graceful stop the kernel keeps accepting
connections that nobody will serve: they hang for up to the grace period and are then
reset, instead of being refused at once so that the client (or load balancer) goes
elsewhere. Here the supervisor lets go of its copy of the socket as soon as it has told
the workers to stop; each worker closes its own when its shutdown begins, so the port
stops accepting while in-flight requests finish. tests/test_drills.py checks this with
one and with two workers.
"""

from __future__ import annotations

import importlib
from typing import Any

from uvicorn.supervisors import Multiprocess


class ReleasingMultiprocess(Multiprocess):
    def terminate_all(self) -> None:
        super().terminate_all()
        # Only called on the way out (restarts replace workers one by one, elsewhere).
        for sock in self.sockets:
            sock.close()


def main() -> None:
    # uvicorn's run() builds its supervisor itself; this is the one way in. (The module,
    # not `uvicorn.main`, which the package rebinds to the command.)
    cli: Any = importlib.import_module("uvicorn.main")
    cli.Multiprocess = ReleasingMultiprocess
    cli.main()


if __name__ == "__main__":
    main()
