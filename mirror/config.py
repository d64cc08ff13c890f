"""Configuration: one TOML file, every key overridable from the environment.

`load_config(path, environ)` returns a frozen `Config` or raises `ConfigError`
with a one-line message naming the offending key. The schema is the set of
dataclasses below; each field's metadata names the parser for its values, so
adding a key is adding a field. Every key `section.key` can be set by the
environment variable `MIRROR_<SECTION>_<KEY>` (upper case), which wins over
the file. Unknown keys and unknown `MIRROR_*` variables are errors, because a
typo silently ignored is an outage nobody can explain; the error names the
closest key or variable there is ("did you mean"). Values are parsed
strictly for the same reason: white space around a value, a unit in the
wrong case (`50gib`) or one tools read differently (`50G`) is refused with
the value probably meant, never read one way silently.

`[upstream]` configures Docker Hub; every other registry is a table
`[registries."<host>"]` keyed by the host clients use, whose keys are set from
the environment as `MIRROR_REGISTRY_<SLUG>_<KEY>` (see `registry_slug`).
`Config.registry_configs()` lists them all, Docker Hub first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.htpasswd import HtpasswdError, read_htpasswd
from mirror.tls import TlsError, server_context

DOCKER_HUB = "https://registry-1.docker.io"
DOCKER_IO = "docker.io"
# Host names that mean Docker Hub in a reference or an ?ns= value.
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
ENV_PREFIX = "MIRROR_"
REGISTRIES_ENV = "MIRROR_REGISTRIES"
REGISTRY_ENV_PREFIX = "MIRROR_REGISTRY_"
# What Kubernetes injects for a Service named "mirror" (MIRROR_SERVICE_HOST,
# MIRROR_PORT_5000_TCP_ADDR, ...): not ours, and no config key looks like it.
_KUBERNETES_SERVICE_VARIABLE = re.compile(r"^MIRROR_(SERVICE_[A-Z0-9_]+|PORT(_.*)?)$")
# Read by the program but no config key: the source revision the image was
# built from (mirror/__init__.py, for mirror_build_info).
REVISION_ENV = "MIRROR_REVISION"


class ConfigError(Exception):
    """A configuration value or key is wrong. The message is one line.

    `key` names what is wrong as the operator wrote it: a key
    (`cache.max_size`, `registries."ghcr.io".tag_ttl`), a section
    (`[cahce]`) or an environment variable when the variable itself is the
    problem; None when no one key is (an unreadable file). Without an
    explicit `key`, the key the message starts with (`cache.max_size: ...`)
    is taken. `suggestion` is what was probably meant (a key, a variable or
    a value), when one is close; the message says it too.
    """

    def __init__(
        self, message: str, *, key: str | None = None, suggestion: str | None = None
    ) -> None:
        super().__init__(message)
        if key is None:
            key = _key_of_message(message)
        self.key = key
        self.suggestion = suggestion


# `cache.max_size: ...`, `registries."ghcr.io".url: ...`, `MIRROR_REGISTRIES: ...`
_MESSAGE_KEY_RE = re.compile(
    r'((?:registries\."[^"]*"|[a-z_]+)(?:\.[a-z_]+)?|MIRROR_[A-Z0-9_]+): '
)


def _key_of_message(message: str) -> str | None:
    """The key or variable a message starts with, if it starts with one (and
    not with a file name such as `mirror.toml: invalid TOML`)."""
    match = _MESSAGE_KEY_RE.match(message)
    if match is None:
        return None
    key = match.group(1)
    first = key.split(".")[0]
    known = first in SECTIONS or first == "registries" or key.startswith(ENV_PREFIX)
    return key if known else None


@dataclass(frozen=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --- value parsers: str | int | bool from TOML or str from env -> typed value --
#
# Strict on purpose: a value that could mean two things, or carries stray
# white space, is refused with what was probably meant, rather than read one
# way silently. Parsers raise BadValue (a ValueError).


class BadValue(ValueError):
    """A value a parser refuses; `suggestion` is the value probably meant."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


def _refuse(
    value: object,
    what: str,
    forms: str | None,
    reason: str | None = None,
    suggestion: str | None = None,
) -> BadValue:
    """`'50gib' is not a size (units are case-sensitive; did you mean
    '50GiB'?): use ...`"""
    notes = [note for note in (reason, _did_you_mean(suggestion)) if note]
    text = f"{value!r} is not {what}"
    text += f" ({'; '.join(notes)})" if notes else ""
    text += f": use {forms}" if forms else ""
    return BadValue(text, suggestion)


def _did_you_mean(suggestion: str | None) -> str | None:
    return None if suggestion is None else f"did you mean {suggestion!r}?"


def _padding(text: str) -> str | None:
    """What is wrong with the white space around `text`, if anything."""
    leading, trailing = text != text.lstrip(), text != text.rstrip()
    if leading and trailing:
        return "spaces around it"
    if leading:
        return "a leading space"
    return "a trailing space" if trailing else None


def _suggest(text: str, fixed: str, parse: Callable[[str], object]) -> str | None:
    """`fixed` if it differs from `text` and `parse` takes it."""
    if fixed == text:
        return None
    try:
        parse(fixed)
    except ValueError:
        return None
    return fixed


