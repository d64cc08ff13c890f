"""Unit tests for mirror.reference: names, tags and digests per the spec."""

from __future__ import annotations

import hashlib

import pytest

from mirror.errors import DigestInvalid, InvalidReference, NameInvalid, TagInvalid
from mirror.reference import (
    MAX_NAME_LENGTH,
    Digest,
    is_digest,
    parse_digest,
    parse_name,
    parse_reference,
    parse_tag,
)

HEX64 = "a" * 64
HEX128 = "0123456789abcdef" * 8

# --- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpine", "library/alpine"),
        ("library/alpine", "library/alpine"),
        ("bitnami/redis", "bitnami/redis"),
        ("a/b/c/d", "a/b/c/d"),
        ("my.org/app", "my.org/app"),
        ("a_b", "library/a_b"),
        ("a__b", "library/a__b"),
        ("a-b", "library/a-b"),
        ("a---b", "library/a---b"),
        ("a.b.c", "library/a.b.c"),
        ("0", "library/0"),
        ("9to5/x1", "9to5/x1"),
    ],
)
def test_valid_names(name: str, expected: str) -> None:
    assert parse_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alpine",
        "library/Alpine",
        "a..b",
        "a._b",
        "a-.b",
        "a___b",
        "a//b",
        "-a",
        "a-",
        ".a",
        "a.",
        "_a",
        "a_",
        "/a",
        "a/",
        "a/-b",
        "a b",
        "a:b",
        "a@b",
        "ä",
        "a\n",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        parse_name(name)
    assert info.value.detail == {"name": name}


def test_name_length_limit() -> None:
    longest = "/".join(["a" * 127, "b" * 127])
    assert len(longest) == MAX_NAME_LENGTH == 255
    assert parse_name(longest) == longest
    with pytest.raises(NameInvalid):
        parse_name(longest + "c")


def test_name_invalid_is_an_invalid_reference() -> None:
    with pytest.raises(InvalidReference):
        parse_name("UPPER")


# --- tags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["latest", "3.19", "v1.2.3-rc_1", "_private", "A", "0", "a" * 128]
)
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", ".hidden", "-dash", "a" * 129, "a/b", "a:b", "a b", "tag!", "ü"]
)
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        parse_tag(tag)
    assert info.value.detail == {"tag": tag}


# --- digests ----------------------------------------------------------------------


def test_sha256_digest() -> None:
    digest = parse_digest(f"sha256:{HEX64}")
    assert digest == Digest("sha256", HEX64)
    assert str(digest) == f"sha256:{HEX64}"


def test_sha512_digest() -> None:
    digest = parse_digest(f"sha512:{HEX128}")
    assert digest == Digest("sha512", HEX128)


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{HEX64.upper()}",
        f"sha256:{'A' + HEX64[1:]}",
        f"sha256:{HEX64[:-1]}",
        f"sha256:{HEX64}0",
        f"sha512:{HEX64}",
        f"sha256:{HEX128}",
        f"sha256:{'g' * 64}",
        "sha256:",
        f":{HEX64}",
        HEX64,
        f"SHA256:{HEX64}",
        f"sha256:{HEX64} ",
        f"sha256::{HEX64}",
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        parse_digest(text)
    assert info.value.detail == {"digest": text}


@pytest.mark.parametrize("text", [f"md5:{'a' * 32}", f"sha384:{'a' * 96}", "foo:bar"])
def test_unknown_algorithm_is_rejected(text: str) -> None:
    with pytest.raises(DigestInvalid, match="unsupported digest algorithm"):
        parse_digest(text)


def test_digest_of_and_hasher() -> None:
    data = b"hello mirror"
    digest = Digest.of(data)
    assert digest == Digest("sha256", hashlib.sha256(data).hexdigest())
    hasher = digest.hasher()
    hasher.update(data)
    assert hasher.hexdigest() == digest.hex
    assert Digest.of(data, "sha512").hex == hashlib.sha512(data).hexdigest()
    assert parse_digest(str(digest)) == digest


# --- references -------------------------------------------------------------------


def test_reference_tag() -> None:
    assert parse_reference("latest") == "latest"
    assert is_digest("latest") is False


def test_reference_digest() -> None:
    ref = parse_reference(f"sha256:{HEX64}")
    assert ref == Digest("sha256", HEX64)
    assert is_digest(f"sha256:{HEX64}") is True


def test_reference_bad_tag() -> None:
    with pytest.raises(TagInvalid):
        parse_reference(".bad")


def test_reference_with_colon_is_checked_as_a_digest() -> None:
    with pytest.raises(DigestInvalid):
        parse_reference("latest:x")
    with pytest.raises(DigestInvalid):
        parse_reference(f"sha256:{HEX64.upper()}")
