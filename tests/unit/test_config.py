"""Unit tests for mirror.config: parsers, TOML loading and env overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import (
    DOCKER_HUB,
    DOCKER_HUB_HOSTS,
    DOCKER_IO,
    Address,
    CacheConfig,
    Config,
    ConfigError,
    LogConfig,
    RegistryConfig,
    ServerConfig,
    UpstreamConfig,
    default_cache_dir,
    describe,
    env_name,
    load_config,
    parse_address,
    parse_bool,
    parse_duration,
    parse_patterns,
    parse_registry_host,
    parse_size,
    registry_env_name,
    registry_slug,
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
        ("10KB", 10_000),
        ("10kB", 10_000),
        ("3MB", 3_000_000),
        ("2TB", 2 * 1000**4),
        ("10KiB", 10 * 1024),
        ("512", 512),
        ("512B", 512),
        ("2 MiB", 2 * 1024**2),  # as `mirror status` prints sizes
        ("0", 0),
        (0, 0),
        (123456789, 123456789),
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        *("", "MiB", "-1", "-1MiB", "40XB", "1.5.5GB", "4 0MiB", "2  MiB"),
        *("50GB ", " 50GB", "50gib", "10kb", "512b", "50G", "1k", "50Gi", "1.5B"),
        *("1.5", "50_000", "1,5GB"),
        *(-1, 1.5, True, None),
    ],
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
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(value: object, expected: float) -> None:
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        *("", "90", "m", "5M", "-5s", "5 m", "1h 30m", "5x", "s5", "5s!", " 5m "),
        *("5m ", "5S", "5min", "1hr"),
        *(90, -1, 1.5, False, None),
    ],
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
    assert {"upstream.allow", "upstream.deny"} <= keys
    for key, env, _default, doc in rows:
        assert doc
        if key.startswith("registries."):
            continue  # see test_describe_names_registry_keys_by_placeholder
        section, name = key.split(".")
        assert env == env_name(section, name)


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
    path = write(tmp_path, '[cache]\ntag_ttl = "5m"\nbogus = "5m"\n')
    assert config_error(path, dict(PINNED)) == "unknown key cache.bogus"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[bogus]\ndir = '/x'\n")
    assert config_error(path, dict(PINNED)) == "unknown section [bogus]"


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'cache = "/x"\n')
    assert config_error(path, dict(PINNED)) == "[cache] must be a table"


def test_unknown_environment_variable() -> None:
    message = config_error(None, {**PINNED, "MIRROR_BOGUS": "5m"})
    assert message == "unknown environment variable MIRROR_BOGUS"


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


# --- issue 9: several upstream registries -------------------------------------

GHCR = 'registries."ghcr.io"'


def registry(config: Config, host: str) -> RegistryConfig:
    """The registry `host` of `config`, failing the test if it is absent."""
    found = [r for r in config.registries if r.host == host]
    assert len(found) == 1, [r.host for r in config.registries]
    return found[0]


def test_no_registries_by_default() -> None:
    config = load_config(None, dict(PINNED))
    assert config.registries == ()
    assert config.registry_configs() == (
        RegistryConfig(DOCKER_IO, config.upstream, 300.0, None),
    )


def test_docker_hub_hosts() -> None:
    assert DOCKER_IO == "docker.io"
    assert DOCKER_HUB_HOSTS == ("docker.io", "index.docker.io", "registry-1.docker.io")


def test_empty_registry_table_is_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[registries."quay.io"]\n'), dict(PINNED))
    assert config.registries == (
        RegistryConfig("quay.io", UpstreamConfig(url="https://quay.io"), 300.0, None),
    )


def test_registry_table_keys_are_parsed(tmp_path: Path) -> None:
    secret = tmp_path / "ghcr-token"
    secret.write_text("  from-file\n")
    path = write(
        tmp_path,
        f"""
        [registries."ghcr.io"]
        url = "https://ghcr.example/"
        username = "bot"
        password_file = "{secret}"
        trusted_realms = ["Auth.Example"]
        connect_timeout = "2s"
        read_timeout = "1m"
        first_byte_timeout = "3s"
        retries = 5
        retry_backoff = "1s"
        retry_max_time = "1m"
        down_backoff = "10s"
        resume_attempts = 1
        ratelimit_warn_below = 7
        allow = ["myorg/**", "tools/?q"]
        deny = ["myorg/secret"]
        tag_ttl = "1h"
        max_stale = "1d"
        """,
    )
    ghcr = registry(load_config(path, dict(PINNED)), "ghcr.io")
    assert ghcr == RegistryConfig(
        "ghcr.io",
        UpstreamConfig(
            url="https://ghcr.example",
            username="bot",
            password="from-file",
            password_file=secret,
            trusted_realms=("auth.example",),
            connect_timeout=2.0,
            read_timeout=60.0,
            first_byte_timeout=3.0,
            retries=5,
            retry_backoff=1.0,
            retry_max_time=60.0,
            down_backoff=10.0,
            resume_attempts=1,
            ratelimit_warn_below=7,
            allow=("myorg/**", "tools/?q"),
            deny=("myorg/secret",),
        ),
        3600.0,
        86400.0,
    )


def test_registry_defaults_are_built_in_not_upstreams(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [upstream]
        connect_timeout = "1s"
        read_timeout = "5s"
        retries = 9
        down_backoff = "1m"
        trusted_realms = ["auth.docker.io"]
        allow = ["library/*"]
        deny = ["library/evil"]

        [registries."quay.io"]
        """,
    )
    quay = registry(load_config(path, dict(PINNED)), "quay.io")
    assert quay.upstream == UpstreamConfig(url="https://quay.io")


