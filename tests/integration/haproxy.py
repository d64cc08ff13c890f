"""Real HAProxy in front of mirror nodes, configured from the shipped file.

This module owns ``HaproxyProcess``: it reads ``deploy/haproxy/haproxy.cfg``,
the file operators deploy, and changes only what cannot be the same on a
test machine (``render_config``): the registry frontend's ``bind`` and the
stats frontend's ``bind`` become free loopback ports, and the backend's
``server`` lines name the test's nodes. Every other directive (the hashing
keys, the health checks, retries, timeouts, the log format) is the shipped
one, so the tests exercise what is deployed. The process runs in the
foreground (``-db``) with its log (the shipped ``log stdout``) in a file,
and is stopped by its PID.

It also reads HAProxy back: ``server_states`` from the stats page's CSV,
and ``requests`` from the access log, whose shipped format ends with the
shard key (``key="..."``), so a test sees which node each request went to
and under which key.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .tools import ManagedProcess, ProcessDied, free_port, http_status, require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY_PATH = "/usr/sbin/haproxy"
REGISTRY_FRONTEND = "frontend registry"
STATS_FRONTEND = "frontend stats"
BACKEND = "backend mirror_nodes"

# The shipped log-format: HAProxy's httplog fields, then key="<shard key>".
LOG_LINE = re.compile(
    r"^\S+ \[[^\]]*\] \S+ (?P<backend>[^/\s]+)/(?P<server>\S+) \S+ "
    r"(?P<status>-?\d+) (?P<bytes>\d+) (?P<termination>\S+) \S+ \S+ "
    r'"(?P<method>\S+) (?P<uri>\S+)[^"]*" key="(?P<key>[^"]*)"$'
)


@dataclass(frozen=True)
class Server:
    """One ``server`` line: the node's name, its ring id and its address."""

    name: str
    id: int
    address: str

    def line(self) -> str:
        return f"    server {self.name} {self.address} id {self.id}"


def _section(line: str) -> str | None:
    """The section a non-indented, non-comment line opens, else None."""
    if not line or line[0].isspace() or line.startswith("#"):
        return None
    return line.split("#", 1)[0].strip()


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`haproxy -c -f path`: HAProxy's own verdict on a config file (the
    binary found as the integration tests find it)."""
    return subprocess.run(
        [require_tool("haproxy", prefer=HAPROXY_PATH), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def render_config(
    text: str, *, bind: str, stats_bind: str, servers: Sequence[Server]
) -> str:
    """The shipped config ``text`` with the registry frontend bound to
    ``bind``, the stats frontend to ``stats_bind`` and the backend's server
    lines replaced by ``servers``; nothing else changes.

    Raises ValueError when the file no longer has exactly one bind in each
    frontend and a block of server lines in the backend: the harness must
    not quietly test something else than the shipped file.
    """
    out: list[str] = []
    section = None
    binds = {REGISTRY_FRONTEND: 0, STATS_FRONTEND: 0}
    servers_written = False
    for line in text.splitlines():
        opened = _section(line)
        if opened is not None:
            section = opened
        words = line.split()
        if section in binds and words[:1] == ["bind"]:
            binds[section] += 1
            address = bind if section == REGISTRY_FRONTEND else stats_bind
            out.append(f"    bind {address}")
            continue
        if section == BACKEND and words[:1] == ["server"]:
            if not servers_written:
                out.extend(server.line() for server in servers)
                servers_written = True
            continue
        out.append(line)
    if any(count != 1 for count in binds.values()):
        raise ValueError(f"expected one bind line per frontend, found {binds}")
    if not servers_written:
        raise ValueError(f"no server lines in {BACKEND!r}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Routed:
    """One request as HAProxy logged it."""

    server: str
    """The node that answered, ``<NOSRV>`` if none did."""
    status: int
    method: str
    uri: str
    key: str
    """The shard key; empty (logged as ``-``) for round-robin requests."""
    termination: str
    """HAProxy's termination state; ``----`` for a normal end."""


def parse_log(text: str) -> list[Routed]:
    """The requests in a chunk of HAProxy log (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            continue
        key = match["key"]
        found.append(
            Routed(
                server=match["server"],
                status=int(match["status"]),
                method=match["method"],
                uri=match["uri"],
                key="" if key == "-" else key,
                termination=match["termination"],
            )
        )
    return found


@dataclass
class HaproxyProcess:
    """``haproxy -db -f <rendered config>`` on loopback ports."""

    binary: str
    workdir: Path
    servers: Sequence[Server]
    port: int = 0
    stats_port: int = 0
    process: ManagedProcess | None = None
    config_path: Path = field(init=False)
    # The shipped file rendered (its binds and server lines replaced), and
    # lines added to its sections: a variant under test.
    source: Path = SHIPPED_CONFIG
    globals_: Sequence[str] = ()
    defaults: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "haproxy.cfg"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/stats"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def start(self, *, timeout: float = 15.0, attempts: int = 3) -> None:
        """Write the config for free ports, start haproxy and wait for its
        stats page. Retries on fresh ports if it exits (a port taken in the
        meantime); raises ProcessDied or TimeoutError with its log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        shipped = self.source.read_text()
        for section, lines in (("global", self.globals_), ("defaults", self.defaults)):
            extra = "".join(f"    {line}\n" for line in lines)
            shipped = shipped.replace(f"\n{section}\n", f"\n{section}\n{extra}", 1)
        for attempt in range(attempts):
            self.port, self.stats_port = free_port(), free_port()
            self.config_path.write_text(
                render_config(
                    shipped,
                    bind=self.host,
                    stats_bind=f"127.0.0.1:{self.stats_port}",
                    servers=self.servers,
                )
            )
            self.process = ManagedProcess(
                name="haproxy",
                argv=[self.binary, "-db", "-f", str(self.config_path)],
                log_path=self.log_path,
            )
            self.process.start()
            try:
                self.process.wait_ready(
                    self.ready, timeout=timeout, what=self.waits_for
                )
                return
            except ProcessDied:
                if attempt + 1 == attempts:
                    raise

    waits_for = "the stats page answered"

    def ready(self) -> bool:
        """Whether a started haproxy is up (see `waits_for`)."""
        return http_status(self.stats_url) == 200

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def mark(self) -> int:
        assert self.process is not None
        return self.process.log_size()

    def log_text(self, since: int = 0) -> str:
        return "" if self.process is None else self.process.log_text(since=since)

    def requests(self, since: int = 0) -> list[Routed]:
        """Requests logged since the log position ``since``. HAProxy logs
        a request when it ends, so wait for clients to finish first."""
        assert self.process is not None
        return parse_log(self.process.log_text(since=since, limit=None))

    def server_states(self) -> dict[str, str]:
        """Node name -> status on the stats page (``UP``, ``DOWN``,
        ``UP 1/2`` while rising, ``DOWN 1/2`` while falling...)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.stats_url};csv", timeout=5) as response:
            text = response.read().decode().lstrip("# ")
        names = {server.name for server in self.servers}
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == BACKEND.split()[1] and row["svname"] in names
        }

    async def wait_state(
        self, name: str, status: str, *, within: float = 30.0
    ) -> float:
        """Poll until node ``name`` shows ``status`` exactly; return the
        seconds it took. Raises TimeoutError with the states seen. The
        event loop keeps running meanwhile (clients may be mid-pull)."""
        start = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - start < within:
            states = await asyncio.to_thread(self.server_states)
            if states.get(name) == status:
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{name} not {status} after {within}s: {states}")
