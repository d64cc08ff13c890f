"""The real daemon under a low file-descriptor limit.

`mirror serve` runs as a subprocess whose RLIMIT_NOFILE is 256 (soft and
hard, so it cannot raise it) in front of a FakeRegistry served by this test.
It must say at start-up that it lowered server.max_connections to fit, then
answer connections past that with 503 rather than run out of descriptors:
no hang, no traceback, and never a 404 for a blob it has cached.

MirrorProcess takes neither extra environment nor a wrapper for the child,
so `LimitedMirror` here starts the daemon itself, from the same parts.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.fakes.registry import FakeRegistry, sha256
from tests.promtext import parse_samples

from .cache_dir import CacheDir
from .mirror_process import REPO_ROOT, mirror_config, mirror_environment
from .tools import ManagedProcess, free_port, http_status

NOFILE = 256
# Sets RLIMIT_NOFILE (soft and hard) to argv[1], then becomes argv[2:].
WITH_NOFILE = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)
LOWERED = re.compile(r"server\.max_connections lowered from (\d+) to (\d+)")
BLOB_SIZE = 4 * 1024 * 1024
EXCESS = 40
EXCESS_BATCH = 10
# Silent connections past the limit, more than the descriptors left.
FLOOD = 250

ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class LimitedMirror:
    """`python -m mirror serve` with RLIMIT_NOFILE set to `nofile`."""

    upstream_url: str
    workdir: Path
    nofile: int
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cache(self) -> CacheDir:
        return CacheDir(self.workdir / "cache")

    def start(self, *, timeout: float = 15.0) -> None:
        """Start and wait for GET /v2/ 200. Raises ProcessDied, TimeoutError."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "mirror.toml"
        config.write_text(
            mirror_config(
                port=self.port,
                upstream_url=self.upstream_url,
                cache_dir=self.cache.root,
                extra="",
            )
        )
        self.process = ManagedProcess(
            name="mirror",
            argv=[
                *(sys.executable, "-c", WITH_NOFILE, str(self.nofile)),
                *(sys.executable, "-m", "mirror", "serve", "--config", str(config)),
            ],
            log_path=self.workdir / "mirror.log",
            cwd=REPO_ROOT,
            env={**mirror_environment(), **self.env},
        )
        self.process.start()
        self.process.wait_ready(
            lambda: http_status(f"{self.url}/v2/") == 200,
            timeout=timeout,
            what="GET /v2/ returned 200",
        )

    def stop(self) -> int | None:
        return None if self.process is None else self.process.stop(timeout=10.0)

    def log(self) -> str:
        return "" if self.process is None else self.process.log_text(limit=None)