def _close(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `word`, if one is close (difflib's 0.6)."""
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return matches[0] if matches else None


# Decimal units are powers of 1000 and IEC units powers of 1024, as everyone
# writes them; a bare K/M/G/T is refused, because tools disagree on it
# (Kubernetes' G is 10^9, systemd's and Docker's 2^30).
_SIZE_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
# What a unit written otherwise probably meant: other case, Kubernetes' Gi.
_SIZE_UNIT_FIXES = {
    **{unit.lower(): unit for unit in _SIZE_UNITS},
    **{f"{p}i": f"{p.upper()}iB" for p in "kmgt"},
    "bytes": "B",
    "byte": "B",
}
_AMBIGUOUS_SIZE_UNITS = frozenset("kmgt")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]*)")
_SIZE_FORMS = (
    "a whole number of bytes, or a number and a unit, e.g. 50GiB or 1.5TB "
    "(B; KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)"
)


def parse_size(value: object) -> int:
    """`40MiB`, `50GiB`, `1.5GB`, `512 KiB` or a whole number of bytes.

    Units are case-sensitive (`kB` is allowed for `KB`); one space may
    separate the number from its unit, as `mirror status` prints sizes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _refuse(value, "a size", _SIZE_FORMS, "cannot be negative")
        return value
    if not isinstance(value, str):
        reason = "quote it, with a unit" if isinstance(value, float) else None
        raise _refuse(value, "a size", _SIZE_FORMS, reason)
    try:
        return _size(value)
    except ValueError as exc:
        reason = str(exc) or None
    raise _refuse(
        value, "a size", _SIZE_FORMS, reason, _suggest(value, _fix_size(value), _size)
    )


def _size(text: str) -> int:
    """The strict grammar; raises ValueError with the reason (or none)."""
    if padding := _padding(text):
        raise ValueError(padding)
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError("cannot be negative" if text.startswith("-") else "")
    number, unit = match.groups()
    if unit and unit not in _SIZE_UNITS:
        lower = unit.lower()
        if lower in _AMBIGUOUS_SIZE_UNITS:
            upper = unit.upper()
            raise ValueError(
                f"a bare {unit} is ambiguous: write {upper}B (powers of 1000) "
                f"or {upper}iB (powers of 1024)"
            )
        if lower in _SIZE_UNIT_FIXES:
            fix = _SIZE_UNIT_FIXES[lower]
            raise ValueError(
                "units are case-sensitive" if fix.lower() == lower else f"write {fix}"
            )
        raise ValueError(f"unknown unit {unit!r}")
    factor = _SIZE_UNITS.get(unit, 1)
    if factor == 1 and "." in number:
        raise ValueError("not a whole number of bytes")
    return int(Decimal(number) * factor)


def _fix_size(text: str) -> str:
    """`text` with its probable mistakes undone (spaces, unit case)."""
    fixed = text.strip().replace("_", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)( ?)([A-Za-z]+)", fixed)
    if match and match.group(3) not in _SIZE_UNITS:
        unit = _SIZE_UNIT_FIXES.get(match.group(3).lower())
        if unit is not None:
            fixed = match.group(1) + match.group(2) + unit
    return fixed


def _nonzero_size(why: str) -> Callable[[object], int]:
    """parse_size, refusing 0 because `why`."""

    def parse(value: object) -> int:
        size = parse_size(value)
        if size == 0:
            raise BadValue(why)
        return size

    return parse


parse_cache_budget = _nonzero_size(
    "0 leaves no room for any blob, so every pull would fetch every layer "
    "from upstream again (the mirror has no no-caching mode); give a budget "
    "below the disk's size, e.g. 50GiB"
)
parse_body_limit = _nonzero_size(
    "0 would refuse every manifest and token; give a limit, e.g. 4MiB"
)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# What other ways of writing a unit probably meant. Not `M`: it may be meant
# as months.
_DURATION_UNIT_FIXES = {
    **{unit.upper(): unit for unit in _DURATION_UNITS if unit != "m"},
    **dict.fromkeys(["sec", "secs", "second", "seconds"], "s"),
    **dict.fromkeys(["min", "mins", "minute", "minutes"], "m"),
    **dict.fromkeys(["hr", "hrs", "hour", "hours"], "h"),
    **dict.fromkeys(["day", "days"], "d"),
    **dict.fromkeys(["msec", "msecs", "millisecond", "milliseconds"], "ms"),
}
_DURATION_FORMS = "a number and a unit, e.g. 90s, 5m, 1h30m (ms, s, m, h, d), or 0"


def parse_duration(value: object) -> float:
    """`90s`, `5m`, `1h30m`, `250ms`, `7d` or `0`; returns seconds."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise _refuse(
            value,
            "a duration",
            _DURATION_FORMS,
            "a duration needs a unit" if value > 0 else "cannot be negative",
            f"{value}s" if value > 0 else None,
        )
    if not isinstance(value, str):
        raise _refuse(value, "a duration", _DURATION_FORMS)
    try:
        return _duration(value)
    except ValueError as exc:
        reason = str(exc) or None
    fixed = _suggest(value, _fix_duration(value), _duration)
    raise _refuse(value, "a duration", _DURATION_FORMS, reason, fixed)


def _duration(text: str) -> float:
    """The strict grammar; raises ValueError with the reason (or none)."""
    if padding := _padding(text):
        raise ValueError(padding)
    if text == "0":
        return 0.0
    parts = _DURATION_RE.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if text.startswith("-"):
        raise ValueError("cannot be negative")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        raise ValueError("a duration needs a unit")
    if " " in text:
        raise ValueError("no spaces inside a duration")
    for unit in re.findall(r"[A-Za-z]+", text):
        if unit == "M":
            raise ValueError("M is not a unit: minutes are m; for months write days")
        if unit not in _DURATION_UNITS:
            raise ValueError(
                "units are lower case"
                if unit.lower() in _DURATION_UNITS
                else f"unknown unit {unit!r}"
            )
    raise ValueError("")


