"""What runs on each host of the cluster, and how to start, stop and break it.

```
                 this machine (.1): shoppers, pages, the operator, the drills
                          │
 ─────────────────────────┴──────── bridge <prefix>-br, <subnet>.0/24 ────────────────
        │                         │                        │                       │
  edge (.30)               app1 (.21)               app2 (.22)               data (.10)
  HAProxy :80              web ×2 processes :8000   web ×2 processes :8000   PostgreSQL :5432
  stats :8404              worker                   worker                   Redis :6379, :6380
                                                                             Sentinel ×3 :26379-81
```

- **data**: a PostgreSQL cluster of its own (Debian's binaries, `initdb` into the run
  directory, run as the `postgres` user, trust authentication on the bridge's subnet), and
  Redis with Sentinel (`cluster/redis_ha.py`): a primary, its replica and three Sentinels.
- **app1, app2**: the Procfile's `web` (`WEB_CONCURRENCY=2`) and `worker`, exactly as a
  process manager would run them, with `DATABASE_URL` and `REDIS_SENTINELS` pointing at the
  data host. The Procfile's `release` (migrations) runs once, on app1, before them.
- **edge**: HAProxy (Debian's package) in front of both app hosts, HTTP and WebSocket alike
  (`EDGE_CONFIG` below says what each line is for).

A cluster started by `bin/cluster up` outlives the command; `bin/cluster down` finds its
processes through their namespaces, so it needs nothing but the topology.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from cluster import network
from cluster.network import Host, Topology, sh
from cluster.redis_ha import RedisGroup
from server.devtools.processes import ROOT, procfile

WEB_PORT = 8000
EDGE_PORT = 80
STATS_PORT = 8404
POSTGRES_PORT = 5432
REDIS_PORTS = (6379, 6380, 26379, 26380, 26381)  # primary, replica, three Sentinels
DATABASE = "flashsale"
ADMIN_TOKEN_FILE = "admin-token"
SESSION_SECRET_FILE = "session-secret"

# The edge. Every request is balanced on its own (HTTP keep-alive to the client does not pin
# it to a server); WebSocket connections are balanced when they open and then tunnelled.
EDGE_CONFIG = """\
global
    # Two descriptors a connection; the machine allows 20,000 a process.
    maxconn 9000
    stats socket {run}/haproxy.sock mode 600 level admin
    log stdout format raw local0 notice

defaults
    mode http
    log global
    option dontlognull
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    # An open WebSocket may stay quiet for as long as the app's ping interval allows.
    timeout tunnel 1h
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    # /readyz answers within 2 s (a second for the database, one for Redis).
    timeout check 3s
    # A request whose connection to a server failed goes to another server. One that got
    # no answer at all (the server died with it) is sent again only when that is safe:
    # not a POST without an Idempotency-Key (see the frontend).
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response
    # The edge's own errors say what happened, in the service's JSON error format.
{errors}

frontend shop
    bind {edge}:{edge_port}
    option forwardfor
    http-request disable-l7-retry if METH_POST !{{ req.hdr(idempotency-key) -m found }}
    use_backend live if {{ path /ws }}
    default_backend app

backend app
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    # A host whose /readyz fails twice in a row is out; twice good, it is back.
    # At most 1,000 requests in flight to a host, the rest wait here (up to `timeout
    # queue`): a storm's requests, each the first on its shopper's connection, would
    # otherwise open thousands of connections to the host at once, past its web
    # processes' listen backlog (uvicorn's 2,048), and the dropped ones end in 503 after
    # the connect retries (measured: 1,152 of 5,000 shoppers on one host).
    default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 2 maxconn 1000
{servers}
    # Panic mode: when every host is unready the cause is shared (the database restarting,
    # Redis failing over), and no host is better than another. Rather than answer every
    # request with its own 503, the edge then sends to all of them, whose answers say what
    # is wrong (503 database_unavailable with Retry-After) or just work (Redis is not
    # needed to sell).
    option allbackups
{backups}
    http-response set-header X-Edge-Server %[srv_name]

backend live
    # The same hosts, in or out with their state in `app`. Taking a host out closes its
    # WebSockets, so that their pages reconnect to a host that works (requests in flight
    # in `app` are left to finish: their answers are the app's own); a host coming back
    # after a panic closes those made in panic mode, which no check would close later.
    balance leastconn
    default-server on-marked-down shutdown-sessions on-marked-up shutdown-backup-sessions
{tracked}
    option allbackups
{backups}
    http-response set-header X-Edge-Server %[srv_name]

