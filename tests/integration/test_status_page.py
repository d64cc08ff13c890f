"""The status page in a real browser: headless Chromium driven over the
Chrome DevTools Protocol (aiohttp's websocket client), against a real
`mirror serve` in front of a real registry that skopeo pulled through.

The page must render without a console error or an exception, ask nothing
of any host but the mirror, refresh itself from /status.json, and show the
numbers /metrics gives at the same moment. A screenshot is saved as a test
artifact (MIRROR_TEST_ARTIFACTS, default <repo>/.artifacts/).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.promtext import parse_samples

from .conftest import MirrorFactory, Publisher, unique
from .mirror_process import REPO_ROOT, MirrorProcess
from .skopeo import Skopeo
from .tools import ClosedPort, ManagedProcess, require_tool
from .upstream import Upstream

MiB = 1 << 20
# Every wait is bounded by one of these.
START_TIMEOUT = 30.0
CALL_TIMEOUT = 15.0
LOAD_TIMEOUT = 20.0
# The page refreshes every 5 s; one refresh must land within this.
REFRESH_TIMEOUT = 15.0
VIEWPORT = {"width": 1280, "height": 720}

# Read from the DOM: the raw numbers the page shows (data-value attributes).
READ_PAGE = """(() => {
  const v = (id) => document.getElementById(id).getAttribute("data-value");
  const text = (id) => document.getElementById(id).textContent;
  const rows = (sel) => Array.from(document.querySelectorAll(sel));
  return {
    version: text("version"), revision: text("revision"), ready: v("ready"),
    cacheSize: v("cache-size"), cacheSizeText: text("cache-size"),
    maxSize: v("cache-max-size"), blobs: v("cache-blobs"), diskFree: v("disk-free"),
    minFree: v("min-free"), evicted: v("evicted"),
    usageBar: document.getElementById("usage-fill").getAttribute("width"),
    inProgress: v("downloads-in-progress"), queued: v("downloads-queued"),
    servedCache: v("served-cache"), servedUpstream: v("served-upstream"),
    hits: v("hits-hour"), lookups: v("lookups-hour"), ratio: v("hit-ratio"),
    chartBars: document.querySelectorAll("#hit-chart g").length,
    registries: rows("#registries tr[data-registry]").map((r) => ({
      name: r.getAttribute("data-registry"),
      state: r.querySelector("[data-field=state]").getAttribute("data-value"),
      remaining: r.querySelector("[data-field=remaining]").getAttribute("data-value"),
      budgetText: r.querySelector("[data-field=remaining]").textContent,
    })),
    top: rows("#top-repositories tr[data-repository]").map((r) => ({
      registry: r.getAttribute("data-registry"),
      repository: r.getAttribute("data-repository"),
      pulls: Number(r.getAttribute("data-pulls")),
      shown: r.cells[2].textContent,
    })),
    evictions: rows("#recent-evictions tr[data-blobs]").map((r) => ({
      blobs: Number(r.getAttribute("data-blobs")),
      bytes: Number(r.getAttribute("data-bytes")),
    })),
  };
})()"""


class DevTools:
    """A Chrome DevTools Protocol connection: commands and the events seen."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            waiter = self._pending.pop(data.get("id", -1), None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(data)
            elif "method" in data:
                self.events.append(data)
                self._arrived.set()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("DevTools connection closed"))

    async def call(
        self, method: str, session: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Send a command (to a target's `session`); its result, or fail."""
        ident = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[ident] = waiter
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        async with asyncio.timeout(CALL_TIMEOUT):
            reply = await waiter
        if "error" in reply:
            pytest.fail(f"DevTools {method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def event(self, method: str, within: float) -> dict[str, Any]:
        """The first event of that method (already seen, or awaited)."""
        async with asyncio.timeout(within):
            while True:
                for seen in self.events:
                    if seen["method"] == method:
                        return seen
                self._arrived.clear()
                await self._arrived.wait()

    def of(self, *methods: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["method"] in methods]

    async def open(self, url: str) -> str:
        """A new tab showing `url`, loaded, with Runtime, Log, Page and
        Network events on; returns its session."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session: str = attached["sessionId"]
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            deviceScaleFactor=1,
            mobile=False,
            **VIEWPORT,
        )
        for domain in ("Runtime", "Log", "Page", "Network"):
            await self.call(f"{domain}.enable", session)
        navigated = await self.call("Page.navigate", session, url=url)
        assert "errorText" not in navigated, navigated
        await self.event("Page.loadEventFired", LOAD_TIMEOUT)
        return session

    async def evaluate(self, session: str, expression: str) -> Any:
        reply = await self.call(
            "Runtime.evaluate", session, expression=expression, returnByValue=True
        )
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    async def screenshot(self, session: str, name: str) -> bytes:
        """The whole page as PNG, also saved as the artifact `name`."""
        shot = await self.call(
            "Page.captureScreenshot", session, format="png", captureBeyondViewport=True
        )
        png = base64.b64decode(shot["data"])
        (artifacts() / name).write_bytes(png)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        return png

    def errors(self) -> list[dict[str, Any]]:
        """Exceptions, console errors and warnings, and errors logged."""
        return [
            e
            for e in self.of(
                "Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded"
            )
            if e["method"] == "Runtime.exceptionThrown"
            or e["params"].get("type") in ("error", "assert", "warning")
            or e["params"].get("entry", {}).get("level") == "error"
        ]

    def requested(self) -> list[str]:
        """The URL of every request the pages made."""
        return [
            e["params"]["request"]["url"] for e in self.of("Network.requestWillBeSent")
        ]

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a fresh profile; its DevTools connection.

    Killed with its process group at the end (ManagedProcess gives it a
    session of its own), whatever happened.
    """
    binary = require_tool("chromium")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    process = ManagedProcess(
        name="chromium",
        argv=[
            binary,
            "--headless",
            "--no-sandbox",  # we run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        log_path=tmp_path / "chromium.log",
        env={**os.environ, "HOME": str(tmp_path)},
    )
    process.start()
    try:
        port_file = profile / "DevToolsActivePort"
        process.wait_ready(
            lambda: port_file.exists() and len(port_file.read_text().split()) >= 2,
            timeout=START_TIMEOUT,
            what="DevToolsActivePort written",
        )
        port, path = port_file.read_text().split()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{port}{path}", max_msg_size=256 * MiB
            ) as ws,
        ):
            devtools = DevTools(ws)
            try:
                yield devtools
            finally:
                await devtools.close()
    finally:
        process.stop(timeout=5)


async def until(check: Callable[[], Any], within: float, what: str) -> Any:
    """Poll the coroutine function `check` until it returns something true;
    fail after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not (found := await check()):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: not within {within}s")
        await asyncio.sleep(0.1)
    return found


async def metrics(
    http: aiohttp.ClientSession, mirror: MirrorProcess
) -> dict[str, float]:
    async with http.get(f"{mirror.url}/metrics") as resp:
        assert resp.status == 200
        return parse_samples(await resp.text())


def by_cache(samples: dict[str, float], result: str) -> float:
    prefix = f'mirror_http_request_duration_seconds_count{{cache="{result}",'
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def artifacts() -> Path:
    directory = Path(
        os.environ.get("MIRROR_TEST_ARTIFACTS") or REPO_ROOT / ".artifacts"
    )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def test_the_status_page_renders_what_metrics_say(
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    # A budget the pulls below outgrow, so that the page has evictions.
    mirror = mirror_factory(
        upstream.url, extra_toml='max_size = "8MiB"\nlow_watermark = "70%"\n'
    )
    hot = await publish.image(unique("library/web-"), layer_sizes=[MiB, 2 * MiB])
    warm = await publish.image(unique("team/api-"), layer_sizes=[MiB + MiB // 2])
    big = await publish.image(unique("tools/build-"), layer_sizes=[3 * MiB, MiB])
    for i, image in enumerate((hot, warm, hot, hot, warm, big)):
        reference = f"{image.repository}:{image.tag}"
        await skopeo.pull_to_dir(mirror.host, reference, tmp_path / f"pull{i}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def settled() -> dict[str, float] | None:
            samples = await metrics(http, mirror)
            done = (
                samples["mirror_evictions_total"] > 0
                and samples["mirror_cache_size_bytes"] <= 8 * MiB
                and samples["mirror_blob_downloads_in_progress"] == 0
            )
            return samples if done else None

        await until(settled, 30, "eviction brought the cache within its budget")

        async with chromium(tmp_path) as devtools:
            session = await devtools.open(f"{mirror.url}/")
            rendered = "document.body.getAttribute('data-rendered')"

            async def first_render() -> Any:
                return await devtools.evaluate(session, rendered)

            first = await until(first_render, LOAD_TIMEOUT, "rendered")

            async def refreshed() -> bool:
                return bool(await devtools.evaluate(session, rendered) != first)

            # The script fetched status.json and rendered it again.
            await until(refreshed, REFRESH_TIMEOUT, "refreshed from status.json")
            page = await devtools.evaluate(session, READ_PAGE)
            samples = await metrics(http, mirror)
            async with http.get(f"{mirror.url}/status.json") as resp:
                status = await resp.json()
            png = await devtools.screenshot(session, "status-page.png")
            # The dark scheme too (prefers-color-scheme), for the eye.
            await devtools.call(
                "Emulation.setEmulatedMedia",
                session,
                features=[{"name": "prefers-color-scheme", "value": "dark"}],
            )
            dark = await devtools.screenshot(session, "status-page-dark.png")
            errors = devtools.errors()
            requested = devtools.requested()

    assert errors == [], json.dumps(errors, indent=1)[:4000]
    assert dark != png
    assert len(png) > 20_000  # a rendered dashboard, not a blank page
    # Only the mirror was asked: the page itself and its refreshes.
    assert requested, "no request seen"
    outside = [u for u in requested if not u.startswith(f"{mirror.url}/")]
    assert outside == [], outside
    assert f"{mirror.url}/status.json" in requested

    build = next(k for k in samples if k.startswith("mirror_build_info{"))
    assert f'version="{page["version"]}"' in build
    assert f'revision="{page["revision"]}"' in build
    assert page["ready"] == "1"
    assert samples["mirror_ready"] == 1

    assert int(page["cacheSize"]) == samples["mirror_cache_size_bytes"]
    assert page["cacheSizeText"].endswith("MiB")
    assert int(page["maxSize"]) == samples["mirror_cache_max_size_bytes"] == 8 * MiB
    assert int(page["blobs"]) == samples["mirror_cache_blobs"] > 0
    assert int(page["minFree"]) == samples["mirror_cache_min_free_bytes"]
    # Free disk is read at each look; other processes write meanwhile.
    disk = samples["mirror_cache_disk_free_bytes"]
    assert abs(int(page["diskFree"]) - disk) < 256 * MiB
    used = samples["mirror_cache_size_bytes"] / samples["mirror_cache_max_size_bytes"]
    assert int(page["usageBar"]) == round(used * 1000)
    assert int(page["evicted"]) == samples["mirror_evictions_total"] > 0
    assert (
        sum(e["blobs"] for e in page["evictions"]) == samples["mirror_evictions_total"]
    )
    assert (
        sum(e["bytes"] for e in page["evictions"])
        == samples["mirror_evicted_bytes_total"]
    )
    assert int(page["inProgress"]) == samples["mirror_blob_downloads_in_progress"] == 0
    assert int(page["queued"]) == samples["mirror_blob_downloads_queued"] == 0
    assert (
        int(page["servedCache"]) == samples['mirror_served_bytes_total{source="cache"}']
    )
    assert (
        int(page["servedUpstream"])
        == samples['mirror_served_bytes_total{source="upstream"}']
    )

    hits = by_cache(samples, "hit")
    lookups = sum(
        by_cache(samples, r) for r in ("hit", "miss", "joined", "stale", "uncached")
    )
    assert int(page["hits"]) == hits > 0
    assert int(page["lookups"]) == lookups > hits
    assert float(page["ratio"]) == round(hits / lookups, 4)
    assert page["chartBars"] == 60

    [registry] = page["registries"]
    assert registry["name"] == "docker.io"
    assert registry["state"] == "up"
    assert samples['mirror_upstream_up{registry="docker.io"}'] == 1
    assert samples['mirror_upstream_throttled{registry="docker.io"}'] == 0
    # distribution sends no rate-limit headers: no gauge, "not reported".
    assert registry["remaining"] == ""
    assert registry["budgetText"] == "not reported"
    assert not any("ratelimit" in k for k in samples)

    top = [(t["repository"], t["pulls"]) for t in page["top"]]
    assert [name for name, _ in top] == [
        hot.repository,
        warm.repository,
        big.repository,
    ]
    pulls = dict(top)
    # Three pulls, two and one: each pull asked the same manifests.
    assert pulls[hot.repository] == 3 * pulls[big.repository]
    assert pulls[warm.repository] == 2 * pulls[big.repository]
    assert all(t["shown"] == t["repository"] for t in page["top"])
    assert page["top"] == [
        {**t, "shown": t["repository"]} for t in status["top_repositories"]
    ]


async def test_the_status_page_shows_an_upstream_that_is_down(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    closed = ClosedPort()
    try:
        mirror = mirror_factory(
            closed.url, upstream_toml='retry_backoff = "0s"\ndown_backoff = "5m"\n'
        )
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            async with http.get(f"{mirror.url}/v2/library/app/manifests/1") as resp:
                assert resp.status == 503
            async with chromium(tmp_path) as devtools:
                session = await devtools.open(f"{mirror.url}/")
                state = (
                    "document.querySelector('#registries [data-field=state]')"
                    "?.getAttribute('data-value')"
                )

                async def shown() -> Any:
                    return await devtools.evaluate(session, state)

                assert await until(shown, LOAD_TIMEOUT, "registry state") == "down"
                badge = await devtools.evaluate(
                    session,
                    "document.querySelector('#registries [data-field=state]')"
                    ".textContent",
                )
                empty = await devtools.evaluate(
                    session,
                    "[...document.querySelectorAll('td.empty')]"
                    ".map((td) => td.textContent)",
                )
                await devtools.screenshot(session, "status-page-down.png")
                errors = devtools.errors()
            samples = await metrics(http, mirror)
    finally:
        closed.close()
    assert errors == [], json.dumps(errors, indent=1)[:4000]
    assert samples['mirror_upstream_up{registry="docker.io"}'] == 0
    assert badge.startswith("down ")  # with the time left: "down 4m 59s"
    assert empty == ["No pulls yet", "No evictions since start"]
