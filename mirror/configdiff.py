"""What changed between two configurations, as a person would write it.

`changes(old, new)` lists every key whose value differs, with both values
in the units of the configuration file (`cache.tag_ttl: 10m -> 1m`,
`cache.max_size: 50GiB -> 20GiB`), for the reload log. Secrets (passwords,
which include what a password_file holds) are never shown: only that they
changed. Registry tables come as `registries."<host>"` (added or removed) and
`registries."<host>".<key>`. Which changes apply live is the app's to say.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mirror.config import (
    CacheConfig,
    Config,
    RegistryConfig,
    UpstreamConfig,
    describe,
)
from mirror.logutil import config_duration, config_size, escape

# What a changed secret logs instead of its values.
HIDDEN = "changed (secret, not shown)"
_REGISTRY_PREFIX = 'registries."<host>".'


@dataclass(frozen=True)
class Change:
    """One changed key: `key` as the docs name it, `text` what happened
    (`10m -> 1m`, `added`), and for a key of a registry table its name in
    the table (`tag_ttl`), else None."""

    key: str
    text: str
    registry_key: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"


def changes(old: Config, new: Config) -> list[Change]:
    """Registries added or removed, then each shared registry's changed keys
    (by host), then the changed keys of each section."""
    return [*_registry_changes(old, new), *_section_changes(old, new)]


def _section_changes(old: Config, new: Config) -> Iterator[Change]:
    for section in dataclasses.fields(old):
        if section.name == "registries":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        for key in dataclasses.fields(before):
            text = _difference(key, getattr(before, key.name), getattr(after, key.name))
            if text is not None:
                yield Change(f"{section.name}.{key.name}", text)


def _registry_changes(old: Config, new: Config) -> Iterator[Change]:
    before = {r.host: r for r in old.registries}
    after = {r.host: r for r in new.registries}
    for host in sorted(before.keys() ^ after.keys()):
        yield Change(f'registries."{host}"', "added" if host in after else "removed")
    fields = _registry_fields()
    for host in sorted(before.keys() & after.keys()):
        was, now = before[host], after[host]
        for name, (field, value) in fields.items():
            text = _difference(field, value(was), value(now))
            if text is not None:
                yield Change(f'registries."{host}".{name}', text, name)


def _registry_fields() -> dict[
    str, tuple[dataclasses.Field[Any], Callable[[RegistryConfig], object]]
]:
    """A registry table's keys (as config.describe() lists them): the field
    that parses each, and how to read its value off a RegistryConfig."""
    names = [
        key.removeprefix(_REGISTRY_PREFIX)
        for key, *_ in describe()
        if key.startswith(_REGISTRY_PREFIX)
    ]
    upstream = {f.name: f for f in dataclasses.fields(UpstreamConfig)}
    cache = {f.name: f for f in dataclasses.fields(CacheConfig)}
    fields: dict[
        str, tuple[dataclasses.Field[Any], Callable[[RegistryConfig], object]]
    ] = {}
    for name in names:
        if name in {"tag_ttl", "max_stale"}:
            fields[name] = (cache[name], _attribute(name))
        else:
            fields[name] = (upstream[name], _upstream_attribute(name))
    return fields


def _attribute(name: str) -> Callable[[RegistryConfig], object]:
    return lambda registry: getattr(registry, name)


def _upstream_attribute(name: str) -> Callable[[RegistryConfig], object]:
    return lambda registry: getattr(registry.upstream, name)


def _difference(
    field: dataclasses.Field[Any], before: object, after: object
) -> str | None:
    """`old -> new` for a key whose value changed, else None."""
    if before == after:
        return None
    if not field.repr:  # a secret (config._key(secret=True))
        return HIDDEN
    parse = field.metadata.get("parse")
    return f"{render(parse, before)} -> {render(parse, after)}"


def render(parse: object, value: object) -> str:
    """`value` as it would be written in the configuration, going by what
    the parser of its key takes (see _kind)."""
    kind = _kind(parse) if callable(parse) else None
    if value is None:
        return "unlimited" if kind == "duration" else "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "duration" and isinstance(value, int | float):
        return config_duration(value)
    if kind == "size" and isinstance(value, int):
        return config_size(value)
    if kind == "fraction" and isinstance(value, int | float):
        return f"{value * 100:g}%"
    if isinstance(value, tuple):
        return "[" + ", ".join(escape(str(item)) for item in value) + "]"
    if value == "":
        return '""'
    return escape(str(value))


@functools.cache
def _kind(parse: Callable[[object], object]) -> str | None:
    """ "size", "duration" or "fraction": the values a key's parser takes,
    found by asking it (a size key may have a parser of its own, with
    bounds, and still be a size)."""
    for kind, probe, expected in _PROBES:
        try:
            if parse(probe) == expected:
                return kind
        except (ValueError, TypeError, ArithmeticError):
            continue
    return None


# What a parser of each kind makes of a value only that kind takes.
_PROBES: tuple[tuple[str, str, object], ...] = (
    ("size", "3MiB", 3 * 1024**2),
    ("duration", "3m", 180.0),
    ("fraction", "30%", 0.3),
)
