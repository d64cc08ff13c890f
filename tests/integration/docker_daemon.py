"""A private dockerd, and an async client for its Engine API.

This module owns ``DockerDaemon`` (a ``dockerd`` with the vfs storage driver,
no networking setup, and ``--registry-mirror`` pointing at the mirror) and
``DockerEngine`` (the few Engine API calls the tests make, over the daemon's
unix socket with aiohttp). The Engine API is used instead of a ``docker``
CLI because the CLI on PATH may be much newer than the daemon.

dockerd only consults a registry mirror for Docker Hub images
(``library/x:1``, ``someuser/app:1``), and when the mirror fails it falls back
to registry-1.docker.io. Its environment names a ``ClosedPort`` as the HTTP(S)
proxy (loopback excepted), so that fallback fails at once: a mirror bug shows
up as a pull error mentioning registry-1.docker.io and a refused proxy
connection. The mirror's address is also an ``--insecure-registry``, so images
named by a path through it (``127.0.0.1:PORT/ghcr.io/owner/app:1``) pull over
plain HTTP; dockerd treats 127.0.0.0/8 that way by default, and saying so
keeps it from being an accident.

An ``https://`` mirror URL makes dockerd speak TLS to the mirror, but on
127.0.0.0/8 it does not verify the certificate: an insecure registry gets
InsecureSkipVerify, and ``/etc/docker/certs.d/<host:port>/`` is read only
for secure ones (there is no flag to point dockerd at another certs.d).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from .tools import ClosedPort, ManagedProcess

API = "http://docker"  # Host is ignored on a unix socket; aiohttp needs one.


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, for the synchronous readiness probe."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


def unix_ping(socket_path: Path) -> bool:
    """True when dockerd answers ``GET /_ping`` on ``socket_path``."""
    if not socket_path.exists():
        return False
    connection = _UnixHTTPConnection(str(socket_path), timeout=2.0)
    try:
        connection.request("GET", "/_ping")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@dataclass
class DockerDaemon:
    """One dockerd with its own data root, exec root and socket."""

    binary: str
    directory: Path
    mirror_url: str
    extra_args: Sequence[str] = ()
    process: ManagedProcess | None = None
    socket_path: Path = field(init=False)
    closed: ClosedPort = field(init=False)

    def __post_init__(self) -> None:
        self.socket_path = self.directory / "d.sock"
        self.closed = ClosedPort()

    def start(self, *, timeout: float = 30.0) -> None:
        """Start dockerd and wait for ``/_ping``; raises with its log if not."""
        self.process = ManagedProcess(
            name="dockerd",
            argv=[
                self.binary,
                "--storage-driver",
                "vfs",
                # No network namespace setup is possible here, and pulls need
                # none.
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-forward=false",
                "--ip-masq=false",
                "--data-root",
                str(self.directory / "data"),
                "--exec-root",
                str(self.directory / "x"),
                "--pidfile",
                str(self.directory / "dockerd.pid"),
                "--host",
                f"unix://{self.socket_path}",
                "--registry-mirror",
                self.mirror_url,
                "--insecure-registry",
                urlsplit(self.mirror_url).netloc,
                "--max-concurrent-downloads",
                "3",
                *self.extra_args,
            ],
            log_path=self.directory / "dockerd.log",
            env=self.closed.environment(),
        )
        self.process.start()
        self.process.wait_ready(
            lambda: unix_ping(self.socket_path),
            timeout=timeout,
            what="/_ping answered",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20.0)
        self.closed.close()


class PullError(AssertionError):
    """dockerd reported an error in its pull progress stream."""


class DockerEngine:
    """Async Engine API client; use as ``async with DockerEngine(sock) as d``."""

    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DockerEngine:
        connector = aiohttp.UnixConnector(path=str(self._socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use DockerEngine in 'async with'"
        return self._session

    async def pull(self, image: str, tag: str) -> list[dict[str, Any]]:
        """Pull ``image:tag`` (``tag`` may be ``sha256:…`` for a digest pull).

        Returns the progress messages. Raises PullError if the stream carries
        an error, which is how dockerd reports failed pulls (the HTTP status
        is already 200 by then).
        """
        params = {"fromImage": image, "tag": tag}
        async with self.session.post(f"{API}/images/create", params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise PullError(f"pull {image}:{tag}: HTTP {resp.status}: {body!r}")
        messages = [
            json.loads(line) for line in body.decode().splitlines() if line.strip()
        ]
        errors = [m for m in messages if "error" in m or "errorDetail" in m]
        if errors:
            raise PullError(f"pull {image}:{tag} failed: {errors}")
        return messages

    async def inspect(self, name: str) -> dict[str, Any] | None:
        """Return ``GET /images/{name}/json``, or None if there is no such image."""
        async with self.session.get(
            f"{API}/images/{quote(name, safe='')}/json"
        ) as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    async def remove(self, name: str) -> None:
        """``DELETE /images/{name}?force=1``; a missing image is not an error."""
        url = f"{API}/images/{quote(name, safe='')}"
        async with self.session.delete(url, params={"force": "1"}) as resp:
            if resp.status not in (200, 404):
                raise AssertionError(f"rmi {name}: HTTP {resp.status}")

    async def images(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{API}/images/json") as resp:
            resp.raise_for_status()
            data: list[dict[str, Any]] = await resp.json()
            return data