def test_docker_hub_credentials_are_not_inherited(tmp_path: Path) -> None:
    hub_secret = tmp_path / "hub-token"
    hub_secret.write_text("hub-token\n")
    path = write(
        tmp_path,
        f"""
        [upstream]
        username = "hub-user"
        password_file = "{hub_secret}"

        [registries."ghcr.io"]
        """,
    )
    config = load_config(path, {**PINNED, "MIRROR_REGISTRIES": "quay.io"})
    assert config.upstream.password == "hub-token"
    for other in config.registries:
        assert other.upstream.username == ""
        assert other.upstream.password == ""
        assert other.upstream.password_file is None


def test_docker_hub_env_credentials_are_not_inherited() -> None:
    env = {
        **PINNED,
        "MIRROR_UPSTREAM_USERNAME": "hub-user",
        "MIRROR_UPSTREAM_PASSWORD": "hub-pass",
        "MIRROR_REGISTRIES": "ghcr.io",
    }
    ghcr = registry(load_config(None, env), "ghcr.io")
    assert (ghcr.upstream.username, ghcr.upstream.password) == ("", "")


def test_registry_carries_the_process_wide_bounds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [upstream]
        max_downloads = 8
        download_memory = "16MiB"
        max_body_size = "1MiB"
        [registries."ghcr.io"]
        """,
    )
    env = {**PINNED, "MIRROR_UPSTREAM_MAX_CONNECTIONS": "5"}
    ghcr = registry(load_config(path, env), "ghcr.io")
    assert ghcr.upstream.max_downloads == 8
    assert ghcr.upstream.max_connections == 5
    assert ghcr.upstream.max_body_size == 1024**2
    assert ghcr.upstream.download_memory == 16 * 1024**2


def test_registry_tag_keys_default_to_cache_after_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [cache]
        tag_ttl = "10m"
        max_stale = "2h"
        [registries."ghcr.io"]
        [registries."quay.io"]
        tag_ttl = "1m"
        """,
    )
    config = load_config(path, {**PINNED, "MIRROR_CACHE_TAG_TTL": "30s"})
    ghcr, quay = registry(config, "ghcr.io"), registry(config, "quay.io")
    assert (ghcr.tag_ttl, ghcr.max_stale) == (30.0, 7200.0)
    assert (quay.tag_ttl, quay.max_stale) == (60.0, 7200.0)


def test_registry_max_stale_can_be_unlimited_under_a_bounded_cache(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
        [cache]
        max_stale = "1h"
        [registries."ghcr.io"]
        max_stale = "unlimited"
        """,
    )
    assert registry(load_config(path, dict(PINNED)), "ghcr.io").max_stale is None


def test_registry_environment_wins_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [registries."registry.corp:5000"]
        url = "http://10.0.0.7:5000"
        retries = 2
        tag_ttl = "1h"
        allow = ["team/*"]
        """,
    )
    env = {
        **PINNED,
        "MIRROR_REGISTRY_REGISTRY_CORP_5000_RETRIES": "4",
        "MIRROR_REGISTRY_REGISTRY_CORP_5000_TAG_TTL": "5s",
        "MIRROR_REGISTRY_REGISTRY_CORP_5000_ALLOW": "team/**, ops/*",
        "MIRROR_REGISTRY_REGISTRY_CORP_5000_MAX_STALE": "1d",
    }
    corp = registry(load_config(path, env), "registry.corp:5000")
    assert corp.upstream.url == "http://10.0.0.7:5000"  # not overridden
    assert corp.upstream.retries == 4
    assert corp.upstream.allow == ("team/**", "ops/*")
    assert (corp.tag_ttl, corp.max_stale) == (5.0, 86400.0)


