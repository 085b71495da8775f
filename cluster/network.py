"""The hosts and the wire between them: Linux network namespaces on one bridge.

Each "host" is a network namespace with one interface (`eth0`, one end of a veth pair whose
other end is on the bridge) and one address on a /24 of its own. The machine itself has the
bridge's address (`.1`), so commands run here reach every host, as a shopper's browser or
an operator's laptop would. No host has a default route: nothing in the cluster can reach
past the bridge. The firewall rules of the drills are nftables rules inside one host's
namespace, as a host's own firewall would be.

Everything here needs root (`ip netns`, `nft`); `bin/cluster` says so before starting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Host:
    """One namespace: `name` in the drawing, `netns` its namespace, `address` on the bridge."""

    name: str
    netns: str
    address: str

    def run(self, *command: str) -> list[str]:
        """`command`, to run on this host."""
        return ["ip", "netns", "exec", self.netns, *command]


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one cluster. Two clusters with different prefixes and subnets
    can exist at once (`bin/cluster up` and the drills of `bin/test` use different ones)."""

    prefix: str = "fsc"
    subnet: str = "10.214.14"  # a /24; .1 is this machine

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @property
    def data(self) -> Host:
        return self._host("data", 10)

    @property
    def app_hosts(self) -> list[Host]:
        return [self._host("app1", 21), self._host("app2", 22)]

    @property
    def edge(self) -> Host:
        return self._host("edge", 30)

    @property
    def hosts(self) -> list[Host]:
        return [self.data, *self.app_hosts, self.edge]

    @property
    def run_dir(self) -> Path:
        """Configs, data and logs of the cluster's servers (PostgreSQL's owned by postgres)."""
        return Path(f"/tmp/flashsale-cluster-{self.prefix}")

    def _host(self, name: str, last: int) -> Host:
        return Host(name, f"{self.prefix}-{name}", f"{self.subnet}.{last}")


def sh(*command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise with its output when it fails (and `check`)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def namespaces() -> set[str]:
    listed = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def exists(topology: Topology) -> bool:
    """Whether any part of this cluster's network is there."""
    bridge = sh("ip", "link", "show", topology.bridge, check=False).returncode == 0
    return bridge or bool(namespaces() & {h.netns for h in topology.hosts})


def create(topology: Topology) -> None:
    """The bridge, with this machine's address on it, and each host plugged in."""
    sh("ip", "link", "add", topology.bridge, "type", "bridge")
    sh("ip", "addr", "add", f"{topology.gateway}/24", "dev", topology.bridge)
    sh("ip", "link", "set", topology.bridge, "up")
    for host in topology.hosts:
        sh("ip", "netns", "add", host.netns)
        # The machine's end is named after the host; the host's end is its eth0.
        sh("ip", "link", "add", host.netns, "type", "veth", "peer", "name", "eth0",
           "netns", host.netns)  # fmt: skip
        sh("ip", "link", "set", host.netns, "master", topology.bridge)
        sh("ip", "link", "set", host.netns, "up")
        sh(*host.run("ip", "link", "set", "lo", "up"))
        sh(*host.run("ip", "addr", "add", f"{host.address}/24", "dev", "eth0"))
        sh(*host.run("ip", "link", "set", "eth0", "up"))


def pids(host: Host) -> list[int]:
    """Every process running on the host (in its network namespace)."""
    listed = sh("ip", "netns", "pids", host.netns, check=False).stdout
    return [int(p) for p in listed.split()]


def kill_all(host: Host, sig: signal.Signals = signal.SIGKILL) -> list[int]:
    """Send `sig` to every process on the host; the pids it went to."""
    found = pids(host)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return found


def stop_all(host: Host, grace: float = 10.0) -> None:
    """SIGTERM to every process on the host, then SIGKILL to what is left after `grace`."""
    kill_all(host, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids(host) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(host, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids(host) and time.monotonic() < deadline:
        time.sleep(0.05)


def destroy(topology: Topology) -> None:
    """Stop every process on every host, and remove the hosts and the bridge. Safe to run
    on a cluster that is half made or already gone."""
    present = namespaces()
    for host in topology.hosts:
        if host.netns in present:
            stop_all(host)
            sh("ip", "netns", "del", host.netns, check=False)
    for host in topology.hosts:  # a veth left behind by a half-made host
        sh("ip", "link", "del", host.netns, check=False)
    sh("ip", "link", "del", topology.bridge, check=False)


# -- the host's own firewall ---------------------------------------------------------------

FIREWALL_TABLE = "drill"


def cut_off(host: Host, addresses: Sequence[str]) -> None:
    """Drop every packet the host sends to `addresses`, and every packet it receives from
    them: a network partition, as silent as a dead link (no resets, no ICMP)."""
    targets = ", ".join(addresses)
    rules = (
        f"table inet {FIREWALL_TABLE} {{\n"
        f"  chain out {{ type filter hook output priority 0; ip daddr {{ {targets} }} drop; }}\n"
        f"  chain in {{ type filter hook input priority 0; ip saddr {{ {targets} }} drop; }}\n"
        "}\n"
    )
    subprocess.run([*host.run("nft", "-f", "-")], input=rules, text=True, check=True)


def reconnect(host: Host) -> None:
    """Remove the rules `cut_off` added."""
    sh(*host.run("nft", "delete", "table", "inet", FIREWALL_TABLE), check=False)
