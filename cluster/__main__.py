"""`python -m cluster up | down | status | drill | bench` (run through `bin/cluster`, as root).

- `up`: build the cluster (cluster/hosts.py) with demo products and leave it running;
  prints the shop's, the operator's and the edge's stats URLs.
- `down`: stop and remove it all.
- `status`: which hosts are there, and each app host's state at the edge.
- `drill`: on a cluster of its own (another prefix and subnet, so that it never touches
  one started with `up`), run the drills (cluster/drills.py), print what each checked,
  and remove it all, whatever happened. Exit status 0 when every check passed.
- `bench`: on a cluster of its own again (`fsb`, 10.214.16.0/24), the storm and the steady
  shop through the edge with one app host and with two, as shares of a bare endpoint behind
  the same edge; the edge's hop; a Redis failover (cluster/bench.py; `bench --help`).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

from cluster import network
from cluster.hosts import Cluster
from cluster.network import Topology

LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bin/cluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status", "drill", "bench"])
    parser.add_argument("--only", help="drill: run only these drills (comma-separated names)")
    argv = sys.argv[1:] if argv is None else argv
    # `bench` has options of its own (cluster/bench.py).
    rest = argv[1:] if argv[:1] == ["bench"] else []
    args = parser.parse_args(argv[:1] if rest else argv)
    if os.geteuid() != 0:
        print(
            "bin/cluster needs root: it makes network namespaces, a bridge and firewall rules, "
            "and runs PostgreSQL as the postgres user. Run it as root (sudo bin/cluster …).",
            file=sys.stderr,
        )
        return 2

    if args.command == "drill":
        from cluster import drills

        topology = Topology(prefix="fsd", subnet="10.214.15")
        with locked(topology):
            return drills.main(topology, only=args.only)

    if args.command == "bench":
        from cluster import bench

        if "-h" in rest or "--help" in rest:
            return bench.main(rest)
        with locked(bench.TOPOLOGY):
            return bench.run(rest)

    topology = Topology()
    with locked(topology):
        cluster = Cluster(topology)
        if args.command == "up":
            cluster.up(seed=True)
            print(
                f"\nshop:      {cluster.edge_url}/\n"
                f"operator:  {cluster.edge_url}/admin   (token: {cluster.admin_token})\n"
                f"edge:      {cluster.stats_url}   (HAProxy's stats)\n"
                f"database:  {cluster.database_url}\n"
                f"sentinels: {cluster.redis.sentinels_env}\n"
                f"logs:      {cluster.logs}/\n"
                "stop it all with `bin/cluster down`"
            )
        elif args.command == "down":
            cluster.down()
            print("cluster down")
        else:
            present = network.namespaces()
            for host in topology.hosts:
                state = "up" if host.netns in present else "absent"
                print(f"{host.name:5} {host.address:15} {state}")
            if topology.edge.netns in present:
                for name, status in sorted(cluster.edge_status().items()):
                    print(f"edge: {name} {status}")
    return 0


class locked:
    """One command at a time on a cluster (two `bin/test` runs wait for each other)."""

    def __init__(self, topology: Topology) -> None:
        self.path = LOCK_DIR / f"flashsale-cluster-{topology.prefix}.lock"

    def __enter__(self) -> None:
        self.file = self.path.open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another bin/cluster on this cluster ({self.path})…", flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.file.close()


if __name__ == "__main__":
    sys.exit(main())
