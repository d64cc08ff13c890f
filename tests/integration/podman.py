"""podman pulling through the mirror, with private storage and configuration.

This module owns ``Podman``: the podman CLI (no service; each command is one
process) with its own storage root, run root and temporary directory under a
short ``/tmp/mi-…`` directory, the ``vfs`` storage driver (no mounts needed,
so it works inside containers), and its own ``registries.conf``,
``containers.conf``, ``storage.conf`` and signature policy, so nothing in
``/etc/containers`` or ``/var/lib/containers`` is read or written.

``registries.conf`` gives each registry a mirror: ``[[registry]] prefix =
location = "ghcr.io"`` with ``[[registry.mirror]] location =
"127.0.0.1:PORT/ghcr.io"``, which makes podman ask the mirror for
``/v2/ghcr.io/owner/app/...``; Docker Hub's mirror has no path
(``127.0.0.1:PORT``), so ``docker.io/library/x`` becomes ``/v2/library/x``.
Mirrors are ``insecure``: podman tries HTTPS first, then plain HTTP. For a
mirror serving HTTPS they are not (``insecure=False``), and podman verifies
its certificate against the ``ca.crt`` of ``cert_dir`` (``--cert-dir``,
which applies to mirrors as to any registry; ``client.cert``/``client.key``
there are presented for mTLS).

podman falls back to the registry itself when every mirror fails; its
environment names a ``ClosedPort`` as the HTTP(S) proxy (loopback excepted),
so that fails at once instead of reaching the internet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .mirror_process import toml_string
from .tools import ClosedPort, Completed, run


def registries_conf(mirrors: Mapping[str, str], *, insecure: bool = True) -> str:
    """``registries.conf`` sending each registry (key) to its mirror
    location (value, ``host:port[/path]``); short names are not resolved.
    ``insecure`` mirrors may be plain HTTP or unverified HTTPS."""
    lines = ["unqualified-search-registries = []", 'short-name-mode = "disabled"']
    for registry, location in mirrors.items():
        lines += [
            "",
            "[[registry]]",
            f"prefix = {toml_string(registry)}",
            f"location = {toml_string(registry)}",
            "",
            "[[registry.mirror]]",
            f"location = {toml_string(location)}",
            f"insecure = {'true' if insecure else 'false'}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Podman:
    """One private podman configuration; ``close()`` when done."""

    binary: str
    directory: Path
    """A short directory of its own (``make_daemon_dir``), removed by the
    caller after ``close()``."""
    mirrors: Mapping[str, str]
    """Registry host -> mirror location, as in ``registries_conf``."""
    insecure: bool = True
    """False: the mirrors serve HTTPS, verified (see ``cert_dir``)."""
    cert_dir: Path | None = None
    """``--cert-dir`` for pulls: ``ca.crt`` (and ``client.cert``/``.key``)."""
    closed: ClosedPort = field(init=False)

    def __post_init__(self) -> None:
        self.closed = ClosedPort()
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        self._conf("registries.conf").write_text(
            registries_conf(self.mirrors, insecure=self.insecure)
        )
        self._conf("policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        # No credentials: podman insists that the file it is told of exists.
        self._conf("auth.json").write_text('{"auths": {}}')
        self._conf("storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {toml_string(str(self._root))}\n"
            f"runroot = {toml_string(str(self._runroot))}\n"
        )
        self._conf("containers.conf").write_text(
            f'[engine]\nevents_logger = "none"\ntmp_dir = {self._tmp_toml}\n'
        )

    @property
    def _root(self) -> Path:
        return self.directory / "root"

    @property
    def _runroot(self) -> Path:
        return self.directory / "run"

    @property
    def _tmp_toml(self) -> str:
        return toml_string(str(self.directory / "libpod-tmp"))

    def _conf(self, name: str) -> Path:
        return self.directory / name

    def environment(self) -> dict[str, str]:
        env = self.closed.environment()
        env.update(
            CONTAINERS_REGISTRIES_CONF=str(self._conf("registries.conf")),
            CONTAINERS_CONF=str(self._conf("containers.conf")),
            CONTAINERS_STORAGE_CONF=str(self._conf("storage.conf")),
            REGISTRY_AUTH_FILE=str(self._conf("auth.json")),
            # Where image layers are staged while pulling (else /var/tmp).
            TMPDIR=str(self.directory / "tmp"),
        )
        return env

    async def run(
        self, *args: str, time_limit: float = 90.0, check: bool = True
    ) -> Completed:
        return await run(
            self.binary,
            "--root",
            self._root,
            "--runroot",
            self._runroot,
            "--storage-driver",
            "vfs",
            "--tmpdir",
            self.directory / "libpod-tmp",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            *args,
            time_limit=time_limit,
            check=check,
            env=self.environment(),
        )

    async def pull(
        self,
        reference: str,
        *,
        time_limit: float = 90.0,
        check: bool = True,
        cert_dir: Path | None = None,
        authfile: Path | None = None,
    ) -> Completed:
        """``podman pull`` (the linux/amd64 image) through the mirrors, with
        ``cert_dir`` instead of the configured one if given, and the
        credentials of ``authfile`` (an ``auth.json``; default: one with
        none)."""
        cert_dir = cert_dir or self.cert_dir
        certs = [] if cert_dir is None else ["--cert-dir", str(cert_dir)]
        auth = [] if authfile is None else ["--authfile", str(authfile)]
        return await self.run(
            "pull",
            "--quiet",
            *certs,
            *auth,
            "--signature-policy",
            str(self._conf("policy.json")),
            "--platform",
            "linux/amd64",
            reference,
            time_limit=time_limit,
            check=check,
        )

    async def image_digest(self, reference: str) -> str:
        """The manifest digest podman recorded for a pulled image."""
        result = await self.run(
            "image", "inspect", "--format", "{{.Digest}}", reference
        )
        return result.stdout.strip()

    async def remove(self, reference: str) -> None:
        """``podman rmi``: the image, and its layers no other image uses."""
        await self.run("rmi", reference)

    def close(self) -> None:
        self.closed.close()
