"""Run the mirror daemon under test as a real subprocess.

This module owns ``MirrorProcess``: it writes a TOML config pointing at an
upstream, starts ``python -m mirror serve --config FILE`` from the repository
root with the interpreter running pytest, waits for ``GET /v2/`` to answer
200, and stops it with SIGTERM. The daemon's output goes to a log file that
fixtures attach to failing tests.

Given ``tls`` (the files of a test CA's server certificate) it serves HTTPS
(``[server] tls_cert`` / ``tls_key``), and with ``client_ca`` it requires
client certificates; the readiness probe then speaks HTTPS, trusting the CA
and presenting ``client_cert``. A mirror requiring passwords
(``[auth] htpasswd``) answers ``/v2/`` 401 once it serves; ``ready_status``
says which answer the probe waits for.
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.tls import TlsFiles

from .tools import ManagedProcess, ProcessDied, free_port, http_status

REPO_ROOT = Path(__file__).resolve().parents[2]


def toml_string(value: str) -> str:
    """Quote ``value`` as a TOML basic string (paths, URLs)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def mirror_config(
    *,
    port: int,
    upstream_url: str,
    cache_dir: Path,
    extra: str,
    upstream: str = "",
    server: str = "",
) -> str:
    """The generated config; ``server`` lines land in ``[server]``,
    ``upstream`` ones in ``[upstream]`` and ``extra`` after ``[cache] dir``."""
    return (
        "[server]\n"
        f"listen = {toml_string(f'127.0.0.1:{port}')}\n"
        f"{server}"
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


def client_context(
    ca_file: Path, client_cert: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting ``ca_file`` (and the system store) and,
    for mTLS, presenting ``client_cert`` (certificate file, key file)."""
    context = ssl.create_default_context(cafile=ca_file)
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    return context


def launch(
    render: Callable[[int], str],
    *,
    config_path: Path,
    log_path: Path,
    timeout: float,
    attempts: int = 3,
    ca_file: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
    ready_status: int = 200,
) -> tuple[ManagedProcess, int]:
    """Write ``render(port)`` to ``config_path`` for a free port, start
    ``python -m mirror serve --config`` on it and wait until ``GET /v2/``
    returns ``ready_status`` (200; 401 for a mirror requiring passwords);
    returns the process and its port.

    With ``ca_file`` the mirror is expected to serve HTTPS: the probe asks
    ``https://127.0.0.1:PORT/v2/`` trusting that CA, presenting
    ``client_cert`` (certificate file, key file) if given. Without it the
    probe is plain HTTP, as before.

    Retries on a fresh port if the child dies (most likely a port taken
    between choosing and binding it); raises ProcessDied or TimeoutError
    carrying the mirror's output otherwise.
    """
    context = None if ca_file is None else client_context(ca_file, client_cert)
    scheme = "http" if context is None else "https"
    for attempt in range(attempts):
        port = free_port()
        config_path.write_text(render(port))
        process = serve_process(config_path, log_path)
        process.start()
        base = f"{scheme}://127.0.0.1:{port}/v2/"
        try:
            process.wait_ready(
                functools.partial(_answers, base, ready_status, context),
                timeout=timeout,
                what=f"GET {base} returned {ready_status}",
            )
            return process, port
        except ProcessDied:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def serve_process(config_path: Path, log_path: Path) -> ManagedProcess:
    """``python -m mirror serve --config config_path``, not started yet."""
    return ManagedProcess(
        name="mirror",
        argv=[sys.executable, "-m", "mirror", "serve", "--config", str(config_path)],
        log_path=log_path,
        cwd=REPO_ROOT,
        env=mirror_environment(),
    )


def _answers(url: str, status: int, context: ssl.SSLContext | None = None) -> bool:
    return http_status(url, context=context) == status


@dataclass
class MirrorProcess:
    """One ``python -m mirror serve`` child with its own cache directory.

    ``extra_toml`` is appended verbatim to the generated config, right after
    ``[cache] dir``: plain ``key = value`` lines land in ``[cache]``, and
    later ``[section]`` headers start other tables. ``upstream_toml`` lines
    land in ``[upstream]`` and ``server_toml`` ones in ``[server]`` (a TOML
    table cannot be opened twice).

    ``tls`` makes it serve HTTPS with that certificate (``url`` is then
    ``https://``), ``client_ca`` makes it require client certificates, and
    ``client_cert`` is what the readiness probe presents then.
    ``ready_status`` is the ``GET /v2/`` answer that means it serves: 200,
    or 401 when ``extra_toml`` sets ``[auth] htpasswd``.
    """

    upstream_url: str
    workdir: Path
    extra_toml: str = ""
    upstream_toml: str = ""
    server_toml: str = ""
    tls: TlsFiles | None = None
    client_ca: Path | None = None
    client_cert: tuple[Path, Path] | None = None
    ready_status: int = 200
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
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _server_lines(self) -> str:
        lines = self.server_toml
        if self.tls is not None:
            lines += (
                f"tls_cert = {toml_string(str(self.tls.cert_file))}\n"
                f"tls_key = {toml_string(str(self.tls.key_file))}\n"
            )
        if self.client_ca is not None:
            lines += f"client_ca = {toml_string(str(self.client_ca))}\n"
        return lines

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context for this mirror: trusting its CA, presenting
        ``client_cert`` if set. Only for a mirror with ``tls``."""
        assert self.tls is not None, "this mirror serves plain HTTP"
        return client_context(self.tls.ca_file, self.client_cert)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 15.0, attempts: int = 3) -> None:
        """Start the mirror and wait until ``GET /v2/`` returns
        ``ready_status``.

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
                server=self._server_lines(),
            ),
            config_path=self.config_path,
            log_path=self.log_path,
            timeout=timeout,
            attempts=attempts,
            ca_file=None if self.tls is None else self.tls.ca_file,
            client_cert=self.client_cert,
            ready_status=self.ready_status,
        )

    def restart(self, *, timeout: float = 30.0) -> None:
        """Start the mirror again from its config file, after it stopped or
        was killed: same port, same cache dir. Waits like start()."""
        scheme = "http" if self.tls is None else "https"
        context = None if self.tls is None else self.client_context()
        base = f"{scheme}://127.0.0.1:{self.port}/v2/"
        self.process = serve_process(self.config_path, self.log_path)
        self.process.start()
        self.process.wait_ready(
            functools.partial(_answers, base, self.ready_status, context),
            timeout=timeout,
            what=f"GET {base} returned {self.ready_status} after the restart",
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
