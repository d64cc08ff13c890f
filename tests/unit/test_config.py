"""Unit tests for mirror.config: parsers, TOML loading and env overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import (
    DOCKER_HUB,
    Address,
    CacheConfig,
    Config,
    ConfigError,
    LogConfig,
    ServerConfig,
    UpstreamConfig,
    default_cache_dir,
    describe,
    env_name,
    load_config,
    parse_address,
    parse_bool,
    parse_duration,
    parse_size,
)

# An environment that pins the cache dir, so results do not depend on the euid.
PINNED = {"MIRROR_CACHE_DIR": "/srv/mirror-cache"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirror.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: dict[str, str]) -> str:
    """Load, expect ConfigError, and return its message after checking it."""
    with pytest.raises(ConfigError) as info:
        load_config(path, environ)
    message = str(info.value)
    assert message
    assert "\n" not in message, f"ConfigError must be one line: {message!r}"
    return message


# --- parse_size -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40MiB", 40 * 1024**2),
        ("50GiB", 50 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1TiB", 1024**4),
        ("10kb", 10_000),
        ("10KiB", 10 * 1024),
        ("512", 512),
        ("512b", 512),
        (" 2 MiB ", 2 * 1024**2),
        (0, 0),
        (123456789, 123456789),
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value",
    ["", "MiB", "-1", "-1MiB", "40XB", "1.5.5GB", "4 0MiB", -1, 1.5, True, None],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(value)


def test_parse_size_decimal_is_exact() -> None:
    assert parse_size("1.005KB") == 1005


# --- parse_duration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("250ms", 0.25),
        ("1m500ms", 60.5),
        ("7d", 7 * 86400.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 5m ", 300.0),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(value: object, expected: float) -> None:
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    ["", "90", "m", "5M", "-5s", "5 m", "1h 30m", "5x", "s5", "5s!", 90, False, None],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)


# --- parse_bool -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("yes", True), ("ON", True), ("0", False)],
)
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", "", 1, 0, None])
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool(value)


# --- parse_address ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5000", Address("127.0.0.1", 5000)),
        ("localhost:8080", Address("localhost", 8080)),
        (":5000", Address("0.0.0.0", 5000)),  # noqa: S104 - the documented default
        ("[::1]:5000", Address("::1", 5000)),
        ("[::]:1", Address("::", 1)),
        ("host:65535", Address("host", 65535)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),  # a free port, for tests
    ],
)
def test_parse_address_accepts(value: str, expected: Address) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "localhost",
        "5000",
        "localhost:",
        "localhost:65536",
        "localhost:99999",
        "localhost:-1",
        "localhost:+80",
        "localhost:port",
        "",
        5000,
    ],
)
def test_parse_address_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        parse_address(value)


def test_parse_address_rejects_bare_ipv6() -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        parse_address("::1")


def test_address_str_brackets_ipv6() -> None:
    assert str(Address("::1", 5000)) == "[::1]:5000"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"


# --- load_config: defaults, file, environment -------------------------------------


def test_defaults_without_file() -> None:
    config = load_config(None, dict(PINNED))
    assert config.server.listen == Address("0.0.0.0", 5000)  # noqa: S104
    assert config.upstream.url == DOCKER_HUB
    assert config.upstream.connect_timeout == 10.0
    assert config.upstream.read_timeout == 60.0
    assert config.cache.dir == Path("/srv/mirror-cache")
    assert config.cache.tag_ttl == 300.0
    assert config.log.level == "info"
    assert config.log.access_log is True


def test_file_values_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        listen = "[::1]:5001"

        [upstream]
        url = "http://127.0.0.1:9000/"
        connect_timeout = "2s"
        read_timeout = "1m30s"

        [cache]
        dir = "/data/cache"
        tag_ttl = 0

        [log]
        level = "DEBUG"
        access_log = false
        """,
    )
    config = load_config(path, {})
    assert config == Config(
        server=ServerConfig(listen=Address("::1", 5001)),
        upstream=UpstreamConfig(
            url="http://127.0.0.1:9000", connect_timeout=2.0, read_timeout=90.0
        ),
        cache=CacheConfig(dir=Path("/data/cache"), tag_ttl=0.0),
        log=LogConfig(level="debug", access_log=False),
    )


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [cache]
        dir = "/from/file"
        tag_ttl = "10m"
        [log]
        access_log = true
        """,
    )
    config = load_config(
        path,
        {
            "MIRROR_CACHE_TAG_TTL": "30s",
            "MIRROR_LOG_ACCESS_LOG": "off",
            "MIRROR_SERVER_LISTEN": ":6000",
        },
    )
    assert config.cache.tag_ttl == 30.0
    assert config.cache.dir == Path("/from/file")  # not overridden: file value kept
    assert config.log.access_log is False
    assert config.server.listen == Address("0.0.0.0", 6000)  # noqa: S104


def test_unrelated_environment_is_ignored() -> None:
    config = load_config(None, {**PINNED, "PATH": "/bin", "MIRRORX": "1"})
    assert config.cache.dir == Path("/srv/mirror-cache")


def test_config_is_frozen() -> None:
    config = load_config(None, dict(PINNED))
    with pytest.raises(AttributeError):
        config.cache.tag_ttl = 1.0  # type: ignore[misc]


def test_env_name() -> None:
    assert env_name("cache", "tag_ttl") == "MIRROR_CACHE_TAG_TTL"


def test_describe_covers_every_key() -> None:
    rows = describe()
    keys = {row[0] for row in rows}
    assert {"server.listen", "cache.tag_ttl", "upstream.url", "log.level"} <= keys
    for key, env, _default, doc in rows:
        section, name = key.split(".")
        assert env == env_name(section, name)
        assert doc


# --- load_config: errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[cache]\ntag_ttl = "soon"\n', "cache.tag_ttl"),
        ("[cache]\ntag_ttl = 90\n", "cache.tag_ttl"),
        ('[cache]\ndir = ""\n', "cache.dir"),
        ('[server]\nlisten = "localhost:70000"\n', "server.listen"),
        ('[upstream]\nurl = "ftp://example.com"\n', "upstream.url"),
        ('[upstream]\nconnect_timeout = "fast"\n', "upstream.connect_timeout"),
        ('[log]\nlevel = "verbose"\n', "log.level"),
        ('[log]\naccess_log = "sometimes"\n', "log.access_log"),
    ],
)
def test_bad_file_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    # No MIRROR_CACHE_DIR here: it would win over the file's cache.dir.
    message = config_error(write(tmp_path, toml), {})
    assert message.startswith(f"{key}: ")


def test_bad_multiline_value_still_gives_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\ntag_ttl = """\nfive\nminutes"""\n')
    message = config_error(path, dict(PINNED))
    assert message.startswith("cache.tag_ttl: ")


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("MIRROR_CACHE_TAG_TTL", "soon", "cache.tag_ttl"),
        ("MIRROR_SERVER_LISTEN", "nowhere", "server.listen"),
        ("MIRROR_LOG_ACCESS_LOG", "perhaps", "log.access_log"),
        ("MIRROR_UPSTREAM_URL", "registry-1.docker.io", "upstream.url"),
    ],
)
def test_bad_env_value_names_the_key(variable: str, value: str, key: str) -> None:
    message = config_error(None, {**PINNED, variable: value})
    assert message.startswith(f"{key}: ")


def test_bad_env_value_wins_over_good_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\ntag_ttl = "5m"\n')
    message = config_error(path, {**PINNED, "MIRROR_CACHE_TAG_TTL": "x"})
    assert message.startswith("cache.tag_ttl: ")


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\ntag_ttl = "5m"\nttl = "5m"\n')
    assert config_error(path, dict(PINNED)) == "unknown key cache.ttl"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[cahce]\ndir = '/x'\n")
    assert config_error(path, dict(PINNED)) == "unknown section [cahce]"


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'cache = "/x"\n')
    assert config_error(path, dict(PINNED)) == "[cache] must be a table"


def test_unknown_environment_variable() -> None:
    message = config_error(None, {**PINNED, "MIRROR_CACHE_TTL": "5m"})
    assert message == "unknown environment variable MIRROR_CACHE_TTL"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[cache\ndir = \n")
    message = config_error(path, dict(PINNED))
    assert "invalid TOML" in message
    assert str(path) in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mirror.toml"
    path.write_bytes(b'[cache]\ndir = "\xff\xfe"\n')
    message = config_error(path, dict(PINNED))
    assert str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"cannot read {path}")


# --- default cache dir ------------------------------------------------------------


def test_default_cache_dir_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    env = {"XDG_CACHE_HOME": "/xdg", "HOME": "/home/u"}
    assert default_cache_dir(env) == Path("/var/cache/mirror")


def test_default_cache_dir_uses_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env = {"XDG_CACHE_HOME": "/xdg", "HOME": "/home/u"}
    assert default_cache_dir(env) == Path("/xdg/mirror")


def test_default_cache_dir_falls_back_to_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/mirror")
    # An empty XDG_CACHE_HOME means unset, per the XDG spec.
    env = {"XDG_CACHE_HOME": "", "HOME": "/home/u"}
    assert default_cache_dir(env) == Path("/home/u/.cache/mirror")


def test_load_config_applies_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    config = load_config(None, {"XDG_CACHE_HOME": "/xdg"})
    assert config.cache.dir == Path("/xdg/mirror")


def test_explicit_cache_dir_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config = load_config(None, {"MIRROR_CACHE_DIR": "/elsewhere"})
    assert config.cache.dir == Path("/elsewhere")


def test_kubernetes_service_variables_are_not_config_errors() -> None:
    injected = {
        "MIRROR_SERVICE_HOST": "10.0.0.7",
        "MIRROR_SERVICE_PORT": "5000",
        "MIRROR_SERVICE_PORT_HTTP": "5000",
        "MIRROR_PORT": "tcp://10.0.0.7:5000",
        "MIRROR_PORT_5000_TCP_ADDR": "10.0.0.7",
    }
    assert load_config(None, injected) == load_config(None, {})


# --- issue 8: secrets in the URL, the CA bundle, new bounds ---------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://ci-bot:s3cret@registry.example",
        "https://ci-bot@registry.example",
        "https://:s3cret@registry.example:443/",
    ],
)
def test_userinfo_in_upstream_url_is_a_one_line_error(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"MIRROR_UPSTREAM_URL": url})
    message = str(raised.value)
    assert message.startswith("upstream.url: ")
    assert "upstream.username" in message
    assert "upstream.password" in message
    assert "s3cret" not in message
    assert "ci-bot" not in message
    assert "\n" not in message


def test_ca_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"upstream\.ca_file: cannot read"):
        load_config(None, {"MIRROR_UPSTREAM_CA_FILE": str(missing)})


def test_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"upstream\.ca_file: .*ca\.pem"):
        load_config(None, {"MIRROR_UPSTREAM_CA_FILE": str(garbage)})


@pytest.mark.parametrize(
    "variable",
    [
        "MIRROR_SERVER_MAX_CONNECTIONS",
        "MIRROR_UPSTREAM_MAX_DOWNLOADS",
        "MIRROR_UPSTREAM_MAX_CONNECTIONS",
    ],
)
def test_bounds_must_be_at_least_one(variable: str) -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(None, {variable: "0"})


def test_bounds_have_busy_fleet_defaults() -> None:
    config = load_config(None, {})
    assert config.server.max_connections == 2048
    assert config.server.header_timeout == 30.0
    assert config.server.send_timeout == 60.0
    assert config.upstream.max_downloads == 64
    assert config.upstream.max_connections == 32
    assert config.upstream.max_body_size == 4 * 1024 * 1024
    assert config.upstream.ca_file is None
