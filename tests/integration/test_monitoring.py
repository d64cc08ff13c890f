"""The shipped alert rules and Grafana dashboard against real parts.

A real Prometheus (Debian ``prometheus``) scrapes a real ``mirror serve``
every second, with deploy/prometheus/alerts.yml loaded. Upstream is
``HubEdge``, the Docker Hub look-alike (token auth, rate-limit headers, a
CDN), so the pull budget has series. The load: an image pulled three times
with skopeo (a miss, then hits), a second image, a third whose layer the CDN
corrupts (a verification failure), and a fourth after the account's
password changed upstream (credentials rejected, so the mirror, serving one
registry, turns unready); then connections up to server.max_connections and
one more, turned away.

Then every dashboard panel query (Grafana variables filled in) and every
alert expression goes through Prometheus' query API: each must parse; each
panel query must return data; every metric an alert selects must have
series; and the alerts the load provoked must have a result, those it did
not must have none. The failure counters the alerts watch exist at 0 before
the first failure, so plain increase() and rate() see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import monitoring
from tests.promtext import parse_samples

from .conftest import Published, Publisher, start_or_fail, unique, watch_log
from .hub_edge import Fault, HubEdge
from .mirror_process import MirrorProcess, toml_string
from .prometheus import PrometheusProcess, QueryFailed
from .skopeo import Skopeo
from .token_server import TokenServer
from .tools import require_tool
from .upstream import Upstream

KiB = 1024
# Fail fast: the failure steps of the load must not wait on retries.
UPSTREAM = {
    "retries": 2,
    "retry_backoff": "50ms",
    "down_backoff": "300ms",
    "first_byte_timeout": "2s",
    "read_timeout": "2s",
    "resume_attempts": 1,
}
# Pulls left when the test starts: below 10% of the limit after the first
# manifest GET, so MirrorPullBudgetLow's expression has a result.
LIMIT, REMAINING = 100, 10
# server.max_connections: room for skopeo and Prometheus, few enough to
# reach on purpose (MirrorConnectionsRejected's counter).
MAX_CONNECTIONS = 12


@pytest.fixture
async def edge(token_upstream: Upstream) -> AsyncIterator[HubEdge]:
    hub = HubEdge(token_upstream, limit=LIMIT, remaining=REMAINING)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


@pytest.fixture
def prometheus_factory() -> Iterator[list[PrometheusProcess]]:
    """Prometheus processes the test started, stopped (by PID) after it."""
    started: list[PrometheusProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def mirrors(request: pytest.FixtureRequest) -> Iterator[list[MirrorProcess]]:
    """Mirrors the test started: their logs go with a failure, and they
    are stopped after it."""
    started: list[MirrorProcess] = []
    yield started
    for process in started:
        if process.process is not None:
            watch_log(request, "mirror", process.process)
        process.stop()


async def reach_connection_limit(mirror: MirrorProcess) -> bytes:
    """Open connections to the mirror, each sending half a request, until
    one is turned away; return that answer. Closes every one it opened."""
    opened: list[asyncio.StreamWriter] = []
    try:
        for _ in range(MAX_CONNECTIONS * 2):
            reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
            opened.append(writer)
            # Half a request: an admitted connection waits for the rest, a
            # refused one is answered at its first bytes.
            writer.write(b"GET /v2/ HTTP/1.1\r\n")
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(4096), 0.3)
                if answer:
                    return answer
        raise AssertionError(f"{len(opened)} connections and none was refused")
    finally:
        for writer in opened:
            writer.close()


async def metrics_page(
    http: aiohttp.ClientSession, mirror: MirrorProcess
) -> dict[str, float]:
    async with http.get(f"{mirror.url}/metrics") as response:
        assert response.status == 200
        return parse_samples(await response.text())


def total(samples: dict[str, float], name: str, *labels: str) -> float:
    """Sum of a metric's samples whose label text has every one of `labels`."""
    return sum(
        value
        for series, value in samples.items()
        if series.partition("{")[0] == name and all(label in series for label in labels)
    )


