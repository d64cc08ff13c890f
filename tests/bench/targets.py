"""The caches under test, each a subprocess on its own 127.0.0.1 port.

This module owns the three pull-through caches the benchmark compares, all
started with empty caches in front of the same upstream registry:

* ``MirrorTarget``: ``python -m mirror serve`` (via the integration
  harness's ``MirrorProcess``) with the access log off and log level warning.
* ``ProxyRegistry``: distribution's own pull-through cache, the Debian
  ``docker-registry`` with a ``proxy.remoteurl`` and its own storage.
* ``NginxCache``: nginx as a caching reverse proxy, configured the way a
  careful operator would for a registry (see ``nginx_config``).

plus ``Direct``, the upstream itself (or the upstream through the WAN
proxy), for the no-mirror limit; ``AuthMirrorTarget``, mirror configured as
``MirrorTarget`` but with client authentication on (``[auth] htpasswd`` of
bcrypt hashes), which only the client-auth scenario uses; and
``HaproxyCluster``, three ``MirrorTarget`` nodes behind HAProxy with
``deploy/haproxy/local-workers.cfg`` (``LocalHaproxy``), the cluster
scenario's target. Every target can be reset to an empty cache (stop, wipe,
start), which is how cold pulls are repeated.

The WAN scenario's link is ``tests/bench/wanproxy.py``'s.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import bcrypt

from tests.integration.haproxy import HaproxyProcess, Server
from tests.integration.mirror_process import MirrorProcess, toml_string
from tests.integration.tools import ManagedProcess, ProcessDied, free_port, http_status
from tests.integration.upstream import Upstream, registry_config

from .report import CLUSTER_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_WORKERS = REPO_ROOT / "deploy" / "haproxy" / "local-workers.cfg"

# Same freshness for tags in mirror and nginx, so the by-tag numbers compare
# like with like; distribution's proxy asks upstream on every tag request.
TAG_TTL = "1m"
LONG_TTL = "7d"
# mirror's settings as measured, after ``[cache] dir``: tag freshness as for
# nginx, warning-level logs, no access log (a line per request costs).
MIRROR_TOML = f'tag_ttl = "{TAG_TTL}"\n\n[log]\nlevel = "warning"\naccess_log = false\n'


class Target(Protocol):
    """What a scenario needs from a cache (or from the upstream itself)."""

    name: str

    @property
    def url(self) -> str: ...

    def root_pid(self) -> int | None:
        """The process whose tree's memory counts, or None (upstream)."""
        ...

    def reset(self) -> None:
        """Restart with an empty cache."""
        ...

    def stop(self) -> None: ...


class Cache(Target, Protocol):
    """A target that is a process the benchmark starts (not direct)."""

    def start(self) -> None:
        """Start with an empty cache and return once it serves."""
        ...


def answers_200(url: str) -> bool:
    return http_status(url) == 200


def start_on_free_port(
    name: str,
    argv: Callable[[int], Sequence[str]],
    log_path: Path,
    *,
    timeout: float = 20.0,
    attempts: int = 3,
) -> tuple[ManagedProcess, int]:
    """Start ``argv(port)`` on a fresh port until ``GET /v2/`` answers 200.

    ``argv`` writes any config file the port goes into. Retries on another
    port if the child dies (the port was taken meanwhile); raises
    ProcessDied or TimeoutError with the child's log otherwise.
    """
    for attempt in range(attempts):
        port = free_port()
        process = ManagedProcess(name=name, argv=argv(port), log_path=log_path)
        process.start()
        ping = f"http://127.0.0.1:{port}/v2/"
        try:
            process.wait_ready(
                functools.partial(answers_200, ping),
                timeout=timeout,
                what="GET /v2/ returned 200",
            )
        except ProcessDied:
            if attempt + 1 == attempts:
                raise
        else:
            return process, port
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Direct:
    """No mirror: the client talks to the upstream registry itself, or
    through ``via`` (the WAN proxy's URL) when given."""

    upstream: Upstream
    name: str = "direct"
    via: str | None = None

    @property
    def url(self) -> str:
        return self.upstream.url if self.via is None else self.via

    def root_pid(self) -> int | None:
        return None

    def reset(self) -> None:
        """Nothing to empty: the upstream is the source of truth."""

    def stop(self) -> None:
        """The upstream is stopped by whoever started it."""


@dataclass
class MirrorTarget:
    """mirror as measured: warning-level logs, no access log."""

    upstream_url: str
    workdir: Path
    name: str = "mirror"
    process: MirrorProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = MirrorProcess(
            upstream_url=self.upstream_url,
            workdir=self.workdir,
            extra_toml=MIRROR_TOML,
        )

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> None:
        self.process.start()

    def root_pid(self) -> int | None:
        managed = self.process.process
        return None if managed is None else managed.pid

    def reset(self) -> None:
        self.process.stop()
        shutil.rmtree(self.process.cache_dir, ignore_errors=True)
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