def test_registry_password_from_environment(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    env = {
        **PINNED,
        "MIRROR_REGISTRIES": "ghcr.io",
        "MIRROR_REGISTRY_GHCR_IO_USERNAME": "bot",
        "MIRROR_REGISTRY_GHCR_IO_PASSWORD_FILE": str(secret),
    }
    ghcr = registry(load_config(None, env), "ghcr.io")
    assert (ghcr.upstream.username, ghcr.upstream.password) == ("bot", "s3cret")


def test_mirror_registries_adds_registries_with_defaults() -> None:
    env = {**PINNED, "MIRROR_REGISTRIES": " quay.io , GHCR.io,,registry.k8s.io, "}
    config = load_config(None, env)
    assert [r.host for r in config.registries] == [
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
    ]
    assert registry(config, "registry.k8s.io").upstream == UpstreamConfig(
        url="https://registry.k8s.io"
    )


def test_mirror_registries_adds_to_the_files_tables(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."ghcr.io"]\nretries = 7\n')
    config = load_config(path, {**PINNED, "MIRROR_REGISTRIES": "ghcr.io,quay.io"})
    assert [r.host for r in config.registries] == ["ghcr.io", "quay.io"]
    assert registry(config, "ghcr.io").upstream.retries == 7  # one registry


def test_empty_mirror_registries_adds_nothing() -> None:
    assert load_config(None, {**PINNED, "MIRROR_REGISTRIES": ""}).registries == ()


@pytest.mark.parametrize(
    "variable",
    ["MIRROR_REGISTRY_GHCR_IO_URL", "MIRROR_REGISTRY_GHCR_IO_TAG_TTL"],
)
def test_variable_of_an_undefined_registry_is_unknown(variable: str) -> None:
    env = {**PINNED, "MIRROR_REGISTRIES": "quay.io", variable: "x"}
    with pytest.raises(ConfigError) as raised:
        load_config(None, env)
    # quay.io's variable is not offered: it is another registry.
    assert str(raised.value) == (
        f"unknown environment variable {variable} (no registry has the slug "
        'GHCR_IO: define it with [registries."<host>"] or MIRROR_REGISTRIES first)'
    )
    assert (raised.value.key, raised.value.suggestion) == (variable, None)


def test_unknown_key_variable_of_a_defined_registry() -> None:
    env = {**PINNED, "MIRROR_REGISTRIES": "ghcr.io", "MIRROR_REGISTRY_GHCR_IO_TTL": "1"}
    message = config_error(None, env)
    assert message == (
        "unknown environment variable MIRROR_REGISTRY_GHCR_IO_TTL "
        "(did you mean MIRROR_REGISTRY_GHCR_IO_TAG_TTL?)"
    )


def test_registry_variable_with_a_near_slug_is_pointed_to_it() -> None:
    env = {**PINNED, "MIRROR_REGISTRIES": "ghcr.io", "MIRROR_REGISTRY_GHCR_URL": "x"}
    with pytest.raises(ConfigError) as raised:
        load_config(None, env)
    assert raised.value.suggestion == "MIRROR_REGISTRY_GHCR_IO_URL"
    assert "did you mean MIRROR_REGISTRY_GHCR_IO_URL?" in str(raised.value)


@pytest.mark.parametrize(
    ("host", "slug"),
    [
        ("ghcr.io", "GHCR_IO"),
        ("registry.corp:5000", "REGISTRY_CORP_5000"),
        ("registry.k8s.io", "REGISTRY_K8S_IO"),
        ("my-registry.example", "MY_REGISTRY_EXAMPLE"),
        ("[::1]:5000", "___1__5000"),
    ],
)
def test_registry_slug(host: str, slug: str) -> None:
    assert registry_slug(host) == slug


def test_registry_env_name() -> None:
    assert (
        registry_env_name("ghcr.io", "password_file")
        == "MIRROR_REGISTRY_GHCR_IO_PASSWORD_FILE"
    )


def test_hosts_sharing_a_slug_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."a-b.io"]\n')
    message = config_error(path, {**PINNED, "MIRROR_REGISTRIES": "a.b.io"})
    assert '"a-b.io"' in message
    assert '"a.b.io"' in message
    assert "MIRROR_REGISTRY_A_B_IO_" in message


@pytest.mark.parametrize("host", [*DOCKER_HUB_HOSTS, "Docker.IO"])
def test_docker_hub_under_registries_points_to_upstream(
    tmp_path: Path, host: str
) -> None:
    message = config_error(write(tmp_path, f'[registries."{host}"]\n'), dict(PINNED))
    assert message.startswith(f'registries."{host}": ')
    assert "[upstream]" in message


def test_docker_hub_in_mirror_registries_points_to_upstream() -> None:
    message = config_error(None, {**PINNED, "MIRROR_REGISTRIES": "ghcr.io,docker.io"})
    assert message.startswith("MIRROR_REGISTRIES: ")
    assert "[upstream]" in message


@pytest.mark.parametrize(
    "key", ["max_downloads", "download_memory", "max_connections", "max_body_size"]
)
def test_process_wide_key_is_refused_per_registry(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f'[registries."ghcr.io"]\n{key} = 4\n')
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"{GHCR}.{key}: ")
    assert "whole process" in message
    assert "[upstream]" in message


def test_process_wide_variable_is_refused_per_registry() -> None:
    variable = "MIRROR_REGISTRY_GHCR_IO_MAX_DOWNLOADS"
    env = {**PINNED, "MIRROR_REGISTRIES": "ghcr.io", variable: "4"}
    message = config_error(None, env)
    assert message.startswith(f"{variable}: ")
    assert "[upstream]" in message