def _fix_duration(text: str) -> str:
    """`text` with its probable mistakes undone (spaces, unit spelling)."""
    fixed = re.sub(r"\s+", "", text)
    fixed = re.sub(
        r"(\d+(?:\.\d+)?)([A-Za-z]+)",
        lambda m: m.group(1) + _DURATION_UNIT_FIXES.get(m.group(2), m.group(2)),
        fixed,
    )
    if re.fullmatch(r"\d+(?:\.\d+)?", fixed) and fixed != "0":
        fixed += "s"
    return fixed


def _positive_duration(why: str) -> Callable[[object], float]:
    """parse_duration, refusing 0 because `why`."""

    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds == 0:
            raise BadValue(why)
        return seconds

    return parse


parse_timeout = _positive_duration(
    "0 would time out at once (or never); give a time, e.g. 30s"
)
parse_interval = _positive_duration(
    "0 would run passes back to back; give a time, e.g. 30s"
)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_BOOL_FORMS = "true or false (in the environment also yes/no, on/off, 1/0)"


def parse_bool(value: object) -> bool:
    """TOML's true/false, or (any case) true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    reason, suggestion = None, None
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        reason = _padding(value)
        suggestion = value.strip() if reason else _close(word, (*_TRUE, *_FALSE))
        if suggestion is not None and suggestion.lower() not in (*_TRUE, *_FALSE):
            suggestion = None
    elif isinstance(value, int) and value in (0, 1):
        suggestion = "true" if value else "false"
    raise _refuse(value, "a boolean", _BOOL_FORMS, reason, suggestion)


def parse_address(value: object) -> Address:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`; port 0 picks
    a free port (tests)."""
    if isinstance(value, str) and (padding := _padding(value)):
        raise _refuse(value, "host:port", None, padding, value.strip())
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if ":" in host and not bracketed:
            raise ValueError(f"{value!r} is not host:port (IPv6: [addr]:port)")
        host = host[1:-1] if bracketed else host
        host = host or "0.0.0.0"  # noqa: S104 - the documented default
        if sep and port.isdigit() and 0 <= int(port) < 65536:
            return Address(host, int(port))
    raise ValueError(f"{value!r} is not host:port (use e.g. 0.0.0.0:5000)")


def parse_url(value: object) -> str:
    """An http(s) URL without credentials in it.

    A `user:password@` part is refused without echoing the value: it would
    otherwise end up in logs and on /readyz.
    """
    return _parse_url(value, "upstream")


def _parse_url(value: object, owner: str) -> str:
    """parse_url, with the refusal of credentials naming `owner`'s keys."""
    if isinstance(value, str) and (padding := _padding(value)):
        # Not echoed: it may carry credentials.
        raise BadValue(f"is not a URL ({padding})")
    if isinstance(value, str):
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError("is not a valid URL (check the host and port)") from None
        if "@" in parts.netloc:
            raise ValueError(
                "must not carry credentials (user:password@); set "
                f"{owner}.username and {owner}.password (or password_file)"
            )
        if parts.scheme in {"http", "https"} and parts.hostname:
            return value.rstrip("/")
    raise ValueError(f"{value!r} is not an http(s) URL")


