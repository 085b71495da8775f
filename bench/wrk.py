"""Driving wrk: one scenario, one generated Lua script, results as data.

wrk (C, event-driven) is the load generator because a Python client would be the bottleneck
long before the service is. The script counts statuses per thread and prints one JSON line
with the latency distribution when the run is done.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SCRIPT = """
local method, path, body = %(method)s, %(path)s, %(body)s
local headers = %(headers)s
local paths_file = %(paths_file)s
local rotate_name, rotate_file = %(rotate_name)s, %(rotate_file)s
local threads = {}
local paths, next_path = nil, 0
local values, next_value = nil, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  s2, s3, s4, s5 = 0, 0, 0, 0
  if paths_file then
    paths = {}
    for line in io.lines(paths_file) do table.insert(paths, line) end
  end
  if rotate_file then
    values = {}
    for line in io.lines(rotate_file) do table.insert(values, line) end
  end
end

function request()
  if values then
    next_value = next_value %% #values + 1
    headers[rotate_name] = values[next_value]
  end
  if paths then
    next_path = next_path %% #paths + 1
    return wrk.format(method, paths[next_path], headers, body)
  end
  return wrk.format(method, path, headers, body)
end

function response(status, hdrs, b)
  if status < 300 then s2 = s2 + 1
  elseif status < 400 then s3 = s3 + 1
  elseif status < 500 then s4 = s4 + 1
  else s5 = s5 + 1 end
end

function done(summary, latency, requests)
  local c = {0, 0, 0, 0}
  for _, t in ipairs(threads) do
    c[1] = c[1] + t:get("s2"); c[2] = c[2] + t:get("s3")
    c[3] = c[3] + t:get("s4"); c[4] = c[4] + t:get("s5")
  end
  io.write(string.format(
    '\\nRESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"status": {"2xx": %%d, "3xx": %%d, "4xx": %%d, "5xx": %%d}}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write +
      summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    c[1], c[2], c[3], c[4]))
end
"""


def _lua(value: str | None) -> str:
    return "nil" if value is None else json.dumps(value)


@dataclass
class Load:
    path: str
    method: str = "GET"
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    connections: int = 64
    threads: int = 1
    seconds: float = 10.0
    # Each request takes the next of these paths instead of `path` (round the list again
    # when it runs out), e.g. a different hold to complete each time.
    paths: list[str] | None = None
    # (header name, values): each request takes the next value of that header (round the
    # list again when it runs out), e.g. many shoppers' cookies instead of one's.
    rotate: tuple[str, list[str]] | None = None


@dataclass
class Result:
    requests: int
    duration_us: int
    errors: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    status: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": round(self.rps, 1)}


def available() -> bool:
    return shutil.which("wrk") is not None


def run(base_url: str, load: Load) -> Result:
    headers = (
        "{"
        + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in load.headers.items())
        + "}"
    )
    paths_path = None
    if load.paths:
        with tempfile.NamedTemporaryFile("w", suffix=".paths", delete=False) as f:
            f.write("\n".join(load.paths) + "\n")
            paths_path = Path(f.name)
    rotate_path = None
    if load.rotate:
        with tempfile.NamedTemporaryFile("w", suffix=".values", delete=False) as f:
            f.write("\n".join(load.rotate[1]) + "\n")
            rotate_path = Path(f.name)
    script = _SCRIPT % {
        "method": json.dumps(load.method),
        "path": json.dumps(load.path),
        "body": _lua(load.body),
        "headers": headers,
        "paths_file": _lua(None if paths_path is None else str(paths_path)),
        "rotate_name": _lua(None if load.rotate is None else load.rotate[0]),
        "rotate_file": _lua(None if rotate_path is None else str(rotate_path)),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        script_path = Path(f.name)
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{load.threads}",
                f"-c{load.connections}",
                f"-d{max(1, round(load.seconds))}s",
                f"--script={script_path}",
                base_url + load.path,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=load.seconds + 60,
        ).stdout
    finally:
        script_path.unlink()
        for made in (paths_path, rotate_path):
            if made is not None:
                made.unlink()
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return Result(**json.loads(line.removeprefix("RESULT ")))
