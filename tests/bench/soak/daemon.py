"""The mirror under soak: ``python -m mirror serve`` with short timeouts.

This module owns the soak's mirror configuration (``MirrorSettings``: a
small cache so eviction runs, fewer download slots than clients so the
queue fills, short send, header and upstream timeouts so stalls are cut
within the run) and the process running it. The integration harness's
``MirrorProcess`` can only add to ``[cache]`` and ``[upstream]``; the soak
needs ``[server]`` keys too, so it writes the whole file itself and reuses
the harness's ``ManagedProcess`` to run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.integration.mirror_process import launch, toml_string
from tests.integration.tools import ManagedProcess


@dataclass(frozen=True)
class MirrorSettings:
    """The keys the soak sets; everything else is mirror's default."""

    max_size: str = "64MiB"
    max_downloads: int = 16
    send_timeout: str = "5s"
    header_timeout: str = "5s"
    read_timeout: str = "5s"
    first_byte_timeout: str = "5s"
    connect_timeout: str = "2s"
    down_backoff: str = "2s"
    tag_ttl: str = "10s"
    eviction_interval: str = "5s"
    log_level: str = "info"

    def toml(self, *, port: int, upstream_url: str, cache_dir: Path) -> str:
        return f"""\
[server]
listen = {toml_string(f"127.0.0.1:{port}")}
send_timeout = "{self.send_timeout}"
header_timeout = "{self.header_timeout}"

[upstream]
url = {toml_string(upstream_url)}
max_downloads = {self.max_downloads}
read_timeout = "{self.read_timeout}"
first_byte_timeout = "{self.first_byte_timeout}"
connect_timeout = "{self.connect_timeout}"
down_backoff = "{self.down_backoff}"

[cache]
dir = {toml_string(str(cache_dir))}
max_size = "{self.max_size}"
tag_ttl = "{self.tag_ttl}"
eviction_interval = "{self.eviction_interval}"

[log]
level = "{self.log_level}"
access_log = false
"""


@dataclass
class SoakMirror:
    """One mirror process with its cache, config and log under ``workdir``."""

    upstream_url: str
    workdir: Path
    settings: MirrorSettings
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mirror.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mirror.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, timeout: float = 20.0, attempts: int = 3) -> None:
        """Start it and wait for ``GET /v2/`` to answer 200, on a fresh port
        if the chosen one was taken. Raises ProcessDied or TimeoutError."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.process, self.port = launch(
            lambda port: self.settings.toml(
                port=port, upstream_url=self.upstream_url, cache_dir=self.cache_dir
            ),
            config_path=self.config_path,
            log_path=self.log_path,
            timeout=timeout,
            attempts=attempts,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, *, timeout: float = 40.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``: mirror gives in-flight
        requests 30 s); returns the exit status."""
        if self.process is None:
            return None
        return self.process.stop(timeout=timeout)

    def log_text(self) -> str:
        return "" if self.process is None else self.process.log_text(limit=None)