listen stats
    bind {edge}:{stats_port}
    stats enable
    stats uri /
    stats refresh 2s
"""


EDGE_ERRORS = [
    (502, "Bad Gateway", "bad_gateway",
     "The server handling this request stopped before answering; retrying with the same "
     "Idempotency-Key is safe."),
    (503, "Service Unavailable", "service_unavailable",
     "No server can take this request right now; try again in a moment."),
    (504, "Gateway Timeout", "gateway_timeout",
     "The server did not answer in time; retrying with the same Idempotency-Key is safe."),
]  # fmt: skip


def edge_errors() -> str:
    """HAProxy's `http-error` lines: the edge's own errors in the service's JSON format."""
    lines = []
    for status, reason, code, message in EDGE_ERRORS:
        body = json.dumps(
            {"statusCode": status, "error": reason, "code": code, "message": message},
            separators=(",", ":"),
        )
        lines.append(
            f"    http-error status {status} content-type application/json "
            f"string '{body}' hdr Retry-After 1"
        )
    return "\n".join(lines)


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries, the newest installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent)
    if not found:
        raise RuntimeError("PostgreSQL's server binaries are missing: apt-get install postgresql")
    return found[-1].parent


def wait_until(check: Callable[[], object], what: str, within: float = 60.0) -> None:
    """Poll `check` every 50 ms until it returns something true; TimeoutError after `within`."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {within:.0f} s for {what}")
        time.sleep(0.05)


class Cluster:
    """One cluster on `topology`. `up()` builds and starts it; `down()` removes it all.

    `settings` are extra environment variables for the app hosts' processes (HOLD_SECONDS,
    …), on top of the caller's environment and the cluster's own wiring.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        settings: Mapping[str, str] | None = None,
        admin_token: str | None = None,
        say: Callable[[str], None] = print,
        edge_extra: str = "",
    ) -> None:
        self.topology = topology
        # More of HAProxy's configuration, after the edge's own (cluster/bench.py adds the
        # bare endpoint's frontend and backend).
        self.edge_extra = edge_extra
        self.settings = dict(settings or {})
        self.say = say
        self.run_dir = topology.run_dir
        self.logs = self.run_dir / "logs"
        token_file = self.run_dir / ADMIN_TOKEN_FILE
        if admin_token is None and token_file.exists():
            admin_token = token_file.read_text().strip()
        self.admin_token = admin_token or os.urandom(12).hex()
        # One key for every web process of every app host: a shopper's cookie signed by one
        # must be good on the others, wherever the edge sends the next request.
        secret_file = self.run_dir / SESSION_SECRET_FILE
        self.session_secret = (
            secret_file.read_text().strip() if secret_file.exists() else secrets.token_urlsafe(32)
        )
        self.redis = RedisGroup(
            self.run_dir / "redis",
            topology.data.address,
            REDIS_PORTS,
            prefix=topology.data.run(),
        )
        self._processes: list[subprocess.Popen[bytes]] = []

    # -- addresses ----------------------------------------------------------------------

    @property
    def edge_url(self) -> str:
        return f"http://{self.topology.edge.address}:{EDGE_PORT}"

    @property
    def stats_url(self) -> str:
        return f"http://{self.topology.edge.address}:{STATS_PORT}/"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.topology.data.address}:{POSTGRES_PORT}/{DATABASE}"

    def app_url(self, host: Host) -> str:
        return f"http://{host.address}:{WEB_PORT}"

    # -- the whole cluster --------------------------------------------------------------

    def up(self, *, seed: bool = False) -> None:
        """Build the network and start every host; returns once the edge has both app hosts
        in service. Raises (after removing what it made) if anything fails to start."""
        if network.exists(self.topology):
            raise RuntimeError(
                f"a cluster named {self.topology.prefix!r} is already there: "
                "`bin/cluster down` first"
            )
        for part in ("pg", "redis", "edge", "logs"):
            shutil.rmtree(self.run_dir / part, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.run_dir.chmod(0o755)
        (self.run_dir / ADMIN_TOKEN_FILE).write_text(self.admin_token + "\n")
        secret_file = self.run_dir / SESSION_SECRET_FILE
        secret_file.write_text(self.session_secret + "\n")
        secret_file.chmod(0o600)
        try:
            self.say(f"network: bridge {self.topology.bridge}, {self.topology.subnet}.0/24")
            network.create(self.topology)
            self.start_postgres(fresh=True)
            self.say("data: PostgreSQL up")
            self.redis.start()
            self.say("data: Redis primary, replica and three Sentinels up")
            self.release(seed=seed)
            for host in self.topology.app_hosts:
                self.start_app(host)
            self.start_edge()
            self.wait_in_service(self.topology.app_hosts)
            self.say("app1, app2: web (2 processes) and worker up; edge: both in service")
        except BaseException:
            self.say(f"start failed; logs in {self.logs}")
            self.down()
            raise

    def down(self) -> None:
        """Stop every process of every host, remove the hosts and the bridge, and the
        servers' data (the logs stay, in the run directory)."""
        data = self.topology.data
        if data.netns in network.namespaces() and (self.run_dir / "pg" / "data").exists():
            self._pg_ctl("stop", "-m", "fast", check=False)
        for host in [self.topology.edge, *self.topology.app_hosts]:
            if host.netns in network.namespaces():
                network.stop_all(host)
        self.redis.stop()
        network.destroy(self.topology)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self._processes.clear()
        for part in ("pg", "redis", "edge"):
            shutil.rmtree(self.run_dir / part, ignore_errors=True)

    # -- data host ----------------------------------------------------------------------

    def start_postgres(self, *, fresh: bool = False) -> None:
        pg = self.run_dir / "pg"
        if fresh:
            pg.mkdir(parents=True)
            shutil.chown(pg, "postgres", "postgres")
            sh("runuser", "-u", "postgres", "--", str(postgres_bin() / "initdb"),
               "-D", str(pg / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
               "--locale=C", "--no-sync")  # fmt: skip
            address = self.topology.data.address
            with (pg / "data" / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"listen_addresses = '{address}'\nport = {POSTGRES_PORT}\n"
                    f"unix_socket_directories = '{pg}'\nmax_connections = 200\n"
                    "log_min_messages = warning\n"
                )
            (pg / "data" / "pg_hba.conf").write_text(
                f"local all all trust\nhost all all {self.topology.subnet}.0/24 trust\n"
            )
        log = self.logs / "postgres.log"
        log.touch()
        shutil.chown(log, "postgres", "postgres")
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(log))
        if fresh:
            sh(*self.topology.data.run("runuser", "-u", "postgres", "--",
               str(postgres_bin() / "psql"), "-h", str(pg), "-d", "postgres", "-q",
               "-c", f"CREATE DATABASE {DATABASE}"))  # fmt: skip

    def restart_postgres(self) -> None:
        """A fast restart (clients disconnected, a checkpoint, start again), returning once
        it accepts connections."""
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", "60",
                     "-l", str(self.logs / "postgres.log"))  # fmt: skip

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        data = self.run_dir / "pg" / "data"
        command = ["runuser", "-u", "postgres", "--", str(postgres_bin() / "pg_ctl"), "-D",
                   str(data), *args]  # fmt: skip
        # pg_ctl start leaves the server running on the data host after it returns.
        sh(*self.topology.data.run(*command), check=check, timeout=90)

    # -- app hosts ----------------------------------------------------------------------

    def app_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR",)}
        venv_bin = str(Path(sys.executable).parent)
        env.update(
            {
                "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
                "DATABASE_URL": self.database_url,
                "REDIS_URL": "",
                "REDIS_SENTINELS": self.redis.sentinels_env,
                "REDIS_SENTINEL_SERVICE": self.redis.service,
                "HOST": "0.0.0.0",
                "PORT": str(WEB_PORT),
                "WEB_CONCURRENCY": "2",
                "ADMIN_TOKEN": self.admin_token,
                "SESSION_SECRET": self.session_secret,
                # The edge's X-Forwarded-For names the shopper (rate limit, logs).
                "FORWARDED_ALLOW_IPS": self.topology.edge.address,
                "WORKER_METRICS_PORT": "9108",
                "LOG_LEVEL": "WARNING",
                **self.settings,
            }
        )
        return env

    def release(self, *, seed: bool) -> None:
        """The Procfile's `release` (migrations) once, from app1; with `seed`, demo products."""
        host = self.topology.app_hosts[0]
        command = "exec python -m server seed" if seed else procfile()["release"]
        done = subprocess.run(
            host.run("bash", "-c", command),
            cwd=ROOT,
            env=self.app_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"release failed: {done.stdout}{done.stderr}")

    def start_app(self, host: Host) -> None:
        """The Procfile's `web` and `worker` on `host`."""
        commands = procfile()
        for name in ("web", "worker"):
            self.spawn(host, name, ["bash", "-c", commands[name]], env=self.app_env())

    def kill_app(self, host: Host) -> list[int]:
        """SIGKILL to every process on the host, as a power cut would."""
        return network.kill_all(host, signal.SIGKILL)

    def wait_app_ready(self, host: Host, within: float = 60.0) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.app_url(host)}/readyz", timeout=3).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, f"{host.name} to be ready", within)

    # -- edge ---------------------------------------------------------------------------

    def start_edge(self) -> None:
        run = self.run_dir / "edge"
        run.mkdir(parents=True, exist_ok=True)
        apps = self.topology.app_hosts
        config = EDGE_CONFIG.format(
            run=run,
            edge=self.topology.edge.address,
            edge_port=EDGE_PORT,
            errors=edge_errors(),
            stats_port=STATS_PORT,
            servers="\n".join(f"    server {h.name} {h.address}:{WEB_PORT} check" for h in apps),
            backups="\n".join(
                f"    server {h.name}-panic {h.address}:{WEB_PORT} backup" for h in apps
            ),
            tracked="\n".join(
                f"    server {h.name} {h.address}:{WEB_PORT} track app/{h.name}" for h in apps
            ),
        )
        path = run / "haproxy.cfg"
        path.write_text(config + self.edge_extra)
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("HAProxy is missing: apt-get install haproxy")
        sh(haproxy, "-c", "-q", "-f", str(path))
        self.spawn(self.topology.edge, "haproxy", [haproxy, "-db", "-f", str(path)])

    def edge_status(self, backend: str = "app") -> dict[str, str]:
        """Each app server's state at the edge, in `backend`: `UP`, `DOWN`, `UP 1/2`
        (rising), `MAINT`, …"""
        reply = self._haproxy("show stat")
        status = {}
        for line in reply.splitlines():
            fields = line.split(",")
            if (
                len(fields) > 17
                and fields[0] == backend
                and fields[1] not in ("FRONTEND", "BACKEND")
            ):
                status[fields[1]] = fields[17]
        return status

    def wait_in_service(
        self, hosts: list[Host], within: float = 90.0, *, backend: str = "app"
    ) -> None:
        """Until the edge has each of `hosts` UP in `backend`."""

        def in_service() -> bool:
            status = self.edge_status(backend)
            return all(status.get(h.name) == "UP" for h in hosts)

        wait_until(in_service, f"the edge to take {', '.join(h.name for h in hosts)}", within)

    def edge_command(self, command: str) -> str:
        """One command to HAProxy's runtime API (its stats socket), e.g. `set server app/app2
        state maint`; its answer ("" if it cannot be reached)."""
        return self._haproxy(command)

    def _haproxy(self, command: str) -> str:
        path = self.run_dir / "edge" / "haproxy.sock"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(path))
                s.sendall(command.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return ""
        return b"".join(chunks).decode()

    # -- processes ----------------------------------------------------------------------

    def spawn(
        self, host: Host, name: str, command: list[str], env: Mapping[str, str] | None = None
    ) -> None:
        """Start `command` on `host`, its output to `<logs>/<host>-<name>.log`; it outlives
        this process (`down()` finds it through the host's namespace)."""
        log = (self.logs / f"{host.name}-{name}.log").open("ab")
        with log:
            self._processes.append(
                subprocess.Popen(
                    host.run(*command),
                    cwd=ROOT,
                    env=dict(env) if env is not None else None,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives `bin/cluster up`; Ctrl-C is not for it
                )
            )

    def log_tails(self, lines: int = 30) -> str:
        """The end of every log, for a report after a failure."""
        out = []
        for path in sorted(self.logs.glob("*.log")) + sorted(
            (self.run_dir / "redis").glob("*.log")
        ):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)
