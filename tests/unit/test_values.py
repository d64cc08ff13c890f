"""Parsers for values from the network: media types, bounded numbers, JSON."""

from __future__ import annotations

import pytest

from mirror.upstream.ratelimit import MAX_BUDGET, parse_ratelimit
from mirror.values import bounded_seconds, loads_json, media_type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", "application/json"),
        ("application/json; charset=utf-8", "application/json"),
        (
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.index.v1+json",
        ),
        ('text/plain;q="a \\" b"', "text/plain"),
        ("  a/b  ", "a/b"),
        ("a/b;", "a/b"),
    ],
)
def test_media_type_accepts(value: str, expected: str) -> None:
    assert media_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "application/vnd.oci.image.manifest.v1+json\x01x",
        "application/json\r\nX-Injected: 1",
        "appl\u00e9cation/json",
        "application/\udcffjson",  # what a non-UTF-8 byte decodes to
        "application",
        "application/",
        "/json",
        "a b/c",
        "a/b c",
        "a/b; q",
        'a/b; q="unterminated',
        "a/" + "x" * 200,
    ],
)
def test_media_type_rejects(value: str | None) -> None:
    with pytest.raises(ValueError, match="Content-Type"):
        media_type(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("1e308", 21600.0),
        ("9" * 400, None),
        ("inf", None),
        ("nan", None),
        ("-1", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ("", None),
        (None, None),
    ],
)
def test_bounded_seconds(text: str | None, expected: float | None) -> None:
    assert bounded_seconds(text, maximum=21600.0) == expected


def test_loads_json_never_raises_recursion_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json(deep)
    with pytest.raises(ValueError, match="Expecting value"):
        loads_json(b"<html>maintenance</html>")
    assert loads_json(b'{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100;w=21600", (100, 21600)),
        ("76", (76, None)),
        ("9" * 400, None),
        ("100;w=" + "9" * 400, (100, None)),
        ("99999999999999999", (MAX_BUDGET, None)),
        ("-1", None),
        ("garbage", None),
    ],
)
def test_ratelimit_numbers_are_bounded(
    value: str, expected: tuple[int, int | None] | None
) -> None:
    assert parse_ratelimit(value) == expected