def test_unknown_registry_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."ghcr.io"]\nfoo = 1\n')
    assert config_error(path, dict(PINNED)) == f"unknown key {GHCR}.foo"


def test_unquoted_dotted_host_gets_a_hint(tmp_path: Path) -> None:
    # TOML reads [registries.ghcr.io] as host "ghcr" with a table "io".
    message = config_error(write(tmp_path, "[registries.ghcr.io]\n"), dict(PINNED))
    assert message.startswith('unknown key registries."ghcr".io')
    assert '[registries."ghcr.io"]' in message


def test_registries_must_be_a_table(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, 'registries = "ghcr.io"\n'), dict(PINNED))
    assert message == "[registries] must be a table"


def test_registry_must_be_a_table(tmp_path: Path) -> None:
    message = config_error(
        write(tmp_path, '[registries]\n"ghcr.io" = "yes"\n'), dict(PINNED)
    )
    assert message == f"{GHCR} must be a table"


def test_two_tables_for_one_host_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."ghcr.io"]\n[registries."GHCR.io"]\n')
    message = config_error(path, dict(PINNED))
    assert '"ghcr.io"' in message
    assert '"GHCR.io"' in message


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('tag_ttl = "soon"', "tag_ttl"),
        ("max_stale = 5", "max_stale"),
        ('url = "ftp://ghcr.io"', "url"),
        ("retries = -1", "retries"),
        ('allow = ["Upper/case"]', "allow"),
        ('deny = ["myorg/*", 3]', "deny"),
        ("trusted_realms = 3", "trusted_realms"),
    ],
)
def test_bad_registry_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    message = config_error(
        write(tmp_path, f'[registries."ghcr.io"]\n{toml}\n'), dict(PINNED)
    )
    assert message.startswith(f"{GHCR}.{key}: ")


def test_bad_registry_env_value_names_the_key() -> None:
    env = {
        **PINNED,
        "MIRROR_REGISTRIES": "ghcr.io",
        "MIRROR_REGISTRY_GHCR_IO_READ_TIMEOUT": "slow",
    }
    assert config_error(None, env).startswith(f"{GHCR}.read_timeout: ")


def test_registry_url_defaults_to_https_host(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[registries."registry.corp:5000"]\n[registries."[fd00::7]:5000"]\n',
    )
    config = load_config(path, dict(PINNED))
    urls = {r.host: r.upstream.url for r in config.registries}
    assert urls == {
        "registry.corp:5000": "https://registry.corp:5000",
        "[fd00::7]:5000": "https://[fd00::7]:5000",
    }


def test_userinfo_in_registry_url_names_the_registry_keys() -> None:
    env = {
        **PINNED,
        "MIRROR_REGISTRIES": "ghcr.io",
        "MIRROR_REGISTRY_GHCR_IO_URL": "https://bot:s3cret@ghcr.io",
    }
    message = config_error(None, env)
    assert message.startswith(f"{GHCR}.url: ")
    assert f"{GHCR}.username" in message
    assert f"{GHCR}.password" in message
    assert "upstream." not in message
    assert "s3cret" not in message


def test_registry_password_and_password_file_conflict(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("t\n")
    path = write(
        tmp_path,
        f"""
        [registries."ghcr.io"]
        username = "bot"
        password = "p"
        password_file = "{secret}"
        """,
    )
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"{GHCR}.password_file: ")


def test_registry_password_file_must_be_readable(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    path = write(
        tmp_path,
        f'[registries."ghcr.io"]\nusername = "bot"\npassword_file = "{missing}"\n',
    )
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"{GHCR}.password_file: cannot read")


@pytest.mark.parametrize(
    ("toml", "prefix"),
    [
        ('username = "bot"', f"{GHCR}.username: "),
        ('password = "p"', f"{GHCR}.password: set {GHCR}.username too"),
    ],
)
def test_registry_username_and_password_go_together(
    tmp_path: Path, toml: str, prefix: str
) -> None:
    message = config_error(
        write(tmp_path, f'[registries."ghcr.io"]\n{toml}\n'), dict(PINNED)
    )
    assert message.startswith(prefix)


def test_registry_ca_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    path = write(tmp_path, f'[registries."ghcr.io"]\nca_file = "{missing}"\n')
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"{GHCR}.ca_file: cannot read {missing}")


