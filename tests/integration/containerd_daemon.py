"""A private containerd, and ``ctr`` commands that pull through the mirror.

This module owns ``Containerd``: a containerd with its own root, state and
short socket paths (the CRI plugin disabled, since nothing here runs pods),
plus a ``hosts.toml`` directory that makes ``docker.io`` (and any other
registries named) resolve through the mirror. ctr 1.6 reads that directory
with ``--hosts-dir``; an ``http://`` host in it needs no ``--plain-http``.
containerd appends ``?ns=<registry>`` to every request it sends to a mirror
host and does not ping ``/v2/``.

For a mirror serving HTTPS, ``hosts.toml`` names the CA that signed its
certificate (``ca``) and, when it requires client certificates, the one ctr
presents (``client = [["cert", "key"]]``); ctr reads both with the rest of
``--hosts-dir`` and verifies the mirror against that CA. A mirror requiring
a password gets it from a ``[host."<url>".header]`` table (``authorization =
"Basic …"``), which ctr sends with every request to that host.

When the mirror fails, containerd tries the ``server`` of ``hosts.toml``
next. That is a ``ClosedPort`` here, and so are the proxies in the daemon's
and ``ctr``'s environment, so a fallback fails at once instead of reaching
the real registry.

Pulls use the ``native`` snapshotter so unpacking works wherever the tests
run, including inside containers where overlay mounts are not allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .mirror_process import toml_string
from .tools import ClosedPort, Completed, ManagedProcess, run

SNAPSHOTTER = "native"


def containerd_config(directory: Path) -> str:
    return (
        "version = 2\n"
        f'root = "{directory / "root"}"\n'
        f'state = "{directory / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "\n[grpc]\n"
        f'  address = "{directory / "c.sock"}"\n'
        "\n[ttrpc]\n"
        f'  address = "{directory / "c.sock.ttrpc"}"\n'
    )


def hosts_toml(
    mirror_url: str,
    server: str,
    *,
    ca: Path | None = None,
    client: tuple[Path, Path] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Resolve and pull through ``mirror_url``; fall back to ``server``.

    ``ca``: the PEM CA an ``https://`` mirror's certificate is verified
    against; ``client``: (certificate, key) presented to a mirror requiring
    client certificates; ``headers``: sent with every request to the mirror
    (``authorization`` for one requiring a password).
    """
    text = (
        f'server = "{server}"\n'
        "\n"
        f'[host."{mirror_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    if ca is not None:
        text += f"  ca = {toml_string(str(ca))}\n"
    if client is not None:
        cert, key = (toml_string(str(path)) for path in client)
        text += f"  client = [[{cert}, {key}]]\n"
    if headers:
        text += f'\n  [host."{mirror_url}".header]\n'
        for name, value in headers.items():
            text += f"    {name} = {toml_string(value)}\n"
    return text


@dataclass
class Containerd:
    """One containerd daemon plus the ``ctr`` invocations tests need."""

    binary: str
    ctr: str
    directory: Path
    mirror_url: str
    registries: tuple[str, ...] = ("docker.io",)
    """Registries whose ``hosts.toml`` sends them through the mirror."""
    ca_file: Path | None = None
    """The CA of an ``https://`` mirror's certificate (``ca`` in hosts.toml)."""
    client_cert: tuple[Path, Path] | None = None
    """(certificate, key) ctr presents to the mirror (``client``)."""
    headers: Mapping[str, str] | None = None
    """Headers ctr sends the mirror (``header`` in hosts.toml)."""
    process: ManagedProcess | None = None
    socket_path: Path = field(init=False)
    hosts_dir: Path = field(init=False)
    closed: ClosedPort = field(init=False)

    def __post_init__(self) -> None:
        self.socket_path = self.directory / "c.sock"
        self.hosts_dir = self.directory / "hosts"
        self.closed = ClosedPort()

    def start(self, *, timeout: float = 20.0) -> None:
        """Start containerd and wait for its socket; raises with its log."""
        config = self.directory / "config.toml"
        config.write_text(containerd_config(self.directory))
        for registry in self.registries:
            host_dir = self.hosts_dir / registry
            host_dir.mkdir(parents=True, exist_ok=True)
            (host_dir / "hosts.toml").write_text(
                hosts_toml(
                    self.mirror_url,
                    self.closed.url,
                    ca=self.ca_file,
                    client=self.client_cert,
                    headers=self.headers,
                )
            )
        self.process = ManagedProcess(
            name="containerd",
            argv=[self.binary, "--config", str(config)],
            log_path=self.directory / "containerd.log",
            env=self.closed.environment(),
        )
        self.process.start()
        # The socket appears once the gRPC server listens; "serving..." for
        # the main address is logged just before.
        self.process.wait_ready(
            lambda: (
                self.socket_path.exists()
                and "containerd successfully booted" in self.process_log()
            ),
            timeout=timeout,
            what="containerd booted",
        )

    def process_log(self) -> str:
        return "" if self.process is None else self.process.log_text(limit=200_000)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20.0)
        self.closed.close()

    async def ctr_run(
        self, *args: str, time_limit: float = 90.0, check: bool = True
    ) -> Completed:
        return await run(
            self.ctr,
            "--address",
            str(self.socket_path),
            *args,
            time_limit=time_limit,
            check=check,
            # ctr itself fetches what it pulls: its fallback must fail too.
            env=self.closed.environment(),
        )

    def write_hosts(
        self,
        name: str,
        *,
        registry: str = "docker.io",
        ca: Path | None = None,
        client: tuple[Path, Path] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Path:
        """Another hosts directory, ``name``, sending ``registry`` to the
        mirror with these ``ca``, ``client`` and ``headers`` settings (for a
        ``pull`` configured differently from the daemon's own directory)."""
        directory = self.directory / name
        host_dir = directory / registry
        host_dir.mkdir(parents=True, exist_ok=True)
        (host_dir / "hosts.toml").write_text(
            hosts_toml(
                self.mirror_url,
                self.closed.url,
                ca=ca,
                client=client,
                headers=headers,
            )
        )
        return directory

    async def pull(
        self,
        reference: str,
        *extra: str,
        time_limit: float = 90.0,
        check: bool = True,
        hosts_dir: Path | None = None,
    ) -> Completed:
        """``ctr images pull`` through the mirror (``extra``: more flags),
        configured by ``hosts_dir`` (default: the daemon's, from start)."""
        return await self.ctr_run(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts_dir or self.hosts_dir),
            "--snapshotter",
            SNAPSHOTTER,
            *extra,
            reference,
            time_limit=time_limit,
            check=check,
        )

    async def image_digests(self) -> dict[str, str]:
        """Map each image reference to its target digest (``ctr images ls``)."""
        result = await self.ctr_run("images", "ls")
        images: dict[str, str] = {}
        # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS, after a header row.
        for line in result.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[2].startswith("sha256:"):
                images[parts[0]] = parts[2]
        return images

    async def content_digests(self) -> set[str]:
        """Digests of everything in the content store (``ctr content ls -q``)."""
        result = await self.ctr_run("content", "ls", "--quiet")
        return set(result.stdout.split())

    async def remove_image(self, reference: str) -> None:
        """Remove the image and garbage-collect its content synchronously."""
        await self.ctr_run("images", "rm", "--sync", reference)