def parse_str(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{value!r} is not a non-empty string")


def parse_path(value: object) -> Path:
    """A file or directory; white space around it is refused (a stray space
    from an environment file would name another place)."""
    text = parse_str(value)
    if padding := _padding(text):
        raise _refuse(value, "a path", None, padding, text.strip() or None)
    return Path(text).expanduser()


def parse_choice(*choices: str) -> Callable[[object], str]:
    """One of `choices`, in any case."""

    def parse(value: object) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        reason, suggestion = None, None
        if isinstance(value, str):
            reason = _padding(value)
            suggestion = value.strip() if reason else _close(value.lower(), choices)
            if suggestion is not None and suggestion.lower() not in choices:
                suggestion = None
        raise _refuse(value, f"one of {', '.join(choices)}", None, reason, suggestion)

    return parse


_FRACTION_FORMS = "a share, e.g. 90% or 0.9"


def parse_fraction(value: object) -> float:
    """`90%` or `0.9`: a share strictly between 0 and 1 (1 itself allowed)."""
    number: float | None = None
    if isinstance(value, str) and (padding := _padding(value)):
        raise _refuse(value, "a share", _FRACTION_FORMS, padding, value.strip())
    if isinstance(value, str) and value.endswith("%"):
        with contextlib.suppress(ValueError):
            number = float(value[:-1]) / 100
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is not None and 0 < number <= 1:
        return number
    suggestion = None
    if number is not None and 1 < number <= 100 and not str(value).endswith("%"):
        suggestion = f"{value}%"  # 90 for 90%
    raise _refuse(value, "a share", _FRACTION_FORMS, None, suggestion)


def parse_int(value: object) -> int:
    """A whole number >= 0: digits only in a string."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        return int(value)
    reason, suggestion = None, None
    if isinstance(value, str) and (reason := _padding(value)):
        suggestion = _suggest(value, value.strip(), parse_int)
    elif isinstance(value, int | str) and str(value).startswith("-"):
        reason = "cannot be negative"
    raise _refuse(value, "a whole number >= 0", None, reason, suggestion)


def parse_positive_int(value: object) -> int:
    number = parse_int(value)
    if number < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return number


def parse_optional_duration(value: object) -> float | None:
    """A duration, or `unlimited` for no bound (None)."""
    if isinstance(value, str) and value.lower() in {"unlimited", "none"}:
        return None
    return parse_duration(value)


def parse_hosts(value: object) -> tuple[str, ...]:
    """Host names: a TOML array, or a comma-separated string (environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, list | tuple) and all(isinstance(i, str) for i in items):
        return tuple(i.strip().lower() for i in items if i.strip())
    raise ValueError(f"{value!r} is not a list of host names")


def parse_networks(
    value: object,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single addresses: a TOML
    array, or a comma-separated string (environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(i, str) for i in items
    ):
        raise ValueError(f"{value!r} is not a list of networks")
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not a network (use e.g. 10.0.0.0/8 or 192.0.2.7)"
            ) from None
    return tuple(networks)


# One component of a domain name in the reference grammar: letters, digits and
# inner hyphens. Matched after lower-casing.
_DOMAIN_COMPONENT = r"(?:[a-z0-9]|[a-z0-9][a-z0-9-]*[a-z0-9])"
_REGISTRY_HOST_RE = re.compile(
    rf"(?:(?P<name>{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*)"
    r"|\[(?P<ipv6>[0-9a-f:.]+)\])"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_DOTTED_QUAD_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


def parse_registry_host(value: object) -> str:
    """A registry host as a reference names it, lower-cased: `ghcr.io`,
    `registry.corp:5000`, `10.0.0.7:5000`, `[fd00::7]:5000`.

    The domain of the reference grammar: a host name, an IPv4 address or a
    bracketed IPv6 address, optionally with a port from 1 to 65535.
    """
    if isinstance(value, str):
        host = value.lower()
        match = _REGISTRY_HOST_RE.fullmatch(host)
        if match and _valid_host_parts(match):
            return host
    raise ValueError(
        f"{value!r} is not a registry host (use e.g. ghcr.io or registry.corp:5000)"
    )


def _valid_host_parts(match: re.Match[str]) -> bool:
    """The address and port checks a regular expression cannot make."""
    name, ipv6, port = match.group("name", "ipv6", "port")
    if port is not None and int(port) > 65535:
        return False
    try:
        if ipv6 is not None:
            ipaddress.IPv6Address(ipv6)
        elif _DOTTED_QUAD_RE.fullmatch(name):
            ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def registry_slug(host: str) -> str:
    """What stands for `host` in environment variable names: upper case, every
    character outside A-Z0-9 replaced by `_` (`registry.corp:5000` ->
    `REGISTRY_CORP_5000`)."""
    return re.sub(r"[^A-Z0-9]", "_", host.upper())


# Repository-name characters, plus the glob characters `*`, `?` (and `**`).
_PATTERN_RE = re.compile(r"[a-z0-9._/*?-]+")


def parse_patterns(value: object) -> tuple[str, ...]:
    """Repository globs for allow/deny: a TOML array of strings, or a
    comma-separated string (environment; empty items are skipped).

    A pattern is repository-name characters (`a-z 0-9 . _ / -`) with `*` and
    `?` (which do not cross `/`) and `**` (which does). Raises ValueError.
    """
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(i, str) for i in value):
        items = list(value)
    else:
        raise ValueError(f"{value!r} is not a list of repository patterns")
    for item in items:
        _check_pattern(item)
    return tuple(items)


def _check_pattern(pattern: str) -> None:
    """Raises ValueError for a pattern that is not one, or can never match."""
    if not _PATTERN_RE.fullmatch(pattern):
        raise ValueError(
            f"{pattern!r} is not a repository pattern "
            "(use a-z 0-9 . _ / - and the globs * ? **)"
        )
    if "***" in pattern:
        raise ValueError(f"{pattern!r} is not a repository pattern (* or **, not ***)")
    if "" in pattern.split("/"):
        # Repository names have no empty path component: this never matches.
        raise ValueError(
            f"{pattern!r} is not a repository pattern (no leading, trailing or //)"
        )


def parse_text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("is not a string")


def _key(
    parser: Callable[[object], Any], default: object, doc: str, *, secret: bool = False
) -> Any:
    """A config key: its parser, its default and one line for the docs."""
    return field(
        default=default, repr=not secret, metadata={"parse": parser, "doc": doc}
    )


# --- the schema ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    listen: Address = _key(
        parse_address,
        Address("0.0.0.0", 5000),  # noqa: S104 - all interfaces is the point
        "address and port to serve on",
    )
    max_connections: int = _key(
        parse_positive_int,
        2048,
        "client connections served at once; more get 503 and are closed",
    )
    header_timeout: float = _key(
        parse_timeout,
        30.0,
        "time a connection may take to send a request's headers (idle included)",
    )
    send_timeout: float = _key(
        parse_timeout,
        60.0,
        "longest a client may accept no response bytes before it is dropped",
    )
    tls_cert: Path | None = _key(
        parse_path,
        None,
        "PEM certificate (chain after it) to serve HTTPS with; needs tls_key",
    )
    tls_key: Path | None = _key(parse_path, None, "PEM private key of tls_cert")
    client_ca: Path | None = _key(
        parse_path,
        None,
        "PEM CA bundle: clients must present a certificate it issued (mTLS)",
    )
    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        parse_networks,
        (),
        "client networks (CIDRs) that may use the mirror; empty: every one",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        parse_networks,
        (),
        "proxies (CIDRs) whose X-Forwarded-For names the client",
    )
    max_requests_per_client: int = _key(
        parse_int,
        0,
        "requests one client address may have in flight; more get 429 (0: no bound)",
    )
    admin_listen: Address | None = _key(
        parse_address,
        None,
        "address for /metrics, /healthz and /readyz apart from the registry port",
    )
    admin_tls_cert: Path | None = _key(
        parse_path, None, "PEM certificate for HTTPS on admin_listen"
    )
    admin_tls_key: Path | None = _key(parse_path, None, "PEM key of admin_tls_cert")
    admin_allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        parse_networks,
        (),
        "networks (CIDRs) that may use admin_listen; empty: every one",
    )
    tls_watch_interval: float = _key(
        parse_duration,
        10.0,
        "how often the certificate files are checked for changes (0: never)",
    )


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = _key(parse_url, DOCKER_HUB, "registry to mirror")
    connect_timeout: float = _key(
        parse_timeout, 10.0, "time to open a TCP+TLS connection upstream"
    )
    read_timeout: float = _key(
        parse_timeout, 60.0, "longest silence while waiting for upstream bytes"
    )
    first_byte_timeout: float = _key(
        parse_timeout, 30.0, "longest wait from sending a request to its headers"
    )
    username: str = _key(parse_text, "", "Docker Hub user (or empty: anonymous)")
    password: str = _key(
        parse_text, "", "password or access token for username", secret=True
    )
    password_file: Path | None = _key(
        parse_path, None, "file holding the password (instead of password)"
    )
    ca_file: Path | None = _key(
        parse_path, None, "PEM bundle trusted for upstream TLS besides the system's"
    )
    trusted_realms: tuple[str, ...] = _key(
        parse_hosts,
        (),
        "token realm hosts trusted with credentials besides upstream's domain",
    )
    retries: int = _key(parse_int, 3, "attempts for an idempotent upstream request")
    retry_backoff: float = _key(
        parse_duration, 0.5, "first wait between attempts; doubles, with jitter"
    )
    retry_max_time: float = _key(
        parse_duration, 20.0, "give up retrying a request after this long"
    )
    down_backoff: float = _key(
        parse_duration, 5.0, "after upstream failed every attempt, fail fast this long"
    )
    resume_attempts: int = _key(
        parse_int, 3, "times a cut blob download is resumed with a Range request"
    )
    ratelimit_warn_below: int = _key(
        parse_int, 20, "log a warning when fewer pulls than this remain"
    )
    max_downloads: int = _key(
        parse_positive_int, 64, "blob downloads at once; more wait in a queue"
    )
    download_memory: int = _key(
        parse_size,
        64 * 1024**2,
        "blob bytes all downloads together hold in memory ahead of the disk",
    )
    max_connections: int = _key(
        parse_positive_int,
        32,
        "connections for manifest, tag and token requests (apart from blobs)",
    )
    max_body_size: int = _key(
        parse_body_limit,
        4 * 1024**2,
        "largest manifest, tag list, token or error body read into memory",
    )
    allow: tuple[str, ...] = _key(
        parse_patterns, (), "repositories served (globs); empty: every one"
    )
    deny: tuple[str, ...] = _key(
        parse_patterns, (), "repositories refused (globs); wins over allow"
    )