async def scrape(mirror: LimitedMirror) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{mirror.url}/metrics") as resp,
    ):
        assert resp.status == 200
        return parse_samples(await resp.text())


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, within: float
) -> None:
    """Poll `check` every 50 ms; fail if it is not true within `within` s."""
    for _ in range(int(within / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not true after {within}s: {what}")


def quiet(mirror: LimitedMirror) -> Callable[[], Awaitable[bool]]:
    """True once the only open connection is the scrape asking."""

    async def check() -> bool:
        return (await scrape(mirror))["mirror_http_connections"] == 1

    return check


async def outcome(reader: asyncio.StreamReader, *, within: float = 3.0) -> bytes | None:
    """What the mirror sent on a connection before closing it, or None if
    it still holds the connection open after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read()
    except TimeoutError:
        return None


async def fetch(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` on a fresh connection; status and body (to EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        ask = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        writer.write(ask.encode() + b"\r\n")
        async with asyncio.timeout(15.0):
            data = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@dataclass
class Limited:
    """A LimitedMirror in front of a FakeRegistry, with one blob cached."""

    mirror: LimitedMirror
    upstream: FakeRegistry
    digest: str
    limit: int  # server.max_connections, as lowered at start-up
    connections: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/v2/library/app/blobs/{self.digest}"

    async def stalled(
        self, count: int, request: bytes = b"GET /v2/ HTTP/1.1\r\nHost: 127.0"
    ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """`count` connections that send `request` (or nothing) and stall."""
        opened = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.mirror.port
            )
            self.connections.append(writer)
            if request:
                writer.write(request)
            opened.append((reader, writer))
        return opened

    def close_all(self) -> None:
        for writer in self.connections:
            writer.close()

    async def finish(self) -> str:
        """Stop the mirror; fail unless it exited 0 with a clean log."""
        self.close_all()
        status = await asyncio.to_thread(self.mirror.stop)
        log = self.mirror.log()
        assert status == 0, log[-3000:]
        assert "Traceback" not in log, log[-5000:]
        assert " ERROR " not in log, log[-5000:]
        assert self.upstream.count("blob", "GET") == 1
        return log


@pytest.fixture
async def limited(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[Limited]:
    """The daemon under RLIMIT_NOFILE=256 with upstream.max_downloads=4,
    after it cached one blob; stopped after the test."""
    upstream = FakeRegistry()
    data = random.Random("limits").randbytes(BLOB_SIZE)  # noqa: S311 - test data
    digest = upstream.add_blob(data)
    server = await aiohttp_server(upstream.app())
    mirror = LimitedMirror(
        upstream_url=str(server.make_url("")).rstrip("/"),
        workdir=tmp_path / "mirror",
        nofile=NOFILE,
        env={
            "MIRROR_UPSTREAM_MAX_DOWNLOADS": "4",
            "MIRROR_UPSTREAM_RETRY_BACKOFF": "0s",
            "MIRROR_SERVER_HEADER_TIMEOUT": "30s",
        },
    )
    try:
        await asyncio.to_thread(mirror.start)
        lowered = LOWERED.search(mirror.log())
        assert lowered is not None, mirror.log()
        assert int(lowered.group(1)) == 2048
        limit = int(lowered.group(2))
        assert 1 < limit < NOFILE // 2, lowered.group(0)
        setup = Limited(mirror, upstream, digest, limit)

        status, body = await fetch(mirror.port, setup.path)
        assert (status, sha256(body)) == (200, digest)

        async def committed() -> bool:
            return digest in await asyncio.to_thread(mirror.cache.rows)

        await eventually(committed, "the blob is committed", within=10.0)
        await eventually(quiet(mirror), "no connection but the scrape", within=5.0)
        yield setup
        setup.close_all()
    finally:
        await asyncio.to_thread(mirror.stop)


async def test_low_fd_limit_refuses_with_503_and_never_breaks(
    limited: Limited,
) -> None:
    # More stalled connections than the limit: the excess get 503 at once
    # (they sent data), the rest are held open. The excess come in batches
    # smaller than the refusals the listener lets wait for their request
    # (32): past that many a refusal is written before the request arrives,
    # and the request landing on the closed socket may reset the connection
    # before the client reads the 503 (test_silent_flood_... covers that).
    opened = await limited.stalled(limited.limit)
    outcomes = await asyncio.gather(*(outcome(reader) for reader, _ in opened))
    for _ in range(EXCESS // EXCESS_BATCH):
        batch = await limited.stalled(EXCESS_BATCH)
        opened += batch
        outcomes += await asyncio.gather(*(outcome(reader) for reader, _ in batch))
    held = [i for i, out in enumerate(outcomes) if out is None]
    refused = [out for out in outcomes if out is not None]
    assert len(held) == limited.limit, (len(held), limited.mirror.log()[-3000:])
    assert len(refused) == EXCESS
    for answer in refused:
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b'"UNAVAILABLE"' in answer
        assert b"Retry-After: 1" in answer

    # Free some slots; concurrent pulls of the cached blob get it whole or a
    # 503, never a 404 and never a hang.
    for index in held[:10]:
        opened[index][1].close()
    await asyncio.sleep(0.3)
    port, path = limited.mirror.port, limited.path
    results = await asyncio.gather(*(fetch(port, path) for _ in range(30)))
    statuses = sorted(status for status, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert 1 <= statuses.count(200) <= 10, statuses
    for status, body in results:
        if status == 200:
            assert sha256(body) == limited.digest

    limited.close_all()
    await eventually(quiet(limited.mirror), "all connections closed", within=5.0)
    samples = await scrape(limited.mirror)
    rejected = "mirror_http_connections_rejected_total"
    assert samples[rejected + '{reason="limit"}'] >= EXCESS + 20
    assert samples.get(rejected + '{reason="fds"}', 0) == 0
    await limited.finish()


async def test_silent_flood_past_the_limit_leaves_admitted_clients_served(
    limited: Limited,
) -> None:
    # Admitted and silent: ten that will ask for the cached blob, and the
    # rest of the slots held.
    ready = await limited.stalled(10, request=b"")
    await limited.stalled(limited.limit - 10, request=b"")
    await asyncio.sleep(0.3)
    # Silent connections past the limit: each waits for a request to refuse.
    flood = await limited.stalled(FLOOD, request=b"")
    ask = (
        f"GET {limited.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    ).encode()
    for _, writer in ready:
        writer.write(ask)
    pulls, refusals = await asyncio.gather(
        asyncio.gather(*(outcome(reader) for reader, _ in ready)),
        asyncio.gather(*(outcome(reader, within=5.0) for reader, _ in flood)),
    )
    # Every connection past the limit is answered 503, none hangs (but
    # those accepted once the ten pulls left are admitted, and stay open).
    answers = {out[:40] if out else out for out in refusals}
    assert sum(out is None for out in refusals) <= len(ready), answers
    assert all(out is None or out.startswith(b"HTTP/1.1 503 ") for out in refusals)
    # ...and the clients admitted before the flood get their blob.
    for out in pulls:
        assert out is not None
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), out[:300]
        assert sha256(body) == limited.digest
    await limited.finish()
