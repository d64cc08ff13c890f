"""The real distribution registry as the mirror's upstream, and its request log.

This module owns ``Upstream``: one ``docker-registry`` process (distribution
2.8) with filesystem storage in a temporary directory, how images are pushed
to it with skopeo, and how tests learn which requests it served.

Request counting reads the registry's own log. distribution 2.8 prints, for
every request, a combined-format access log line (wrapped here)::

    127.0.0.1 - - [22/Nov/2026:07:01:24 +0000] "GET /v2/library/b/blobs/sha256:7f…
    HTTP/1.1" 200 262590 "" "docker/20.10.24+dfsg1 go/go1.19.8 …"

and, for requests its API handlers served, a logrus line::

    time="…" level=info msg="response completed" … http.request.method=GET
    http.request.uri="/v2/library/b/manifests/1?ns=docker.io" … http.response.status=200

The access log covers every request (including 404s from unknown routes), so
it is what we count; the logrus lines are the fallback for a configuration
without an access log. A log position (``mark``) is a byte offset, so tests
ask "what was served since this point" without truncating a file the registry
still has open.

A registry can demand its own credentials with distribution's htpasswd auth
(``htpasswd_auth``), which takes bcrypt hashes only; they are made with the
system's libcrypt (libxcrypt, part of Debian's base system) through ctypes,
so no bcrypt package is needed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .images import Layout
from .skopeo import Skopeo
from .tools import ManagedProcess, ProcessDied, free_port, http_status

ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) \S+(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)
LOGRUS_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')
DIGEST_IN_PATH = re.compile(
    r"^/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<reference>[^/]+)$"
)
# Any route naming a repository: blobs (and uploads), manifests, tags/list,
# referrers.
NAME_IN_PATH = re.compile(
    r"^/v2/(?P<name>.+?)/(?:blobs|manifests|tags|referrers)/[^/]+(?:/[^/]*)?$"
)

RequestKind = Literal["blob", "manifest", "other"]


@dataclass(frozen=True)
class Request:
    """One request the registry served, as its log recorded it."""

    method: str
    uri: str
    status: int
    user_agent: str = ""

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def query(self) -> str:
        return self.uri.partition("?")[2]

    def _match(self) -> re.Match[str] | None:
        return DIGEST_IN_PATH.match(self.path)

    @property
    def kind(self) -> RequestKind:
        match = self._match()
        if match is None:
            return "other"
        return "blob" if match["kind"] == "blobs" else "manifest"

    @property
    def repository(self) -> str | None:
        match = self._match()
        return None if match is None else match["name"]

    @property
    def reference(self) -> str | None:
        """The tag or digest after ``/blobs/`` or ``/manifests/``."""
        match = self._match()
        return None if match is None else match["reference"]

    @property
    def named(self) -> str | None:
        """The repository any repository route names (tags, referrers and
        uploads too); None for ``/v2/`` and the like."""
        match = NAME_IN_PATH.match(self.path)
        return None if match is None else match["name"]

    @property
    def by_digest(self) -> bool:
        ref = self.reference
        return ref is not None and ref.startswith("sha256:")

    def __str__(self) -> str:
        return f"{self.method} {self.uri} -> {self.status}"


@dataclass(frozen=True)
class RequestLog:
    """Requests served between two log positions, with the usual questions."""

    requests: tuple[Request, ...]

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def blob_gets(self, *, successful: bool = False) -> Counter[str]:
        """How many times each blob digest was requested with GET.

        With ``successful``, only GETs answered below 400 count: a GET refused
        with 401 (the first try against a token-auth registry) moved no
        content.
        """
        return Counter(
            r.reference or ""
            for r in self.requests
            if r.method == "GET"
            and r.kind == "blob"
            and not (successful and r.status >= 400)
        )

    def repositories(self) -> set[str]:
        """Every repository a request named (see ``Request.named``)."""
        return {name for r in self.requests if (name := r.named) is not None}

    def manifest_requests_by_digest(self) -> list[Request]:
        """GET/HEAD of manifests by digest: content that can never change."""
        return [r for r in self.requests if r.kind == "manifest" and r.by_digest]

    def describe(self) -> str:
        if not self.requests:
            return "(no requests)"
        return "\n".join(f"  {request}" for request in self.requests)


def parse_requests(text: str) -> list[Request]:
    """Return the requests recorded in a chunk of registry log.

    Uses access log lines if the chunk has any, else logrus "response
    completed" lines, so a request is never counted twice.
    """
    access: list[Request] = []
    logrus: list[Request] = []
    for line in text.replace("\0", "").splitlines():
        match = ACCESS_LINE.match(line)
        if match is not None:
            access.append(
                Request(
                    method=match["method"],
                    uri=match["uri"],
                    status=int(match["status"]),
                    user_agent=match["agent"] or "",
                )
            )
            continue
        if 'msg="response completed' not in line:
            continue
        fields = {key: value.strip('"') for key, value in LOGRUS_FIELD.findall(line)}
        try:
            logrus.append(
                Request(
                    method=fields["http.request.method"],
                    uri=fields["http.request.uri"],
                    status=int(fields["http.response.status"]),
                    user_agent=fields.get("http.request.useragent", ""),
                )
            )
        except (KeyError, ValueError):
            continue
    return access if access else logrus


def registry_config(root: Path, port: int, auth: dict[str, Any] | None = None) -> str:
    """Return a distribution config; JSON is valid YAML and needs no library.

    ``auth`` becomes the config's ``auth`` section (e.g. token auth).
    """
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": False},
            # No background purge goroutine surprising a test mid-run.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            # A fixed secret silences the "No HTTP secret" warning; it only
            # signs upload state, so its value does not matter here.
            "secret": "mirror-integration-tests",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if auth is not None:
        config["auth"] = auth
    return json.dumps(config, indent=2)


def bcrypt_hash(password: str, *, cost: int = 4) -> str:
    """A bcrypt (``$2y$``) hash of ``password`` from the system's libcrypt.

    Raises OSError when libcrypt is missing or cannot make bcrypt hashes.
    The cost is bcrypt's lowest: distribution checks the password on every
    request.
    """
    library = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    gensalt = library.crypt_gensalt
    gensalt.restype = ctypes.c_char_p
    gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    crypt = library.crypt
    crypt.restype = ctypes.c_char_p
    crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    entropy = secrets.token_bytes(16)
    setting = gensalt(b"$2y$", cost, entropy, len(entropy))
    hashed = None if setting is None else crypt(password.encode(), setting)
    if hashed is None or not hashed.startswith(b"$2y$"):
        raise OSError("libcrypt made no bcrypt hash")
    return str(hashed.decode())


def htpasswd_auth(path: Path, username: str, password: str) -> dict[str, Any]:
    """Write an htpasswd file for one account; return the registry's ``auth``
    section using it (HTTP Basic, realm ``mirror-test``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{username}:{bcrypt_hash(password)}\n")
    return {"htpasswd": {"realm": "mirror-test", "path": str(path)}}


@dataclass
class Upstream:
    """A running ``docker-registry`` on 127.0.0.1 and helpers around it."""

    binary: str
    skopeo: Skopeo
    workdir: Path
    auth: dict[str, Any] | None = None
    """The registry's ``auth`` section; None serves anonymously."""
    credentials: tuple[str, str] | None = None
    """(username, password) to push with, for a registry that demands them."""
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(
        self, *, timeout: float = 15.0, attempts: int = 3, same_port: bool = False
    ) -> None:
        """Start the registry and wait for ``/v2/`` to answer 200.

        Retries on a new port if the chosen one was taken in the meantime.
        ``same_port`` restarts a stopped registry where it was (on the same
        storage), for clients configured with its address; there is no
        retry then. Raises ProcessDied or TimeoutError with the registry log.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if same_port:
            attempts = 1
        for attempt in range(attempts):
            if not (same_port and self.port):
                self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(
                registry_config(self.workdir / "storage", self.port, self.auth)
            )
            self.process = ManagedProcess(
                name="docker-registry",
                argv=[self.binary, "serve", str(config)],
                log_path=self.workdir / "registry.log",
            )
            self.process.start()
            try:
                self.process.wait_ready(
                    # 401 is a token-auth registry's healthy answer.
                    lambda: http_status(f"{self.url}/v2/") in (200, 401),
                    timeout=timeout,
                    what="GET /v2/ answered",
                )
                return
            except ProcessDied:
                if attempt + 1 == attempts:
                    raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def mark(self) -> int:
        """Return the current log position for a later ``requests_since``."""
        assert self.process is not None
        return self.process.log_size()

    def requests_now(self, mark: int) -> RequestLog:
        """Requests logged since ``mark``, without waiting for stragglers."""
        assert self.process is not None
        text = self.process.log_text(since=mark, limit=None)  # every line counts
        return RequestLog(tuple(parse_requests(text)))

    async def requests_since(self, mark: int, *, quiet: float = 0.2) -> RequestLog:
        """Requests served since ``mark``, once the log has gone quiet.

        The registry writes its access line after the response is complete,
        so a client can finish a moment before the last line appears; wait
        until the log has not grown for ``quiet`` seconds (at most 3 s).
        """
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        size = self.process.log_size()
        while loop.time() < deadline:
            await asyncio.sleep(quiet)
            new_size = self.process.log_size()
            if new_size == size:
                break
            size = new_size
        return await asyncio.to_thread(self.requests_now, mark)

    async def push(self, layout: Layout, repository: str, tag: str) -> None:
        """Push a generated image (all children of an index) as repository:tag."""
        await self.skopeo.push(
            layout, self.host, repository, tag, credentials=self.credentials
        )