def basic_authorization(user: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP Basic credentials."""
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {encoded}"


@dataclass
class AuthMirrorTarget:
    """mirror as ``MirrorTarget`` runs it, plus ``[auth] htpasswd``.

    The htpasswd file holds the user ``ci`` and ``spare_users`` more
    (``ci-1``, ``ci-2``, ...: logins the mirror has not seen, for pulls that
    must pay a bcrypt check), each with a hash of ``bcrypt_cost`` rounds
    (made with the ``bcrypt`` package, as ``htpasswd -B -C <cost>`` would);
    it is written at the first start. ``authorization()`` is the header value
    a client sends as one of them. Ready when ``GET /v2/`` without
    credentials is a 401. Its own cache directory: the plain mirror's is not
    shared.
    """

    upstream_url: str
    workdir: Path
    bcrypt_cost: int
    spare_users: int = 0
    name: str = "mirror+auth"
    password: str = "bench-s3cret"
    process: MirrorProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = MirrorProcess(
            upstream_url=self.upstream_url,
            workdir=self.workdir,
            extra_toml=(
                f"{MIRROR_TOML}\n[auth]\nhtpasswd = {toml_string(str(self.htpasswd))}\n"
            ),
            ready_status=401,
        )

    @property
    def htpasswd(self) -> Path:
        return self.workdir / "htpasswd"

    @staticmethod
    def user(number: int = 0) -> str:
        return f"ci-{number}" if number else "ci"

    def authorization(self, number: int = 0) -> str:
        """Basic credentials of ``user(number)`` (0: ``ci``)."""
        return basic_authorization(self.user(number), self.password)

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> None:
        if not self.htpasswd.exists():
            lines = []
            for number in range(self.spare_users + 1):
                salt = bcrypt.gensalt(rounds=self.bcrypt_cost)
                hashed = bcrypt.hashpw(self.password.encode(), salt).decode()
                lines.append(f"{self.user(number)}:{hashed}\n")
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.htpasswd.write_text("".join(lines))
        self.process.start()

    def root_pid(self) -> int | None:
        managed = self.process.process
        return None if managed is None else managed.pid

    def reset(self) -> None:
        self.process.stop()
        shutil.rmtree(self.process.cache_dir, ignore_errors=True)
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


def proxy_registry_config(root: Path, port: int, remote: str) -> str:
    """The integration harness's registry config, in proxy mode and quiet.

    The access log is off and the level is warn, as for mirror: a cache
    writing a line per request pays for it, and we measure the cache.
    """
    config = json.loads(registry_config(root, port))
    config["log"] = {
        "level": "warn",
        "formatter": "text",
        "accesslog": {"disabled": True},
    }
    config["proxy"] = {"remoteurl": remote}
    return json.dumps(config, indent=2)


@dataclass(kw_only=True)
class LocalServer:
    """A cache run as one process tree on a port of its own.

    Everything it writes is under ``workdir``: its cache in ``cache_dir``
    (emptied by ``reset``) and its output in ``log_path``. Subclasses say
    how it is started (``argv``).
    """

    name: str
    binary: str
    workdir: Path
    port: int = field(default=0, init=False)
    process: ManagedProcess | None = field(default=None, init=False)
    CACHE_SUBDIR: ClassVar[str] = "cache"
    LOG_NAME: ClassVar[str] = "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / self.CACHE_SUBDIR

    @property
    def log_path(self) -> Path:
        return self.workdir / self.LOG_NAME

    def argv(self, port: int) -> list[str]:
        """Write the configuration for ``port`` and return the command line."""
        raise NotImplementedError

    def start(self) -> None:
        self.process, self.port = start_on_free_port(
            self.name, self.argv, self.log_path
        )

    def root_pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass(kw_only=True)
class ProxyRegistry(LocalServer):
    """distribution 2.8 in pull-through cache mode, with its own storage."""

    upstream_url: str
    name: str = "distribution"
    CACHE_SUBDIR: ClassVar[str] = "storage"
    LOG_NAME: ClassVar[str] = "registry.log"

    def argv(self, port: int) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(
            proxy_registry_config(self.cache_dir, port, self.upstream_url)
        )
        return [self.binary, "serve", str(config)]


NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_config(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as a registry cache, configured to do its best.

    * Blobs and manifests by digest never change: cached for a week. Tags
      move: manifests by tag are cached for ``TAG_TTL``, like mirror's
      ``cache.tag_ttl`` here.
    * The manifest cache key includes ``Accept``: the registry picks the
      representation from it, so two clients asking differently must not
      share an entry.
    * ``proxy_cache_lock``: concurrent misses for one key wait for the first
      download instead of each going upstream (nginx's single-flight; the
      waiters poll the cache every 500 ms, and give up after the lock
      timeout, set long here so a big layer does not escape it).
    * HEAD: with ``proxy_cache_convert_head`` (the default) a HEAD miss is
      fetched upstream as a GET and cached, so HEAD and GET share entries
      and the method needs no place in the key.
    * The registry's own ``Cache-Control`` is ignored so the rules above
      decide; ``sendfile`` serves cached blobs from the page cache.
    """
    temp = prefix / "temp"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};" for kind in NGINX_TEMP_DIRS
    )
    # Workers of a root master otherwise drop to nobody, who cannot write
    # the cache directory the harness created.
    user = "user root;\n" if os.geteuid() == 0 else ""
    # Quoted: a bare "{" in a regex would open a block.
    blob_location = r'"^/v2/.+/blobs/sha256:[0-9a-f]{64}$"'
    digest_manifest = r'"^/v2/.+/manifests/sha256:[0-9a-f]{64}$"'
    tag_manifest = r'"^/v2/.+/manifests/[^/]+$"'
    return f"""\
{user}daemon off;
master_process on;
worker_processes auto;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000;
{temp_paths}

    proxy_cache_path {prefix / "cache"} levels=1:2 keys_zone=registry:16m
                     max_size=20g inactive={LONG_TTL} use_temp_path=off;

    upstream registry {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering on;
        proxy_buffer_size 64k;
        proxy_buffers 16 64k;
        proxy_busy_buffers_size 256k;
        proxy_read_timeout 120s;

        proxy_cache registry;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 300s;
        proxy_cache_lock_age 300s;
        proxy_cache_convert_head on;
        proxy_cache_use_stale error timeout updating http_500 http_502 http_503;
        proxy_ignore_headers Cache-Control Expires Set-Cookie;
        add_header X-Cache-Status $upstream_cache_status always;

        location ~ {blob_location} {{
            proxy_pass http://registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 {LONG_TTL};
        }}

        location ~ {digest_manifest} {{
            proxy_pass http://registry;
            proxy_cache_key $uri|$http_accept;
            proxy_cache_valid 200 {LONG_TTL};
        }}

        location ~ {tag_manifest} {{
            proxy_pass http://registry;
            proxy_cache_key $uri|$http_accept;
            proxy_cache_valid 200 {TAG_TTL};
        }}

        location / {{
            proxy_pass http://registry;
            proxy_cache off;
        }}
    }}
}}
"""


