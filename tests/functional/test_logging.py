"""The log through the real listener (`serve()`): access lines that say what
was sent, JSON lines, the request id, reload lines, and TLS handshakes on the
plain-HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from mirror.app import EVICTOR, RELOAD
from mirror.cli import reload_config
from mirror.logformat import ACCESS_FIELDS, JsonFormatter
from tests.fakes.registry import FakeRegistry
from tests.functional.conftest import REPOSITORY, Served, ServeFactory

# The size of the blob in issue 11's report: logged as 422 bytes (its
# headers) when served from the cache.
BLOB_SIZE = 6_293_622
ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) "(?P<line>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r"(?P<duration>\d+\.\d{6})s cache=(?P<cache>\S+) registry=(?P<registry>\S+) "
    r'id=(?P<id>\S+) "(?P<agent>(?:[^"\\]|\\.)*)"$'
)


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mirror.access"]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    lines = []
    for record in access_records(caplog):
        match = ACCESS_RE.match(record.getMessage())
        assert match is not None, record.getMessage()
        lines.append(match)
    return lines


async def fetch(
    served: Served, path: str, *, method: str = "GET", **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.request(method, served.url + path, headers=headers) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.read()


@pytest.fixture
def mirror_level() -> Iterator[None]:
    """A reload sets the `mirror` logger's level: put it back after."""
    logger = logging.getLogger("mirror")
    level = logger.level
    try:
        yield
    finally:
        logger.setLevel(level)


# --- the access line -------------------------------------------------------------


