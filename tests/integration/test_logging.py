"""The log of a real `mirror serve`: when it says "listening", what a SIGHUP
reports, JSON lines under a real client, and skopeo's TLS probes.

* A port already taken: exit status 1, the reason, and no "listening".
* Start-up after a crash: reconciliation and the "mirroring" lines come
  before "listening", which names the bound address.
* SIGHUP: each changed key with its old and new value, at a level that
  `log.level = "warning"` still shows, and never a password.
* `log.format = "json"` under a skopeo pull: every line is a JSON object;
  the blob lines carry the blob's full size, hit or miss, and the request
  id; skopeo's https:// attempts (TLS verification off) leave no access
  line, one INFO line and a counter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from .conftest import MirrorFactory, Publisher, unique
from .mirror_process import (
    REPO_ROOT,
    MirrorProcess,
    mirror_config,
    mirror_environment,
    toml_string,
)
from .skopeo import Skopeo
from .tools import free_port
from .upstream import Upstream

# Nothing is asked of this upstream before a client pulls.
UNUSED_UPSTREAM = "http://127.0.0.1:9"


def serve_once(
    config: Path, *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`mirror serve --config` to its end (it must end by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        cwd=REPO_ROOT,
        env=mirror_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(
    mirror: MirrorProcess, text: str, *, since: int, within: float = 10.0
) -> str:
    """The mirror's log from `since`, once `text` is in it."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        log = full_log(mirror, since)
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(
        f"{text!r} not logged within {within}s:\n{mirror.log_text(since=since)}"
    )


def full_log(mirror: MirrorProcess, since: int = 0) -> str:
    assert mirror.process is not None
    return mirror.process.log_text(since=since, limit=None)


