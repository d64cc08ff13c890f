"""What the soak's upstream serves: generated blobs and images.

This module owns the content: ``blobs`` random, incompressible blobs whose
sizes grow geometrically from ``min_size`` to ``max_size`` (so every order
of magnitude between them is covered about equally), spread over
``images`` repositories, each with one Docker schema 2 image tagged
``latest`` whose layers are that repository's blobs. Blob bytes are kept in
files under the work directory, so a client can check any byte range it
was served against the original (``Blob.read``).

The registry is seeded over its own HTTP API (a monolithic blob upload, a
manifest PUT), not with skopeo: the layers need not be real tar files for
a registry or for the mirror, and 200 uploads this way take seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.integration.images import MEDIA_TYPES

MANIFEST_TYPE = MEDIA_TYPES["docker"]["manifest"]
CONFIG_TYPE = MEDIA_TYPES["docker"]["config"]
LAYER_TYPE = MEDIA_TYPES["docker"]["layer"]
UPLOADS_AT_ONCE = 8


@dataclass(frozen=True)
class Blob:
    """One blob pushed upstream: where it lives and what it holds."""

    repository: str
    digest: str
    size: int
    path: Path

    def read(self, start: int, end: int) -> bytes:
        """The original bytes ``[start, end)``."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Image:
    """One image: its manifest bytes exactly as pushed."""

    repository: str
    tag: str
    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


@dataclass(frozen=True)
class Content:
    images: tuple[Image, ...]

    @property
    def blobs(self) -> list[Blob]:
        """Every layer (configs are tiny and left to the manifest clients)."""
        return [blob for image in self.images for blob in image.layers]

    @property
    def total_bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_sizes(count: int, min_size: int, max_size: int) -> list[int]:
    """``count`` sizes from ``min_size`` to ``max_size``, geometrically."""
    if count == 1:
        return [max_size]
    ratio = (max_size / min_size) ** (1 / (count - 1))
    return [round(min_size * ratio**number) for number in range(count)]


def generate(
    directory: Path,
    *,
    blobs: int,
    images: int,
    min_size: int,
    max_size: int,
    seed: str,
) -> Content:
    """Write every blob to ``directory`` and describe the images.

    Blob ``n`` goes to image ``n % images``, so every image has small and
    large layers. Plain blocking file writes: this runs before any client.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Test data, not secrets: a seeded generator makes digests repeatable.
    rng = random.Random(seed)  # noqa: S311
    layers: dict[int, list[Blob]] = {number: [] for number in range(images)}
    for number, size in enumerate(blob_sizes(blobs, min_size, max_size)):
        data = rng.randbytes(size)
        digest = sha256(data)
        path = directory / digest.removeprefix("sha256:")
        path.write_bytes(data)
        repository = f"soak/app-{number % images:02d}"
        layers[number % images].append(Blob(repository, digest, size, path))
    result = []
    for number, image_layers in layers.items():
        repository = f"soak/app-{number:02d}"
        config_json = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"soak.seed": seed, "soak.image": str(number)}},
                "rootfs": {"type": "layers", "diff_ids": []},
            },
            sort_keys=True,
        ).encode()
        config_digest = sha256(config_json)
        config_path = directory / config_digest.removeprefix("sha256:")
        config_path.write_bytes(config_json)
        config = Blob(repository, config_digest, len(config_json), config_path)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": _descriptor(CONFIG_TYPE, config),
            "layers": [_descriptor(LAYER_TYPE, blob) for blob in image_layers],
        }
        result.append(
            Image(
                repository=repository,
                tag="latest",
                manifest=json.dumps(manifest, indent=3).encode(),
                config=config,
                layers=tuple(image_layers),
            )
        )
    return Content(tuple(result))


def _descriptor(media_type: str, blob: Blob) -> dict[str, object]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


class SeedError(RuntimeError):
    """The registry refused an upload."""


async def push(registry_url: str, content: Content) -> None:
    """Upload every blob, then every manifest. Raises SeedError."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=UPLOADS_AT_ONCE)
    ) as session:
        blobs: Sequence[Blob] = [
            blob for image in content.images for blob in (image.config, *image.layers)
        ]
        gate = asyncio.Semaphore(UPLOADS_AT_ONCE)

        async def upload(blob: Blob) -> None:
            async with gate:
                await _upload_blob(session, registry_url, blob)

        await asyncio.gather(*(upload(blob) for blob in blobs))
        for image in content.images:
            url = f"{registry_url}/v2/{image.repository}/manifests/{image.tag}"
            async with session.put(
                url, data=image.manifest, headers={"Content-Type": MANIFEST_TYPE}
            ) as response:
                if response.status != 201:
                    raise SeedError(
                        f"PUT {url}: {response.status} {await response.text()}"
                    )


async def _upload_blob(
    session: aiohttp.ClientSession, registry_url: str, blob: Blob
) -> None:
    start = f"{registry_url}/v2/{blob.repository}/blobs/uploads/"
    async with session.post(start) as response:
        if response.status != 202:
            raise SeedError(f"POST {start}: {response.status}")
        location = response.headers["Location"]
    if location.startswith("/"):
        location = registry_url + location
    separator = "&" if "?" in location else "?"
    data = await asyncio.to_thread(blob.path.read_bytes)
    url = f"{location}{separator}digest={blob.digest}"
    async with session.put(
        url, data=data, headers={"Content-Type": "application/octet-stream"}
    ) as response:
        if response.status != 201:
            raise SeedError(f"PUT {url}: {response.status} {await response.text()}")