async def test_access_line_counts_the_body_sendfile_sent(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    upstream = FakeRegistry()
    data = bytes(range(256)) * (BLOB_SIZE // 256) + b"x" * (BLOB_SIZE % 256)
    digest = upstream.add_blob(data)
    served = await start(upstream)
    path = served.blob_path(digest)

    status, miss_headers, body = await fetch(served, path, **{"User-Agent": "t/1"})
    assert (status, len(body)) == (200, BLOB_SIZE)
    await served.settle()
    status, hit_headers, body = await fetch(served, path, **{"User-Agent": "t/2"})
    assert (status, body == data, hit_headers["X-Mirror-Cache"]) == (200, True, "hit")
    status, _, body = await fetch(served, path, Range="bytes=100-199")
    assert (status, len(body)) == (206, 100)
    status, head_headers, body = await fetch(served, path, method="HEAD")
    assert (status, body, head_headers["Content-Length"]) == (200, b"", str(BLOB_SIZE))

    miss, hit, ranged, head = access_lines(caplog)
    assert (miss["bytes"], miss["cache"], miss["status"]) == (
        str(BLOB_SIZE),
        "miss",
        "200",
    )
    assert (hit["bytes"], hit["cache"], hit["status"]) == (str(BLOB_SIZE), "hit", "200")
    assert (ranged["bytes"], ranged["status"]) == ("100", "206")
    assert head["bytes"] == "0"
    for line in (miss, hit, ranged, head):
        assert line["registry"] == "docker.io"
        assert line["remote"] == "127.0.0.1"
        assert re.fullmatch(r"[0-9a-f]{16}", line["id"]), line["id"]
    assert miss["line"] == f"GET {path} HTTP/1.1"
    assert head["line"] == f"HEAD {path} HTTP/1.1"
    assert (miss["agent"], hit["agent"]) == ("t/1", "t/2")
    # The request id is the one the response carried.
    assert miss["id"] == miss_headers["X-Request-Id"]
    assert hit["id"] == hit_headers["X-Request-Id"]
    assert len({line["id"] for line in (miss, hit, ranged, head)}) == 4


async def test_access_line_of_a_manifest_and_an_error(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    upstream = FakeRegistry()
    image = upstream.push_image(REPOSITORY, "1", [b"layer"])
    served = await start(upstream)
    manifest = f"/v2/{REPOSITORY}/manifests/1"
    assert (await fetch(served, manifest))[2] == image.manifest
    assert (await fetch(served, manifest))[0] == 200
    status, _, error = await fetch(served, f"/v2/{REPOSITORY}/manifests/nope")
    assert status == 404
    status, _, base = await fetch(served, "/v2/")
    assert status == 200

    miss, hit, unknown, root = access_lines(caplog)
    assert (miss["cache"], miss["bytes"]) == ("miss", str(len(image.manifest)))
    assert (hit["cache"], hit["bytes"]) == ("hit", str(len(image.manifest)))
    assert (unknown["status"], unknown["bytes"]) == ("404", str(len(error)))
    assert unknown["registry"] == "docker.io"
    # /v2/ asks no registry and no cache.
    assert (root["cache"], root["registry"], root["bytes"]) == (
        "-",
        "-",
        str(len(base)),
    )
    assert root["agent"].startswith("Python/")


async def test_a_plain_request_id_from_the_client_is_kept(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    served = await start()
    given = "haproxy-7F3a.9_x"
    assert (await fetch(served, "/v2/", **{"X-Request-Id": given}))[1][
        "X-Request-Id"
    ] == given
    refused = ["a b", "x" * 65, "id;drop", "caf\u00e9", ""]
    answered = []
    for value in refused:
        status, headers, _ = await fetch(served, "/v2/", **{"X-Request-Id": value})
        assert status == 200
        answered.append(headers["X-Request-Id"])
    for value in answered:
        assert re.fullmatch(r"[0-9a-f]{16}", value), value
    assert [line["id"] for line in access_lines(caplog)] == [given, *answered]


# --- log.format = "json" -----------------------------------------------------------


async def test_json_access_line_has_every_field_and_escapes_client_values(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    upstream = FakeRegistry()
    data = b"j" * 70_000
    digest = upstream.add_blob(data)
    served = await start(upstream, log_format="json")
    path = served.blob_path(digest)
    assert (await fetch(served, path))[0] == 200
    await served.settle()
    # A tab (allowed in a header value), a quote, a backslash and raw bytes.
    agent = b'ev"il\\ \t\x80caf\xc3\xa9'
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + b"User-Agent: "
        + agent
        + b"\r\n\r\n"
    )
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(data)

    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in access_records(caplog)]
    assert len(lines) == 2, lines
    for line in lines:
        assert all(" " <= c <= "~" for c in line), repr(line)  # no \n either
    miss, hit = (json.loads(line) for line in lines)
    assert set(ACCESS_FIELDS) | {"time", "level", "logger", "message"} == set(hit)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", hit["time"])
    assert (hit["level"], hit["logger"]) == ("info", "mirror.access")
    assert hit["message"] == f"GET {path} 200"
    assert {k: hit[k] for k in ("remote", "method", "path", "proto", "status")} == {
        "remote": "127.0.0.1",
        "method": "GET",
        "path": path,
        "proto": "HTTP/1.1",
        "status": 200,
    }
    assert (miss["bytes"], miss["cache"]) == (len(data), "miss")
    assert (hit["bytes"], hit["cache"], hit["registry"]) == (
        len(data),
        "hit",
        "docker.io",
    )
    assert isinstance(hit["duration_s"], float)
    assert 0 <= hit["duration_s"] < 60
    assert re.fullmatch(r"[0-9a-f]{16}", hit["request_id"])
    # The value as aiohttp decoded it (raw bytes as surrogate escapes).
    assert hit["user_agent"] == agent.decode("utf-8", "surrogateescape")


def test_json_lines_carry_exceptions_as_one_string() -> None:
    record = logging.LogRecord(
        "mirror.x", logging.ERROR, __file__, 1, "a %s", ("b",), None
    )
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["message"]) == ("error", "a b")
    assert entry["exception"].startswith("Traceback")
    assert entry["exception"].endswith("ValueError: bad\nthing")


# --- SIGHUP: each changed key, with its old and new value ------------------------


async def test_reload_logs_each_change_at_warning_with_human_units(
    start: ServeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mirror_level: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    served = await start(
        registries="ghcr.io", registry_ghcr_io_url="http://127.0.0.1:1"
    )
    secret, new_secret = "s3cret-Before", "s3cret-After"
    password_file = tmp_path / "password"
    password_file.write_text(new_secret + "\n")

    def write(body: str) -> Path:
        path = tmp_path / "mirror.toml"
        path.write_text(body)
        return path

    upstream = served.config.upstream.url
    before = write(
        f'[upstream]\nurl = "{upstream}"\nusername = "u"\npassword = "{secret}"\n'
        f'[cache]\ndir = "{served.config.cache.dir}"\ntag_ttl = "10m"\n'
        'max_size = "50GiB"\nlow_watermark = "90%"\n'
        '[log]\nlevel = "info"\n'
        '[registries."ghcr.io"]\nurl = "http://127.0.0.1:1"\ntag_ttl = "5m"\n'
    )
    apply = served.app[RELOAD]
    reload_config(apply, before)  # from the start fixture's config to this one
    mark = len(caplog.records)

    after = write(
        f'[upstream]\nurl = "{upstream}"\nusername = "u"\n'
        f'password_file = "{password_file}"\n'
        f'[cache]\ndir = "{served.config.cache.dir}"\ntag_ttl = "1m"\n'
        'max_size = "20GiB"\nlow_watermark = "80%"\n'
        "[server]\nmax_connections = 100\n"
        '[log]\nlevel = "warning"\n'
        '[registries."ghcr.io"]\nurl = "http://127.0.0.1:1"\ntag_ttl = "90s"\n'
    )
    reload_config(apply, after)
    # log.level = warning now: what is left must still show what changed.
    assert logging.getLogger("mirror").getEffectiveLevel() == logging.WARNING
    records = [r for r in caplog.records[mark:] if r.name.startswith("mirror")]
    assert all(r.levelno >= logging.WARNING for r in records)
    lines = [r.getMessage() for r in records]
    assert set(lines) >= {
        'reload: registries."ghcr.io".tag_ttl: 5m -> 1m30s',
        "reload: cache.tag_ttl: 10m -> 1m",
        "reload: cache.max_size: 50GiB -> 20GiB",
        "reload: cache.low_watermark: 90% -> 80%",
        "reload: log.level: info -> warning",
        "reload: server.max_connections: 2048 -> 100 (takes effect after a restart)",
        "reload: upstream.password: changed (secret, not shown) "
        "(takes effect after a restart)",
        f"reload: upstream.password_file: none -> {password_file} "
        "(takes effect after a restart)",
    }, lines
    summary = [line for line in lines if line.startswith("configuration reloaded")]
    assert summary == [
        f"configuration reloaded from {after}; changed, but takes effect only after "
        "a restart: server.max_connections, upstream.password, upstream.password_file"
    ]
    # Neither password was ever logged, by either reload.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "upstream.password: changed (secret, not shown)" in text
    assert secret not in text
    assert new_secret not in text
    # And the live changes applied.
    assert served.app[EVICTOR].max_size == 20 * 1024**3


# --- a TLS handshake on the plain-HTTP port --------------------------------------


async def tls_attempt(port: int) -> tuple[type[BaseException] | None, bytes]:
    """A real TLS client (Python's ssl) connecting to the plain port: what the
    handshake raised, and the bytes it received afterwards (raw)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    error: type[BaseException] | None = None
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
        writer.close()
    except (ssl.SSLError, ConnectionError) as exc:
        error = type(exc)
    # The same ClientHello bytes over a raw socket: the answer, then EOF.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(outgoing.read())
    async with asyncio.timeout(5):
        answer = await reader.read()  # to EOF: the server closed
    writer.close()
    return error, answer


async def test_tls_handshakes_on_the_plain_port_are_closed_counted_and_quiet(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="mirror")
    served = await start()
    attempts = [await tls_attempt(served.port) for _ in range(3)]
    for error, answer in attempts:
        assert error is not None  # the handshake failed
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
        assert b"use http://" in answer
    # Two connections per attempt, each a ClientHello.
    await served.until(
        "mirror_http_bad_requests_total", 6, within=5, reason="tls_on_plain"
    )
    assert served.sample("mirror_http_bad_requests_total", reason="malformed") == 0
    assert access_records(caplog) == []
    noted = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(noted) == 1, [r.getMessage() for r in noted]
    assert noted[0].levelno == logging.INFO
    assert "from 127.0.0.1" in noted[0].getMessage()
    assert "http://" in noted[0].getMessage()
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]
    # Plain HTTP still works, and is logged.
    assert (await fetch(served, "/v2/"))[0] == 200
    assert len(access_records(caplog)) == 1


async def test_malformed_requests_are_counted(start: ServeFactory) -> None:
    served = await start()
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400 ")  # aiohttp's, as an OCI error
        assert b'"BAD_REQUEST"' in answer
    await served.until(
        "mirror_http_bad_requests_total", 2, within=5, reason="malformed"
    )
