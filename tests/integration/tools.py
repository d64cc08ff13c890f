"""Find external binaries and run child processes with bounded lifetimes.

This module owns two things every integration fixture needs:

* ``require_tool``: locate a binary, skipping the test when it is missing on a
  developer machine but failing it when ``CI=true``, so CI can never go green
  by silently skipping the real-client tests.
* ``ManagedProcess``: a long-running child (registry, mirror, dockerd,
  containerd) whose output goes to a log file, which is started in its own
  session and stopped with SIGTERM, then SIGKILL after a timeout.

Plus ``run``, an async subprocess runner with a timeout for one-shot client
commands (skopeo, ctr, podman), and ``ClosedPort``, where clients that fall
back to the real registry (dockerd, containerd, podman) are sent instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

# Debian ships dockerd in /usr/sbin, which is not on every user's PATH.
EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def in_ci() -> bool:
    """True when missing tools must fail tests instead of skipping them."""
    return os.environ.get("CI", "").lower() == "true"


def find_tool(name: str) -> str | None:
    """Return the absolute path of ``name``, or None if it is not installed."""
    found = shutil.which(name)
    if found is None:
        search = os.pathsep.join(EXTRA_PATH)
        found = shutil.which(name, path=search)
    return found


def require_tool(name: str, *, prefer: str | None = None) -> str:
    """Return the path of a required binary or end the test.

    ``prefer`` is a path to use when it exists (e.g. Debian's
    ``/usr/sbin/dockerd`` over another dockerd on PATH); otherwise ``name``
    is looked up on PATH and the sbin directories. A missing tool skips the
    test, or fails it when ``CI=true``; ``pytest.skip``/``pytest.fail`` raise,
    so the return value is always a usable path.
    """
    if prefer is not None and os.access(prefer, os.X_OK):
        return prefer
    found = find_tool(name)
    if found is None:
        reason = f"required tool {name!r} not found on PATH or {EXTRA_PATH}"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: missing tools are failures)")
        pytest.skip(reason)
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    There is a window between closing this socket and the child binding the
    port; callers retry start-up on a fresh port if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ClosedPort:
    """A loopback port that refuses every connection, held for as long as
    this object is open.

    Daemons that fall back to the real registry when the mirror fails
    (dockerd, containerd, podman) are pointed here: as their HTTP(S) proxy,
    and as the fallback ``server`` in containerd's ``hosts.toml``. The port
    is bound but never listened on, so a connection is refused at once (a
    fallback fails fast instead of reaching the internet) and no other
    process can take the port meanwhile.
    """

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with every proxy
        variable naming this port, except for 127.0.0.0/8."""
        env = dict(os.environ if base is None else base)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = self.url
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.0/8,localhost"
        return env

    def close(self) -> None:
        self._socket.close()


def http_status(
    url: str, *, timeout: float = 2.0, context: ssl.SSLContext | None = None
) -> int | None:
    """Return the status of a GET to ``url``, or None if nothing answered
    (a refused TLS handshake included). ``context`` is the client's TLS for
    an ``https://`` URL: the CA it trusts, the certificate it presents."""
    # No proxies: urllib would send even 127.0.0.1 through $http_proxy.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    direct = urllib.request.build_opener(*handlers)
    try:
        with direct.open(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


class ProcessDied(RuntimeError):
    """The child exited while we were waiting for it to become ready."""


@dataclass
class ManagedProcess:
    """A child process whose stdout and stderr go to ``log_path``.

    The child gets its own session so SIGTERM reaches it and not pytest, and
    so stopping it never touches any process we did not start.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the child. Raises OSError if the binary cannot be executed."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append mode: both streams share one offset, so lines never overwrite
        # each other, and byte offsets into the file stay valid as marks.
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=None if self.env is None else dict(self.env),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self, *, since: int = 0, limit: int | None = 20_000) -> str:
        """Return the log from byte offset ``since``, trimmed to its tail
        (for showing to people; ``limit=None`` for the whole of it)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                data = log.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", "replace")
        if limit is not None and len(text) > limit:
            text = "[...]\n" + text[-limit:]
        return text

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_ready(
        self, ready: Callable[[], bool], *, timeout: float, what: str
    ) -> None:
        """Poll ``ready`` until it returns True.

        Raises ProcessDied if the child exits first and TimeoutError when
        ``timeout`` seconds pass; both messages carry the child's log.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.popen is None else self.popen.returncode
                raise ProcessDied(
                    f"{self.name} exited with {code} before {what}; log:\n"
                    f"{self.log_text()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name} not ready ({what}) after {timeout}s; log:\n{self.log_text()}"
        )

    def stop(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM the child, SIGKILL it after ``timeout`` s; return its status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        # Children of the child (dockerd's containerd, containerd's shims)
        # share its session; reap any that outlived their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


@dataclass(frozen=True)
class Completed:
    """The outcome of a one-shot command run by ``run``."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit status {self.returncode}\n"
            f"--- stdout\n{self.stdout[-8000:]}\n--- stderr\n{self.stderr[-8000:]}"
        )


async def run(
    *argv: str | Path,
    time_limit: float = 60.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run a command to completion without blocking the event loop.

    Kills the command after ``time_limit`` seconds and fails the test; with
    ``check`` a non-zero exit fails the test with the command's output.
    """
    args = tuple(str(arg) for arg in argv)
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), time_limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"timed out after {time_limit}s: {' '.join(args)}")
    result = Completed(
        argv=args,
        returncode=process.returncode if process.returncode is not None else -1,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        pytest.fail(result.describe())
    return result