# Keys of [upstream] that bound the whole process, not one registry: a
# registry's UpstreamConfig carries [upstream]'s values of them.
_PROCESS_WIDE_KEYS = (
    "max_downloads",
    "download_memory",
    "max_connections",
    "max_body_size",
)


def small_blob_slots(max_downloads: int) -> int:
    """Download slots kept for small blobs (configs, small layers) on top of
    upstream.max_downloads, so a pull can start while big layers queue."""
    return max(2, max_downloads // 8)


@dataclass(frozen=True)
class CacheConfig:
    # The default depends on who runs us; load_config applies default_cache_dir().
    dir: Path = _key(
        parse_path, Path("/var/cache/mirror"), "where blobs and the database live"
    )
    tag_ttl: float = _key(
        parse_duration, 300.0, "how long a tag is served without asking upstream"
    )
    max_stale: float | None = _key(
        parse_optional_duration,
        None,
        "how old a cached tag may be and still be served when upstream fails",
    )
    max_size: int = _key(
        parse_cache_budget, 50 * 1024**3, "disk budget for cached blobs (bytes)"
    )
    min_free: int = _key(
        parse_size, 1024**3, "keep at least this much free on the cache's disk"
    )
    low_watermark: float = _key(
        parse_fraction, 0.9, "eviction frees space down to this share of max_size"
    )
    eviction_interval: float = _key(
        parse_interval, 30.0, "how often the eviction worker checks the budget"
    )


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path | None = _key(
        parse_path,
        None,
        "htpasswd file of bcrypt entries: /v2/ requests must log in as one",
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = _key(
        parse_choice("debug", "info", "warning", "error"), "info", "log level"
    )
    access_log: bool = _key(parse_bool, True, "log one line per HTTP request")
    format: str = _key(
        parse_choice("text", "json"),
        "text",
        "text for people, json for one object per line (docs/logging.md)",
    )


@dataclass(frozen=True)
class RegistryConfig:
    """One upstream registry as the mirror serves it."""

    # The name clients use, lower case: "docker.io", "ghcr.io", "registry.corp:5000".
    host: str
    # url, credentials, timeouts, retries, allow/deny; the process-wide bounds
    # (max_downloads, download_memory, max_connections, max_body_size) are
    # [upstream]'s.
    upstream: UpstreamConfig
    tag_ttl: float
    max_stale: float | None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    # Docker Hub, and the process-wide upstream bounds.
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Every registry other than docker.io, sorted by host.
    registries: tuple[RegistryConfig, ...] = ()

    def registry_configs(self) -> tuple[RegistryConfig, ...]:
        """docker.io first (from [upstream] and [cache]), then `registries`."""
        docker_io = RegistryConfig(
            DOCKER_IO, self.upstream, self.cache.tag_ttl, self.cache.max_stale
        )
        return (docker_io, *self.registries)


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "cache": CacheConfig,
    "auth": AuthConfig,
    "log": LogConfig,
}


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """`/var/cache/mirror` for root (a system service), else the XDG cache."""
    if os.geteuid() == 0:
        return Path("/var/cache/mirror")
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", "~")).expanduser() / ".cache"
    return base / "mirror"


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def registry_env_name(host: str, key: str) -> str:
    """`MIRROR_REGISTRY_<SLUG>_<KEY>`: the variable for one key of a registry."""
    return f"{REGISTRY_ENV_PREFIX}{registry_slug(host)}_{key.upper()}"


# Descriptions of a registry's keys where [upstream]'s speak of Docker Hub.
_REGISTRY_DOCS = {
    "url": "registry to mirror",
    "username": "user to pull as (or empty: anonymous)",
}


def _registry_keys() -> list[tuple[str, Callable[[object], Any], str, str]]:
    """(key, parser, default as documented, description) of every key a
    `[registries."<host>"]` table takes: [upstream]'s per-registry keys with
    their built-in defaults (never [upstream]'s values: Docker Hub's
    credentials must not go to another registry), and [cache]'s tag keys."""
    keys = []
    for f in dataclasses.fields(UpstreamConfig):
        if f.name not in _PROCESS_WIDE_KEYS:
            default = "https://<host>" if f.name == "url" else str(f.default)
            doc = _REGISTRY_DOCS.get(f.name, f.metadata["doc"])
            keys.append((f.name, f.metadata["parse"], default, doc))
    for f in dataclasses.fields(CacheConfig):
        if f.name in {"tag_ttl", "max_stale"}:
            keys.append((f.name, f.metadata["parse"], "[cache]'s", f.metadata["doc"]))
    return keys


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    load_certificates: bool = True,
) -> Config:
    """Read `path` (optional), apply `MIRROR_*` overrides from `environ`.

    Raises ConfigError for an unreadable file, bad TOML, an unknown section,
    key or variable, or a value its parser rejects; and for a certificate
    that does not load, unless not `load_certificates`.
    """
    environ = os.environ if environ is None else environ
    raw = _read_file(path) if path is not None else {}
    tables = _registry_tables(raw.pop("registries", {}), environ)
    _check_environment(environ, tables)

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        given = raw.pop(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{section}] must be a table")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = env_name(section, f.name)
            value: object = given.pop(f.name, None)
            value = environ.get(variable, value)
            if value is None:
                continue
            values[f.name] = _parse_value(
                f"{section}.{f.name}", f.metadata["parse"], value, variable, environ
            )
        if given:
            raise _unknown_key(section, sorted(given)[0], _field_names(cls))
        if section == "cache" and "dir" not in values:
            values["dir"] = default_cache_dir(environ)
        sections[section] = cls(**values)
    if raw:
        raise _unknown_section(sorted(raw)[0], raw[sorted(raw)[0]])
    _check_tls(sections["server"], load=load_certificates)
    _check_htpasswd(sections["auth"].htpasswd)
    upstream = _read_password(sections["upstream"], "upstream")
    _check_ca_file(upstream.ca_file, "upstream.ca_file")
    _check_docker_io_patterns(upstream)
    sections["upstream"] = upstream

    registries = tuple(
        _load_registry(host, tables[host], environ, upstream, sections["cache"])
        for host in sorted(tables)
    )
    return Config(**sections, registries=registries)