def test_a_taken_port_fails_without_claiming_to_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mirror.toml"
        config.write_text(
            mirror_config(
                port=port,
                upstream_url=UNUSED_UPSTREAM,
                cache_dir=tmp_path / "cache",
                extra="",
            )
        )
        result = serve_once(config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    reason = f"cannot listen on server.listen 127.0.0.1:{port}: Address already in use"
    assert f"mirror: {reason}\n" in result.stderr, output
    assert " listening on " not in output, output
    assert "Traceback" not in output, output


def test_a_taken_port_is_reported_in_json_with_log_format_json(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mirror.toml"
        config.write_text(
            mirror_config(
                port=port,
                upstream_url=UNUSED_UPSTREAM,
                cache_dir=tmp_path / "cache",
                extra='[log]\nformat = "json"\n',
            )
        )
        result = serve_once(config)
    assert result.returncode == 1, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries[-1]["level"] == "error", entries
    assert entries[-1]["message"] == (
        f"cannot listen on server.listen 127.0.0.1:{port}: Address already in use"
    )
    assert not [e for e in entries if " listening on " in e["message"]], entries


def test_a_taken_admin_port_fails_without_claiming_to_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        config = tmp_path / "mirror.toml"
        config.write_text(
            mirror_config(
                port=free_port(),
                upstream_url=UNUSED_UPSTREAM,
                cache_dir=tmp_path / "cache",
                extra="",
                server=f"admin_listen = {toml_string(f'127.0.0.1:{admin}')}\n",
            )
        )
        result = serve_once(config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot listen on server.admin_listen 127.0.0.1:{admin}" in result.stderr
    assert " listening on " not in output, output


def test_listening_comes_after_reconciliation_and_names_the_bound_port(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "mirror"
    # A blob file without a database row, as a crash between the rename and
    # the commit leaves it: start-up adopts it.
    data = b"left by a crash" * 1000
    hex_digest = hashlib.sha256(data).hexdigest()
    stray = workdir / "cache" / "blobs" / "sha256" / hex_digest[:2] / hex_digest
    stray.parent.mkdir(parents=True)
    stray.write_bytes(data)
    admin = free_port()
    mirror = MirrorProcess(
        upstream_url=UNUSED_UPSTREAM,
        workdir=workdir,
        server_toml=f"admin_listen = {toml_string(f'127.0.0.1:{admin}')}\n",
    )
    mirror.start()
    try:
        log = wait_for(mirror, "listening on", since=0)
        listening = log.index(f"listening on 127.0.0.1:{mirror.port} (http)")
        reconciled = log.index("reconciled the cache with its database")
        assert "1 files adopted" in log[reconciled:listening]
        mirroring = log.index(f"mirroring docker.io from {UNUSED_UPSTREAM}")
        admin_line = log.index(f"on 127.0.0.1:{admin} (http)")
        assert reconciled < mirroring < admin_line < listening, log
        assert log.count(" listening on ") == 1, log
    finally:
        assert mirror.stop() == 0


def test_sighup_logs_each_change_with_old_and_new_values(tmp_path: Path) -> None:
    password = "pw-" + os.urandom(6).hex()

    def config(tag_ttl: str, level: str, secret: str, connections: int) -> str:
        return mirror_config(
            port=mirror.port,
            upstream_url=UNUSED_UPSTREAM,
            cache_dir=mirror.cache_dir,
            server=f"max_connections = {connections}\n",
            upstream=f'username = "u"\npassword = {toml_string(secret)}\n',
            extra=f'tag_ttl = "{tag_ttl}"\nmax_size = "2GiB"\n'
            f'[log]\nlevel = "{level}"\n',
        )

    mirror = MirrorProcess(
        upstream_url=UNUSED_UPSTREAM,
        workdir=tmp_path / "mirror",
        server_toml="max_connections = 500\n",
        upstream_toml=f'username = "u"\npassword = {toml_string(password)}\n',
        extra_toml='tag_ttl = "10m"\nmax_size = "2GiB"\n[log]\nlevel = "info"\n',
    )
    mirror.start()
    try:
        assert mirror.process is not None
        mirror.config_path.write_text(config("1m", "warning", password + "2", 100))
        mark = mirror.mark()
        os.kill(mirror.process.pid, signal.SIGHUP)
        log = wait_for(mirror, "configuration reloaded", since=mark)
        lines = [line.split(": ", 1)[1] for line in log.splitlines() if ": " in line]
        assert "reload: cache.tag_ttl: 10m -> 1m" in lines, log
        assert "reload: log.level: info -> warning" in lines, log
        assert (
            "reload: server.max_connections: 500 -> 100 (takes effect after a restart)"
            in lines
        ), log
        assert (
            "reload: upstream.password: changed (secret, not shown) "
            "(takes effect after a restart)" in lines
        ), log
        assert re.search(
            r" WARNING mirror: configuration reloaded from .*mirror\.toml; changed, "
            r"but takes effect only after a restart: server\.max_connections, "
            r"upstream\.password$",
            log,
            re.MULTILINE,
        ), log
        assert "max_size" not in log  # unchanged keys are not listed

        # At log.level = warning, the next reload is still reported.
        mirror.config_path.write_text(config("2m", "warning", password + "2", 100))
        mark = mirror.mark()
        os.kill(mirror.process.pid, signal.SIGHUP)
        log = wait_for(mirror, "configuration reloaded", since=mark)
        assert "reload: cache.tag_ttl: 1m -> 2m" in log, log
        assert password not in full_log(mirror)
    finally:
        assert mirror.stop() == 0


async def test_json_log_under_a_skopeo_pull(
    mirror_factory: MirrorFactory,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    published = await publish.image(unique("library/logs-"), layer_sizes=[2_000_000])
    mirror = mirror_factory(upstream.url, extra_toml='[log]\nformat = "json"\n')
    reference = f"{published.repository}:{published.tag}"
    first = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "first")
    second = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "second")
    assert first.blobs == second.blobs
    sizes = {digest: len(data) for digest, data in first.blobs.items()}
    async with http.get(f"{mirror.url}/metrics") as resp:
        metrics = await resp.text()
    assert mirror.stop() == 0

    entries = []
    for line in full_log(mirror).splitlines():
        assert all(" " <= char <= "~" for char in line), line
        entries.append(json.loads(line))
    assert entries, "nothing logged"
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    access = [e for e in entries if e["logger"] == "mirror.access"]
    blobs = [e for e in access if "/blobs/" in e["path"] and e["method"] == "GET"]
    by_digest: dict[str, list[tuple[str, int]]] = {}
    for entry in blobs:
        digest = entry["path"].rsplit("/", 1)[1]
        by_digest.setdefault(digest, []).append((entry["cache"], entry["bytes"]))
        assert entry["registry"] == "docker.io"
        assert entry["status"] == 200
        assert re.fullmatch(r"[0-9a-f]{16}", entry["request_id"])
        assert entry["user_agent"].startswith("skopeo/")
    # Each blob once from upstream, once from the cache, full size both times.
    assert by_digest == {
        digest: [("miss", size), ("hit", size)] for digest, size in sizes.items()
    }, by_digest
    # skopeo tried https:// first (TLS verification is off): no access line
    # for it, one quiet line, and a count.
    assert not [e for e in access if e["method"] not in ("GET", "HEAD")], access
    probes = [
        e for e in entries if "TLS handshake on the plain-HTTP port" in e["message"]
    ]
    assert len(probes) == 1, probes
    assert probes[0]["level"] == "info"
    match = re.search(
        r'^mirror_http_bad_requests_total\{reason="tls_on_plain"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert match is not None, metrics
    assert float(match.group(1)) >= 2  # one per pull at least
    listening = [e for e in entries if "listening on" in e["message"]]
    assert len(listening) == 1
