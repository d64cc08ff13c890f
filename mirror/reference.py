"""Repository names, tags and digests: parsing per the distribution spec.

Everything a client sends is checked here before it touches the disk or
upstream. Docker Hub's single-component names are normalised to
`library/<name>`, as the Docker CLI does, so `alpine` and `library/alpine`
share one cache entry; other registries' names are taken as they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# Algorithms we can verify, with the length of their hex encoding.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest we know how to verify, e.g. sha256:<64 hex>."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_name(name: str, *, official: str | None = "library") -> str:
    """A repository name; a single-component one goes under `official`
    (Docker Hub's `library/`), unless that is None (other registries).

    Raises NameInvalid.
    """
    normalised = name if "/" in name or official is None else f"{official}/{name}"
    if len(normalised) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid("invalid repository name", {"name": name})
    return normalised


def parse_tag(tag: str) -> str:
    """Raises TagInvalid."""
    if not _TAG_RE.fullmatch(tag):
        raise TagInvalid("invalid tag", {"tag": tag})
    return tag


def parse_digest(text: str) -> Digest:
    """Raises DigestInvalid for bad syntax or an algorithm we cannot verify."""
    if not _DIGEST_RE.fullmatch(text):
        raise DigestInvalid("invalid digest", {"digest": text})
    algorithm, _, encoded = text.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise DigestInvalid("unsupported digest algorithm", {"digest": text})
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise DigestInvalid("invalid digest", {"digest": text})
    return Digest(algorithm, encoded)


def names_a_registry(component: str) -> bool:
    """Docker's rule for the first component of an image name: a registry
    host if it has a `.` or a `:` or is `localhost` (no Docker Hub namespace
    has either character)."""
    return "." in component or ":" in component or component == "localhost"


def is_digest(reference: str) -> bool:
    """True when a manifest reference is a digest rather than a tag."""
    return ":" in reference


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference: a tag (str) or a Digest.

    Raises TagInvalid or DigestInvalid.
    """
    return parse_digest(reference) if is_digest(reference) else parse_tag(reference)