def _parse_value(
    key: str,
    parse: Callable[[object], Any],
    value: object,
    variable: str,
    environ: Mapping[str, str],
) -> Any:
    """`parse(value)` for `key`; the message says when the value came from
    the environment `variable`, not the file. Raises ConfigError."""
    try:
        return parse(value)
    except ValueError as exc:
        source = f" (from {variable})" if variable in environ else ""
        raise ConfigError(
            f"{key}: {exc}{source}",
            key=key,
            suggestion=getattr(exc, "suggestion", None),
        ) from None


def _field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(
    table: str, key: str, known: Iterable[str], *, elsewhere: bool = True
) -> ConfigError:
    """`unknown key cache.maxsize (did you mean cache.max_size?)`. `table` is
    the key's table as written (`cache`, `registries."ghcr.io"`); with
    `elsewhere`, a key of another section (`tag_ttl` under [upstream]) is
    pointed there."""
    close = _close(key.lower(), known)
    suggestion = None if close is None else f"{table}.{close}"
    if suggestion is None and elsewhere:
        suggestion = _home_of(key, table)
    note = "" if suggestion is None else f" (did you mean {suggestion}?)"
    return ConfigError(
        f"unknown key {table}.{key}{note}",
        key=f"{table}.{key}",
        suggestion=suggestion,
    )


def _home_of(key: str, besides: str | None = None) -> str | None:
    """`section.key` for the section (other than `besides`) that has `key`."""
    for section, cls in SECTIONS.items():
        if section != besides and key in _field_names(cls):
            return f"{section}.{key}"
    return None


