"""skopeo as the push tool and as a pulling client.

This module owns ``Skopeo``: pushing generated layouts to a registry with
digests preserved, copying images from a registry (or the mirror) into a
``dir:`` directory, and reading such a directory back so tests can compare
the bytes they got with the bytes they generated.

skopeo needs a signature policy; ours accepts anything and lives in the
test's temporary directory, so nothing depends on /etc/containers.

Pulls and inspections speak plain HTTP (``--src-tls-verify=false``) unless
given a ``cert_dir``: then HTTPS, verified against the ``ca.crt`` in it and
presenting ``client.cert`` / ``client.key`` if there (containers/image's
certs.d convention, which podman's ``--cert-dir`` follows too;
``write_cert_dir`` makes one), and as ``credentials`` (``--src-creds`` /
``--creds``) when given.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .images import Layout
from .tools import Completed, run


@dataclass(frozen=True)
class DirImage:
    """What ``skopeo copy … dir:OUT`` wrote: manifests and blobs by digest."""

    manifest: bytes
    """The top-level manifest (or index), byte for byte as served."""
    child_manifests: dict[str, bytes]
    """For ``--all`` copies of an index: each child manifest by digest."""
    blobs: dict[str, bytes]
    """Config and layer blobs by digest, read from files named by hex."""

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def read_dir_image(path: Path) -> DirImage:
    """Read a ``dir:`` copy; each blob's name is its claimed sha256 hex."""
    blobs: dict[str, bytes] = {}
    children: dict[str, bytes] = {}
    for entry in path.iterdir():
        name = entry.name
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            blobs["sha256:" + name] = entry.read_bytes()
        elif name.endswith(".manifest.json") and len(name) == 64 + 14:
            children["sha256:" + name[:64]] = entry.read_bytes()
    return DirImage(
        manifest=(path / "manifest.json").read_bytes(),
        child_manifests=children,
        blobs=blobs,
    )


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_cert_dir(
    directory: Path, ca_file: Path, client: tuple[Path, Path] | None = None
) -> Path:
    """A containers/image cert directory: ``ca.crt`` (trusted for the
    server's certificate) and, for mTLS, ``client.cert`` + ``client.key``
    from ``client`` (certificate file, key file)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_file, directory / "ca.crt")
    if client is not None:
        shutil.copyfile(client[0], directory / "client.cert")
        shutil.copyfile(client[1], directory / "client.key")
    return directory


def _tls_flags(direction: str, cert_dir: Path | None) -> list[str]:
    """``--src-…``/``--dest-…``/``--…`` (``direction``) TLS flags: plain
    HTTP without a cert dir, verified HTTPS with one."""
    if cert_dir is None:
        return [f"--{direction}tls-verify=false"]
    return [f"--{direction}tls-verify=true", f"--{direction}cert-dir", str(cert_dir)]


def _creds_flags(direction: str, credentials: tuple[str, str] | None) -> list[str]:
    """``--src-creds``/``--dest-creds``/``--creds`` (``direction``) for
    ``credentials`` (username, password); none without."""
    if credentials is None:
        return []
    return [f"--{direction}creds", ":".join(credentials)]


@dataclass(frozen=True)
class Skopeo:
    """A skopeo binary plus the policy file it runs with."""

    binary: str
    policy_path: Path

    @classmethod
    def create(cls, binary: str, workdir: Path) -> Skopeo:
        workdir.mkdir(parents=True, exist_ok=True)
        policy = workdir / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        return cls(binary=binary, policy_path=policy)

    async def copy(
        self, *args: str | Path, time_limit: float = 90.0, check: bool = True
    ) -> Completed:
        return await run(
            self.binary,
            "--policy",
            self.policy_path,
            "copy",
            *args,
            time_limit=time_limit,
            check=check,
        )

    async def inspect_raw(
        self,
        reference: str,
        *,
        time_limit: float = 60.0,
        check: bool = True,
        cert_dir: Path | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> Completed:
        """``skopeo inspect --raw docker://<reference>``: the manifest's
        bytes as served, in ``stdout``. Over plain HTTP, or HTTPS with
        ``cert_dir`` (see ``write_cert_dir``); as ``credentials`` (username,
        password) if given."""
        return await run(
            self.binary,
            "--policy",
            self.policy_path,
            "inspect",
            "--raw",
            *_tls_flags("", cert_dir),
            *_creds_flags("", credentials),
            f"docker://{reference}",
            time_limit=time_limit,
            check=check,
        )

    async def push(
        self,
        layout: Layout,
        host: str,
        repository: str,
        tag: str,
        *,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """Copy a generated layout (every child of an index) to ``host``,
        as ``credentials`` (username, password) if given.

        ``--preserve-digests`` makes skopeo fail rather than rewrite a
        manifest, so the registry serves exactly the generated digests.
        """
        await self.copy(
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            *_creds_flags("dest-", credentials),
            layout.reference,
            f"docker://{host}/{repository}:{tag}",
        )

    async def pull_to_dir(
        self,
        host: str,
        reference: str,
        out: Path,
        *,
        all_images: bool = False,
        cert_dir: Path | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> DirImage:
        """Copy ``host/reference`` (``repo:tag`` or ``repo@digest``) to ``out``.

        With ``all_images`` an index is copied with all its children;
        otherwise skopeo picks the linux/amd64 child, like a daemon would.
        ``--preserve-digests`` guarantees ``out`` holds the served bytes.
        Plain HTTP, or HTTPS with ``cert_dir`` (see ``write_cert_dir``); as
        ``credentials`` (username, password) if given.
        """
        flags = ["--all"] if all_images else []
        await self.copy(
            "--quiet",
            "--preserve-digests",
            *_tls_flags("src-", cert_dir),
            *_creds_flags("src-", credentials),
            "--override-os",
            "linux",
            "--override-arch",
            "amd64",
            *flags,
            f"docker://{host}/{reference}",
            f"dir:{out}",
        )
        return read_dir_image(out)
