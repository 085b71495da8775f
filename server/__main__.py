"""`python -m server migrate | seed | serve`: the service's commands.

- `migrate`: apply pending schema migrations (the Procfile's `release`).
- `seed`: add the demo products to an empty database.
- `serve`: run everything for development: Redis (unless REDIS_URL is set), migrations,
  demo products, then the Procfile's web and worker; Ctrl-C, SIGTERM or SIGHUP stops all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server.devtools.launcher import prepare_database, serve
from server.infra.logs import configure_logging
from server.infra.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending migrations")
    commands.add_parser("seed", help="apply migrations and add demo products to an empty database")
    commands.add_parser("serve", help="run web, worker and Redis for development")
    args = parser.parse_args(argv)

    settings = Settings.for_command()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return serve(settings)
    asyncio.run(prepare_database(settings, seed=args.command == "seed"))
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