def _unknown_section(name: str, value: object) -> ConfigError:
    """`unknown section [cahce] (did you mean [cache]?)`; a key written
    before any section header is pointed to its section."""
    if not isinstance(value, dict):
        home = _home_of(name)
        note = (
            ""
            if home is None
            else f" (did you mean {home}, under [{home.split('.')[0]}]?)"
        )
        return ConfigError(
            f"unknown key {name}: it is in no section{note}",
            key=name,
            suggestion=home,
        )
    close = _close(name.lower(), [*SECTIONS, "registries"])
    suggestion = None if close is None else f"[{close}]"
    note = "" if suggestion is None else f" (did you mean {suggestion}?)"
    return ConfigError(
        f"unknown section [{name}]{note}", key=f"[{name}]", suggestion=suggestion
    )


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _registry_tables(
    given: object, environ: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Host -> its table, from [registries] and MIRROR_REGISTRIES (which adds
    registries with default settings; a host in both is one registry).

    Raises ConfigError for a bad host, Docker Hub, or two hosts sharing a slug.
    """
    if not isinstance(given, dict):
        raise ConfigError("[registries] must be a table")
    tables: dict[str, dict[str, Any]] = {}
    written_as: dict[str, str] = {}
    for written, table in given.items():
        key = f'registries."{written}"'
        if not isinstance(table, dict):
            raise ConfigError(f"{key} must be a table")
        host = _registry_host(written, key)
        if host in tables:
            raise ConfigError(
                f'{key}: the same host as registries."{written_as[host]}"'
            )
        tables[host], written_as[host] = table, written
    for item in environ.get(REGISTRIES_ENV, "").split(","):
        if item.strip():
            tables.setdefault(_registry_host(item.strip(), REGISTRIES_ENV), {})

    slugs: dict[str, str] = {}
    for host in sorted(tables):
        slug = registry_slug(host)
        other = slugs.setdefault(slug, host)
        if other != host:
            raise ConfigError(
                f'registries."{other}" and registries."{host}" would share the '
                f"variables {REGISTRY_ENV_PREFIX}{slug}_*: configure only one"
            )
    return tables


def _registry_host(value: str, key: str) -> str:
    """A [registries] host; `key` names where it came from. Raises ConfigError."""
    try:
        host = parse_registry_host(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if host in DOCKER_HUB_HOSTS:
        raise ConfigError(
            f"{key}: {host} is Docker Hub; configure it in [upstream] "
            "(MIRROR_UPSTREAM_*), not under [registries]"
        )
    return host


def _process_wide(name: str) -> str:
    return (
        f"{name}: max_downloads, download_memory, max_connections and "
        "max_body_size bound the whole process, not one registry; set them in "
        "[upstream]"
    )


def _check_environment(
    environ: Mapping[str, str], tables: Mapping[str, object]
) -> None:
    """Every `MIRROR_*` variable must be a key's (or Kubernetes'). A registry's
    variables exist only for a registry the file or MIRROR_REGISTRIES defines.

    Raises ConfigError.
    """
    known = {REGISTRIES_ENV, REVISION_ENV}
    for section, cls in SECTIONS.items():
        known.update(env_name(section, f.name) for f in dataclasses.fields(cls))
    process_wide: set[str] = set()
    for host in tables:
        known.update(registry_env_name(host, key) for key, *_ in _registry_keys())
        process_wide.update(registry_env_name(host, k) for k in _PROCESS_WIDE_KEYS)
    for name in sorted(environ):
        if name in process_wide:
            raise ConfigError(_process_wide(name))
        if (
            name.startswith(ENV_PREFIX)
            and name not in known
            and not _KUBERNETES_SERVICE_VARIABLE.match(name)
        ):
            raise _unknown_variable(name, known, [registry_slug(h) for h in tables])


def _unknown_variable(
    name: str, known: Iterable[str], slugs: Iterable[str]
) -> ConfigError:
    """`unknown environment variable MIRROR_CACHE_MAXSIZE (did you mean
    MIRROR_CACHE_MAX_SIZE?)`. A registry's variable is matched by its slug
    first, so that a registry not defined is not taken for another one."""
    suggestion, note = None, ""
    key = _registry_variable_key(name)
    if key is not None:
        slug = name[len(REGISTRY_ENV_PREFIX) : -len(key) - 1]
        close = _close(slug, slugs)
        if close is not None:
            suggestion = f"{REGISTRY_ENV_PREFIX}{close}_{key}"
        else:
            note = (
                f" (no registry has the slug {slug}: define it with "
                '[registries."<host>"] or MIRROR_REGISTRIES first)'
            )
    else:
        # Compared without the prefix every name shares, which would make
        # any two names look alike.
        stems = {k[len(ENV_PREFIX) :]: k for k in known}
        close = _close(name[len(ENV_PREFIX) :], stems)
        suggestion = None if close is None else stems[close]
    if suggestion is not None:
        note = f" (did you mean {suggestion}?)"
    return ConfigError(
        f"unknown environment variable {name}{note}", key=name, suggestion=suggestion
    )


def _registry_variable_key(name: str) -> str | None:
    """`URL` for `MIRROR_REGISTRY_<SLUG>_URL`: the registry key a variable
    ends with, if it looks like a registry's variable (longest key first)."""
    if not name.startswith(REGISTRY_ENV_PREFIX):
        return None
    keys = sorted((key.upper() for key, *_ in _registry_keys()), key=len)
    for key in reversed(keys):
        if (
            name.endswith(f"_{key}")
            and len(name) > len(REGISTRY_ENV_PREFIX) + len(key) + 1
        ):
            return key
    return None


def _check_docker_io_patterns(upstream: UpstreamConfig) -> None:
    """docker.io names are matched in their `library/` form, so a pattern
    without a namespace would never match. Raises ConfigError."""
    for key in ("allow", "deny"):
        for pattern in getattr(upstream, key):
            if "/" not in pattern and pattern != "**":
                raise ConfigError(
                    f"upstream.{key}: {pattern!r}: docker.io names have a "
                    f"namespace: write library/{pattern}, not {pattern}"
                )