def test_registry_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    env = {
        **PINNED,
        "MIRROR_REGISTRIES": "registry.corp:5000",
        "MIRROR_REGISTRY_REGISTRY_CORP_5000_CA_FILE": str(garbage),
    }
    message = config_error(None, env)
    assert message.startswith(f'registries."registry.corp:5000".ca_file: {garbage}: ')
    assert "not a PEM CA bundle" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ghcr.io", "ghcr.io"),
        ("Ghcr.IO", "ghcr.io"),
        ("registry.corp:5000", "registry.corp:5000"),
        ("localhost", "localhost"),
        ("localhost:5000", "localhost:5000"),
        ("a-b.io", "a-b.io"),
        ("host:1", "host:1"),
        ("host:65535", "host:65535"),
        ("10.0.0.7:5000", "10.0.0.7:5000"),
        ("[::1]", "[::1]"),
        ("[FD00::7]:5000", "[fd00::7]:5000"),
    ],
)
def test_parse_registry_host_accepts(value: str, expected: str) -> None:
    assert parse_registry_host(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "bad_host",
        "a..b",
        "host:0",
        "host:99999",
        "host:65536",
        "host/path",
        "",
        ".io",
        "ghcr.io.",
        "-ghcr.io",
        "ghcr-.io",
        "host:",
        "host:+80",
        "host:05000",
        "::1",
        "[::1",
        "[zz::1]",
        "[::1]:0",
        "999.0.0.1",
        " ghcr.io",
        "https://ghcr.io",
        5000,
        None,
    ],
)
def test_parse_registry_host_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a registry host"):
        parse_registry_host(value)


def test_registry_host_is_lower_cased(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[registries."Ghcr.IO"]\n'), dict(PINNED))
    assert [(r.host, r.upstream.url) for r in config.registries] == [
        ("ghcr.io", "https://ghcr.io")
    ]


@pytest.mark.parametrize("host", ["bad_host", "a..b", "host:0", "host:99999"])
def test_bad_registry_host_in_file(tmp_path: Path, host: str) -> None:
    message = config_error(write(tmp_path, f'[registries."{host}"]\n'), dict(PINNED))
    assert message.startswith(f'registries."{host}": ')


def test_bad_registry_host_in_file_with_a_slash(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."host/path"]\n')
    assert config_error(path, dict(PINNED)).startswith('registries."host/path": ')


def test_bad_registry_host_in_mirror_registries() -> None:
    message = config_error(None, {**PINNED, "MIRROR_REGISTRIES": "ghcr.io,bad_host"})
    assert message.startswith("MIRROR_REGISTRIES: ")
    assert "bad_host" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["library/*", "myorg/**"], ("library/*", "myorg/**")),
        ("library/*,myorg/**", ("library/*", "myorg/**")),
        (" library/* , myorg/** ,", ("library/*", "myorg/**")),
        ("", ()),
        ([], ()),
        (["**"], ("**",)),
        (["alpine"], ("alpine",)),  # namespaces are docker.io's rule, not this
        (
            ["my_org/app.v2-x", "tools/?q", "a/**/b"],
            ("my_org/app.v2-x", "tools/?q", "a/**/b"),
        ),
    ],
)
def test_parse_patterns_accepts(value: object, expected: tuple[str, ...]) -> None:
    assert parse_patterns(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        [""],
        ["library/*", ""],
        ["Library/alpine"],
        ["library/alp ine"],
        ["library/[ab]"],
        ["library/alpine:3"],
        ["a/***"],
        ["/library/alpine"],
        ["library/"],
        ["library//alpine"],
        "library/*,MyOrg/*",
        [1],
        5,
        None,
        True,
    ],
)
def test_parse_patterns_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="pattern"):
        parse_patterns(value)


def test_upstream_allow_and_deny(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[upstream]\nallow = ["library/*", "myorg/**"]\ndeny = ["myorg/x"]\n',
    )
    config = load_config(path, dict(PINNED))
    assert config.upstream.allow == ("library/*", "myorg/**")
    assert config.upstream.deny == ("myorg/x",)
    assert load_config(None, dict(PINNED)).upstream.allow == ()
    assert load_config(None, dict(PINNED)).upstream.deny == ()


