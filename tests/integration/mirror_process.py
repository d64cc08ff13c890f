"""Run the mirror daemon under test as a real subprocess.

This module owns ``MirrorProcess``: it writes a TOML config pointing at an
upstream, starts ``python -m mirror serve --config FILE`` from the repository
root with the interpreter running pytest, waits for ``GET /v2/`` to answer
200, and stops it with SIGTERM. The daemon's output goes to a log file that
fixtures attach to failing tests.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .tools import ManagedProcess, ProcessDied, free_port, http_status

REPO_ROOT = Path(__file__).resolve().parents[2]


def toml_string(value: str) -> str:
    """Quote ``value`` as a TOML basic string (paths, URLs)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def mirror_config(
    *, port: int, upstream_url: str, cache_dir: Path, extra: str, upstream: str = ""
) -> str:
    return (
        "[server]\n"
        f"listen = {toml_string(f'127.0.0.1:{port}')}\n"
        "\n[upstream]\n"
        f"url = {toml_string(upstream_url)}\n"
        f"{upstream}"
        "\n[cache]\n"
        f"dir = {toml_string(str(cache_dir))}\n"
        f"{extra}"
    )


def mirror_environment() -> dict[str, str]:
    """The test process's environment minus ``MIRROR_*`` variables.

    Every config key can be overridden by a ``MIRROR_<SECTION>_<KEY>``
    variable, and unknown ones are fatal, so a stray variable in a
    developer's shell must not leak into the daemon under test.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MIRROR_")
    }


def launch(
    render: Callable[[int], str],
    *,
    config_path: Path,
    log_path: Path,
    timeout: float,
    attempts: int = 3,
) -> tuple[ManagedProcess, int]:
    """Write ``render(port)`` to ``config_path`` for a free port, start
    ``python -m mirror serve --config`` on it and wait until ``GET /v2/``
    returns 200; returns the process and its port.

    Retries on a fresh port if the child dies (most likely a port taken
    between choosing and binding it); raises ProcessDied or TimeoutError
    carrying the mirror's output otherwise.
    """
    for attempt in range(attempts):
        port = free_port()
        config_path.write_text(render(port))
        process = ManagedProcess(
            name="mirror",
            argv=[
                sys.executable,
                "-m",
                "mirror",
                "serve",
                "--config",
                str(config_path),
            ],
            log_path=log_path,
            cwd=REPO_ROOT,
            env=mirror_environment(),
        )
        process.start()
        base = f"http://127.0.0.1:{port}/v2/"
        try:
            process.wait_ready(
                functools.partial(_answers_200, base),
                timeout=timeout,
                what="GET /v2/ returned 200",
            )
            return process, port
        except ProcessDied:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _answers_200(url: str) -> bool:
    return http_status(url) == 200


@dataclass
class MirrorProcess:
    """One ``python -m mirror serve`` child with its own cache directory.

    ``extra_toml`` is appended verbatim to the generated config, right after
    ``[cache] dir``: plain ``key = value`` lines land in ``[cache]``, and
    later ``[section]`` headers start other tables. ``upstream_toml`` lines
    land in ``[upstream]`` (a TOML table cannot be opened twice).
    """

    upstream_url: str
    workdir: Path
    extra_toml: str = ""
    upstream_toml: str = ""
    port: int = 0
    process: ManagedProcess | None = None
    cache_dir: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cache_dir = self.workdir / "cache"
        self.config_path = self.workdir / "mirror.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mirror.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 15.0, attempts: int = 3) -> None:
        """Start the mirror and wait until ``GET /v2/`` returns 200.

        Retries on a fresh port if the child dies (most likely a port taken
        between choosing and binding it); raises ProcessDied or TimeoutError
        carrying the mirror's output otherwise.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        self.process, self.port = launch(
            lambda port: mirror_config(
                port=port,
                upstream_url=self.upstream_url,
                cache_dir=self.cache_dir,
                extra=self.extra_toml,
                upstream=self.upstream_toml,
            ),
            config_path=self.config_path,
            log_path=self.log_path,
            timeout=timeout,
            attempts=attempts,
        )

    def stop(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM the mirror (SIGKILL after ``timeout``); return its status."""
        if self.process is None:
            return None
        return self.process.stop(timeout=timeout)

    def mark(self) -> int:
        assert self.process is not None
        return self.process.log_size()

    def log_text(self, since: int = 0) -> str:
        return "" if self.process is None else self.process.log_text(since=since)
