"""Units in log lines (mirror/logutil.py), the reload diff
(mirror/configdiff.py) and JSON lines (mirror/logformat.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from mirror.config import (
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_size,
)
from mirror.configdiff import changes
from mirror.logformat import JsonFormatter, formatter
from mirror.logutil import config_duration, config_size, human_size


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (90, "1m30s"),
        (600, "10m"),
        (5400, "1h30m"),
        (86400, "1d"),
        (90.5, "90.5s"),
    ],
)
def test_durations_read_as_written_and_parse_back(seconds: float, text: str) -> None:
    assert config_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (512, "512"),
        (1024, "1KiB"),
        (4 * 1024**2, "4MiB"),
        (50 * 1024**3, "50GiB"),
        (1_500_000_000, "1.5GB"),
        (6_293_622, "6293622"),
    ],
)
def test_sizes_read_as_written_and_parse_back(size: int, text: str) -> None:
    assert config_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (12 * 1024**2, "12.0 MiB"),
        (int(1.2 * 1024**3), "1.2 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_human_size_is_in_iec_units(size: int, text: str) -> None:
    assert human_size(size) == text


def test_the_reload_diff_names_each_key_and_hides_secrets(tmp_path: Path) -> None:
    old = load_config(
        None,
        {
            "MIRROR_CACHE_DIR": str(tmp_path),
            "MIRROR_UPSTREAM_USERNAME": "u",
            "MIRROR_UPSTREAM_PASSWORD": "hunter2",
            "MIRROR_REGISTRIES": "ghcr.io,quay.io",
        },
    )
    new = load_config(
        None,
        {
            "MIRROR_CACHE_DIR": str(tmp_path),
            "MIRROR_UPSTREAM_USERNAME": "u",
            "MIRROR_UPSTREAM_PASSWORD": "correct-horse",
            "MIRROR_REGISTRIES": "ghcr.io,gcr.io",
            "MIRROR_REGISTRY_GHCR_IO_TAG_TTL": "1m",
            "MIRROR_CACHE_MAX_STALE": "1h",
            "MIRROR_CACHE_MIN_FREE": "2GiB",
            "MIRROR_LOG_ACCESS_LOG": "false",
            "MIRROR_SERVER_ALLOW_FROM": "10.0.0.0/8,192.0.2.7",
        },
    )
    lines = [str(change) for change in changes(old, new)]
    assert lines == [
        'registries."gcr.io": added',
        'registries."quay.io": removed',
        'registries."ghcr.io".tag_ttl: 5m -> 1m',
        # Inherited from [cache]: what the registry now runs with.
        'registries."ghcr.io".max_stale: unlimited -> 1h',
        "server.allow_from: [] -> [10.0.0.0/8, 192.0.2.7/32]",
        "upstream.password: changed (secret, not shown)",
        "cache.max_stale: unlimited -> 1h",
        "cache.min_free: 1GiB -> 2GiB",
        "log.access_log: true -> false",
    ]
    assert changes(new, new) == []
    assert not any("hunter2" in line or "horse" in line for line in lines)


def test_a_password_file_change_is_a_password_change(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("first\n")
    environ = {
        "MIRROR_CACHE_DIR": str(tmp_path),
        "MIRROR_UPSTREAM_USERNAME": "u",
        "MIRROR_UPSTREAM_PASSWORD_FILE": str(secret),
    }
    old = load_config(None, environ)
    secret.write_text("second\n")
    new = load_config(None, environ)
    assert [str(c) for c in changes(old, new)] == [
        "upstream.password: changed (secret, not shown)"
    ]


def test_json_lines_are_one_ascii_object_each() -> None:
    record = logging.LogRecord(
        "mirror.x",
        logging.WARNING,
        __file__,
        1,
        "from %s",
        ("caf\u00e9\n\x1b[31m",),
        None,
    )
    line = formatter("json").format(record)
    assert isinstance(formatter("json"), JsonFormatter)
    assert all(" " <= c <= "~" for c in line), line
    entry = json.loads(line)
    assert entry["message"] == "from caf\u00e9\n\x1b[31m"
    assert (entry["level"], entry["logger"]) == ("warning", "mirror.x")
    assert entry["time"].endswith("Z")
    assert (
        formatter("text")
        .format(record)
        .endswith(" WARNING mirror.x: from caf\u00e9\n\x1b[31m")
    )


def test_log_format_is_text_or_json(tmp_path: Path) -> None:
    environ = {"MIRROR_CACHE_DIR": str(tmp_path)}
    assert load_config(None, environ).log.format == "text"
    config = load_config(None, {**environ, "MIRROR_LOG_FORMAT": "JSON"})
    assert config.log.format == "json"
    assert dataclasses.replace(Config().log, format="json").format == "json"
    with pytest.raises(ConfigError, match=r"log\.format"):
        load_config(None, {**environ, "MIRROR_LOG_FORMAT": "logfmt"})