def test_upstream_allow_from_environment_wins(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\nallow = ["library/*"]\n')
    env = {**PINNED, "MIRROR_UPSTREAM_ALLOW": "library/*,myorg/**"}
    assert load_config(path, env).upstream.allow == ("library/*", "myorg/**")


def test_bad_upstream_pattern_names_the_key() -> None:
    message = config_error(None, {**PINNED, "MIRROR_UPSTREAM_DENY": "my org/*"})
    assert message.startswith("upstream.deny: ")


@pytest.mark.parametrize(
    ("key", "pattern"),
    [("allow", "alpine"), ("deny", "alpine"), ("allow", "*"), ("deny", "alp?ne")],
)
def test_docker_io_pattern_needs_a_namespace(
    tmp_path: Path, key: str, pattern: str
) -> None:
    path = write(tmp_path, f'[upstream]\n{key} = ["library/*", "{pattern}"]\n')
    message = config_error(path, dict(PINNED))
    assert message.startswith(f"upstream.{key}: ")
    assert f"write library/{pattern}, not {pattern}" in message


def test_docker_io_pattern_rule_applies_to_environment() -> None:
    message = config_error(None, {**PINNED, "MIRROR_UPSTREAM_ALLOW": "alpine"})
    assert message.startswith("upstream.allow: ")
    assert "namespace" in message


def test_docker_io_double_star_alone_is_fine() -> None:
    config = load_config(None, {**PINNED, "MIRROR_UPSTREAM_ALLOW": "**"})
    assert config.upstream.allow == ("**",)


def test_namespace_rule_is_docker_io_only(tmp_path: Path) -> None:
    path = write(tmp_path, '[registries."registry.corp:5000"]\nallow = ["app", "*"]\n')
    corp = registry(load_config(path, dict(PINNED)), "registry.corp:5000")
    assert corp.upstream.allow == ("app", "*")


def test_registry_configs_order_and_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [upstream]
        retries = 2
        [cache]
        tag_ttl = "2m"
        max_stale = "1h"
        [registries."registry.corp:5000"]
        [registries."quay.io"]
        tag_ttl = "9m"
        """,
    )
    config = load_config(path, {**PINNED, "MIRROR_REGISTRIES": "ghcr.io"})
    assert [r.host for r in config.registries] == [
        "ghcr.io",
        "quay.io",
        "registry.corp:5000",
    ]
    first, *rest = config.registry_configs()
    assert first == RegistryConfig("docker.io", config.upstream, 120.0, 3600.0)
    assert first.upstream.retries == 2
    assert tuple(rest) == config.registries
    assert registry(config, "quay.io").tag_ttl == 540.0


def test_registry_config_is_frozen() -> None:
    config = load_config(None, {**PINNED, "MIRROR_REGISTRIES": "ghcr.io"})
    with pytest.raises(AttributeError):
        config.registries[0].tag_ttl = 1.0  # type: ignore[misc]


def test_kubernetes_variables_still_exempt_with_registries() -> None:
    env = {
        **PINNED,
        "MIRROR_REGISTRIES": "ghcr.io",
        "MIRROR_SERVICE_HOST": "10.0.0.7",
        "MIRROR_PORT_5000_TCP_ADDR": "10.0.0.7",
    }
    assert load_config(None, env).registries[0].host == "ghcr.io"


def test_describe_names_registry_keys_by_placeholder() -> None:
    rows = {key: (env, default) for key, env, default, _doc in describe()}
    assert rows['registries."<host>"'][0] == "MIRROR_REGISTRIES"
    assert rows['registries."<host>".url'] == (
        "MIRROR_REGISTRY_<SLUG>_URL",
        "https://<host>",
    )
    assert rows['registries."<host>".password_file'][0] == (
        "MIRROR_REGISTRY_<SLUG>_PASSWORD_FILE"
    )
    assert rows['registries."<host>".tag_ttl'] == (
        "MIRROR_REGISTRY_<SLUG>_TAG_TTL",
        "[cache]'s",
    )
    assert rows['registries."<host>".max_stale'][1] == "[cache]'s"
    assert rows['registries."<host>".allow'][0] == "MIRROR_REGISTRY_<SLUG>_ALLOW"
    for key in (
        "max_downloads",
        "download_memory",
        "max_connections",
        "max_body_size",
        "dir",
    ):
        assert f'registries."<host>".{key}' not in rows


# --- strict values: what was probably meant, named ------------------------------


def refused(path: Path | None, environ: dict[str, str]) -> ConfigError:
    """Load, expect ConfigError, and return it after checking its message."""
    config_error(path, environ)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ)
    return info.value


@pytest.mark.parametrize(
    ("written", "reason", "suggestion"),
    [
        ('"50GB "', "a trailing space", "50GB"),
        ('" 50GB"', "a leading space", "50GB"),
        ('"50gib"', "units are case-sensitive", "50GiB"),
        ('"50GIB"', "units are case-sensitive", "50GiB"),
        ('"500mb"', "units are case-sensitive", "500MB"),
        ('"50Gi"', "write GiB", "50GiB"),
        ('"50G"', "a bare G is ambiguous: write GB (powers of 1000) or GiB", None),
        ('"50XB"', "unknown unit 'XB'", None),
        ('"-5GiB"', "cannot be negative", None),
        ("-5", "cannot be negative", None),
        ("1.5", "quote it, with a unit", None),
    ],
)
def test_a_size_mistake_names_key_value_forms_and_fix(
    tmp_path: Path, written: str, reason: str, suggestion: str | None
) -> None:
    error = refused(write(tmp_path, f"[cache]\nmax_size = {written}\n"), dict(PINNED))
    message = str(error)
    value = written.strip('"') if written.startswith('"') else written
    shown = repr(value) if written.startswith('"') else value
    assert message.startswith(f"cache.max_size: {shown} is not a size ({reason}")
    # The accepted forms, both families of units.
    assert "KB, MB, GB, TB: powers of 1000" in message
    assert "KiB, MiB, GiB, TiB: powers of 1024" in message
    assert (error.key, error.suggestion) == ("cache.max_size", suggestion)
    if suggestion is not None:
        assert f"did you mean {suggestion!r}?" in message
        fixed = write(tmp_path, f'[cache]\nmax_size = "{suggestion}"\n')
        assert load_config(fixed, dict(PINNED)).cache.max_size > 0


def test_decimal_and_binary_units_are_both_taken_and_differ() -> None:
    def size(text: str) -> int:
        return load_config(
            None, {**PINNED, "MIRROR_CACHE_MIN_FREE": text}
        ).cache.min_free

    assert size("1KB") == size("1kB") == 1000
    assert size("1KiB") == 1024
    assert size("1.5GB") == 1_500_000_000
    assert size("1.5GiB") == 1024**3 * 3 // 2
    assert size("50 GiB") == 50 * 1024**3
    assert size("53687091200") == 50 * 1024**3


def test_a_bad_value_from_the_environment_says_so() -> None:
    error = refused(None, {**PINNED, "MIRROR_CACHE_MAX_SIZE": "50gib"})
    assert str(error).startswith("cache.max_size: '50gib' is not a size")
    assert str(error).endswith("(from MIRROR_CACHE_MAX_SIZE)")
    assert error.suggestion == "50GiB"


@pytest.mark.parametrize("written", ["0", '"0"', '"0B"', '"0 GiB"', '"0.0MiB"'])
def test_a_cache_budget_of_zero_is_refused(tmp_path: Path, written: str) -> None:
    path = write(tmp_path, f"[cache]\nmax_size = {written}\n")
    message = config_error(path, dict(PINNED))
    assert message.startswith("cache.max_size: 0 leaves no room for any blob")
    assert "no no-caching mode" in message


def test_a_zero_body_limit_is_refused_and_zero_min_free_is_not() -> None:
    message = config_error(None, {**PINNED, "MIRROR_UPSTREAM_MAX_BODY_SIZE": "0"})
    assert message.startswith("upstream.max_body_size: 0 would refuse every")
    config = load_config(None, {**PINNED, "MIRROR_CACHE_MIN_FREE": "0"})
    assert config.cache.min_free == 0


@pytest.mark.parametrize(
    "key",
    [
        "server.header_timeout",
        "server.send_timeout",
        "upstream.connect_timeout",
        "upstream.read_timeout",
        "upstream.first_byte_timeout",
        "cache.eviction_interval",
    ],
)
def test_a_zero_timeout_or_interval_is_refused(key: str) -> None:
    section, name = key.split(".")
    message = config_error(None, {**PINNED, env_name(section, name): "0s"})
    assert message.startswith(f"{key}: 0 would ")


def test_a_registry_timeout_of_zero_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'[{GHCR}]\nread_timeout = "0"\n')
    assert config_error(path, dict(PINNED)).startswith(f"{GHCR}.read_timeout: 0 ")


def test_zero_durations_that_mean_something_are_kept() -> None:
    env = {
        **PINNED,
        "MIRROR_CACHE_TAG_TTL": "0",
        "MIRROR_SERVER_TLS_WATCH_INTERVAL": "0s",
        "MIRROR_UPSTREAM_RETRY_BACKOFF": "0ms",
    }
    config = load_config(None, env)
    assert config.cache.tag_ttl == 0
    assert config.server.tls_watch_interval == 0
    assert config.upstream.retry_backoff == 0


@pytest.mark.parametrize(
    ("written", "reason", "suggestion"),
    [
        ('"5m "', "a trailing space", "5m"),
        ('"5min"', "unknown unit 'min'", "5m"),
        ('"1hr30min"', "unknown unit 'hr'", "1h30m"),
        ('"1h 30m"', "no spaces inside a duration", "1h30m"),
        ('"5S"', "units are lower case", "5s"),
        ('"300"', "a duration needs a unit", "300s"),
        ("300", "a duration needs a unit", "300s"),
        ('"1M"', "M is not a unit: minutes are m; for months write days", None),
        ('"-5m"', "cannot be negative", None),
    ],
)
def test_a_duration_mistake_names_the_fix(
    tmp_path: Path, written: str, reason: str, suggestion: str | None
) -> None:
    error = refused(write(tmp_path, f"[cache]\ntag_ttl = {written}\n"), dict(PINNED))
    assert "is not a duration (" + reason in str(error)
    assert "use a number and a unit, e.g. 90s, 5m" in str(error)
    assert (error.key, error.suggestion) == ("cache.tag_ttl", suggestion)


@pytest.mark.parametrize(
    ("variable", "value", "reason", "suggestion"),
    [
        ("MIRROR_LOG_ACCESS_LOG", "True ", "a trailing space", "True"),
        ("MIRROR_LOG_ACCESS_LOG", "ture", None, "true"),
        ("MIRROR_LOG_LEVEL", "warn", None, "warning"),
        ("MIRROR_LOG_LEVEL", "info ", "a trailing space", "info"),
        ("MIRROR_CACHE_LOW_WATERMARK", "90", None, "90%"),
        ("MIRROR_CACHE_LOW_WATERMARK", "90% ", "a trailing space", "90%"),
        ("MIRROR_UPSTREAM_RETRIES", " 3", "a leading space", "3"),
        ("MIRROR_UPSTREAM_RETRIES", "-1", "cannot be negative", None),
        ("MIRROR_CACHE_DIR", "/srv/cache ", "a trailing space", "/srv/cache"),
        ("MIRROR_SERVER_LISTEN", ":5000 ", "a trailing space", ":5000"),
    ],
)
def test_other_values_are_strict_too(
    variable: str, value: str, reason: str | None, suggestion: str | None
) -> None:
    error = refused(None, {**PINNED, variable: value})
    message = str(error)
    assert message.startswith(f"{error.key}: {value!r} is not "), message
    if reason is not None:
        assert f"({reason}" in message
    assert error.suggestion == suggestion
    if suggestion is not None:
        assert f"did you mean {suggestion!r}?" in message
        assert load_config(None, {**PINNED, variable: suggestion}) is not None
    else:
        assert "did you mean" not in message


def test_booleans_and_levels_keep_their_spellings(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\naccess_log = "yes"\nlevel = "WARNING"\n')
    config = load_config(path, {**PINNED, "MIRROR_LOG_ACCESS_LOG": "off"})
    assert (config.log.access_log, config.log.level) == (False, "warning")
    assert load_config(path, dict(PINNED)).log.access_log is True


def test_a_url_with_a_stray_space_is_refused_without_echoing_it() -> None:
    error = refused(None, {**PINNED, "MIRROR_UPSTREAM_URL": "https://u:secret@r.io "})
    assert str(error).startswith("upstream.url: is not a URL (a trailing space)")
    assert "secret" not in str(error)


# --- unknown names: did you mean ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "suggestion"),
    [
        (
            '[cache]\nmaxsize = "50GiB"\n',
            "unknown key cache.maxsize (did you mean cache.max_size?)",
            "cache.max_size",
        ),
        (
            '[cache]\nttl = "5m"\n',
            "unknown key cache.ttl (did you mean cache.tag_ttl?)",
            "cache.tag_ttl",
        ),
        (
            '[upstream]\ntag_ttl = "5m"\n',
            "unknown key upstream.tag_ttl (did you mean cache.tag_ttl?)",
            "cache.tag_ttl",
        ),
        (
            "[cahce]\ndir = '/x'\n",
            "unknown section [cahce] (did you mean [cache]?)",
            "[cache]",
        ),
        (
            '[registry."ghcr.io"]\n',
            "unknown section [registry] (did you mean [registries]?)",
            "[registries]",
        ),
        (
            'max_size = "50GiB"\n',
            "unknown key max_size: it is in no section "
            "(did you mean cache.max_size, under [cache]?)",
            "cache.max_size",
        ),
        (
            f'[{GHCR}]\ntagttl = "1h"\n',
            f"unknown key {GHCR}.tagttl (did you mean {GHCR}.tag_ttl?)",
            f"{GHCR}.tag_ttl",
        ),
        (
            f'[{GHCR}]\nusername = "u"\npasword = "p"\n',
            f"unknown key {GHCR}.pasword (did you mean {GHCR}.password?)",
            f"{GHCR}.password",
        ),
    ],
)
def test_an_unknown_key_or_section_gets_a_suggestion(
    tmp_path: Path, text: str, message: str, suggestion: str
) -> None:
    error = refused(write(tmp_path, text), dict(PINNED))
    assert str(error) == message
    assert error.suggestion == suggestion


def test_an_unknown_key_with_nothing_close_gets_no_guess(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "[cache]\nzzz = 1\n"), dict(PINNED))
    assert (str(error), error.key, error.suggestion) == (
        "unknown key cache.zzz",
        "cache.zzz",
        None,
    )


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("MIRROR_CACHE_MAXSIZE", "MIRROR_CACHE_MAX_SIZE"),
        ("MIRROR_CACHE_MAX_SIZ", "MIRROR_CACHE_MAX_SIZE"),
        ("MIRROR_LOG_LVL", "MIRROR_LOG_LEVEL"),
        ("MIRROR_UPSTREAM_PASSWORDFILE", "MIRROR_UPSTREAM_PASSWORD_FILE"),
        ("MIRROR_REGISTRY", "MIRROR_REGISTRIES"),
    ],
)
def test_an_unknown_variable_gets_a_suggestion(variable: str, suggestion: str) -> None:
    error = refused(None, {**PINNED, variable: "1"})
    assert str(error) == (
        f"unknown environment variable {variable} (did you mean {suggestion}?)"
    )
    assert (error.key, error.suggestion) == (variable, suggestion)


def test_config_error_key_comes_from_the_message_or_is_none(tmp_path: Path) -> None:
    error = refused(None, {**PINNED, "MIRROR_SERVER_CLIENT_CA": "/x.pem"})
    assert error.key == "server.client_ca"
    error = refused(write(tmp_path, "[cache\n"), dict(PINNED))
    assert error.key is None
    assert ConfigError("mirror.toml: invalid TOML: ...").key is None
    error = refused(None, {**PINNED, "MIRROR_REGISTRIES": "docker.io"})
    assert error.key == "MIRROR_REGISTRIES"


def test_the_image_revision_variable_is_not_an_unknown_key() -> None:
    # deploy/Dockerfile sets it; mirror_build_info reads it.
    assert load_config(None, {**PINNED, "MIRROR_REVISION": "abc123"}) is not None
