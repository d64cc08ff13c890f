"""Checks for values that arrive from the network, before anything uses them.

Upstream registries (and whatever sits between us and them) are peers, not
friends: a header or body may be malformed, huge or hostile. This module owns
the small parsers that turn such values into something safe or refuse them:

* `media_type`: a `Content-Type` per RFC 9110's grammar, ASCII only.
* `bounded_seconds`: a delay parsed without overflow and clamped to a sane
  range (rate-limit counts are parsed in upstream/ratelimit.py).
* `loads_json`: `json.loads` that cannot raise RecursionError.

Each raises ValueError (or returns None) on bad input; callers decide which
domain error that becomes. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# RFC 9110 5.6.2 token (tchar+), and 8.3.1 media-type = type "/" subtype parameters.
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_PARAMETER = rf"[ \t]*;[ \t]*(?:{_TCHARS}=(?:{_TCHARS}|{_QUOTED}))?"
_MEDIA_TYPE_RE = re.compile(rf"({_TCHARS})/({_TCHARS})(?:{_PARAMETER})*")
# RFC 6838 4.2: type and subtype names are at most 127 characters each.
_MAX_NAME = 127


def media_type(value: str | None) -> str:
    """`type/subtype` of a Content-Type header, parameters dropped.

    Raises ValueError when the value is missing, not ASCII, or not a media
    type by RFC 9110 (a control character, a space inside, no subtype...).
    """
    if not value:
        raise ValueError("no Content-Type")
    if not value.isascii():
        raise ValueError("Content-Type is not ASCII")
    match = _MEDIA_TYPE_RE.fullmatch(value.strip(" \t"))
    if not match:
        raise ValueError("Content-Type is not a media type")
    kind, subtype = match.group(1), match.group(2)
    if len(kind) > _MAX_NAME or len(subtype) > _MAX_NAME:
        raise ValueError("Content-Type is too long")
    return f"{kind}/{subtype}"


def bounded_seconds(text: str | None, *, maximum: float) -> float | None:
    """A delay in seconds (`Retry-After`'s delta-seconds form, or a decimal),
    finite, clamped to [0, maximum]; None if absent or malformed."""
    if text is None:
        return None
    text = text.strip()
    if not text or len(text) > 32 or not text.isascii():
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, maximum)


def loads_json(data: bytes | str) -> Any:
    """Parse JSON; raises ValueError for anything that is not JSON, including
    nesting too deep for the parser (RecursionError is never raised)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