@dataclass(kw_only=True)
class NginxCache(LocalServer):
    """nginx (master plus workers); ``workdir`` is its ``-p`` prefix."""

    upstream_port: int
    name: str = "nginx"
    LOG_NAME: ClassVar[str] = "nginx.out"

    def argv(self, port: int) -> list[str]:
        for kind in NGINX_TEMP_DIRS:
            (self.workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(nginx_config(self.workdir, port, self.upstream_port))
        # -e: Debian's build would otherwise open /var/log/nginx/error.log
        # before reading the config.
        return [
            self.binary,
            "-p",
            str(self.workdir),
            "-c",
            str(config),
            "-e",
            str(self.workdir / "error.log"),
        ]


@dataclass
class LocalHaproxy(HaproxyProcess):
    """HaproxyProcess, rendered from ``source`` (local-workers.cfg) instead of
    the cluster's file; only binds and server lines change, as there. Ready
    once every server is UP, so a measurement never starts on a cold ring."""

    source: Path = LOCAL_WORKERS
    waits_for = "every server UP"

    def ready(self) -> bool:
        return self._all_up()

    def _all_up(self) -> bool:
        try:
            states = self.server_states()
        except OSError:
            return False
        return len(states) == len(self.servers) and all(
            state == "UP" for state in states.values()
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@dataclass
class HaproxyCluster:
    """``nodes`` mirror processes (each a ``MirrorTarget``, its own cache
    directory) behind HAProxy with ``deploy/haproxy/local-workers.cfg``, as
    ``tests/bench/cores.py`` builds it: server ``worker<i>``, id ``i``, per
    node. ``url`` is HAProxy's. Its memory is the nodes' (``node_pids``);
    ``root_pid`` is HAProxy's, whose tree holds none of them.
    """

    upstream_url: str
    workdir: Path
    haproxy_binary: str
    nodes: int = 3
    name: str = CLUSTER_NAME
    members: list[MirrorTarget] = field(init=False, default_factory=list)
    haproxy: LocalHaproxy | None = field(init=False, default=None)

    @property
    def url(self) -> str:
        assert self.haproxy is not None, "cluster not started"
        return self.haproxy.url

    def start(self) -> None:
        """Start the nodes, then HAProxy once they listen (their ports go
        into its server lines); returns when HAProxy sees every node UP."""
        self.members = [
            MirrorTarget(self.upstream_url, self.workdir / f"node{n}", name=f"node{n}")
            for n in range(1, self.nodes + 1)
        ]
        for member in self.members:
            member.start()
        self.haproxy = LocalHaproxy(
            binary=self.haproxy_binary,
            workdir=self.workdir / "haproxy",
            servers=[
                Server(f"worker{n}", n, member.process.host)
                for n, member in enumerate(self.members, start=1)
            ],
        )
        self.haproxy.start()

    def node_pids(self) -> list[int]:
        return [
            pid for member in self.members if (pid := member.root_pid()) is not None
        ]

    def root_pid(self) -> int | None:
        return None if self.haproxy is None else self.haproxy.pid

    def reset(self) -> None:
        self.stop()
        for member in self.members:
            shutil.rmtree(member.process.cache_dir, ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for member in self.members:
            member.stop()