def _load_registry(
    host: str,
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    upstream: UpstreamConfig,
    cache: CacheConfig,
) -> RegistryConfig:
    """One registry from its table and its `MIRROR_REGISTRY_<SLUG>_*` variables
    (which win). Raises ConfigError."""
    prefix = f'registries."{host}"'
    given = dict(table)
    for key in _PROCESS_WIDE_KEYS:
        if key in given:
            raise ConfigError(_process_wide(f"{prefix}.{key}"))
    values: dict[str, Any] = {key: getattr(upstream, key) for key in _PROCESS_WIDE_KEYS}
    values["url"] = f"https://{host}"
    tag_ttl, max_stale = cache.tag_ttl, cache.max_stale
    for key, parse, _default, _doc in _registry_keys():
        value: object = given.pop(key, None)
        value = environ.get(registry_env_name(host, key), value)
        if value is None:
            continue
        if key == "url":
            parse = functools.partial(_parse_url, owner=prefix)
        variable = registry_env_name(host, key)
        parsed = _parse_value(f"{prefix}.{key}", parse, value, variable, environ)
        if key == "tag_ttl":
            tag_ttl = parsed
        elif key == "max_stale":
            max_stale = parsed
        else:
            values[key] = parsed
    if given:
        key = sorted(given)[0]
        if isinstance(given[key], dict):
            raise ConfigError(
                f"unknown key {prefix}.{key} "
                f'(quote a host with dots: [registries."{host}.{key}"])',
                key=f"{prefix}.{key}",
                suggestion=f'[registries."{host}.{key}"]',
            )
        raise _unknown_key(
            prefix, key, [k for k, *_ in _registry_keys()], elsewhere=False
        )
    registry_upstream = _read_password(UpstreamConfig(**values), prefix)
    _check_ca_file(registry_upstream.ca_file, f"{prefix}.ca_file")
    return RegistryConfig(host, registry_upstream, tag_ttl, max_stale)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, description) for every key.

    A registry's keys are named `registries."<host>".<key>` and
    `MIRROR_REGISTRY_<SLUG>_<KEY>`, with the placeholders as written.
    """
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    env_name(section, f.name),
                    str(f.default),
                    f.metadata["doc"],
                )
            )
    rows.append(
        (
            'registries."<host>"',
            REGISTRIES_ENV,
            "none",
            "another registry to serve, by the host clients use; the variable "
            "lists hosts (comma-separated) served with default settings",
        )
    )
    for key, _parse, default, doc in _registry_keys():
        rows.append(
            (
                f'registries."<host>".{key}',
                f"{REGISTRY_ENV_PREFIX}<SLUG>_{key.upper()}",
                default,
                doc,
            )
        )
    return rows


def _read_password(upstream: UpstreamConfig, owner: str) -> UpstreamConfig:
    """Resolve password_file into password; check the credentials add up.
    `owner` names the table in messages (`upstream`, `registries."ghcr.io"`).

    Raises ConfigError.
    """
    password = upstream.password
    if upstream.password_file is not None:
        if password:
            raise ConfigError(
                f"{owner}.password_file: give either password or password_file"
            )
        try:
            password = upstream.password_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{owner}.password_file: cannot read: {exc}") from None
    if bool(upstream.username) != bool(password):
        raise ConfigError(
            f"{owner}.username: username and password go together"
            if upstream.username
            else f"{owner}.password: set {owner}.username too"
        )
    return dataclasses.replace(upstream, password=password)


def _check_tls(server: ServerConfig, *, load: bool = True) -> None:
    """The listeners' certificates must load now, not at the first client
    (unless not `load`: a SIGHUP reloads them on its own, and a certificate
    mid-rotation must not hold back the rest of the configuration).

    Raises ConfigError.
    """
    if server.client_ca is not None and server.tls_cert is None:
        raise ConfigError("server.client_ca: needs tls_cert and tls_key (HTTPS)")
    _check_pair(server.tls_cert, server.tls_key, server.client_ca, "", load)
    _check_pair(server.admin_tls_cert, server.admin_tls_key, None, "admin_", load)
    admin = (server.admin_tls_cert, server.admin_tls_key, server.admin_allow_from)
    if server.admin_listen is None and any(admin):
        raise ConfigError("server.admin_listen: admin_* keys need admin_listen")
    if server.admin_listen is not None and server.admin_listen == server.listen:
        raise ConfigError("server.admin_listen: must differ from server.listen")


def _check_pair(
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
    prefix: str,
    load: bool,
) -> None:
    """A certificate and its key: both or neither, and they load."""
    if cert is None or key is None:
        if cert is not None or key is not None:
            missing = f"{prefix}tls_key" if key is None else f"{prefix}tls_cert"
            raise ConfigError(
                f"server.{missing}: {prefix}tls_cert and {prefix}tls_key go together"
            )
        return
    if not load:
        return
    try:
        server_context(cert, key, client_ca)
    except TlsError as exc:
        raise ConfigError(f"server.{prefix}tls_cert: {exc}") from None


def _check_htpasswd(path: Path | None) -> None:
    """The htpasswd file must load now. Raises ConfigError."""
    if path is None:
        return
    try:
        read_htpasswd(path)
    except HtpasswdError as exc:
        raise ConfigError(f"auth.htpasswd: {exc}") from None


def _check_ca_file(path: Path | None, key: str) -> None:
    """The CA bundle must load now, not at the first upstream request. `key`
    names it in messages. Raises ConfigError.
    """
    if path is None:
        return
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    # SSLError is an OSError: it must come first, or a file that was read but
    # holds no certificate would be reported as unreadable.
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or "no certificate found"
        raise ConfigError(f"{key}: {path}: not a PEM CA bundle ({reason})") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