async def pull(
    skopeo: Skopeo, mirror: MirrorProcess, published: Published, out: Path
) -> None:
    image = await skopeo.pull_to_dir(
        mirror.host, f"{published.repository}:{published.tag}", out
    )
    assert image.manifest_digest == published.digest


async def test_every_dashboard_and_alert_expression_against_real_prometheus(
    edge: HubEdge,
    token_upstream: Upstream,
    token_server: TokenServer,
    skopeo: Skopeo,
    mirrors: list[MirrorProcess],
    prometheus_factory: list[PrometheusProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    binary = require_tool("prometheus")
    username, password = unique("monitor-"), unique("pw-")
    token_server.add_account(username, password)
    settings = {"username": username, "password": password, **UPSTREAM}
    mirror = MirrorProcess(
        upstream_url=edge.url,
        workdir=tmp_path / "mirror",
        upstream_toml="".join(
            f"{key} = {toml_string(v) if isinstance(v, str) else v}\n"
            for key, v in settings.items()
        ),
        server_toml=f"max_connections = {MAX_CONNECTIONS}\n",
    )
    mirrors.append(mirror)
    start_or_fail(mirror.start)
    prometheus = PrometheusProcess(
        binary=binary,
        workdir=tmp_path / "prometheus",
        targets=[mirror.host],
        rule_files=[monitoring.ALERTS],
    )
    prometheus_factory.append(prometheus)
    start_or_fail(prometheus.start)
    await prometheus.scraped_after(http, time.time())
    # The failure counters the alerts watch are scraped at 0 before the
    # first failure, so increase() sees that failure.
    failures = await prometheus.query(
        http,
        '{__name__=~"mirror_(verification_failures|upstream_auth_failures'
        '|http_connections_rejected)_total"}',
    )
    assert len(failures) == 2 + 3 + 2, failures
    assert {s["value"][1] for s in failures} == {"0"}, failures

    publish = Publisher(token_upstream, tmp_path / "images")

    async def image() -> Published:
        return await publish.image(
            unique("library/monitored-"),
            flavour="docker",
            layer_sizes=[300 * KiB, 40 * KiB],
            to=token_upstream,
        )

    first, second, corrupted, rejected = [await image() for _ in range(4)]

    # --- the load -------------------------------------------------------------
    # Each step is scraped before the next, so counters created by one step
    # are incremented in a later scrape and rate() sees them move.
    await pull(skopeo, mirror, first, tmp_path / "pull1")
    await prometheus.scraped_after(http, time.time())
    await pull(skopeo, mirror, first, tmp_path / "pull2")
    await prometheus.scraped_after(http, time.time())
    await pull(skopeo, mirror, first, tmp_path / "pull3")
    await pull(skopeo, mirror, second, tmp_path / "pull4")
    async with http.get(f"{mirror.url}/v2/library/absent/manifests/1") as response:
        assert response.status in (401, 404)
    await prometheus.scraped_after(http, time.time())

    layer = corrupted.single.layers[0].descriptor.digest
    edge.inject(Fault("corrupt", "cdn", digest=layer))
    failed = await skopeo.copy(
        "--quiet",
        "--src-tls-verify=false",
        f"docker://{mirror.host}/{corrupted.repository}:{corrupted.tag}",
        f"dir:{tmp_path / 'corrupted'}",
        check=False,
        time_limit=60,
    )
    assert failed.returncode != 0, "a corrupted layer was pulled"
    edge.clear()
    samples = await metrics_page(http, mirror)
    assert total(samples, "mirror_verification_failures_total") >= 1

    token_server.add_account(username, unique("changed-"))
    failed = await skopeo.copy(
        "--quiet",
        "--src-tls-verify=false",
        f"docker://{mirror.host}/{rejected.repository}:{rejected.tag}",
        f"dir:{tmp_path / 'rejected'}",
        check=False,
        time_limit=60,
    )
    assert failed.returncode != 0, "a pull with rejected credentials worked"
    samples = await metrics_page(http, mirror)
    rejections = (
        'mirror_upstream_auth_failures_total{reason="rejected",registry="docker.io"}'
    )
    assert samples.get(rejections, 0) >= 1, samples
    assert samples["mirror_ready"] == 0
    assert edge.last_ratelimit is not None
    remaining = edge.last_ratelimit[1]
    assert remaining < LIMIT // 10

    refusal = await reach_connection_limit(mirror)
    assert refusal.startswith(b"HTTP/1.1 503"), refusal
    samples = await metrics_page(http, mirror)
    assert samples['mirror_http_connections_rejected_total{reason="limit"}'] >= 1

    await prometheus.scraped_after(http, time.time())

    # --- the dashboard --------------------------------------------------------
    problems: list[str] = []
    results: dict[str, list[Any]] = {}
    for query in monitoring.panel_queries():
        expr = monitoring.substitute(query.expr)
        try:
            result = await prometheus.query(http, expr)
        except QueryFailed as error:
            problems.append(f"{query}: {error}")
            continue
        results[f"{query.panel}/{query.ref}"] = result
        if not result:
            problems.append(f"{query} returned no data: {expr}")
    assert not problems, "\n".join(problems)

    def value(panel: str, ref: str = "A", **labels: str) -> float:
        for series in results[f"{panel}/{ref}"]:
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        raise AssertionError(f"{panel}/{ref} has no series {labels}")

    # A few values the load fixes: what the edge last said is left, hits
    # served from disk, the one node that is up and unready.
    assert value("Pull budget remaining", registry="docker.io") == remaining
    assert value("Pull budget remaining", "B", registry="docker.io") == LIMIT
    assert 0 < value("Hit ratio", "B") < 1
    assert value("Upstream bytes saved vs fetched") > 0
    assert value("Nodes ready", "A") == 0
    assert value("Nodes ready", "B") == 1
    assert value("Cache size and budget") > 0

    # --- the alert rules ------------------------------------------------------
    loaded = {rule["name"]: rule for rule in await prometheus.rules(http)}
    assert set(loaded) == {alert.name for alert in monitoring.alerts()}
    for alert in monitoring.alerts():
        rule = loaded[alert.name]
        assert rule["health"] == "ok", f"{alert.name}: {rule.get('lastError')}"
        assert rule["labels"] == alert.rule["labels"]
        assert rule["annotations"] == alert.rule["annotations"]

    firing: dict[str, list[Any]] = {}
    for alert in monitoring.alerts():
        try:
            firing[alert.name] = await prometheus.query(http, alert.expr)
        except QueryFailed as error:
            problems.append(f"{alert.name}: {error}")
            continue
        for name in sorted(monitoring.metric_names(alert.expr)):
            series = await prometheus.query(http, f'count({{__name__="{name}"}})')
            if not series:
                problems.append(f"{alert.name}: no series of {name}")
    assert not problems, "\n".join(problems)

    # What the load provoked has a result (ignoring `for`), keyed as the
    # alert would be; what it did not, none.
    instance = {"instance": mirror.host}
    provoked = {
        "MirrorPullBudgetLow": {**instance, "registry": "docker.io"},
        "MirrorVerificationFailures": {**instance, "registry": "docker.io"},
        "MirrorUpstreamCredentialsRejected": {**instance, "registry": "docker.io"},
        "MirrorNotReady": instance,
        "MirrorConnectionsRejected": instance,
    }
    for name, labels in provoked.items():
        assert [s["metric"] for s in firing[name]] == [labels], name
    for name in ("MirrorDown", "MirrorUpstreamThrottled", "MirrorDownloadQueueLong"):
        assert firing[name] == [], name
